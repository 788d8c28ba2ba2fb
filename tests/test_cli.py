"""``python -m propgen show`` and ``python -m propgen doctor`` (propgen/cli.py).

Most tests call ``propgen.cli.main(argv)`` in-process and read stdout/stderr with capsys; a
few run ``python -m propgen`` as a real subprocess for the ``__main__`` path.  Error lines are
found from the test files' text (a ``# BAD`` marker), never hard-coded.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import propgen
import propgen.doctor
from propgen import cli

REPO = Path(__file__).resolve().parent.parent
CHAOTIC = REPO / "examples" / "chaotic_rnn.py"
SHAPING = REPO / "examples" / "gaussian_shaping.py"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(path: Path, name: str):
    """Import ``path`` the ordinary way (as a test would), for comparison with the CLI."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def line_of(path: Path, marker: str) -> int:
    hits = [i for i, line in enumerate(path.read_text().splitlines(), 1) if marker in line]
    assert len(hits) == 1, hits
    return hits[0]


# --------------------------------------------------------------------------------------------
# show: @propgen.propagate functions
# --------------------------------------------------------------------------------------------


def test_show_rollout_for_each_propagator(capsys):
    outs = {}
    for prop in ("RP", "LR", "TP", "bp"):
        code, out, err = run(capsys, "show", f"{CHAOTIC}:rollout", "--propagator", prop,
                             "--const", "horizon")
        assert code == 0, err
        assert err == ""
        assert "def rollout_forward(manager, s, W, beta, horizon):" in out
        assert "def rollout_backward(saved, d_" in out
        assert "# Grad of: chaotic_rnn.py:" in out
        compile(out, "<show>", "exec")
        outs[prop] = out
    assert "RPProp(" in outs["RP"].splitlines()[1]
    assert "LRProp(" in outs["LR"].splitlines()[1]
    assert "TotalProp(" in outs["TP"].splitlines()[1]
    assert "BackPropagator()" in outs["bp"].splitlines()[1]
    # TP mixes RP and LR by inverse-variance weighting; LR sends the score times the cost
    assert "inverse_variance_weight(" in outs["TP"]
    assert "location_score(" in outs["LR"] and "inverse_variance_weight" not in outs["LR"]
    for name in ("location_score", "inverse_variance_weight", "batch_weights"):
        assert name not in outs["RP"]
    assert "sample_like(" in outs["RP"]  # RP adds noise, backprop does not
    assert "sample_like" not in outs["bp"]
    assert len(set(outs.values())) == 4


def test_show_const_and_default_placeholders(capsys):
    # without --const, the loop count is a differentiable placeholder: one more gradient slot
    code, with_const, _ = run(capsys, "show", f"{CHAOTIC}:rollout", "-p", "RP", "-c", "horizon")
    assert code == 0
    code, without, _ = run(capsys, "show", f"{CHAOTIC}:rollout", "-p", "RP")
    assert code == 0
    ret = [ln for ln in without.splitlines() if ln.strip().startswith("return d_s")]
    ret_const = [ln for ln in with_const.splitlines() if ln.strip().startswith("return d_s")]
    assert ret and ret_const and ret[0].count(",") == ret_const[0].count(",") + 1
    code, checked, _ = run(capsys, "show", f"{CHAOTIC}:rollout", "-p", "RP", "-c", "horizon",
                           "--check-nan")
    assert code == 0 and "check_finite(" in checked and "check_finite" not in with_const


def test_show_local_propagator(capsys):
    code, out, err = run(capsys, "show", f"{SHAPING}:multipath", "--propagator", "LR",
                         "--local", "shape=GSLoss", "--const", "horizon")
    assert code == 0, err
    assert "batch_cholesky(" in out  # the GS templates are inlined at the "shape" site
    assert "[GSLoss()]" in out and "LRProp(" in out
    compile(out, "<show>", "exec")
    # without --local the call site names a propagator the manager does not have
    code, out, err = run(capsys, "show", f"{SHAPING}:multipath", "--propagator", "LR")
    assert code == 2 and out == ""
    line = line_of(SHAPING, 'local_propagator="shape"')
    assert f"gaussian_shaping.py:{line}" in err
    assert "--local" in err and "Traceback" not in err


def test_show_finds_the_manager_parameter(tmp_path, capsys):
    path = write(tmp_path, "cli_managers.py", """\
        import torch
        import propgen as pg

        GLOBAL = pg.PropagationManager()

        @pg.propagate
        def named(x, manager, W):
            return manager.forward(x @ W).sum(1)

        @pg.propagate
        def annotated(x, m: "pg.PropagationManager", W):
            return m.forward(x @ W).sum(1)

        @pg.propagate
        def from_global(x, W):
            return GLOBAL.forward(x @ W).sum(1)

        @pg.propagate
        def first(m, x, W, scale=2.0):
            return m.forward(x @ W * scale).sum(1)
        """)
    for name, sig in (("named", "(x, manager, W)"), ("annotated", "(x, m, W)"),
                      ("from_global", "(x, W)"), ("first", "(m, x, W, scale)")):
        code, out, err = run(capsys, "show", f"{path}:{name}", "-p", "LR")
        assert code == 0, err
        assert f"def {name}_forward{sig}:" in out
        assert "LRProp(" in out.splitlines()[1]  # the CLI's manager, not GLOBAL's config
        assert "location_score(" in out
    # the file's global manager is left as it was (and the generated code reads it)
    code, out, _ = run(capsys, "show", f"{path}:from_global")
    assert code == 0 and "BackPropagator()" in out.splitlines()[1]


