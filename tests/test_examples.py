"""Every script in examples/ runs, with tiny arguments, and shows what it claims.

``EXAMPLES`` lists every example script with its tiny arguments; a script added to examples/
without an entry there fails ``test_every_example_is_tested``.  The digits examples are
skipped without scikit-learn, the ``--plot`` tests without matplotlib.
"""

from __future__ import annotations

import ast
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

# Shared modules the examples import: no ``main``, not run.  Modules whose name starts with
# "_" are helpers too.
HELPERS = {"digits_data.py"}

# script -> tiny arguments that make it run in about a second
EXAMPLES = {
    "quickstart.py": ["--quiet", "--no-progress"],
    "chaotic_rnn.py": ["--betas", "1.0", "3.5", "--batch", "50", "--horizon", "50",
                       "--repeats", "8", "--quiet", "--no-progress"],
    "gaussian_shaping.py": ["--paths", "1", "16", "--betas", "2.0", "--batch", "100",
                            "--horizon", "10", "--repeats", "10", "--no-progress"],
    "sigprop_digits.py": ["--epochs", "1", "--no-progress", "--threads", "1"],
    "proxprop_digits.py": ["--epochs", "1", "--no-progress", "--threads", "1"],
}
NEEDS_SKLEARN = {"sigprop_digits.py", "proxprop_digits.py"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def example(monkeypatch):
    """Imports an example (by module name) fresh from examples/; forgets it afterwards."""
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    names = {"_common", "digits_data"}

    def forget():
        for module in names:
            sys.modules.pop(module, None)

    def load(name):
        names.add(name)
        forget()
        return importlib.import_module(name)

    yield load
    forget()


def needs(script: str) -> None:
    if script in NEEDS_SKLEARN:
        pytest.importorskip("sklearn", reason="the digits examples need scikit-learn")


def defines(path: Path) -> tuple[bool, bool]:
    """(defines a top-level ``main``, has an ``if __name__ == "__main__":`` block)."""
    tree = ast.parse(path.read_text())
    has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    has_guard = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)
                    for n in tree.body)
    return has_main, has_guard


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES_DIR.glob("*.py")}
    helpers = {s for s in scripts if s.startswith("_") or s in HELPERS}
    assert scripts - helpers == set(EXAMPLES), "list every example script in EXAMPLES"
    for script in EXAMPLES:
        assert defines(EXAMPLES_DIR / script) == (True, True), script
    for helper in helpers:
        assert defines(EXAMPLES_DIR / helper) == (False, False), f"{helper} is a helper"


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_common_options(example, capsys, script):
    """Every example takes --device, --dtype and --no-progress (and shows them in --help)."""
    with pytest.raises(SystemExit) as exit_info:
        example(script[:-3]).main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert all(flag in usage for flag in ("--device", "--dtype", "--no-progress"))
    docstring = (EXAMPLES_DIR / script).read_text().split('"""')[1]
    assert "--device" in docstring and "--dtype" in docstring, "show the flags in the usage"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_quickstart_matches_autograd(example, dtype):
    out = example("quickstart").main(["--dtype", dtype, *EXAMPLES["quickstart.py"]])
    assert out["passed"] and out["max_difference"] <= out["tolerance"]
    assert out["tolerance"] < (1e-4 if dtype == "float32" else 1e-12)
    assert set(out["differences"]) == {"w1", "b1", "w2", "b2"}


def test_quickstart_fails_on_a_wrong_gradient(example, monkeypatch):
    """The check can fail: gradients 1 % off are reported, and main says so."""
    quickstart = example("quickstart")
    grad = quickstart.propgen.grad

    def off_by_one_percent(*args, **kwargs):
        dloss = grad(*args, **kwargs)

        def wrong(*inputs):
            grads, loss = dloss(*inputs)
            return tuple(1.01 * g for g in grads), loss

        return wrong

    monkeypatch.setattr(quickstart.propgen, "grad", off_by_one_percent)
    out = quickstart.main(EXAMPLES["quickstart.py"])
    assert not out["passed"] and out["max_difference"] > out["tolerance"]


def check_estimates(figures: dict) -> None:
    """Every (mean, variance) is finite, every variance positive."""
    for per_x in figures.values():
        for mean, var in per_x.values():
            assert math.isfinite(mean) and math.isfinite(var) and var > 0


def test_chaotic_rnn_shows_the_paper_claims(example):
    args = EXAMPLES["chaotic_rnn.py"]
    repeats = int(args[args.index("--repeats") + 1])
    out = example("chaotic_rnn").main(args)
    assert set(out) == {"RP", "LR", "TP"} and all(set(v) == {1.0, 3.5} for v in out.values())
    check_estimates(out)
    (rp_mean, rp_var), (lr_mean, lr_var), (tp_mean, tp_var) = (out[k][1.0] for k in out)
    # beta 1 (not chaotic): RP and TP estimate the same gradient, both far better than LR
    assert abs(rp_mean - tp_mean) < 5 * math.sqrt((rp_var + tp_var) / repeats)
    assert lr_var > 100 * max(rp_var, tp_var)
    # beta 3.5 (chaotic): RP's variance explodes, LR's and TP's do not
    var = {k: out[k][3.5][1] for k in out}
    assert var["RP"] > 1e6 * rp_var
    assert var["RP"] > 1e3 * max(var["LR"], var["TP"])
    for beta in (1.0, 3.5):  # TP is never worse than the worse of its parts
        assert out["TP"][beta][1] <= max(out["RP"][beta][1], out["LR"][beta][1])


