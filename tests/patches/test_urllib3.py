"""urllib3: pools a manager makes are part of it, requests' internals are part of the Session,
the default pool made on import is labelled library, release never needs close()."""

from __future__ import annotations

import gc
import json
import textwrap
from typing import Any

import requests
import urllib3

from tests.conftest import run_py


def _here(agent: Any) -> dict:
    out: dict = {}
    for s in agent.snapshot().statistics():
        if s.kind != "socket" and s.site and s.site.file == __file__:
            out[s.kind] = out.get(s.kind, (0, 0))
            out[s.kind] = (out[s.kind][0] + s.live, out[s.kind][1] + s.created)
    return out


def test_pools_made_by_a_manager_are_part_of_it(agent: Any, http_server: Any) -> None:
    pm = urllib3.PoolManager(num_pools=1)  # evicts: each host switch drops a pool without close()
    for host in ("127.0.0.1", "localhost") * 3:
        assert pm.request("GET", f"http://{host}:{http_server.port}/").status == 200
    gc.collect()
    assert _here(agent) == {"urllib3.PoolManager": (1, 1)}
    assert not any(s.kind.startswith("urllib3.HTTP") for s in agent.snapshot().statistics())
    pm.clear()
    assert _here(agent) == {"urllib3.PoolManager": (0, 1)}


def test_module_functions_that_make_pools_count_at_the_caller(agent: Any, http_server: Any) -> None:
    pool = urllib3.connection_from_url(f"http://127.0.0.1:{http_server.port}/")
    proxy = urllib3.proxy_from_url(f"http://127.0.0.1:{http_server.port}/")
    assert _here(agent) == {"urllib3.HTTPConnectionPool": (1, 1), "urllib3.ProxyManager": (1, 1)}
    pool.close()
    proxy.clear()
    assert _here(agent) == {"urllib3.HTTPConnectionPool": (0, 1), "urllib3.ProxyManager": (0, 1)}


def test_requests_internal_proxy_manager_is_part_of_the_session(agent: Any, http_server: Any) -> None:
    proxy = f"http://127.0.0.1:{http_server.port}"
    s = requests.Session()
    s.trust_env = False
    for _ in range(3):
        assert s.get("http://example.invalid/x", proxies={"http": proxy}, timeout=10).status_code == 200
    assert _here(agent) == {"requests.Session": (1, 1)}
    s.close()
    assert _here(agent) == {"requests.Session": (0, 1)}


def test_default_pool_made_on_import_is_labelled_library(http_server: Any, tmp_path: Any) -> None:
    script = textwrap.dedent(f"""
        import json, connwatch
        connwatch.enable(snapshot_interval=0, dir={str(tmp_path)!r})
        import urllib3
        r = urllib3.request("GET", "http://127.0.0.1:{http_server.port}/")
        assert r.status == 200
        out = [[s.kind, s.site.file, s.site.line, s.site.library, s.live]
               for s in connwatch.snapshot().statistics() if s.kind != "socket"]
        print(json.dumps(out))
    """)
    proc = run_py(["-c", script], timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 1, rows
    kind, file, _line, library, live = rows[0]
    assert (kind, library, live) == ("urllib3.PoolManager", True, 1)
    assert file.endswith("urllib3/__init__.py")
