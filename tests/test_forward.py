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
import test_errors
import test_language
import torch
from _lang_helpers import marked_line, reference_grads

import propgen

CASES = test_language.CASES
IDS = [c[0] for c in CASES]
# Programs forward mode refuses with a named error (reverse mode follows these through
# torch.autograd, which forward mode cannot do for objects that hide their tensors).
REFUSED = {"distribution_objects": "forward mode through the call Normal"}
# Second derivatives of programs that change lists, dicts or buffers in place: the generated
# backward undoes those changes in place (runtime.undo_pop, restore_slot...), which propgen
# refuses to differentiate again rather than give a wrong answer.
MUTATES = {"augassign_subscript", "buffer_store", "list_ops", "dict_ops", "list_subscript_aug",
           "dict_in_loop", "clone_store_overwrite", "tensor_index_store"}
# ... and of programs with opaque calls, whose backward torch.autograd computes.
OPAQUE = {"distribution_objects", "dict_views"}


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
    if name in OPAQUE or name in MUTATES:
        words = "undoes in-place changes" if name in MUTATES else "without an adjoint template"
        with pytest.raises(propgen.UnsupportedSyntaxError, match=words):
            propgen.hvp(fn, wrt=wrt)(*args, tangents=_call_tangents(tans), **kwargs)
        return
    got = propgen.hvp(fn, wrt=wrt)(*args, tangents=_call_tangents(tans), **kwargs)
    got = (got,) if isinstance(got, torch.Tensor) else tuple(got)
    for i, g, w in zip(wrt, got, want, strict=True):
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"H v for argument {i}: {m}")


# ------------------------------------------------------------------------------------------
# Reverse over reverse, and whole Hessians
# ------------------------------------------------------------------------------------------


def mlp_loss(x, w1, w2, y):
    h = torch.tanh(x @ w1)
    out = torch.sigmoid(h @ w2)
    return ((out - y) ** 2).mean()


def rnn_loss(x, w):
    h = x[0] * 0.0
    for t in range(x.shape[0]):
        h = torch.tanh(h @ w + x[t])
    return (h * h).sum()


def branchy(x):
    total = x.sum() * 0.0
    for i in range(len(x)):
        if x[i] > 0:
            total = total + x[i] ** 3
        else:
            total = total - torch.sin(x[i]) * x[i]
    return total


def listy(x):
    parts = []
    for i in range(3):
        parts.append(torch.exp(x * (i + 1) * 0.1))
    last = parts.pop()
    return (last * parts[0] + parts[1].sum()).sum()


SECOND = [
    ("mlp", mlp_loss, lambda g: (torch.randn(6, 4, generator=g, dtype=torch.float64),
                                 torch.randn(4, 5, generator=g, dtype=torch.float64),
                                 torch.randn(5, 2, generator=g, dtype=torch.float64),
                                 torch.rand(6, 2, generator=g, dtype=torch.float64)), 1),
    ("rnn", rnn_loss, lambda g: (torch.randn(5, 3, generator=g, dtype=torch.float64),
                                 torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.5), 1),
    ("branchy", branchy, lambda g: (torch.randn(6, generator=g, dtype=torch.float64),), 0),
]


def _hessian_reference(fn, args, i):
    def of_one(a):
        full = list(args)
        full[i] = a
        return fn(*full)
    return torch.autograd.functional.hessian(of_one, args[i])


@pytest.mark.parametrize("name, fn, make, i", SECOND, ids=[s[0] for s in SECOND])
def test_hessian_from_hvp_matches_autograd_functional(name, fn, make, i):
    """Columns H e_k from propgen.hvp make torch.autograd.functional.hessian."""
    args = make(torch.Generator().manual_seed(zlib.crc32(name.encode())))
    want = _hessian_reference(fn, args, i)
    hf = propgen.hvp(fn, wrt=i)
    n = args[i].numel()
    cols = []
    for k in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[k] = 1.0
        cols.append(hf(*args, tangents=e.reshape(args[i].shape)).reshape(-1))
    got = torch.stack(cols, 1).reshape(want.shape)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name, fn, make, i", SECOND, ids=[s[0] for s in SECOND])
def test_hvp_matches_torch_functional_hvp(name, fn, make, i):
    args = make(torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7))
    v = torch.randn(args[i].shape, dtype=torch.float64)

    def of_one(a):
        full = list(args)
        full[i] = a
        return fn(*full)

    want = torch.autograd.functional.hvp(of_one, args[i], v)[1]
    got, grad = propgen.hvp(fn, wrt=i, preserve_result=True)(*args, tangents=v)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, torch.func.grad(of_one)(args[i]))


