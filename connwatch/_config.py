"""Every CONNWATCH_* setting, parsed once into a frozen Config.

Precedence: keyword arguments to ``connwatch.enable()`` > environment > defaults. A bad value
gives one warning naming the setting, then the default: configuration never crashes the app.
"""

from __future__ import annotations

import os
import sys

from . import _log

# typing costs ~5 ms to import at interpreter start; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping, Optional, Tuple

ENABLED = "CONNWATCH_ENABLED"
DIR = "CONNWATCH_DIR"
SNAPSHOT_INTERVAL = "CONNWATCH_SNAPSHOT_INTERVAL"
EXPORTER = "CONNWATCH_EXPORTER"
CAP = "CONNWATCH_CAP"
CAP_PER_CALLSITE = "CONNWATCH_CAP_PER_CALLSITE"
CAP_PER_UPSTREAM = "CONNWATCH_CAP_PER_UPSTREAM"
CAP_MODE = "CONNWATCH_CAP_MODE"
DISABLED_PATCHES = "CONNWATCH_DISABLED_PATCHES"
LIBRARY_PATHS = "CONNWATCH_LIBRARY_PATHS"
APP_PATHS = "CONNWATCH_APP_PATHS"
TRACEBACK_DEPTH = "CONNWATCH_TRACEBACK_DEPTH"
SPAN_EVENTS = "CONNWATCH_SPAN_EVENTS"
RETAINERS = "CONNWATCH_RETAINERS"
MAX_CALLSITES = "CONNWATCH_MAX_CALLSITES"
SERVICE = "CONNWATCH_SERVICE"
PROMETHEUS_HOST = "CONNWATCH_PROMETHEUS_HOST"
PROMETHEUS_PORT = "CONNWATCH_PROMETHEUS_PORT"

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off", ""})
EXPORTERS = ("otlp", "prometheus", "console", "none")
CAP_MODES = ("warn", "raise")
MAX_TRACEBACK_DEPTH = 256


def env_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether CONNWATCH_ENABLED asks for the agent (1/true/yes/on, any case)."""
    env = os.environ if environ is None else environ
    return env.get(ENABLED, "").strip().lower() in TRUE


def default_dir() -> str:
    """``$XDG_RUNTIME_DIR/connwatch`` when that folder exists, else ``/tmp/connwatch-<uid>``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "connwatch")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    if os.name == "posix":  # tempfile costs milliseconds to import at start; this is its rule here
        tmp = next((os.environ[v] for v in ("TMPDIR", "TEMP", "TMP") if os.environ.get(v)), "/tmp")
    else:  # pragma: no cover
        import tempfile

        tmp = tempfile.gettempdir()
    return os.path.join(tmp, f"connwatch-{uid}")


def _service_from_env(env: Mapping[str, str]) -> str | None:
    name = env.get(SERVICE) or env.get("OTEL_SERVICE_NAME")
    if name:
        return name.strip() or None
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "service.name" and value.strip():
            return value.strip()
    return None


_FIELDS: Tuple[Tuple[str, object], ...] = (
    ("dir", None),  # None: default_dir()
    ("snapshot_interval", 10.0),
    ("exporters", ()),
    ("cap", None),
    ("cap_per_callsite", None),
    ("cap_per_upstream", None),
    ("cap_mode", "warn"),
    ("disabled_patches", ()),
    ("library_paths", ()),
    ("app_paths", ()),
    ("traceback_depth", 16),
    ("span_events", True),
    ("retainers", False),
    ("max_callsites", 1000),
    ("service", None),
    ("prometheus_host", "127.0.0.1"),
    ("prometheus_port", 9464),
)


class Config:
    """The agent's settings, after validation (immutable; a plain slotted class because
    importing dataclasses costs milliseconds at interpreter start)."""

    __slots__ = tuple(name for name, _ in _FIELDS)
    dir: str
    snapshot_interval: float
    exporters: Tuple[str, ...]
    cap: Optional[int]
    cap_per_callsite: Optional[int]
    cap_per_upstream: Optional[int]
    cap_mode: str
    disabled_patches: Tuple[str, ...]
    library_paths: Tuple[str, ...]
    app_paths: Tuple[str, ...]
    traceback_depth: int
    span_events: bool
    retainers: bool
    max_callsites: int
    service: Optional[str]
    prometheus_host: str
    prometheus_port: int

    def __init__(self, **values: Any) -> None:
        for name, default in _FIELDS:
            value = values.pop(name, default)
            if name == "dir" and value is None:
                value = default_dir()
            object.__setattr__(self, name, value)
        if values:
            raise TypeError(f"unknown settings: {', '.join(sorted(values))}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Config is immutable (cannot set {name!r})")

    def _values(self) -> Tuple[object, ...]:
        return tuple(getattr(self, name) for name, _ in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{name}={getattr(self, name)!r}" for name, _ in _FIELDS) + ")"


def _bad(name: str, raw: object, why: str, default: object) -> None:
    _log.warn_once(
        "config:" + name, "ignoring %s=%r (%s); using the default %r", name, raw, why, default
    )


