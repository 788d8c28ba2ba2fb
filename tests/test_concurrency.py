"""Concurrency: compiling and running from several threads at once, and managers that are
independent of one another (the reliability guarantees in docs/guarantees.md).

Every check compares with torch.autograd or with the same computation run alone, so a race
shows as a wrong number, not only as an exception.  ``sys.setswitchinterval`` is lowered while
the threads run so that the interpreter switches threads between nearly every bytecode.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from propgen.templates import TEMPLATE_MODULES

import propgen as pg
from propgen.template import Registry
from tests._concurrency_program import FUNCTIONS, noisy, noisy_manager, prox_program

F64 = torch.float64


def _in_threads(work: Callable[[int], None], n: int) -> None:
    """Run ``work(i)`` for i < n in n threads released together; re-raise the first error."""
    barrier = threading.Barrier(n)
    errors: list = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a thread hung"
    finally:
        sys.setswitchinterval(old)
    if errors:
        raise errors[0]


def _autograd(f: Callable, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    w = w.detach().requires_grad_()
    (g,) = torch.autograd.grad(f(x, w), [w])
    return g


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)


def test_threads_compiling_and_running_at_once_get_autograds_gradients():
    # a registry of its own: nothing is compiled yet, so the threads compile concurrently
    # (two threads per function: the same compilation raced, and different ones interleaved)
    registry = Registry(TEMPLATE_MODULES)

    def work(i: int) -> None:
        f = FUNCTIONS[i % len(FUNCTIONS)]
        df = pg.grad(f, wrt=(1,), registry=registry)
        for k in range(10):
            x, w = _inputs(100 * i + k)
            torch.testing.assert_close(df(x, w), _autograd(f, x, w), rtol=1e-10, atol=1e-12)

    _in_threads(work, 2 * len(FUNCTIONS))


def test_threads_building_forward_mode_at_once_get_autograds_derivatives():
    registry = Registry(TEMPLATE_MODULES)

    def work(i: int) -> None:
        f = FUNCTIONS[i % len(FUNCTIONS)]
        jf = pg.autodiff(f, mode="forward", wrt=(1,), registry=registry)
        for k in range(5):
            x, w = _inputs(100 * i + k)
            v = torch.randn(w.shape, dtype=F64, generator=torch.Generator().manual_seed(k))
            expected = (_autograd(f, x, w) * v).sum()
            torch.testing.assert_close(jf(x, w, tangents=v), expected, rtol=1e-10, atol=1e-12)

    _in_threads(work, 2 * len(FUNCTIONS))


def test_threads_with_their_own_managers_never_see_each_others_configuration():
    # the scale-0 managers must give noiseless values and backprop's gradient every time, while
    # the other threads run the same generated code with noise of scale 100
    def work(i: int) -> None:
        scale = 0.0 if i % 2 == 0 else 100.0
        manager = noisy_manager(scale)
        for k in range(30):
            x, w = _inputs(10 * i + k)
            w.requires_grad_()
            out = noisy(manager, x, w)
            clean = (torch.tanh(x @ w.detach()) ** 2).sum(1)
            if scale == 0.0:
                torch.testing.assert_close(out, clean, rtol=0, atol=0)
            else:
                assert (out - clean).abs().max() > 1e-3
            manager.backward(out)
            if scale == 0.0:
                expected = _autograd(lambda x, w: (torch.tanh(x @ w) ** 2).sum(1).mean(), x, w)
                torch.testing.assert_close(w.grad, expected, rtol=1e-10, atol=1e-12)

    _in_threads(work, 6)


def _prox_grads(tau: float, order: str) -> dict:
    """The parameter gradients of two ProxProp managers (tau and 10 tau) over one program,
    their forwards and backwards run in ``order`` ("AB": interleaved, "A", "B": alone)."""
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(6, 9).to(F64), torch.nn.Linear(9, 4).to(F64)
    net = prox_program(fc1, fc2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 6, generator=g, dtype=F64), torch.randint(0, 4, (13,), generator=g)
    managers = {"A": pg.PropagationManager(pg.ProxProp(tau=tau, mode="exact")),
                "B": pg.PropagationManager(pg.ProxProp(tau=10 * tau, mode="exact"))}
    names = "AB" if order == "AB" else order
    losses = {n: F.cross_entropy(net(x, managers[n]), y) for n in names}
    out = {}
    for n in reversed(names):  # B's backward first: A's then runs after B's forward and backward
        for p in (*fc1.parameters(), *fc2.parameters()):
            p.grad = None
        managers[n].backward(losses[n])
        out[n] = [p.grad.clone() for p in (*fc1.parameters(), *fc2.parameters())]
    return out


def test_interleaved_managers_each_get_the_result_they_get_alone():
    both = _prox_grads(0.1, "AB")
    alone = {**_prox_grads(0.1, "A"), **_prox_grads(0.1, "B")}
    for n in "AB":
        for got, want in zip(both[n], alone[n]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # the two configurations differ, so mixing them up would show
    assert (both["A"][0] - both["B"][0]).abs().max() > 1e-3


def test_a_manager_recording_in_two_threads_at_once_is_refused():
    manager = noisy_manager(0.0)
    x, w = _inputs(0)
    w.requires_grad_()
    noisy(manager, x, w)  # this thread's forward pass is on the tape
    seen: list = []

    def other() -> None:
        try:
            noisy(manager, x, w)
        except RuntimeError as e:
            seen.append(str(e))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen and "another thread" in seen[0] and "its own PropagationManager" in seen[0]
    assert manager.nodes == 1  # the other thread's nodes did not join this forward pass
    manager.backward(noisy(manager, x, w))  # and this thread goes on recording and propagating
    assert manager.nodes == 0


def test_the_default_registry_is_built_once_when_threads_ask_for_it_together():
    threads = 4
    saved = Registry._default
    Registry._default = None
    got: list = []
    try:
        _in_threads(lambda i: got.append(Registry.default()), threads)
    finally:
        built, Registry._default = Registry._default, saved
    assert len(got) == threads and all(r is built for r in got)
