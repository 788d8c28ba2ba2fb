"""Minimal programs found by the property tests (test_properties.py), as plain tests.

Each program below was drawn by ``tests/_progen.py`` (in the property tests, or in longer
runs of the same checks), shrunk (by hypothesis, or by deleting statements while the failure
stayed the same) and reduced by hand to the few lines that still show the bug.  It is written
out as source, loaded from a real file (propgen reads functions with ``inspect.getsource``)
and compared, in float64, with torch.autograd on the same source, the way the property tests
compare.  A test here that fails is an open propgen bug; its docstring says what goes wrong
(or, for the bugs fixed since, what went wrong).

Nothing here needs hypothesis.
"""

from __future__ import annotations

import textwrap

import _progen
import pytest
import torch

import propgen

F64 = torch.float64
TOL = {"rtol": 1e-7, "atol": 1e-9}


def _load(source: str, directory, name: str = "f"):
    module = _progen.load_module(textwrap.dedent(source), directory, "regression")
    return getattr(module, name)


def _arguments(*shapes, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g, dtype=F64) * 4.0 - 2.0 for s in shapes]


def _autograd(f, args: list, wrt: tuple) -> tuple:
    """f's value and its gradients for the wrt arguments, by torch.autograd."""
    args = list(args)
    for i in wrt:
        args[i] = args[i].detach().clone().requires_grad_(True)
    out = f(*args)
    if out.requires_grad:
        grads = torch.autograd.grad(out, [args[i] for i in wrt], allow_unused=True)
    else:  # no wrt argument reached f's value
        grads = (None,) * len(wrt)
    grads = tuple(torch.zeros_like(args[i]) if g is None else g for i, g in zip(wrt, grads))
    return out.detach(), grads


def _assert_reverse(f, args: list, wrt: tuple = (0,)) -> None:
    value, grads = _autograd(f, args, wrt)
    got, got_value = propgen.grad(f, wrt=wrt, preserve_result=True)(*args)
    got = (got,) if len(wrt) == 1 else got
    torch.testing.assert_close(got_value, value, **TOL, msg=lambda m: f"f's value: {m}")
    for i, g, w in zip(wrt, got, grads):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, i=i: f"gradient of arg {i}: {m}")


def _assert_forward(f, args: list, wrt: tuple = (0,)) -> None:
    value, grads = _autograd(f, args, wrt)
    g = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(args[i].shape, generator=g, dtype=F64) for i in wrt)
    want = sum((gr * t).sum() for gr, t in zip(grads, tangents))
    jvp, got_value = propgen.autodiff(f, mode="forward", wrt=wrt, preserve_result=True)(
        *args, tangents=tangents[0] if len(wrt) == 1 else tangents)
    torch.testing.assert_close(got_value, value, **TOL, msg=lambda m: f"f's value: {m}")
    torch.testing.assert_close(jvp, want, **TOL, msg=lambda m: f"tangent of f: {m}")


def _assert_propagate(f_prop, f, args: list, wrt: tuple = (0,)) -> None:
    """``f_prop`` (f with nodes, under @propgen.propagate) with the default manager puts
    autograd's gradients of ``f`` in the leaves' .grad."""
    value, grads = _autograd(f, args, wrt)
    args = list(args)
    for i in wrt:
        args[i] = args[i].detach().clone().requires_grad_(True)
    manager = propgen.PropagationManager()
    out = f_prop(manager, *args)
    torch.testing.assert_close(out.detach(), value, **TOL, msg=lambda m: f"f's value: {m}")
    manager.backward(out)
    for i, w in zip(wrt, grads):
        got = torch.zeros_like(w) if args[i].grad is None else args[i].grad
        torch.testing.assert_close(got, w, **TOL, msg=lambda m, i=i: f".grad of arg {i}: {m}")


# --------------------------------------------------------------------------------------------
# A name holding a differentiable value, assigned a constant: the gradient that reached the
# constant is not dropped, it flows on to the old value.  propgen.grad only (forward mode is
# right).
# --------------------------------------------------------------------------------------------