def test_show_does_not_run_main_and_imports_siblings(tmp_path, capsys):
    write(tmp_path, "cli_sibling_helper.py", "SCALE = 3.0\n")
    marker = tmp_path / "main_ran"
    path = write(tmp_path, "cli_prog.py", f"""\
        import torch
        from cli_sibling_helper import SCALE

        def loss(x):
            return torch.sum(x * x) * SCALE

        if __name__ == "__main__":
            open({str(marker)!r}, "w").close()
        """)
    before = list(sys.path)
    code, out, err = run(capsys, "show", f"{path}:loss")
    assert code == 0, err
    assert "def loss_forward(x):" in out
    assert not marker.exists()
    assert sys.path == before  # restored


# --------------------------------------------------------------------------------------------
# show: ordinary functions are propgen.grad / propgen.autodiff, no codegen of its own
# --------------------------------------------------------------------------------------------

PLAIN = """\
    import torch

    def loss(x, w, b):
        h = torch.tanh(x @ w + b)
        for _ in range(2):
            h = h * h if h.sum() > 0 else h - 1.0
        return torch.sum(h)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x, y):
            return torch.sum(self.lin(x) * y)

    class Helper:
        def method(self, x, y):
            return torch.sum(x * y)
    """


def test_show_plain_function_is_propgen_grad(tmp_path, capsys):
    path = write(tmp_path, "cli_plain.py", PLAIN)
    mod = load(path, "cli_plain_for_test")
    cases = [
        ([], propgen.grad(mod.loss)),
        (["--wrt", "w,b"], propgen.grad(mod.loss, wrt=(1, 2))),
        (["--wrt", "2,x"], propgen.grad(mod.loss, wrt=(2, 0))),
        (["--wrt", "-1"], propgen.grad(mod.loss, wrt=(2,))),
        (["--mode", "forward", "--wrt", "w"], propgen.autodiff(mod.loss, mode="forward",
                                                               wrt=(1,))),
    ]
    for extra, df in cases:
        code, out, err = run(capsys, "show", f"{path}:loss", *extra)
        assert code == 0, err
        assert out == propgen.source(df), extra
        compile(out, "<show>", "exec")
    # an nn.Module subclass is its forward, --wrt counting forward's own arguments
    code, out, err = run(capsys, "show", f"{path}:Net", "--wrt", "y")
    assert code == 0, err
    assert out == propgen.source(propgen.grad(mod.Net(), wrt=1))
    code, out, err = run(capsys, "show", f"{path}:Helper.method", "--wrt", "1")
    assert code == 0, err
    assert out == propgen.source(propgen.grad(mod.Helper().method, wrt=1))


# --------------------------------------------------------------------------------------------
# show: errors exit 2 with one message naming the file, never a traceback
# --------------------------------------------------------------------------------------------

BAD = """\
    import torch

    def gen(x):
        yield torch.sum(x)  # BAD yield

    counter = 0

    def uses_global(x):
        global counter  # BAD global
        return torch.sum(x)

    def fine(x):
        return torch.sum(x * x)
    """


@pytest.mark.parametrize("case", [
    "missing file", "not python", "no function", "no colon", "syntax error", "import error",
    "bad propagator", "bad local", "propagator on plain", "yield", "global", "bad wrt",
    "bad const", "not a function",
])
def test_show_errors(tmp_path, capsys, case):
    bad = write(tmp_path, "cli_bad.py", BAD)
    syntax = write(tmp_path, "cli_syntax.py", "import torch\n\ndef f(x):\n    return x +\n")
    raising = write(tmp_path, "cli_raising.py", "import torch\nraise RuntimeError('boom')\n")
    text = write(tmp_path, "notes.txt", "hello\n")
    argv, name, expect = {
        "missing file": ([f"{tmp_path}/nope.py:f"], "nope.py", "no such file"),
        "not python": ([f"{text}:f"], "notes.txt", "not a Python file"),
        "no function": ([f"{bad}:nope"], "cli_bad.py", "'nope'"),
        "no colon": ([str(bad)], "cli_bad.py", "FILE.py:FUNCTION"),
        "syntax error": ([f"{syntax}:f"], "cli_syntax.py:4", "syntax error"),
        "import error": ([f"{raising}:f"], "cli_raising.py", "RuntimeError: boom"),
        "bad propagator": ([f"{CHAOTIC}:rollout", "-p", "XYZ"], "chaotic_rnn.py",
                           "unknown propagator 'XYZ'"),
        "bad local": ([f"{SHAPING}:multipath", "--local", "shape"], "gaussian_shaping.py",
                      "NAME=PROPAGATOR"),
        "propagator on plain": ([f"{bad}:fine", "-p", "TP"], "cli_bad.py",
                                "applies to @propgen.propagate functions"),
        "yield": ([f"{bad}:gen"], f"cli_bad.py:{line_of(bad, 'BAD yield')}", "yield"),
        "global": ([f"{bad}:uses_global"], f"cli_bad.py:{line_of(bad, 'BAD global')}",
                   "global"),
        "bad wrt": ([f"{bad}:fine", "--wrt", "y"], "cli_bad.py", "not a parameter"),
        "bad const": ([f"{CHAOTIC}:rollout", "--const", "steps"], "chaotic_rnn.py",
                      "no such parameter"),
        "not a function": ([f"{bad}:counter"], "cli_bad.py", "not a function (int object)"),
    }[case]
    code, out, err = run(capsys, "show", *argv)
    assert code == 2
    assert out == ""
    assert name in err and expect in err, err
    assert "Traceback" not in err