def test_gaussian_shaping_shows_the_paper_claims(example):
    args = EXAMPLES["gaussian_shaping.py"]
    repeats = int(args[args.index("--repeats") + 1])
    out = example("gaussian_shaping").main(args)
    assert set(out) == {"LR", "LR+GS", "TP", "TP+GS"}
    per_d = {name: by_beta[2.0] for name, by_beta in out.items()}
    check_estimates(per_d)
    var = {name: {d: v for d, (_, v) in by_d.items()} for name, by_d in per_d.items()}
    # the other paths add noise to the cost: LR's variance grows with D; GS does not see them
    assert var["LR"][16] > 2 * var["LR"][1]
    assert var["LR+GS"][16] < var["LR"][16]
    # all four estimate the same gradient (TP's estimate is the most precise)
    for name in ("LR", "LR+GS", "TP+GS"):
        for d in (1, 16):
            (mean, v), (tp_mean, tp_v) = per_d[name][d], per_d["TP"][d]
            assert abs(mean - tp_mean) < 5 * math.sqrt((v + tp_v) / repeats), (name, d)


def test_sigprop_digits_trains_every_layer(example):
    needs("sigprop_digits.py")
    out = example("sigprop_digits").main(EXAMPLES["sigprop_digits.py"])
    assert set(out["layers"]) == {f"layers.{i} (Sequential)" for i in range(3)}
    assert all(math.isfinite(loss) and 0 <= acc <= 1 for loss, acc in out["layers"].values())
    assert 0.1 < out["sigprop_test_accuracy"] <= 1 and 0.1 < out["backprop_test_accuracy"] <= 1


def test_proxprop_digits_first_epoch_and_sweep(example):
    needs("proxprop_digits.py")
    mod = example("proxprop_digits")
    out = mod.main(EXAMPLES["proxprop_digits.py"])
    prox, bp = out["proxprop_train_loss"], out["backprop_train_loss"]
    assert prox[0] == pytest.approx(bp[0])  # the same initial network
    assert prox[1] < bp[1] < prox[0]  # the implicit steps go further in one epoch
    sweep = mod.main([*EXAMPLES["proxprop_digits.py"], "--sweep"])
    start = sweep["initial_train_loss"]
    assert all(v < start for k, v in sweep["sweep"].items() if k.startswith("proxprop"))
    assert not sweep["sweep"]["backprop lr=50"] < start  # the explicit step at lr 50 fails


PLOTS = {  # script -> tiny arguments of a --plot run
    "chaotic_rnn.py": ["--betas", "1.0", "2.5", "--batch", "20", "--horizon", "10",
                       "--repeats", "3", "--quiet", "--no-progress"],
    "gaussian_shaping.py": ["--paths", "1", "2", "--betas", "2.0", "3.5", "--batch", "20",
                            "--horizon", "5", "--repeats", "3", "--no-progress"],
}


@pytest.mark.parametrize("script", sorted(PLOTS))
def test_plot_saves_a_png(example, tmp_path, script):
    pytest.importorskip("matplotlib")
    path = tmp_path / "figure.png"
    example(script[:-3]).main([*PLOTS[script], "--plot", str(path)])
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_without_matplotlib_says_what_to_install(example, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "figure.png"
    with pytest.raises(SystemExit) as exit_info:
        example("chaotic_rnn").main([*PLOTS["chaotic_rnn.py"], "--plot", str(path)])
    assert "pip install -e '.[examples]'" in str(exit_info.value.code)
    assert not path.exists()


def test_progress_bars(example, capsys, monkeypatch):
    """With tqdm the repeat loops draw a bar (on stderr); without it they run plainly."""
    pytest.importorskip("tqdm")
    args = [a for a in PLOTS["chaotic_rnn.py"] if a != "--no-progress"]
    out = example("chaotic_rnn").main(args)
    captured = capsys.readouterr()
    assert "estimate" in captured.err and "beta 2.5 TP" in captured.err
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert example("chaotic_rnn").main(args) == out  # the same seed, the same estimates
    captured = capsys.readouterr()
    assert captured.err == "" and "2.5" in captured.out
    common = example("_common")
    assert common.progress(range(3), True) == range(3)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_runs_as_a_script(script):
    """``python examples/X.py <tiny args>`` exits 0 (the ``__main__`` path)."""
    needs(script)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(EXAMPLES_DIR / script), *EXAMPLES[script]],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=EXAMPLES_DIR.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip()
