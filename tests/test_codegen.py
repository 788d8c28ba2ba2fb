"""The generated code: determinism, naming, provenance comments, dead code, constant folding,
the cache file it lives in, debuggability and in-memory caching."""

from __future__ import annotations

import ast
import bdb
import inspect
import json
import os
import re
import subprocess
import sys
import types

import _lang_helpers as H
import torch

import propgen

F64 = torch.float64
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PROVENANCE = re.compile(r"#\s*Grad of:\s*(\S+?):(\d+)\s+(.*?)\s*$")


def rn(*shape):
    return torch.randn(*shape, dtype=F64)


def provenance(src: str) -> list[tuple[str, int, str]]:
    """(file, line, text) of every ``# Grad of:`` comment in generated source."""
    out = []
    for line in src.splitlines():
        if "Grad of:" in line:
            m = PROVENANCE.search(line)
            assert m, f"malformed provenance comment: {line!r}"
            out.append((m.group(1), int(m.group(2)), m.group(3)))
    return out


def source_lines(fn) -> tuple[list[str], int]:
    lines, start = inspect.getsourcelines(fn)
    return lines, start


def line_of(fn, needle: str) -> int:
    lines, start = source_lines(fn)
    hits = [start + k for k, t in enumerate(lines) if needle in t]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def compiled_functions(df) -> list:
    """The functions compiled from the generated file.

    propgen.grad returns either the generated function itself or an object holding the
    generated forward and backward functions (``.forward`` / ``.backward``).
    """
    if isinstance(df, types.FunctionType):
        return [df]
    fns = [getattr(df, name, None) for name in ("forward", "backward")]
    fns = [f for f in fns if isinstance(f, types.FunctionType)]
    assert fns, f"no compiled function reachable from {df!r}"
    return fns


def generated_path(df) -> str:
    """The file the compiled code says it comes from (the same for all its functions)."""
    paths = {f.__code__.co_filename for f in compiled_functions(df)}
    assert len(paths) == 1, paths
    return paths.pop()


# --------------------------------------------------------------------------------------------
# Functions compiled by the tests
# --------------------------------------------------------------------------------------------


def named(x, weight):
    hidden = torch.tanh(x @ weight)
    return (hidden * hidden).sum()


def straight(x, w):
    a = torch.sin(x) * w
    b = a * x + w
    c = torch.exp(b)
    return c.sum()


def dead_statement(x):
    y = torch.exp(x)
    z = torch.sin(x)  # noqa: F841
    return y.sum()


def dead_helper_call(x):
    y = x * 3.0
    unused = H.split_pair(x)  # noqa: F841
    return y.sum()


def unreached_wrt(x, w):
    return x.sum()


def folded(x):
    return (x * (2 * 3)).sum()


def const_only_output(x):
    return torch.tensor(6.0, dtype=torch.float64) * 2


def int32_wraps(x):
    # 2**31 - 1 + 1 wraps to -2**31 in an int32 tensor; as a Python int it would not
    k = torch.tensor(2**31 - 1, dtype=torch.int32) + 1
    return (x * k.to(x.dtype)).sum()


def other_fn(x):
    return torch.cos(x).sum()


def for_cache(x):
    return (x.sin() * x).sum()


def for_cache_other_wrt(x, y):
    return (x * y.exp()).sum()


# --------------------------------------------------------------------------------------------
# Naming and provenance
# --------------------------------------------------------------------------------------------


def test_gradient_names_derive_from_user_names():
    src = propgen.source(propgen.grad(named, wrt=(0, 1)))
    for name in ("d_x", "d_weight", "d_hidden"):
        assert re.search(rf"\b{name}\b", src), f"{name} not in generated code:\n{src}"


def test_generated_code_is_valid_python():
    df = propgen.grad(H.codegen_target, wrt=(0, 1))
    ast.parse(propgen.source(df))


def test_one_provenance_comment_per_statement():
    df = propgen.grad(straight, wrt=(0, 1))
    src = propgen.source(df)
    lines, start = source_lines(straight)
    body = {start + k: t.strip() for k, t in enumerate(lines) if k > 0 and t.strip()}
    prov = provenance(src)
    assert len(prov) == len(body), f"expected {len(body)} provenance comments:\n{src}"
    assert {ln for _, ln, _ in prov} == set(body)
    for file, ln, text in prov:
        assert os.path.basename(file) == "test_codegen.py"
        assert text == body[ln], (text, body[ln])


