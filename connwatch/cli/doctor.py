"""``connwatch doctor``: will the agent load here? Each problem with its fix."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from .. import _config
from ._load import snapshot_dir
from ._render import EXIT_FAIL, EXIT_OK, PLAIN, Style, use_colour

OK, INFO, WARN, PROBLEM = "ok", "info", "warn", "problem"


def _check(name: str, status: str, message: str, fix: Optional[str] = None) -> Dict[str, Any]:
    return {"check": name, "status": status, "message": message, "fix": fix}


def _site_dirs() -> List[str]:
    import site

    dirs: List[str] = []
    try:
        dirs += list(site.getsitepackages())
    except AttributeError:  # pragma: no cover - old virtualenv site.py
        pass
    try:
        user = site.getusersitepackages()
        if isinstance(user, str):
            dirs.append(user)
    except AttributeError:  # pragma: no cover
        pass
    return list(dict.fromkeys(dirs))


def check_pth() -> Dict[str, Any]:
    """Is the ``connwatch.pth`` start-up hook in a site-packages folder this Python reads?"""
    import site

    fix = f"reinstall the package into this Python: {sys.executable} -m pip install --force-reinstall connwatch"
    if sys.flags.no_site:
        return _check("pth hook", PROBLEM, "Python runs with -S (no site module): .pth hooks are not read",
                      "drop -S, or call connwatch.enable() from the app")
    user_site = getattr(site, "USER_SITE", None)
    for folder in _site_dirs():
        path = os.path.join(folder, "connwatch.pth")
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            return _check("pth hook", PROBLEM, f"{path} is not readable ({e.strerror or e})", fix)
        if "connwatch.bootstrap" not in text or "auto_start" not in text:
            return _check("pth hook", PROBLEM, f"{path} is not connwatch's start-up hook", fix)
        if folder == user_site and not site.ENABLE_USER_SITE:
            return _check("pth hook", PROBLEM, f"{path} is in the user site folder, which this Python skips "
                          "(PYTHONNOUSERSITE or -s)", "install into the environment instead: pip install connwatch")
        return _check("pth hook", OK, f"{path} loads the agent when CONNWATCH_ENABLED is set")
    return _check("pth hook", PROBLEM, "no connwatch.pth in " + (", ".join(_site_dirs()) or "any site-packages"),
                  fix + "  (or use sitecustomize_example/sitecustomize.py where .pth hooks are forbidden)")


def check_enabled() -> Dict[str, Any]:
    """Is CONNWATCH_ENABLED set to a value that turns the agent on?"""
    raw = os.environ.get(_config.ENABLED)
    if raw is None:
        return _check("CONNWATCH_ENABLED", PROBLEM, "not set: the agent stays off in processes started from here",
                      "export CONNWATCH_ENABLED=1  (or run the app with: connwatch run -- CMD)")
    if _config.env_enabled():
        return _check("CONNWATCH_ENABLED", OK, f"set to {raw!r}: the agent starts in every Python process")
    return _check("CONNWATCH_ENABLED", PROBLEM, f"set to {raw!r}, which means off (on is 1, true, yes or on)",
                  "export CONNWATCH_ENABLED=1")


def check_dependencies() -> Dict[str, Any]:
    """Can the agent count open descriptors? It needs no other third-party package: /proc,
    else psutil."""
    import importlib.util

    has_psutil = importlib.util.find_spec("psutil") is not None
    if os.path.isdir("/proc/self/fd"):
        return _check("dependencies", OK, "fd counts from /proc" + (" (psutil importable)" if has_psutil else ""))
    if not has_psutil:
        return _check("dependencies", WARN, "psutil is missing and /proc is not available: fd counts unknown",
                      f"{sys.executable} -m pip install psutil")
    return _check("dependencies", OK, "fd counts from psutil (/proc is not available)")


def _sitecustomizes() -> List[str]:
    out = []
    for entry in sys.path:
        folder = os.path.abspath(entry or ".")
        for candidate in (os.path.join(folder, "sitecustomize.py"),
                          os.path.join(folder, "sitecustomize", "__init__.py")):
            if os.path.isfile(candidate):
                out.append(candidate)
    return list(dict.fromkeys(out))


def check_sitecustomize(pth_ok: bool) -> Dict[str, Any]:
    """Does a ``sitecustomize`` on sys.path shadow connwatch's, or undo its socket patch?"""
    found = _sitecustomizes()
    if not found:
        return _check("sitecustomize", OK, "no sitecustomize on sys.path")

    def text(path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read(200_000)
        except OSError:
            return ""

    first = found[0]
    first_text = text(first)
    ours = [p for p in found if "connwatch" in text(p)]
    if any(s in first_text for s in ("monkey.patch_all", "monkey.patch_socket", "socket.socket =")):
        return _check("sitecustomize", WARN, f"{first} replaces the socket module after connwatch patched it "
                      "(it runs after .pth hooks): sockets may go uncounted",
                      "let it run first: call connwatch.enable() at the end of that sitecustomize")
    if ours and ours[0] != first:
        status = INFO if pth_ok else PROBLEM
        return _check("sitecustomize", status, f"{first} shadows connwatch's {ours[0]}: only the first "
                      "sitecustomize on sys.path runs" + (" (the .pth hook still loads the agent)" if pth_ok else ""),
                      None if pth_ok else f"put {os.path.dirname(ours[0])} first on PYTHONPATH (it chains the other)")
    if ours:
        more = f"; it chains {found[1]}" if len(found) > 1 else ""
        return _check("sitecustomize", OK, f"{first} is connwatch's{more}")
    return _check("sitecustomize", INFO, f"{first} runs at start-up; it does not touch connwatch"
                  + ("" if len(found) == 1 else f" (shadowing {len(found) - 1} more)"))


def check_folder() -> Dict[str, Any]:
    """Can the agent create and write its snapshot folder, and is it ours?"""
    from ..exporters.snapshot_file import prepare_dir

    folder = snapshot_dir()
    fix = f"export {_config.DIR}=<a folder you own> (or fix: mkdir -p -m 700 {folder})"
    if os.path.lexists(folder) and not os.path.islink(folder) and not os.path.isdir(folder):
        return _check("snapshot folder", PROBLEM, f"{folder}: exists and is not a folder", fix)
    reason = prepare_dir(folder)
    if reason is not None:
        return _check("snapshot folder", PROBLEM, f"{folder}: {reason}", fix)
    probe = os.path.join(folder, f".doctor-{os.getpid()}.json")
    try:
        from .._snapshot import write_atomic

        write_atomic(probe, b"{}")
        os.unlink(probe)
    except OSError as e:
        return _check("snapshot folder", PROBLEM, f"{folder}: cannot write a file ({e.strerror or e})", fix)
    return _check("snapshot folder", OK, f"{folder} is ours and writable")


def _otlp_endpoint() -> Tuple[str, str, int]:
    env = os.environ
    raw = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or ""
    protocol = (env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    default_port = 4317 if protocol.strip().lower() == "grpc" else 4318
    if not raw.strip():
        return f"localhost:{default_port} (default)", "localhost", default_port
    from urllib.parse import urlsplit

    text = raw.strip()
    parts = urlsplit(text if "://" in text else "//" + text)
    port = parts.port or (443 if parts.scheme == "https" else 80 if parts.scheme == "http" else default_port)
    return text, parts.hostname or "localhost", port


def check_exporter() -> List[Dict[str, Any]]:
    """Is the metric exporter's package installed and its endpoint reachable?"""
    import importlib.util
    import socket

    cfg, warnings = _load_config()
    checks = [_check("configuration", WARN, w, "fix or unset the variable") for w in warnings]
    if not checks:
        checks.append(_check("configuration", OK, "every CONNWATCH_* setting is valid"))
    if not cfg.exporters:
        checks.append(_check("exporter", INFO, "no metric exporter (CONNWATCH_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT "
                             "unset): snapshot files only"))
        return checks
    if "otlp" in cfg.exporters:
        if importlib.util.find_spec("opentelemetry") is None or importlib.util.find_spec("opentelemetry.sdk") is None:
            checks.append(_check("exporter", WARN, "the otlp exporter needs the OpenTelemetry SDK, "
                                 "which is not installed (connwatch depends on it)",
                                 f"{sys.executable} -m pip install --force-reinstall connwatch"))
        shown, host, port = _otlp_endpoint()
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
            checks.append(_check("exporter endpoint", OK, f"OTLP endpoint {shown} accepts connections"))
        except OSError as e:
            checks.append(_check("exporter endpoint", WARN, f"OTLP endpoint {shown} is not reachable "
                                 f"({e.strerror or e}): metrics will not arrive (snapshot files still work)",
                                 "start the collector, or set OTEL_EXPORTER_OTLP_ENDPOINT to where it listens"))
    return checks


def _load_config() -> Tuple[Any, List[str]]:
    import logging

    from .. import _log

    messages: List[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage().replace("connwatch: ", "", 1))

    _log.reset()  # the agent this command started (then stopped) may have reported them already
    logger = logging.getLogger(_log.LOGGER_NAME)
    handler = _Keep(logging.WARNING)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        cfg = _config.load()
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    return cfg, messages


def check_loads(timeout: float = 30.0) -> Dict[str, Any]:
    """Start a fresh Python with CONNWATCH_ENABLED=1 and see whether the agent runs in it."""
    import subprocess
    import tempfile

    code = ("import sys, connwatch; sys.stdout.write(repr((connwatch.is_enabled(), connwatch.__file__)))")
    with tempfile.TemporaryDirectory(prefix="connwatch-doctor-") as tmp:
        env = dict(os.environ)
        env.update({_config.ENABLED: "1", _config.DIR: tmp, _config.SNAPSHOT_INTERVAL: "0", _config.EXPORTER: "none"})
        try:
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return _check("start-up", PROBLEM, f"a test start of {sys.executable} failed: {e}")
    out = proc.stdout.strip()
    if proc.returncode != 0 or not out.startswith("(True"):
        detail = (proc.stderr.strip().splitlines() or [out or f"exit code {proc.returncode}"])[-1]
        return _check("start-up", PROBLEM, f"with CONNWATCH_ENABLED=1, a new {sys.executable} does not start "
                      f"the agent ({detail})", "fix the problems above (the .pth hook first)")
    return _check("start-up", OK, f"with CONNWATCH_ENABLED=1, a new {sys.executable} starts the agent")


def run_doctor() -> Dict[str, Any]:
    """Every check, in order; ``ok`` is False when a problem keeps the agent from loading."""
    checks = [check_dependencies(), check_pth(), check_enabled()]
    checks.append(check_sitecustomize(checks[1]["status"] == OK))
    checks.append(check_loads())
    checks.append(check_folder())
    checks += check_exporter()
    problems = [c for c in checks if c["status"] == PROBLEM]
    loads = next(c for c in checks if c["check"] == "start-up")["status"] == OK and checks[2]["status"] == OK
    return {"ok": not problems, "agent_will_load": loads, "python": sys.executable,
            "problems": len(problems), "checks": checks}


def format_doctor(result: Dict[str, Any], style: Style = PLAIN) -> str:
    """The human-readable form of :func:`run_doctor`."""
    marks = {OK: style.green("ok     "), INFO: style.dim("info   "), WARN: style.yellow("warn   "),
             PROBLEM: style.red("PROBLEM")}
    out = [style.bold(f"connwatch doctor ({result['python']})")]
    for c in result["checks"]:
        out.append(f"  {marks[c['status']]} {c['check']}: {c['message']}")
        if c["fix"] and c["status"] in (WARN, PROBLEM):
            out.append(f"          fix: {c['fix']}")
    if result["ok"]:
        out.append(style.green("the agent will load in this environment"))
    else:
        verdict = "the agent will not load" if not result["agent_will_load"] else "the agent loads, with problems"
        out.append(style.red(f"{verdict}: {result['problems']} problem(s) to fix"))
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    result = run_doctor()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_doctor(result, Style(use_colour(sys.stdout))))
    return EXIT_OK if result["ok"] else EXIT_FAIL


def register(sub: Any) -> None:
    """Add the ``doctor`` command to the parser's subcommands."""
    doc = sub.add_parser("doctor", help="check whether the agent will load in this environment",
                         description="Check the .pth hook, CONNWATCH_ENABLED, sitecustomize conflicts, the "
                                     "snapshot folder and the exporter endpoint; print a fix for each problem.")
    doc.add_argument("--json", action="store_true", help="print the checks as JSON")
    doc.set_defaults(func=main)
