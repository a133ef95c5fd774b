"""``python -m connwatch``: the same as the ``connwatch`` command."""

import sys

from .cli import main

sys.exit(main())
