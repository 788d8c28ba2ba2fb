"""Helpers for the language, extensibility, error and codegen tests.

Two kinds of things live here:

* module-level functions and tensors that differentiated functions in the tests call or read,
  so that propgen has to follow calls into another module (transforming the callee from its
  source, resolving the callee's own globals);
* the reference machinery the tests use: ``reference_grads`` runs the function under
  torch.autograd and ``assert_matches_autograd`` compares propgen's gradients with it.

Nothing here is copied from another project.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence

import torch

import propgen

# --------------------------------------------------------------------------------------------
# Module-level tensors and constants read by differentiated functions
# --------------------------------------------------------------------------------------------

_GEN = torch.Generator().manual_seed(1234)
W_GLOBAL = torch.randn(4, 4, generator=_GEN, dtype=torch.float64)
B_GLOBAL = torch.randn(4, generator=_GEN, dtype=torch.float64)
SCALE = 2.5
OFFSETS = (0.5, -1.0, 2.0)


# --------------------------------------------------------------------------------------------
# Functions called from differentiated functions (propgen transforms them from source)
# --------------------------------------------------------------------------------------------


def scale_add(x, y, alpha=2.0):
    """A helper with a keyword default."""
    return x * alpha + y


def helper_calls_helper(x):
    """A helper that calls another helper of this module."""
    return torch.sin(scale_add(x, x * x, alpha=SCALE))


def rnn_step(h, x, w):
    """One recurrent step, meant to be called in a loop."""
    return torch.tanh(h @ w + x)


def split_pair(x):
    """A helper returning a tuple."""
    s = torch.sin(x)
    c = torch.cos(x) * x
    return s, c


def affine_global(x):
    """Reads this module's globals, not the caller's."""
    return x @ W_GLOBAL + B_GLOBAL


def with_branch(x, flag):
    """A helper with a Python-valued branch and an early return."""
    if flag:
        return (x * 3.0).exp()
    y = x.abs() + 1.0
    return y.log()


def codegen_target(x, w):
    """A function with a loop, a branch and a helper call, compiled in subprocesses."""
    h = x
    acc = torch.zeros((), dtype=x.dtype)
    for i in range(3):
        h = torch.tanh(h @ w) + 0.1 * i
        if i % 2 == 0:
            acc = acc + (h * h).sum()
        else:
            acc = acc - h.mean()
    return acc + scale_add(h, x).sum()


# Constructs propgen must reject when reached through a call (the error names this file).


def helper_with_try(x):
    try:  # BAD-TRY
        y = x.exp()
    except RuntimeError:
        y = x
    return y


def ping(x, n):
    if n <= 0:
        return x
    return pong(x * 2.0, n - 1)  # BAD-PING


def pong(x, n):
    if n <= 0:
        return x
    return ping(x + 1.0, n - 1)  # BAD-PONG


def helper_unresolved(x):
    return x * not_defined_anywhere_qq  # noqa: F821  # BAD-NAME


# --------------------------------------------------------------------------------------------
# Reference machinery
# --------------------------------------------------------------------------------------------

TIGHT64 = {"rtol": 1e-9, "atol": 1e-10}


def tolerances(dtype: torch.dtype) -> dict:
    """Tight tolerances for float64, torch's defaults for other dtypes."""
    return dict(TIGHT64) if dtype == torch.float64 else {}


def reference_grads(f: Callable, args: Sequence, wrt: Sequence[int], kwargs=None):
    """Gradients of ``f(*args, **kwargs)`` w.r.t. ``args[i] for i in wrt`` via torch.autograd.

    Returns (tuple of gradients in wrt order, detached result).  An argument that receives
    no gradient gets zeros, as propgen promises.
    """
    kwargs = kwargs or {}
    args = list(args)
    for i in wrt:
        args[i] = args[i].detach().clone().requires_grad_(True)
    out = f(*args, **kwargs)
    inputs = [args[i] for i in wrt]
    if out.requires_grad:
        grads = torch.autograd.grad(out, inputs, allow_unused=True)
    else:
        grads = (None,) * len(inputs)
    grads = tuple(
        torch.zeros_like(a) if g is None else g for a, g in zip(inputs, grads, strict=True)
    )
    return grads, out.detach()


def as_tuple(grads, n: int) -> tuple:
    """propgen returns one tensor for one wrt index and a tuple for several."""
    if n == 1:
        assert isinstance(grads, torch.Tensor), f"expected one tensor, got {type(grads)}"
        return (grads,)
    assert isinstance(grads, tuple), f"expected a tuple of {n} gradients, got {type(grads)}"
    assert len(grads) == n
    return grads


def assert_matches_autograd(
    f: Callable, *args, wrt: Sequence[int] = (0,), kwargs=None, dtype=None, **grad_kwargs
):
    """propgen.grad(f, wrt) on args (and kwargs) equals torch.autograd, in wrt order.

    Also checks that propgen neither mutates its inputs nor returns a wrongly shaped or typed
    gradient (assert_close compares shape, dtype and device).  Returns the compiled function.
    """
    kwargs = kwargs or {}
    wrt = tuple(wrt)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    expected, _ = reference_grads(f, args, wrt, kwargs)
    df = propgen.grad(f, wrt=wrt, **grad_kwargs)
    got = as_tuple(df(*args, **kwargs), len(wrt))
    if dtype is None:
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
    for i, g, e in zip(wrt, got, expected, strict=True):
        assert isinstance(g, torch.Tensor), f"gradient of argument {i} is {type(g)}"
        torch.testing.assert_close(
            g, e, **tolerances(dtype), msg=lambda m, i=i: f"gradient of argument {i}: {m}"
        )
    for i, (a, b) in enumerate(zip(args, before, strict=True)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f"propgen modified argument {i} in place"
    return df


def marked_line(fn: Callable, marker: str) -> tuple[str, int]:
    """(basename of fn's file, real line number) of the line of fn's source holding ``marker``.

    Computed from inspect.getsourcelines, so the tests never hard-code a line number.
    """
    lines, start = inspect.getsourcelines(fn)
    hits = [start + k for k, line in enumerate(lines) if marker in line]
    assert len(hits) == 1, f"marker {marker!r} found {len(hits)} times in {fn.__name__}"
    return os.path.basename(inspect.getsourcefile(fn)), hits[0]