def test_provenance_points_at_real_lines_with_loops():
    fn = H.codegen_target
    src = propgen.source(propgen.grad(fn, wrt=(0, 1)))
    # every comment quotes the real line of _lang_helpers.py (codegen_target's own lines, or
    # those of the helper scale_add it calls)
    with open(H.__file__, encoding="utf-8") as fh:
        real = {k + 1: t.strip() for k, t in enumerate(fh)}
    prov = provenance(src)
    assert prov, src
    for file, ln, text in prov:
        assert os.path.basename(file) == "_lang_helpers.py"
        assert ln in real and real[ln] == text, (ln, text)
    # each statement of the loop body is commented once (not once per iteration)
    counts = [ln for _, ln, _ in prov]
    for needle in ("h = torch.tanh(h @ w)", "acc = acc + (h * h)", "acc = acc - h.mean()"):
        assert counts.count(line_of(fn, needle)) == 1, (needle, counts)


# --------------------------------------------------------------------------------------------
# Dead code and constant folding
# --------------------------------------------------------------------------------------------


def test_dead_statement_has_no_adjoint():
    x = rn(4)
    df = propgen.grad(dead_statement)
    torch.testing.assert_close(df(x), torch.exp(x), **H.TIGHT64)
    src = propgen.source(df)
    assert "cos" not in src, f"adjoint of an unused sin in:\n{src}"
    dead = line_of(dead_statement, "z = torch.sin(x)")
    assert dead not in {ln for _, ln, _ in provenance(src)}


def test_dead_helper_call_has_no_adjoint():
    x = rn(3, 2)
    df = propgen.grad(dead_helper_call)
    torch.testing.assert_close(df(x), torch.full_like(x, 3.0), **H.TIGHT64)
    src = propgen.source(df)
    dead = line_of(dead_helper_call, "unused = H.split_pair(x)")
    assert dead not in {ln for _, ln, _ in provenance(src)}


def test_unreached_wrt_is_zeros_without_adjoint_code():
    x, w = rn(3), rn(2, 2)
    df = propgen.grad(unreached_wrt, wrt=(0, 1))
    gx, gw = df(x, w)
    torch.testing.assert_close(gx, torch.ones_like(x), rtol=0, atol=0)
    torch.testing.assert_close(gw, torch.zeros_like(w), rtol=0, atol=0)
    assert len(provenance(propgen.source(df))) == 1


def test_constant_folding_gives_sixes():
    x = rn(5)
    df = propgen.grad(folded)
    torch.testing.assert_close(df(x), torch.full_like(x, 6.0), rtol=0, atol=0)


def test_constant_folding_keeps_tensors_tensors():
    x = rn(3)
    df = propgen.grad(const_only_output, preserve_result=True)
    g, result = df(x)
    assert isinstance(result, torch.Tensor), f"constant tensor folded into {type(result)}"
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, torch.tensor(12.0, dtype=F64))
    torch.testing.assert_close(g, torch.zeros_like(x), rtol=0, atol=0)