def test_reverse_over_reverse_gives_hvp():
    """propgen.grad of a function that calls a propgen.grad function: its generated code is
    inlined and differentiated again."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(
        3, 3, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(3, 3, generator=g, dtype=torch.float64)
    dw = propgen.grad(rnn_loss, wrt=1)

    def directional(x, w, v):
        return (dw(x, w) * v).sum()

    got = propgen.grad(directional, wrt=1)(x, w, v)
    want = torch.func.jvp(lambda w: torch.func.grad(rnn_loss, argnums=1)(x, w), (w,), (v,))[1]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name, fn, make, i", SECOND, ids=[s[0] for s in SECOND])
def test_grad_of_grad_sum(name, fn, make, i):
    """Reverse over reverse on every function above: d/dx sum(grad f) = H 1."""
    args = make(torch.Generator().manual_seed(zlib.crc32(name.encode()) + 11))
    df = propgen.grad(fn, wrt=i)

    def second_1(a):
        return df(a).sum()

    def second_2(a, b):
        return df(a, b).sum()

    def second_4(a, b, c, d):
        return df(a, b, c, d).sum()

    second = {1: second_1, 2: second_2, 4: second_4}[len(args)]
    got = propgen.grad(second, wrt=i)(*args)

    def of_one(a):
        full = list(args)
        full[i] = a
        return fn(*full)

    want = torch.autograd.functional.hvp(of_one, args[i], torch.ones_like(args[i]))[1]
    torch.testing.assert_close(got, want)


def test_second_order_of_list_mutation_is_refused():
    """listy's backward puts popped values back with runtime.undo_pop: differentiating that
    code again is refused with a named error, in both compositions."""
    x = torch.randn(4, dtype=torch.float64)
    with pytest.raises(propgen.UnsupportedSyntaxError, match="undoes in-place changes"):
        propgen.hvp(listy)(x, tangents=x)
    df = propgen.grad(listy)

    def second(a):
        return df(a).sum()

    with pytest.raises(propgen.UnsupportedSyntaxError, match="undoes in-place changes"):
        propgen.grad(second)(x)
    # first derivatives of the same function are unaffected
    torch.testing.assert_close(df(x), torch.func.grad(listy)(x))
    jf = propgen.autodiff(listy, mode="forward")
    torch.testing.assert_close(jf(x, tangents=x), torch.func.jvp(listy, (x,), (x,))[1])


def test_forward_over_forward_second_directional_derivative():
    """autodiff(mode='forward') of a forward-mode function: v^T H v along one direction."""
    x = torch.randn(4, dtype=torch.float64)
    v = torch.randn(4, dtype=torch.float64)
    jf = propgen.autodiff(branchy, mode="forward")

    def along(x, v):
        return jf(x, tangents=v)

    jjf = propgen.autodiff(along, mode="forward", wrt=0)
    got = jjf(x, v, tangents=v)
    want = v @ torch.autograd.functional.hessian(branchy, x) @ v
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------
# Bad input: the errors of reverse mode
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, words", [c[1:] for c in test_errors.CONSTRUCTS],
                         ids=[c[0] for c in test_errors.CONSTRUCTS])
def test_forward_unsupported_construct(fn, words):
    args = test_errors._args_for(fn)
    with pytest.raises(propgen.UnsupportedSyntaxError) as info:
        propgen.autodiff(fn, mode="forward")(*args, tangents=torch.ones_like(args[0]))
    msg = str(info.value)
    fname, line = marked_line(fn, "# BAD")
    assert f"{fname}:{line}" in msg, msg
    assert any(w in msg.lower() for w in words), msg


def test_forward_unresolved_name():
    with pytest.raises(propgen.UnresolvedNameError) as info:
        propgen.autodiff(test_errors.uses_undefined, mode="forward")(
            torch.ones(3), tangents=torch.ones(3))
    fname, line = marked_line(test_errors.uses_undefined, "# BAD")
    assert f"{fname}:{line}" in str(info.value)


def test_forward_api_misuse():
    with pytest.raises(ValueError, match="mode must be 'forward' or 'reverse'"):
        propgen.autodiff(branchy, mode="sideways")
    with pytest.raises(ValueError, match="out of range"):
        propgen.autodiff(branchy, mode="forward", wrt=3)
    jf = propgen.autodiff(mlp_loss, mode="forward", wrt=(0, 1))
    args = SECOND[0][2](torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="needs tangents="):
        jf(*args)
    with pytest.raises(TypeError, match="tuple of 2 tangents"):
        jf(*args, tangents=torch.ones(6, 4))


def test_forward_mode_refuses_propagation_nodes():
    manager = propgen.PropagationManager()

    @propgen.propagate
    def loss(x):
        y = manager.forward(torch.sin(x))  # BAD
        return y.sum()

    with pytest.raises(propgen.UnsupportedSyntaxError, match="manager.forward") as info:
        propgen.autodiff(loss, mode="forward")(torch.ones(3), tangents=torch.ones(3))
    assert "test_forward.py" in str(info.value)