def _int(name: str, raw: object, default: Optional[int], minimum: int, maximum: int = sys.maxsize) -> Optional[int]:
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return default
    if isinstance(raw, bool):
        _bad(name, raw, "expected a whole number", default)
        return default
    try:
        value = int(raw.strip()) if isinstance(raw, str) else int(raw)  # type: ignore[call-overload]
        if isinstance(raw, float) and raw != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        _bad(name, raw, "expected a whole number", default)
        return default
    if value < minimum or value > maximum:
        _bad(name, raw, f"expected a number from {minimum} to {maximum}", default)
        return default
    return value


def _float(name: str, raw: object, default: float, minimum: float, maximum: float) -> float:
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return default
    try:
        value = float(raw.strip()) if isinstance(raw, str) else float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        _bad(name, raw, "expected a number of seconds", default)
        return default
    if not (minimum <= value <= maximum) or value != value:
        _bad(name, raw, f"expected seconds from {minimum:g} to {maximum:g}", default)
        return default
    return value


def _bool(name: str, raw: object, default: bool) -> bool:
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE and text:
        return False
    _bad(name, raw, "expected 1/0, true/false, yes/no", default)
    return default


def _list(name: str, raw: object) -> Tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, (list, tuple, set, frozenset)):
        items = [str(x) for x in raw]
    else:
        _bad(name, raw, "expected a comma-separated list", ())
        return ()
    return tuple(x.strip() for x in items if x.strip())


def _exporters(raw: object, env: Mapping[str, str]) -> Tuple[str, ...]:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        endpoint = any(
            env.get(k)
            for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        )
        return ("otlp",) if endpoint else ()
    chosen = [x.lower() for x in _list(EXPORTER, raw)]
    unknown = [x for x in chosen if x not in EXPORTERS]
    if unknown:
        _bad(EXPORTER, raw, f"unknown exporter {unknown[0]!r}; choose from {', '.join(EXPORTERS)}", "none")
        return ()
    return tuple(dict.fromkeys(x for x in chosen if x != "none"))


def _mode(raw: object) -> str:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return "warn"
    text = str(raw).strip().lower()
    if text not in CAP_MODES:
        _bad(CAP_MODE, raw, "expected warn or raise", "warn")
        return "warn"
    return text


def _dir(raw: object) -> str:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default_dir()
    if not isinstance(raw, (str, os.PathLike)):
        _bad(DIR, raw, "expected a folder path", default_dir())
        return default_dir()
    return os.path.abspath(os.path.expanduser(os.fspath(raw)))


# keyword argument of enable() -> (environment variable, parser(raw, env))
_PARSERS: dict[str, tuple[str, Callable[[object, Mapping[str, str]], Any]]] = {
    "dir": (DIR, lambda raw, env: _dir(raw)),
    "snapshot_interval": (
        SNAPSHOT_INTERVAL,
        lambda raw, env: _float(SNAPSHOT_INTERVAL, raw, 10.0, 0.0, 86400.0),
    ),
    "exporters": (EXPORTER, _exporters),
    "cap": (CAP, lambda raw, env: _int(CAP, raw, None, 0)),
    "cap_per_callsite": (CAP_PER_CALLSITE, lambda raw, env: _int(CAP_PER_CALLSITE, raw, None, 0)),
    "cap_per_upstream": (CAP_PER_UPSTREAM, lambda raw, env: _int(CAP_PER_UPSTREAM, raw, None, 0)),
    "cap_mode": (CAP_MODE, lambda raw, env: _mode(raw)),
    "disabled_patches": (DISABLED_PATCHES, lambda raw, env: _list(DISABLED_PATCHES, raw)),
    "library_paths": (LIBRARY_PATHS, lambda raw, env: _list(LIBRARY_PATHS, raw)),
    "app_paths": (APP_PATHS, lambda raw, env: _list(APP_PATHS, raw)),
    "traceback_depth": (
        TRACEBACK_DEPTH,
        lambda raw, env: _int(TRACEBACK_DEPTH, raw, 16, 1, MAX_TRACEBACK_DEPTH),
    ),
    "span_events": (SPAN_EVENTS, lambda raw, env: _bool(SPAN_EVENTS, raw, True)),
    "retainers": (RETAINERS, lambda raw, env: _bool(RETAINERS, raw, False)),
    "max_callsites": (MAX_CALLSITES, lambda raw, env: _int(MAX_CALLSITES, raw, 1000, 1, 1_000_000)),
    "service": (SERVICE, lambda raw, env: (str(raw).strip() or None) if raw is not None else _service_from_env(env)),
    "prometheus_host": (PROMETHEUS_HOST, lambda raw, env: (str(raw).strip() or "127.0.0.1") if raw is not None
                        else "127.0.0.1"),
    "prometheus_port": (PROMETHEUS_PORT, lambda raw, env: _int(PROMETHEUS_PORT, raw, 9464, 0, 65535)),
}
_ALIASES = {"exporter": "exporters"}


def load(environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None) -> Config:
    """Build the Config from ``environ`` (default ``os.environ``) and keyword overrides."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key, raw in (overrides or {}).items():
        key = _ALIASES.get(key, key)
        if key not in _PARSERS:
            _log.warn_once("config-kw:" + key, "enable() got an unknown setting %r; ignored", key)
            continue
        values[key] = _PARSERS[key][1](raw, env)
    for key, (var, parse) in _PARSERS.items():
        if key not in values:
            raw = env.get(var)
            values[key] = parse(raw, env)
    return Config(**values)
