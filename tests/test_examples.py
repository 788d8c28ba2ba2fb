"""The examples run, with tiny arguments, and show what they claim (skipped without the
optional example dependencies)."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def example(monkeypatch):
    pytest.importorskip("sklearn", reason="the digits examples need scikit-learn")
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


def test_sigprop_digits_trains_every_layer(example):
    out = example("sigprop_digits").main(["--epochs", "1", "--no-progress", "--threads", "1"])
    assert set(out["layers"]) == {f"layers.{i} (Sequential)" for i in range(3)}
    assert all(math.isfinite(loss) and 0 <= acc <= 1 for loss, acc in out["layers"].values())
    assert 0.1 < out["sigprop_test_accuracy"] <= 1 and 0.1 < out["backprop_test_accuracy"] <= 1


def test_proxprop_digits_first_epoch_and_sweep(example):
    mod = example("proxprop_digits")
    out = mod.main(["--epochs", "1", "--no-progress", "--threads", "1"])
    prox, bp = out["proxprop_train_loss"], out["backprop_train_loss"]
    assert prox[0] == pytest.approx(bp[0])  # the same initial network
    assert prox[1] < bp[1] < prox[0]  # the implicit steps go further in one epoch
    sweep = mod.main(["--epochs", "1", "--no-progress", "--threads", "1", "--sweep"])
    start = sweep["initial_train_loss"]
    assert all(v < start for k, v in sweep["sweep"].items() if k.startswith("proxprop"))
    assert not sweep["sweep"]["backprop lr=50"] < start  # the explicit step at lr 50 fails
