"""Load connwatch at interpreter start where .pth hooks are not allowed.

Put this folder first on PYTHONPATH (or copy this file into a folder that is): Python imports
``sitecustomize`` at start-up. The agent starts only when CONNWATCH_ENABLED is set, and the
``sitecustomize`` this file shadows (if any) still runs.
"""

import connwatch.bootstrap as _connwatch_bootstrap

_connwatch_bootstrap.auto_start(), _connwatch_bootstrap.chain_sitecustomize(__file__)
