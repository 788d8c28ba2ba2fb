"""Programs the memory tests train for many iterations (tests/test_memory.py) and
benchmarks/memory.py measures: long chains of nodes, one manager.forward per step.
Nothing here is copied from another project."""

from __future__ import annotations

import torch

import propgen as pg


@pg.propagate
def chain(manager, x, w, steps):
    h = x
    for _ in range(steps):
        h = manager.forward(torch.tanh(h @ w))
    return (h * h).sum(1)


@pg.propagate
def weighted_chain(manager, x, w, steps):
    """The chain for TotalProp, whose nodes weigh their estimators by the variance of w's
    gradient (``ivw_target``)."""
    h = x
    for _ in range(steps):
        h = manager.forward(torch.tanh(h @ w), ivw_target=w)
    return (h * h).sum(1)


@pg.propagate
def fragile(manager, x, w):
    """Its second node's gradient is NaN (the derivative of sqrt at 0 times 0): under
    ``check_nan=True`` backward raises there."""
    h = manager.forward(torch.tanh(x @ w))
    h = manager.forward(torch.sqrt(h * h * 0.0) + h)
    return (h * h).sum(1)


def chain_reference(x: torch.Tensor, w: torch.Tensor, steps: int) -> torch.Tensor:
    """``chain`` under torch.autograd: the per-sample loss, for ``.mean().backward()``."""
    h = x
    for _ in range(steps):
        h = torch.tanh(h @ w)
    return (h * h).sum(1)
