"""The wheel and the sdist, built for real: the optional C extension (hatch_build.py) goes into a
platform wheel when a C compiler is there; without it, or when told not to, the wheel is pure
Python and still carries the .pth hook."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

from tests.conftest import REPO

EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
MODULE = f"connwatch/_speedups{EXT_SUFFIX}"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def build_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONNWATCH_", "PYTEST_"))}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def need_a_compiler() -> None:
    """Outside CI a machine without a C compiler (or without Python.h) skips; in CI it fails."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")[0]
    reason = ""
    candidates = list(dict.fromkeys((cc, "cc", "gcc")))
    if not any(shutil.which(name) for name in candidates):
        reason = f"no C compiler ({', '.join(candidates)}) on PATH"
    elif not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        reason = f"no Python.h in {sysconfig.get_paths()['include']}"
    if reason and IN_CI:
        pytest.fail(f"CI=true: {reason}: the C extension must be built there")
    if reason:
        pytest.skip(reason)


def pip_wheel(out: Path, source: Path = REPO, **extra: str) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], env=build_env(**extra), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("connwatch-*.whl")
    return wheel


def hatchling_build(kind: str, project: Path, out: Path, **extra: str) -> subprocess.CompletedProcess:
    """hatchling's own PEP 517 hook (what any frontend calls), so the hook's stderr is visible."""
    code = f"import hatchling.build as b; print(b.build_{kind}({str(out)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=str(project), env=build_env(**extra),
                          capture_output=True, text=True, timeout=240)


def names(wheel: Path) -> List[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def wheel_tag(wheel: Path) -> str:
    return wheel.name[: -len(".whl")].split("-", 2)[2]


@pytest.fixture(scope="module")
def platform_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_a_compiler()
    # REQUIRE: a compile error fails here, with the compiler's message, instead of a pure wheel.
    return pip_wheel(tmp_path_factory.mktemp("wheel"), CONNWATCH_REQUIRE_EXTENSIONS="1")


def test_wheel_carries_the_c_extension_and_a_platform_tag(platform_wheel: Path) -> None:
    contents = names(platform_wheel)
    assert MODULE in contents
    assert "connwatch.pth" in contents and "connwatch/bootstrap.py" in contents
    assert not [n for n in contents if n.endswith(".c") or (n.endswith(".so") and n != MODULE)], contents
    tag = wheel_tag(platform_wheel)
    assert tag != "py3-none-any"
    interpreter, abi, platform = tag.split("-")
    assert interpreter == f"cp{sys.version_info[0]}{sys.version_info[1]}" and abi.startswith(interpreter)
    assert platform != "any" and (platform.startswith("linux_") or not sys.platform.startswith("linux"))
    with zipfile.ZipFile(platform_wheel) as zf:
        wheel_file = zf.read("connwatch-0.1.0.dist-info/WHEEL").decode()
    assert "Root-Is-Purelib: false" in wheel_file and f"Tag: {tag}" in wheel_file


def test_wheel_installed_in_a_fresh_venv_imports_the_extension(platform_wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    with zipfile.ZipFile(platform_wheel) as zf:
        zf.extractall(site)
    # cwd and environment away from the checkout: only the installed copy can be imported.
    code = "import connwatch, connwatch._speedups as s; print(s.__file__); print(connwatch.__file__)"
    proc = subprocess.run([str(python), "-c", code], cwd=str(tmp_path), env=build_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(Path(site) / MODULE), str(Path(site) / "connwatch" / "__init__.py")]
    assert (Path(site) / "connwatch.pth").is_file()


def test_no_extensions_builds_a_pure_wheel_that_still_has_the_pth_hook(tmp_path: Path) -> None:
    wheel = pip_wheel(tmp_path, CONNWATCH_NO_EXTENSIONS="1")
    assert wheel_tag(wheel) == "py3-none-any"
    contents = names(wheel)
    assert "connwatch.pth" in contents and "connwatch/bootstrap.py" in contents
    assert not [n for n in contents if n.endswith((".so", ".pyd", ".c"))], contents


def test_a_failed_compile_warns_once_and_builds_pure_unless_required(tmp_path: Path) -> None:
    need_a_compiler()
    # A copy of the project whose C source does not compile (the real compiler, a real error).
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "hatch_build.py", "README.md", ".gitignore"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "connwatch", project / "connwatch",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    (project / "connwatch" / "_speedups.c").write_text("#include <Python.h>\nthis is not C;\n")
    out = tmp_path / "out"
    proc = hatchling_build("wheel", project, out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("-py3-none-any.whl")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING: connwatch:")]
    assert len(warnings) == 1, proc.stderr
    assert "not built" in warnings[0] and "pure" in warnings[0]
    assert "_speedups.c" in proc.stderr  # the compiler's own message follows the warning
    assert "connwatch.pth" in names(out / proc.stdout.strip())

    proc = hatchling_build("wheel", project, tmp_path / "required", CONNWATCH_REQUIRE_EXTENSIONS="1")
    assert proc.returncode != 0
    assert "CONNWATCH_REQUIRE_EXTENSIONS=1" in proc.stderr and "_speedups.c" in proc.stderr
    assert not list((tmp_path / "required").glob("*.whl"))


def test_no_compiler_on_path_warns_once_and_builds_pure(tmp_path: Path) -> None:
    empty = tmp_path / "bin"  # a PATH with no compiler on it, and a CC that does not exist
    empty.mkdir()
    proc = hatchling_build("wheel", REPO, tmp_path / "out", PATH=str(empty), CC="no-such-cc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("-py3-none-any.whl")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING: connwatch:")]
    assert len(warnings) == 1 and "no C compiler found" in warnings[0], proc.stderr
    assert "connwatch.pth" in names(tmp_path / "out" / proc.stdout.strip())


def test_sdist_ships_the_hook_and_the_c_source_and_builds_the_platform_wheel(tmp_path: Path) -> None:
    need_a_compiler()
    proc = hatchling_build("sdist", REPO, tmp_path)
    assert proc.returncode == 0, proc.stderr
    sdist = tmp_path / proc.stdout.strip()
    with tarfile.open(sdist) as tf:
        members = tf.getnames()
        top = members[0].split("/")[0]
        assert {f"{top}/hatch_build.py", f"{top}/connwatch/_speedups.c", f"{top}/pyproject.toml",
                f"{top}/connwatch/connwatch.pth"} <= set(members)
        assert not [m for m in members if m.endswith((".so", ".pyd"))], members
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(tmp_path / "unpacked", **safe)  # type: ignore[arg-type]
    wheel = pip_wheel(tmp_path / "wheel", tmp_path / "unpacked" / top, CONNWATCH_REQUIRE_EXTENSIONS="1")
    assert wheel_tag(wheel) != "py3-none-any"
    assert MODULE in names(wheel) and "connwatch.pth" in names(wheel)