def test_propagator_names():
    tp = cli.make_propagator("tp")
    assert isinstance(tp, propgen.TotalProp)
    assert tp.defaults["dist_class"] is torch.distributions.Normal
    assert isinstance(cli.make_propagator("BackProp"), propgen.BackPropagator)
    assert isinstance(cli.make_propagator("resample"), propgen.ResampleProp)
    assert isinstance(cli.make_propagator("GSLoss"), propgen.GSLoss)
    assert {"BP", "RP", "LR", "TP", "GSProp", "ProxProp"} <= set(cli.propagator_names())
    assert "SumProp" not in cli.propagator_names()  # needs arguments
    with pytest.raises(cli.CLIError, match="unknown propagator"):
        cli.make_propagator("nope")


# --------------------------------------------------------------------------------------------
# doctor
# --------------------------------------------------------------------------------------------


def test_doctor(capsys, cache_dir):
    code, out, err = run(capsys, "doctor")
    assert code == 0, out + err
    for section in ("versions", "cache", "devices", "checks"):
        assert re.search(rf"^{section}$", out, re.M), section
    for name in ("python", "propgen", "torch", "gast", "astor", "numpy", "distributed"):
        assert re.search(rf"^  {name}\s+\S", out, re.M), name
    assert re.search(rf"^  directory\s+{re.escape(cache_dir)}$", out, re.M)
    assert re.search(r"^  permissions\s+0700 \(user-only\)$", out, re.M)
    checks = re.findall(r"^  (ok|FAIL) +(.*?):", out, re.M)
    names = [n for _, n in checks]
    assert "reverse mode on cpu" in names
    assert {"forward mode", "propagate", "generated file"} <= set(names)
    if torch.cuda.is_available():
        assert "reverse mode on cuda:0" in names
    assert all(status == "ok" for status, _ in checks), out
    assert "FAIL" not in out


def test_doctor_reports_a_failing_check(capsys, monkeypatch):
    def broken() -> str:
        raise AssertionError("JVP differs from torch.func.jvp by 1.0e+00")

    monkeypatch.setattr(propgen.doctor, "_check_forward", broken)
    code, out, _ = run(capsys, "doctor")
    assert code == 1
    assert re.search(r"^  FAIL +forward mode: AssertionError: JVP differs", out, re.M)
    assert re.search(r"^  ok +propagate:", out, re.M)


# --------------------------------------------------------------------------------------------
# the command line itself
# --------------------------------------------------------------------------------------------


def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "show" in out and "doctor" in out and "examples:" in out
    code, out, _ = run(capsys, "show", "--help")
    assert code == 0
    for word in ("--propagator", "--local", "--const", "--wrt", "--mode", "TP", "GSLoss"):
        assert word in out
    code, _, err = run(capsys)
    assert code == 2 and "usage" in err


def test_python_dash_m(tmp_path, cache_dir):
    env = dict(os.environ, PROPGEN_CACHE_DIR=cache_dir)

    def python_m(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "propgen", *argv], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=120)

    p = python_m("--help")
    assert p.returncode == 0 and "show" in p.stdout and "doctor" in p.stdout
    p = python_m("show", f"{CHAOTIC}:rollout", "--propagator", "TP", "--const", "horizon")
    assert p.returncode == 0, p.stderr
    assert "def rollout_backward(" in p.stdout and "inverse_variance_weight(" in p.stdout
    compile(p.stdout, "<show>", "exec")
    bad = write(tmp_path, "cli_bad_sub.py", BAD)
    p = python_m("show", f"{bad}:gen")
    assert p.returncode == 2 and p.stdout == ""
    assert f"cli_bad_sub.py:{line_of(bad, 'BAD yield')}" in p.stderr
    assert "Traceback" not in p.stderr