CONSTANT_REBIND = {
    # as hypothesis shrank it: RuntimeError "size {[3, 4]} is not expandable to size {[]}"
    # in the backward's unbroadcast (the scalar 0.0's gradient carried into the next iteration)
    "shrunk_nested_loops": ("""
        import torch

        def f(x0, n):
            k0 = 0
            while k0 < 2:
                acc2 = 0.0
                for i1 in range(n):
                    v1 = torch.sin(x0)
                    acc2 = acc2 + v1
                k0 += 1
            return acc2.sum()
        """, 1),
    # the same with a tensor constant: no exception, the gradient is 2 cos(x) instead of cos(x)
    "loop_restarts_from_zeros": ("""
        import torch

        def f(x):
            for k in range(2):
                acc = torch.zeros(3, 4, dtype=torch.float64)
                acc = acc + torch.sin(x)
            return acc.sum()
        """, None),
    # no loop needed: propgen's gradient is 3.5 + 2 x instead of 3.5 (the 1.5's gradient, x,
    # is taken for the first v's)
    "straight_line_float": ("""
        import torch

        def f(x):
            v = x * 2.0
            y = v.sum()
            v = 1.5
            return y + (v * x).sum()
        """, None),
}


@pytest.mark.parametrize("case", sorted(CONSTANT_REBIND))
def test_rebinding_to_a_constant_drops_the_gradient(case, tmp_path):
    """Reverse mode; fixed in 9c38bc9.  The backward of ``v = <constant>`` did not reset
    ``d_v`` (the generated backward had no statement for it), so the gradient reaching the
    constant was added to the gradient of the value ``v`` held before.  ``v = c`` with ``c``
    a non-differentiated argument, and ``v = c * 2.0``, were right."""
    source, n = CONSTANT_REBIND[case]
    f = _load(source, tmp_path)
    args = _arguments((3, 4)) + ([] if n is None else [n])
    _assert_reverse(f, args)


def test_rebinding_to_a_constant_forward_mode(tmp_path):
    """Forward mode gets the same programs right: a reference point for the bug above."""
    for source, n in CONSTANT_REBIND.values():
        f = _load(source, tmp_path)
        _assert_forward(f, _arguments((3, 4)) + ([] if n is None else [n]))


# --------------------------------------------------------------------------------------------
# ``for row in x:`` where the body rebinds x: Python iterates over the tensor x held when the
# loop started; propgen reads the rows of the current x.
# --------------------------------------------------------------------------------------------

ITERATED_REBIND = """
    import torch

    import propgen

    def f(x):
        acc = 0.0
        for row in x:
            x = x * 2.0
            acc = acc + row.sum()
        return acc

    @propgen.propagate
    def f_prop(manager, x):
        acc = 0.0
        for row in x:
            x = manager.forward(x * 2.0)
            acc = acc + row.sum()
        return acc
    """


@pytest.mark.parametrize("mode", ["reverse", "forward", "propagate"])
def test_loop_over_a_tensor_the_body_rebinds(mode, tmp_path):
    """All modes; fixed in 9c38bc9.  f's value itself was wrong (the rows of 2x, 4x, 8x...
    were summed instead of the rows of x), and so were the gradients: the loop read the rows
    of the current x instead of the tensor the loop started with."""
    f = _load(ITERATED_REBIND, tmp_path)
    args = _arguments((3, 4))
    if mode == "reverse":
        _assert_reverse(f, args)
    elif mode == "forward":
        _assert_forward(f, args)
    else:
        _assert_propagate(_load(ITERATED_REBIND, tmp_path, "f_prop"), f, args)


# --------------------------------------------------------------------------------------------
# A boolean mask on a 0-d tensor: ``s[s > 0]`` is valid torch (a 1-d result of 0 or 1
# elements), but the adjoint of getitem fails on it.
# --------------------------------------------------------------------------------------------

MASKED_0D = """
    import torch

    def f(x):
        s = x.sum()
        return s[s > 0].sum()
    """


