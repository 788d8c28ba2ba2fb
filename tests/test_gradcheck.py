"""Finite differences in float64 (``torch.autograd.gradcheck``) against the generated code.

The other tables compare with torch.autograd; this one needs no autograd formula at all. The
generated forward and backward are wrapped in an ``autograd.Function`` so that gradcheck
drives the backward with its own incoming gradient (not only the seed 1.0 that
``propgen.grad`` uses) and compares with central differences of the forward.
"""

from __future__ import annotations

import inspect
import warnings
import zlib

import pytest
import test_language
import test_ops
import torch

import propgen


class _Generated(torch.autograd.Function):
    """f(*args) with propgen's generated backward as its derivative."""

    @staticmethod
    def forward(ctx, df, wrt, *args):
        result, saved = df.forward(*[a.detach() if isinstance(a, torch.Tensor) else a
                                     for a in args])
        ctx.df, ctx.wrt, ctx.saved, ctx.n = df, wrt, saved, len(args)
        return result

    @staticmethod
    def backward(ctx, d_result):
        grads = ctx.df.backward(ctx.saved, d_result)
        out = [None] * ctx.n
        for g, i in zip(grads, ctx.wrt):
            out[i] = g
        return (None, None, *out)


def _gradcheck(fn, args: tuple, wrt: tuple, kwargs: dict | None = None) -> None:
    # the generated forward takes every parameter positionally, defaults filled in
    bound = inspect.signature(fn).bind(*args, **(kwargs or {}))
    bound.apply_defaults()
    values = list(bound.arguments.values())
    df = propgen.grad(fn, wrt=wrt)
    df(*[a.detach() if isinstance(a, torch.Tensor) else a for a in values])  # compile
    inputs = [
        a.detach().clone().requires_grad_(i in wrt) if isinstance(a, torch.Tensor) else a
        for i, a in enumerate(values)
    ]

    def wrapped(*a):
        return _Generated.apply(df, wrt, *a)

    assert torch.autograd.gradcheck(wrapped, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5)


# Entries whose test points are non-smooth on purpose (ties, kinks, bounds, torch's
# conventions there) or whose function is not smooth at all: finite differences do not apply.
NOT_SMOOTH = {
    "pow_at_zero": "x ** y at x = 0",
    "fmax_fmin": "ties",
    "clamp": "values on the bounds",
    "clamp_tensor_bounds": "values on the bounds",
    "clamp_min_max": "values on the bounds",
    "relu": "relu at 0",
    "max_min": "ties",
    "sort_ties": "ties",
    "casts": "rounding to half and bfloat16",
    "activations": "kinks at 0",
    "activation_bounds": "values on the bounds",
    "update_under_no_grad": "an update under no_grad changes the value, not the gradient",
    "embedding": "padding_idx and scale_grad_by_freq follow torch's conventions, not calculus",
}
# Language entries that read a tensor's value as a Python number (stop-gradient by design).
LANGUAGE_NOT_SMOOTH = {"stop_gradient"}


def _op_cases():
    for c in test_ops.CASES:
        if "cpu" in c.devices and c.name not in NOT_SMOOTH:
            yield pytest.param(c, id=c.name)


@pytest.mark.parametrize("c", list(_op_cases()))
def test_op_table_gradcheck(c) -> None:
    args = test_ops._inputs(c, torch.float64, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _gradcheck(c.fn, args, c.wrt)


@pytest.mark.parametrize("name, fn, make_args, wrt, kwargs",
                         test_language.CASES, ids=[c[0] for c in test_language.CASES])
def test_language_table_gradcheck(name, fn, make_args, wrt, kwargs) -> None:
    torch.manual_seed(zlib.crc32(name.encode()))
    args = make_args()
    if name in LANGUAGE_NOT_SMOOTH:
        pytest.skip("reads a tensor's value as a constant: finite differences do not apply")
    if not all(a.dtype == torch.float64 for a in args if isinstance(a, torch.Tensor)):
        pytest.skip("gradcheck needs float64 inputs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _gradcheck(fn, args, wrt, kwargs)
