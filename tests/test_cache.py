"""Cache safety: where generated files go, with which permissions, written how, and what
happens to a file someone truncated or edited (docs/guarantees.md lists these claims).

Each test compiles with a registry of its own (nothing memoized) into a cache directory of its
own, set through PROPGEN_CACHE_DIR as a user would.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from propgen.templates import TEMPLATE_MODULES

import propgen as pg
from propgen import load
from propgen.errors import PropgenError
from propgen.template import Registry
from tests._cache_program import model

PROGRAM = Path(__file__).with_name("_cache_program.py")
ROOT = PROGRAM.parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "nested" / "propgen-cache"
    monkeypatch.setenv("PROPGEN_CACHE_DIR", str(path))
    return path


def _compile():
    return pg.grad(model, wrt=(1,), registry=Registry(TEMPLATE_MODULES))


def _check(df) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g,
                                                                            dtype=torch.float64)
    w_ref = w.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model(x, w_ref), [w_ref])
    torch.testing.assert_close(df(x, w), expected, rtol=1e-12, atol=1e-14)


def test_the_environment_variable_chooses_the_directory_created_user_only(cache):
    df = _compile()
    assert df.compiled.path.parent == cache
    assert stat.S_IMODE(cache.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(df.compiled.path.stat().st_mode) == 0o600
    assert df.compiled.path.read_text(encoding="utf-8") == df.source
    name = df.compiled.path.name
    assert name.startswith("model_") and name.endswith(f"_{load._digest(df.source)}.py")


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete"])
def test_a_damaged_file_is_written_again_and_never_executed(cache, damage):
    df = _compile()
    path = df.compiled.path
    marker = cache / "executed"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(df.source) // 2])
    elif damage == "edit":  # code that would leave a mark (and break the gradient) if it ran
        text = df.source.replace("def model_backward(", f"open({str(marker)!r}, 'w').close()\n"
                                 "def model_backward(", 1)
        path.write_text(text.replace(" + ", " - "), encoding="utf-8")
    else:
        path.unlink()
    again = _compile()  # a new compilation of the same function, as in the next session
    assert again.compiled.path == path
    assert path.read_text(encoding="utf-8") == df.source
    _check(again)
    _check(df)
    assert not marker.exists()


def test_a_damaged_file_is_restored_when_its_path_is_handed_out(cache):
    df = _compile()
    df.compiled.path.write_text("raise SystemExit('edited')\n", encoding="utf-8")
    assert df.path.read_text(encoding="utf-8") == df.source  # df.path: what pdb users open
    df.compiled.path.unlink()
    assert df.path.read_text(encoding="utf-8") == df.source


def test_a_file_edited_in_an_earlier_session_is_not_executed_in_the_next(cache):
    env = {**os.environ, "PROPGEN_CACHE_DIR": str(cache)}
    first = subprocess.run([sys.executable, str(PROGRAM)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    path = Path(first.stdout.strip())
    path.write_text("raise SystemExit('the edited cache file ran')\n", encoding="utf-8")
    second = subprocess.run([sys.executable, str(PROGRAM)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "ran" not in second.stdout + second.stderr
    assert "raise SystemExit" not in path.read_text(encoding="utf-8")


def test_processes_compiling_the_same_function_at_once_all_succeed(cache, tmp_path):
    env = {**os.environ, "PROPGEN_CACHE_DIR": str(cache)}
    barrier = tmp_path / "barrier"  # each process compiles once all four have imported propgen
    procs = [subprocess.Popen([sys.executable, str(PROGRAM), str(barrier), "4"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    assert sorted(f.name for f in cache.iterdir()) == [Path(paths.pop()).name]  # no temp files


def test_a_write_that_fails_midway_leaves_neither_half_a_file_nor_a_temporary(cache, monkeypatch):
    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(load.os, "replace", fail)
    with pytest.raises(load.CacheError, match="PROPGEN_CACHE_DIR") as info:
        _compile()
    assert isinstance(info.value, PropgenError) and "No space left" in str(info.value)
    assert list(cache.iterdir()) == []


def test_a_cache_directory_that_cannot_exist_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    monkeypatch.setenv("PROPGEN_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(load.CacheError, match=r"a-file.*PROPGEN_CACHE_DIR to a writable"):
        _compile()
