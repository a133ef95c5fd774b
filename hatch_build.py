"""Hatchling build hook: compiles the optional C extension ``connwatch/_speedups.c`` into the wheel.

The extension only speeds up the hot path; connwatch behaves the same without it (pure Python).
So a missing compiler or a failed compile prints one warning and the wheel is built pure
(``py3-none-any``), unless ``CONNWATCH_REQUIRE_EXTENSIONS=1`` (then the build fails: CI sets it
so that a silently pure build cannot pass). ``CONNWATCH_NO_EXTENSIONS=1`` skips the compile.

The compile uses the building interpreter's own settings (``sysconfig``: CC, CFLAGS, CCSHARED,
LDSHARED, the include folder, EXT_SUFFIX), like distutils did, with ``CC``, ``LDSHARED``,
``CFLAGS``, ``CPPFLAGS`` and ``LDFLAGS`` from the environment taking effect the same way. There
is no setuptools in hatchling's build environment: the compiler runs as a plain subprocess.

Also a script: ``python hatch_build.py --inplace`` builds ``connwatch/_speedups<EXT_SUFFIX>`` next to
the source, for running the tests from a checkout (which imports ``connwatch`` from the checkout,
not from site-packages). The file is git-ignored and never part of a wheel or sdist.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Any, Dict, List, Optional

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # the --inplace script without hatchling installed
    BuildHookInterface = object  # type: ignore[misc,assignment]

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join("connwatch", "_speedups.c")
MODULE = "connwatch/_speedups"  # + EXT_SUFFIX, inside the wheel
COMPILE_TIMEOUT = 300.0


class ExtensionError(Exception):
    """The extension could not be built (the message says why, in one line plus compiler output)."""


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def ext_suffix() -> str:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if not suffix:
        raise ExtensionError("this interpreter reports no EXT_SUFFIX")
    return str(suffix)


def _config(name: str) -> str:
    return str(sysconfig.get_config_var(name) or "")


def _find_compiler(cc: List[str]) -> List[str]:
    """``cc`` itself when it is on PATH, else ``cc``/``gcc`` with the same arguments (the
    interpreter may have been built with a compiler name this machine lacks)."""
    if cc and shutil.which(cc[0]):
        return cc
    for name in ("cc", "gcc"):
        path = shutil.which(name)
        if path:
            return [path, *cc[1:]]
    tried = ", ".join(dict.fromkeys([*cc[:1], "cc", "gcc"]))
    raise ExtensionError(f"no C compiler found (none of {tried} is on PATH)")


def compiler_commands(source: str, output: str, work_dir: str) -> List[List[str]]:
    """The compile and the link command lines for ``source`` -> the shared object ``output``."""
    cc = shlex.split(os.environ.get("CC") or _config("CC"))
    if not cc:
        raise ExtensionError("this interpreter reports no C compiler (sysconfig CC is empty)")
    ldshared = shlex.split(os.environ.get("LDSHARED") or _config("LDSHARED") or _config("BLDSHARED"))
    if not ldshared:
        ldshared = [*cc, "-shared"]
    elif "CC" in os.environ and "LDSHARED" not in os.environ:
        # distutils' rule: an overridden CC also replaces the compiler at the start of LDSHARED.
        ldshared = [*cc, *ldshared[1:]]
    found = _find_compiler(cc)
    if ldshared[0] == cc[0]:
        ldshared = [found[0], *ldshared[1:]]
    cc = found
    if not shutil.which(ldshared[0]):
        raise ExtensionError(f"the linker {ldshared[0]!r} (sysconfig LDSHARED) is not on PATH")

    include = sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        raise ExtensionError(f"Python.h is not in {include} (install this interpreter's headers, e.g. python3-dev)")
    cflags = shlex.split(_config("CFLAGS") or _config("OPT"))
    cflags += [*shlex.split(_config("CCSHARED")), "-O2"]  # after the interpreter's flags: it wins over their -O3
    cflags += shlex.split(os.environ.get("CPPFLAGS", "")) + shlex.split(os.environ.get("CFLAGS", ""))
    obj = os.path.join(work_dir, "_speedups.o")
    compile_cmd = [*cc, *cflags, f"-I{include}", "-c", source, "-o", obj]
    link_cmd = [*ldshared, *shlex.split(os.environ.get("LDFLAGS", "")), obj, "-o", output]
    return [compile_cmd, link_cmd]


def compile_extension(root: str, out_dir: str, output: Optional[str] = None) -> str:
    """Builds the extension from ``root``'s source into ``output`` (default: in ``out_dir``);
    returns its path. Raises :class:`ExtensionError` when it cannot be built."""
    source = os.path.join(root, SOURCE)
    if not os.path.isfile(source):
        raise ExtensionError(f"{SOURCE} is missing")
    output = output or os.path.join(out_dir, "_speedups" + ext_suffix())
    for cmd in compiler_commands(source, output, out_dir):
        try:
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ExtensionError(f"{cmd[0]} could not run: {exc}") from exc
        if proc.returncode != 0:
            lines = (proc.stderr + proc.stdout).strip().splitlines()
            detail = "\n".join("    " + line for line in lines[-30:])
            raise ExtensionError(f"`{shlex.join(cmd)}` exited with {proc.returncode}:\n{detail}")
    return output


def not_built(reason: ExtensionError) -> None:
    """A build without the extension: fails under CONNWATCH_REQUIRE_EXTENSIONS=1, else one warning."""
    if env_flag("CONNWATCH_REQUIRE_EXTENSIONS"):
        raise RuntimeError(f"connwatch: the C extension is required (CONNWATCH_REQUIRE_EXTENSIONS=1) "
                           f"but could not be built: {reason}") from None
    print(f"WARNING: connwatch: the optional C extension ({SOURCE}) was not built, so the hot path is pure "
          f"Python (same behaviour, slower): {reason}", file=sys.stderr, flush=True)


class SpeedupsBuildHook(BuildHookInterface):  # type: ignore[misc,valid-type]
    """Configured for the wheel target only (pyproject.toml): an sdist ships the C source and this file."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: Dict[str, Any]) -> None:
        self._work_dir: Optional[str] = None
        if self.target_name != "wheel":
            return
        if version == "editable":
            # Editable installs (pip install -e .) import connwatch from the checkout, where a module
            # placed in the wheel would not be found: no extension here, the package runs pure Python.
            # `python hatch_build.py --inplace` builds it into the checkout for that case.
            return
        if env_flag("CONNWATCH_NO_EXTENSIONS"):
            return
        self._work_dir = tempfile.mkdtemp(prefix="connwatch-build-")
        try:
            built = compile_extension(self.root, self._work_dir)
        except ExtensionError as exc:
            self._cleanup()
            not_built(exc)
            return
        build_data["force_include"][built] = MODULE + ext_suffix()
        build_data["pure_python"] = False
        build_data["infer_tag"] = True  # cpXY-cpXY-<platform>: the module is for this interpreter only

    def finalize(self, version: str, build_data: Dict[str, Any], artifact_path: str) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if getattr(self, "_work_dir", None):
            shutil.rmtree(self._work_dir, ignore_errors=True)  # type: ignore[arg-type]
            self._work_dir = None


def main(argv: List[str]) -> int:
    if argv != ["--inplace"]:
        print("usage: python hatch_build.py --inplace   (builds connwatch/_speedups<EXT_SUFFIX> in the checkout)",
              file=sys.stderr)
        return 2
    target = os.path.join(ROOT, MODULE + ext_suffix())
    if os.path.exists(target):
        os.remove(target)  # never leave a stale module behind, whatever happens next
    if env_flag("CONNWATCH_NO_EXTENSIONS"):
        print("connwatch: CONNWATCH_NO_EXTENSIONS=1: C extension not built", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(prefix="connwatch-build-") as work:
        try:
            built = compile_extension(ROOT, work)
        except ExtensionError as exc:
            try:
                not_built(exc)
            except RuntimeError as err:
                print(err, file=sys.stderr)
                return 1
            return 0
        shutil.move(built, target)  # built complete, then moved: no half-written module is ever importable
    print(f"connwatch: built {os.path.relpath(target, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
