"""Forward mode and composition over the language table of reverse mode.

Every function of ``test_language.CASES`` (loops, branches, early returns, containers,
closures, helpers called from source, opaque modules...) is differentiated three more ways and
compared with torch.autograd:

* forward mode: ``propgen.autodiff(f, mode='forward')`` along a random direction equals the
  directional derivative <autograd's gradient, direction>;
* forward over reverse: ``propgen.hvp(f)`` equals autograd's double backward;
* torch.func.jvp where torch can run it, as a second reference for the tangent itself.
"""

from __future__ import annotations

import warnings
import zlib

import pytest
import test_language
import torch
from _lang_helpers import reference_grads

import propgen

CASES = test_language.CASES
IDS = [c[0] for c in CASES]
# Programs forward mode refuses with a named error (reverse mode follows these through
# torch.autograd, which forward mode cannot do for objects that hide their tensors).
REFUSED = {"distribution_objects": "forward mode through the call Normal"}


def _direction(name: str, args: tuple, wrt: tuple) -> tuple:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return tuple(torch.randn(args[i].shape, generator=g, dtype=torch.float64).to(args[i])
                 for i in wrt)


def _call_tangents(tans: tuple):
    return tans[0] if len(tans) == 1 else tans


@pytest.mark.parametrize("name, fn, make_args, wrt, kwargs", CASES, ids=IDS)
def test_forward_matches_autograd(name, fn, make_args, wrt, kwargs):
    args = make_args()
    grads, result = reference_grads(fn, args, wrt, kwargs)
    tans = _direction(name, args, wrt)
    want = sum((g * v).sum() for g, v in zip(grads, tans))
    jf = propgen.autodiff(fn, mode="forward", wrt=wrt, preserve_result=True)
    if name in REFUSED:
        with pytest.raises(propgen.UnsupportedSyntaxError, match=REFUSED[name]) as info:
            jf(*args, tangents=_call_tangents(tans), **kwargs)
        assert info.value.lineno > 0 and info.value.filename.endswith("test_language.py")
        return
    got, value = jf(*args, tangents=_call_tangents(tans), **kwargs)
    torch.testing.assert_close(value, result)
    torch.testing.assert_close(got, want.to(got.dtype))


def _double_backward(fn, args, wrt, kwargs, tans):
    args = list(args)
    for i in wrt:
        args[i] = args[i].detach().clone().requires_grad_(True)
    leaves = [args[i] for i in wrt]
    out = fn(*args, **kwargs)
    grads = torch.autograd.grad(out, leaves, create_graph=True, allow_unused=True)
    dot = sum((g * v).sum() for g, v in zip(grads, tans) if g is not None and g.requires_grad)
    if not isinstance(dot, torch.Tensor):
        return tuple(torch.zeros_like(x) for x in leaves)
    hv = torch.autograd.grad(dot, leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if h is None else h for x, h in zip(leaves, hv))


@pytest.mark.parametrize("name, fn, make_args, wrt, kwargs", CASES, ids=IDS)
def test_hvp_matches_double_backward(name, fn, make_args, wrt, kwargs):
    args = make_args()
    tans = _direction(name, args, wrt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _double_backward(fn, args, wrt, kwargs, tans)
    if name in REFUSED:
        with pytest.raises(propgen.UnsupportedSyntaxError):
            propgen.hvp(fn, wrt=wrt)(*args, tangents=_call_tangents(tans), **kwargs)
        return
    got = propgen.hvp(fn, wrt=wrt)(*args, tangents=_call_tangents(tans), **kwargs)
    got = (got,) if isinstance(got, torch.Tensor) else tuple(got)
    for i, g, w in zip(wrt, got, want, strict=True):
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"H v for argument {i}: {m}")