@pytest.mark.parametrize("positive", [True, False], ids=["selected", "empty"])
def test_boolean_mask_of_a_0d_tensor(positive, tmp_path):
    """Reverse mode; fixed in 9c38bc9.  IndexError "too many indices for tensor of dimension
    0" from templates/helpers.py getitem_grad (its index_put scatter on a 0-d tensor)."""
    f = _load(MASKED_0D, tmp_path)
    x = _arguments((3, 4))[0].abs()
    _assert_reverse(f, [x if positive else -x])


def test_boolean_mask_of_a_0d_tensor_forward_mode(tmp_path):
    """Forward mode gets it right: a reference point for the bug above."""
    f = _load(MASKED_0D, tmp_path)
    _assert_forward(f, [_arguments((3, 4))[0].abs()])


# --------------------------------------------------------------------------------------------
# A branch whose only statement assigns a value that carries no gradient: the generated
# backward has an ``else:`` holding nothing but its "# Grad of:" comment.
# --------------------------------------------------------------------------------------------

INACTIVE_BRANCH = """
    import torch

    import propgen

    def f(x, c):
        if x.sum() > 0:
            v = x
        else:
            v = c
        return v.sum()

    @propgen.propagate
    def f_prop(manager, x, c):
        v = manager.forward(torch.tanh(x) if x.sum() > 0.5 else c)
        return v.sum()
    """


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["if", "else"])
def test_branch_assigning_a_constant_argument(sign, tmp_path):
    """Reverse mode and propagation; fixed in 9c38bc9.  Compiling the generated backward
    raised IndentationError "expected an indented block after 'else' statement": c is not
    differentiated, so the backward of ``v = c`` is empty and the branch held only its
    comment.  With wrt=(0, 1), and in forward mode, the same function worked."""
    f = _load(INACTIVE_BRANCH, tmp_path)
    x, c = _arguments((3,), (3,))
    _assert_reverse(f, [sign * x.abs(), c])


def test_branch_assigning_a_constant_argument_propagate(tmp_path):
    """The same bug as found first, by the propagation property: a node on a conditional
    expression whose else side is a constant argument (and no plain ``if`` in sight)."""
    f_prop = _load(INACTIVE_BRANCH, tmp_path, "f_prop")

    def f(x, c):
        return (torch.tanh(x) if x.sum() > 0.5 else c).sum()

    x, c = _arguments((3,), (3,))
    _assert_propagate(f_prop, f, [x.abs(), c])


# --------------------------------------------------------------------------------------------
# F.linear with a 1-d weight (torch allows it: the result drops the output dim).
# --------------------------------------------------------------------------------------------

LINEAR_1D_WEIGHT = """
    import torch
    import torch.nn.functional as F

    def f(x, w):
        return (F.linear(x, w) ** 2).sum()
    """


@pytest.mark.parametrize("wrt", [(0,), (1,)], ids=["input", "weight"])
def test_linear_with_a_1d_weight(wrt, tmp_path):
    """Open bug (reverse mode): RuntimeError "tensor.mT is only supported on matrices or
    batches of matrices. Got 1-D tensor." from the adjoint template of F.linear
    (templates/nn.py ``linear`` takes ``weight.mT``).  Forward mode is right."""
    f = _load(LINEAR_1D_WEIGHT, tmp_path)
    _assert_reverse(f, _arguments((3, 4), (4,)), wrt)


def test_linear_with_a_1d_weight_forward_mode(tmp_path):
    f = _load(LINEAR_1D_WEIGHT, tmp_path)
    _assert_forward(f, _arguments((3, 4), (4,)), (0, 1))


# --------------------------------------------------------------------------------------------
# F.kl_div with an input that broadcasts against the target (torch allows it silently).
# --------------------------------------------------------------------------------------------

KL_DIV_BROADCAST = """
    import torch
    import torch.nn.functional as F

    def f(x, t):
        return F.kl_div(F.log_softmax(x, -1), F.softmax(t, -1), reduction="batchmean")

    def g(x, t):
        return F.kl_div(x, t, reduction="sum")
    """


