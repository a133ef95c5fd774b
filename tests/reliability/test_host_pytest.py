"""A host project's own pytest run with the agent loaded (CONNWATCH_ENABLED=1): connwatch is
imported before pytest and ships a pytest plugin; a project with ``filterwarnings = error``
(urllib3's, for one) must not see pytest's "already imported, cannot be rewritten" warning."""

from __future__ import annotations

from pathlib import Path

from .conftest import run

TESTS = '''\
import socket

def test_passes():
    s = socket.socket()
    s.close()
    assert 1 + 1 == 2

def test_fails_with_introspection():
    values = [1, 2, 3]
    assert values == [1, 2, 4]
'''


def test_a_strict_warnings_project_runs_the_same_with_the_agent(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")
    (tmp_path / "test_host.py").write_text(TESTS)
    results = []
    for env in ({}, {"CONNWATCH_ENABLED": "1", "CONNWATCH_DIR": str(tmp_path / "snap")}):
        proc = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rN", "test_host.py"], cwd=tmp_path, **env)
        results.append(proc)
        assert proc.returncode == 1, proc.stdout + proc.stderr  # one test fails, on purpose
        assert "1 failed, 1 passed" in proc.stdout, proc.stdout
        assert "Warning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        # the project's own assertion rewriting still works
        assert "At index 2 diff: 3 != 4" in proc.stdout, proc.stdout