def test_constant_folding_keeps_tensor_integer_semantics():
    x = rn(3)
    expected = torch.full_like(x, float(-(2**31)))
    torch.testing.assert_close(propgen.grad(int32_wraps)(x), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# The cache file
# --------------------------------------------------------------------------------------------


def test_source_is_the_cache_file(cache_dir):
    df = propgen.grad(straight, wrt=(0, 1))
    path = generated_path(df)
    assert os.path.isfile(path), path
    real_cache = os.path.realpath(cache_dir)
    assert os.path.commonpath([os.path.realpath(path), real_cache]) == real_cache, path
    with open(path, encoding="utf-8") as fh:
        assert fh.read() == propgen.source(df)


def test_different_functions_different_files():
    p1 = generated_path(propgen.grad(straight))
    p2 = generated_path(propgen.grad(other_fn))
    p3 = generated_path(propgen.grad(straight, wrt=(0, 1)))
    assert len({p1, p2, p3}) == 3


def test_verbose_prints_the_code(capsys):
    capsys.readouterr()
    df = propgen.grad(for_cache_other_wrt, wrt=(1,), verbose=1)
    df(rn(3), rn(3))
    out = capsys.readouterr().out
    assert propgen.source(df).strip() in out


def test_line_events_in_the_cache_file():
    df = propgen.grad(straight, wrt=(0, 1))
    path = generated_path(df)
    seen = []

    def tracer(frame, event, arg):
        if frame.f_code.co_filename == path:
            if event == "line":
                seen.append(frame.f_lineno)
            return tracer
        return None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        df(rn(3), rn(3))
    finally:
        sys.settrace(old)
    assert seen, "no line event in the generated file: a breakpoint there would not bind"
    with open(path, encoding="utf-8") as fh:
        file_lines = fh.read().splitlines()
    assert all(1 <= ln <= len(file_lines) for ln in seen)


class _Recorder(bdb.Bdb):
    def __init__(self):
        super().__init__()
        self.stops: list[tuple[str, int]] = []

    def user_line(self, frame):
        self.stops.append((self.canonic(frame.f_code.co_filename), frame.f_lineno))
        self.set_continue()


def test_programmatic_breakpoint_binds():
    df = propgen.grad(straight, wrt=(0, 1))
    path = generated_path(df)
    src_lines = propgen.source(df).splitlines()
    # a line of backward code that computes d_x
    target = next(
        k + 1
        for k, t in enumerate(src_lines)
        if re.search(r"\bd_x\b", t) and not t.strip().startswith(("#", "def ", "return"))
    )
    rec = _Recorder()
    old = sys.gettrace()
    try:
        assert rec.set_break(path, target) is None
        rec.runcall(df, rn(3), rn(3))
    finally:
        rec.clear_all_breaks()
        sys.settrace(old)
    assert (rec.canonic(path), target) in rec.stops, rec.stops


# --------------------------------------------------------------------------------------------
# Caching and determinism
# --------------------------------------------------------------------------------------------


def test_compiled_once_in_memory(cache_dir):
    df1 = propgen.grad(for_cache)
    path = generated_path(df1)
    assert os.path.realpath(path).startswith(os.path.realpath(cache_dir)), path
    mtime = os.stat(path).st_mtime_ns
    df2 = propgen.grad(for_cache)
    for f1, f2 in zip(compiled_functions(df1), compiled_functions(df2), strict=True):
        assert f1.__code__ is f2.__code__, "propgen.grad(f) twice compiled twice"
    assert generated_path(df2) == path
    assert os.stat(path).st_mtime_ns == mtime


def test_options_are_part_of_the_cache_key():
    a = propgen.source(propgen.grad(for_cache_other_wrt, wrt=(0,)))
    b = propgen.source(propgen.grad(for_cache_other_wrt, wrt=(1,)))
    assert a != b


def test_same_text_in_process():
    s1 = propgen.source(propgen.grad(H.codegen_target, wrt=(0, 1)))
    s2 = propgen.source(propgen.grad(H.codegen_target, wrt=(0, 1)))
    assert s1 == s2


_SCRIPT = """
import json, sys, types
sys.path.insert(0, {tests!r})
import torch
import propgen
import _lang_helpers as H
df = propgen.grad(H.codegen_target, wrt=(0, 1))
x = torch.randn(4, dtype=torch.float64)
w = torch.randn(4, 4, dtype=torch.float64)
df(x, w)
fns = [df] if isinstance(df, types.FunctionType) else [df.forward, df.backward]
path = fns[0].__code__.co_filename
print(json.dumps({{"path": path, "source": propgen.source(df),
                  "file": open(path, encoding="utf-8").read()}}))
"""


def _compile_in_subprocess(cache: str, hashseed: str) -> dict:
    env = dict(os.environ)
    env["PROPGEN_CACHE_DIR"] = cache
    env["PYTHONHASHSEED"] = hashseed
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(tests=TESTS_DIR)],
        capture_output=True,
        text=True,
        env=env,
        cwd=TESTS_DIR,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_deterministic_across_processes(tmp_path):
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    r1 = _compile_in_subprocess(cache, "1")
    r2 = _compile_in_subprocess(cache, "2")
    assert r1["source"] == r1["file"]
    assert r1["source"] == r2["source"]
    assert r1["path"] == r2["path"]
    # a fresh cache directory gives the same content-hashed file name
    other = str(tmp_path / "other")
    os.makedirs(other)
    r3 = _compile_in_subprocess(other, "3")
    assert os.path.basename(r3["path"]) == os.path.basename(r1["path"])
    assert r3["source"] == r1["source"]
    # and this process generated the same text
    here = propgen.source(propgen.grad(H.codegen_target, wrt=(0, 1)))
    assert here == r1["source"]


def _recurrence(x, w):
    for _ in range(3):
        x = torch.tanh(x * w + 1.0)
    return x.sum()


def test_tensors_read_only_for_their_shape_are_not_kept():
    """``x * w`` is read by the backward only to undo broadcasting: the forward keeps its
    shape, not its memory (autograd's AddBackward keeps sizes alone, too)."""
    x, w = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    df = propgen.grad(_recurrence, wrt=(0, 1))
    _, saved = df.forward(x, w)
    flat = [v for s in saved for v in (s if isinstance(s, list) else [s])]
    kept = [v for v in flat if isinstance(v, torch.Tensor)]
    # w, the final x and the three values x takes before each step; no product x * w
    assert len(kept) == 5, [tuple(v.shape) for v in kept]
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    _recurrence(xr, wr).backward()
    gx, gw = df(x, w)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, wr.grad, rtol=1e-10, atol=1e-12)