def test_kl_div_input_broadcast_against_target(tmp_path):
    """Open bug (reverse mode): the gradient of x (3, 1) is not 0 (log_softmax over a dim of
    size 1 is constant).  The adjoint of F.kl_div (templates/nn.py ``kl_div``) sends the
    input a gradient of the target's shape (3, 4), without unbroadcast, and the adjoint of
    log_softmax then reduces over the broadcast dim."""
    f = _load(KL_DIV_BROADCAST, tmp_path)
    _assert_reverse(f, _arguments((3, 1), (3, 4)))


@pytest.mark.parametrize("name", ["f", "g"])
def test_kl_div_input_broadcast_against_target_forward_mode(name, tmp_path):
    """Open bug (forward mode): RuntimeError "The expanded size of the tensor (1) must match
    the existing size (4)" from the tangent template of F.kl_div (templates/nn_tangents.py),
    even for the plain ``F.kl_div(x, t)``."""
    f = _load(KL_DIV_BROADCAST, tmp_path, name)
    x, t = _arguments((3, 1), (3, 4))
    _assert_forward(f, [x, t.abs() if name == "g" else t])


# --------------------------------------------------------------------------------------------
# A node inside a function defined in the decorated function (a closure over ``manager``).
# --------------------------------------------------------------------------------------------

NODE_IN_CLOSURE = """
    import torch

    import propgen

    @propgen.propagate
    def f_def(manager, x):
        def g(t):
            return manager.forward(t * 2.0)
        return g(x).sum()

    @propgen.propagate
    def f_lambda(manager, x):
        g = lambda t: manager.forward(t * 2.0)  # noqa: E731
        return g(x).sum()

    def f(x):
        return (x * 2.0).sum()
    """


@pytest.mark.parametrize("name", ["f_def", "f_lambda"])
def test_node_inside_a_nested_function(name, tmp_path):
    """Open bug (propagation): RuntimeError "manager.forward(...) was called outside a
    function decorated with @propgen.propagate" from the generated forward.  The nested
    function is inlined, but ``manager.forward`` on the closure's ``manager`` is compiled as
    an opaque call (``# opaque: forward() has no adjoint template``) instead of a node.  A
    module-level helper taking ``manager`` as an argument works."""
    f_prop = _load(NODE_IN_CLOSURE, tmp_path, name)
    f = _load(NODE_IN_CLOSURE, tmp_path)
    _assert_propagate(f_prop, f, _arguments((3,)))


# --------------------------------------------------------------------------------------------
# Forward mode: a parameter rebound to a slice of itself, then rebound again.
# --------------------------------------------------------------------------------------------

PARAMETER_REBOUND_TWICE = """
    import torch

    def f(x, y):
        x = x[1:]
        x = x * y
        return x.sum()

    def f_found(x0, x2):
        x0 = torch.stack([x0 for c1 in range(1)], dim=-1)[:, 1:]
        x0 *= torch.tanh(2.0 ** x2)
        return torch.tanh(x0).sum()
    """


@pytest.mark.parametrize("name", ["f", "f_found"])
@pytest.mark.parametrize("wrt", [(0,), (0, 1)])
def test_forward_mode_parameter_rebound_to_its_slice(name, wrt, tmp_path):
    """Open bug (forward mode): the tangent of x is lost, silently (the JVP is 0 along x).
    The generated ``f_jvp(x, y, t_x)`` begins with ``t_x = None``, overwriting the tangent
    argument (see ``propgen.autodiff(f, mode='forward').source``).  ``f_found`` is the
    program as the property checks found it, after deleting statements.  Reverse mode is
    right."""
    f = _load(PARAMETER_REBOUND_TWICE, tmp_path, name)
    x, y = _arguments((3, 4), ())
    _assert_forward(f, [x, y], wrt)


def test_parameter_rebound_to_its_slice_reverse_mode(tmp_path):
    f = _load(PARAMETER_REBOUND_TWICE, tmp_path)
    _assert_reverse(f, _arguments((3, 4), ()), (0, 1))
