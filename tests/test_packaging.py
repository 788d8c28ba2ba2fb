"""The built wheel ships the compiler and its templates.

templates/ is a top-level folder of the source tree that pyproject.toml maps to the subpackage
``propgen.templates``.  An editable install finds it through that mapping; a regular
``pip install .`` only has what the wheel holds.  So this builds a wheel from a copy of the
source tree and checks its contents, then imports ``propgen.templates`` from the unpacked wheel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# What a copy of the source tree leaves out: VCS data, build leftovers and caches.
IGNORE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".venv",
    "venv",
    "shared",
)


def _version(dist: str) -> tuple[int, ...] | None:
    from importlib import metadata

    try:
        text = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _wheel_command(out: Path) -> tuple[list[str], str]:
    """The command that builds the wheel here without fetching anything when it can.

    Without build isolation the running interpreter's setuptools builds it: that needs
    setuptools >= 64 (what pyproject.toml asks), and before setuptools 70.1 the ``wheel``
    package for bdist_wheel.  A fresh venv of Python 3.11 has setuptools 65 and no ``wheel``;
    there pip builds in an isolated environment, from the configured package index.
    """
    setuptools = _version("setuptools")
    has_wheel = importlib.util.find_spec("wheel") is not None
    if setuptools and setuptools >= (64,) and (setuptools >= (70, 1) or has_wheel):
        how = f"pip wheel --no-build-isolation (setuptools {'.'.join(map(str, setuptools))})"
        return [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(out),
            ".",
        ], how
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), "."], (
        "pip wheel with build isolation"
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this interpreter: cannot build a wheel")
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    cmd, how = _wheel_command(out)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run(
        cmd,
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        offline = any(
            s in log
            for s in (
                "No matching distribution",
                "Could not find a version",
                "Failed to establish a new connection",
                "Network is unreachable",
            )
        )
        if offline and "--no-build-isolation" not in cmd:
            pytest.skip(f"cannot build a wheel offline ({how}): no setuptools to build with")
        pytest.fail(f"building the wheel failed ({how}):\n{log[-4000:]}")
    wheels = sorted(out.glob("propgen-*.whl"))
    assert len(wheels) == 1, f"expected one propgen wheel in {out}, got {wheels}\n{log[-2000:]}"
    return wheels[0]


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_ships_templates_as_subpackage(wheel):
    names = _names(wheel)
    for required in (
        "propgen/__init__.py",
        "propgen/templates/__init__.py",
        "propgen/templates/ops.py",
    ):
        assert required in names, f"{required} missing from {wheel.name}: {sorted(names)}"
    # The mapping ships templates/ under propgen/, never as a top-level package of its own.
    assert not any(n.startswith("templates/") for n in names), sorted(names)


def test_wheel_ships_every_source_module(wheel):
    names = _names(wheel)
    expected = {f"propgen/{p.name}" for p in (ROOT / "propgen").glob("*.py")}
    expected |= {f"propgen/templates/{p.name}" for p in (ROOT / "templates").glob("*.py")}
    missing = sorted(expected - names)
    assert not missing, f"modules of the source tree missing from {wheel.name}: {missing}"


def test_wheel_metadata_names_dependencies(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
    assert "Name: propgen" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any(line.split()[1].startswith("torch") for line in requires), requires


def test_unpacked_wheel_imports_templates(wheel, tmp_path):
    """What a non-editable install would run: propgen.templates from the wheel alone."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path)
    code = (
        "import sys, propgen, propgen.templates, propgen.templates.ops as ops\n"
        "for m in (propgen, propgen.templates, ops):\n"
        "    assert m.__file__.startswith(sys.argv[1]), (m.__name__, m.__file__)\n"
        "print(propgen.templates.__file__)\n"
    )
    # sys.path[0] is the unpacked wheel; -I keeps PYTHONPATH and the user's site out, so the
    # repository's own propgen/ (or an editable install's finder) cannot answer first.
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + code,
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
