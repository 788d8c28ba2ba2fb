"""Functions the concurrency tests compile from several threads at once.

They are distinct code objects (each thread that compiles one of them runs the whole pipeline)
written over different ops, so that a compiler stage sharing state between compilations would
mix them up.  Nothing here is copied from another project.
"""

from __future__ import annotations

import torch
from torch.distributions import Normal

import propgen as pg


def f0(x, w):
    h = torch.tanh(x @ w)
    return (h * h).sum()


def f1(x, w):
    h = torch.sin(x) @ w
    for _ in range(3):
        h = h * torch.sigmoid(h)
    return h.mean()


def f2(x, w):
    h = x @ w
    if h.sum() > 0:
        h = torch.exp(-h * h)
    else:
        h = torch.log(h * h + 1.0)
    return h.sum()


def f3(x, w):
    a, b = torch.cos(x @ w), torch.sqrt(x * x + 1.0).sum()
    return (a * b).sum() / (b + 1.0)


FUNCTIONS = [f0, f1, f2, f3]


@pg.propagate
def noisy(manager, x, w):
    h = manager.forward(x @ w)
    h = manager.forward(torch.tanh(h))
    return (h ** 2).sum(1)


def noisy_manager(scale: float) -> pg.PropagationManager:
    """A manager whose nodes add Normal(0, scale) noise (scale 0: plain backprop values)."""
    return pg.PropagationManager(
        pg.RPProp(dist_class=Normal, dist_params={"loc": 0.0, "scale": scale}))


def prox_program(fc1: torch.nn.Module, fc2: torch.nn.Module):
    """Two layer nodes: under ProxProp their backward solves read the manager's ``tau``."""

    @pg.propagate
    def net(x, manager):
        h = torch.tanh(manager.forward(x, layer=fc1))
        return manager.forward(h, layer=fc2)

    return net
