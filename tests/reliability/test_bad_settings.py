"""Every setting given garbage (empty, blank, huge, negative, unicode, wrong type): no exception,
at most one warning naming the variable, and a value of the right type (the default or a valid
reading). Then a real app with every variable garbage at once: it runs unchanged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

import pytest

from connwatch import _config, _log

from .conftest import run, write_app

GARBAGE = ["", "   ", "-1", "-999999999999", "9" * 5000, "1e400", "nan", "0x1F", "💥ünïcødé", "\t,\t,",
           "true false", "[1, 2]", "{}", "None", "١٢", "2147483648"]
WRONG_TYPES: list = [True, -3, 2.5, float("nan"), [1, "a"], {"a": 1}, object(), b"bytes", ("x",), 10**40]

# What each field may hold after parsing garbage (besides its default).
TYPES: Dict[str, Any] = {
    "dir": str, "snapshot_interval": float, "exporters": tuple, "cap": (int, type(None)),
    "cap_per_callsite": (int, type(None)), "cap_per_upstream": (int, type(None)), "cap_mode": str,
    "disabled_patches": tuple, "library_paths": tuple, "app_paths": tuple, "traceback_depth": int,
    "span_events": bool, "max_callsites": int, "service": (str, type(None)), "prometheus_host": str,
    "prometheus_port": int,
}


def _check(cfg: _config.Config) -> None:
    for name, types in TYPES.items():
        value = getattr(cfg, name)
        assert isinstance(value, types), (name, value)
    assert cfg.cap_mode in _config.CAP_MODES
    assert set(cfg.exporters) <= set(_config.EXPORTERS)
    assert 0 <= cfg.snapshot_interval <= 86400 and cfg.snapshot_interval == cfg.snapshot_interval
    assert 1 <= cfg.traceback_depth <= _config.MAX_TRACEBACK_DEPTH
    assert 0 <= cfg.prometheus_port <= 65535
    assert 1 <= cfg.max_callsites <= 1_000_000
    for name in ("cap", "cap_per_callsite", "cap_per_upstream"):
        v = getattr(cfg, name)
        assert v is None or v >= 0


@pytest.mark.parametrize("key", sorted(_config._PARSERS))
def test_every_variable_with_garbage(key: str, caplog: pytest.LogCaptureFixture) -> None:
    var = _config._PARSERS[key][0]
    for raw in GARBAGE:
        _log.reset()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="connwatch"):
            cfg = _config.load({var: raw})
            again = _config.load({var: raw})
        assert cfg == again
        _check(cfg)
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) <= 1, (var, raw, msgs)
        assert all(var in m for m in msgs), (var, raw, msgs)


@pytest.mark.parametrize("key", sorted(_config._PARSERS))
def test_every_keyword_with_wrong_types(key: str, caplog: pytest.LogCaptureFixture) -> None:
    for raw in WRONG_TYPES + GARBAGE:
        _log.reset()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="connwatch"):
            cfg = _config.load({}, {key: raw})
        _check(cfg)
        assert len(caplog.records) <= 1, (key, raw, [r.getMessage() for r in caplog.records])


APP = '''\
import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
keep = [socket.create_connection(srv.getsockname()) for _ in range(3)]
print("app ok", len(keep))
'''


@pytest.mark.parametrize("raw", ["", "-1", "💥ünïcødé", "9" * 3000])
def test_a_real_app_with_every_variable_garbage(tmp_path: Path, raw: str) -> None:
    path, _ = write_app(tmp_path, APP)
    env = {var: raw for var, _parse in _config._PARSERS.values()}
    env["CONNWATCH_ENABLED"] = "1"
    plain = run([str(path)])
    proc = run([str(path)], cwd=tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == plain.stdout == "app ok 3\n"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("connwatch:")]
    for var, _parse in _config._PARSERS.values():
        assert sum(var + "=" in ln for ln in lines) <= 1, (var, proc.stderr)
