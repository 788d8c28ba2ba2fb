"""Memory: training loops with a manager do not grow, and the tape is let go after backward,
also when backward raises (docs/guarantees.md).

Growth is measured three ways after a first (warm-up) iteration and after the last: the number
of live torch.Tensor objects (exact: a leaked node would leave thousands), the interpreter's
allocated blocks (Python objects: tape records, saved lists, namespaces) and, on Linux, the
resident set size (tensor storage, with a margin for the allocator's arenas: a leak of one
iteration's saved values would be ~10 MB an iteration, ~1 GB in all).  On CUDA the device
allocator's count is exact.
"""

from __future__ import annotations

import gc
import os
import sys
import weakref

import pytest
import torch
from torch.distributions import Normal

import propgen as pg
from tests._memory_program import chain, chain_reference, fragile, weighted_chain

F64 = torch.float64
NOISE = {"dist_class": Normal, "dist_params": {"loc": 0.0, "scale": 1e-3}}


def _footprint(device: torch.device) -> dict:
    gc.collect()
    # type(), not isinstance(): some objects of torch.distributed warn when asked their class
    out = {"tensors": sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor)),
           "blocks": sys.getallocatedblocks()}
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm", encoding="ascii") as fh:
            out["rss"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda"] = torch.cuda.memory_allocated(device)
    return out


def _train(program, manager, steps: int, iterations: int, device: torch.device) -> tuple:
    """SGD on w for ``iterations`` forward/backward passes of ``steps`` nodes each; the
    footprint after the first iteration and after the last."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g, dtype=F64).to(device)
    w = (0.3 * torch.randn(8, 8, generator=g, dtype=F64)).to(device).requires_grad_()
    opt = torch.optim.SGD([w], lr=1e-3)
    first = None
    for i in range(iterations):
        opt.zero_grad(set_to_none=True)
        manager.backward(program(manager, x, w, steps))
        opt.step()
        if i == 0:
            first = _footprint(device)
    return first, _footprint(device), x, w


def _assert_flat(first: dict, last: dict) -> None:
    assert last["tensors"] == first["tensors"], (first, last)
    assert last["blocks"] - first["blocks"] < 5_000, (first, last)
    if "rss" in first:
        assert last["rss"] - first["rss"] < 96 * 2**20, (first, last)
    if "cuda" in first:
        assert last["cuda"] == first["cuda"], (first, last)


def _devices() -> list:
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    return [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.cuda, cuda])]


@pytest.mark.slow
@pytest.mark.parametrize("device", _devices())
def test_a_hundred_iterations_of_ten_thousand_nodes_end_where_the_first_did(device):
    device = torch.device(device)
    manager = pg.PropagationManager()
    first, last, x, w = _train(chain, manager, 10_000, 100, device)
    _assert_flat(first, last)
    assert manager.nodes == 0
    # the loop trained: one more step's gradient is autograd's at the trained weights
    w_ref = w.detach().clone().requires_grad_()
    chain_reference(x, w_ref, 10_000).mean().backward()
    w.grad = None
    manager.backward(chain(manager, x, w, 10_000))
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["RP", "LR", "TP"])
def test_estimator_training_loops_do_not_grow(name):
    prop = {"RP": pg.RPProp(**NOISE), "LR": pg.LRProp(**NOISE), "TP": pg.TotalProp(**NOISE)}
    program = weighted_chain if name == "TP" else chain
    first, last, _, _ = _train(program, pg.PropagationManager(prop[name]), 300, 30,
                               torch.device("cpu"))
    _assert_flat(first, last)


def _saved_tensors(manager, *inputs: torch.Tensor) -> list:
    """Weak references to the tensors the tape holds (what the forward passes saved), but for
    the ``inputs`` the test itself holds."""
    out, todo = [], [r.saved for r in manager._tape]
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor):
            if not any(v is t for t in inputs):
                out.append(weakref.ref(v))
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
    return out


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    return x, torch.randn(4, 4, generator=g, dtype=F64).requires_grad_()


def test_the_tape_is_let_go_after_backward():
    manager = pg.PropagationManager()
    x, w = _inputs()
    loss = chain(manager, x, w, 20)
    saved = _saved_tensors(manager, x, w)
    assert len(saved) >= 20
    manager.backward(loss)
    assert manager.nodes == 0
    assert [r for r in saved if r() is not None] == []


def test_the_tape_is_let_go_when_backward_raises():
    manager = pg.PropagationManager(check_nan=True)
    x, w = _inputs()
    loss = chain(manager, x, w, 20)  # a record whose backward runs after the failing one
    loss = loss + fragile(manager, x, w)
    saved = _saved_tensors(manager, x, w)
    with pytest.raises(FloatingPointError) as info:
        manager.backward(loss)
    assert "_memory_program.py" in str(info.value)
    assert manager.nodes == 0
    # while the exception (and its traceback) is still held, for post-mortem debugging, only
    # the failing node's values may be alive: the chain's twenty nodes are freed
    alive = [r for r in saved if r() is not None]
    assert len(alive) < 10, len(alive)
    del info
    gc.collect()
    assert [r for r in saved if r() is not None] == []
    # and the manager records and propagates again
    manager.backward(chain(manager, x, w, 3))
