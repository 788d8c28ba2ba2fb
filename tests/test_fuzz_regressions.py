"""Bugs found by the compiler fuzz tests (``tests/test_fuzz.py``), each reduced to a minimal
function and checked here for the *correct* behaviour.

Every test states what Python and torch do with the function, and asserts that propgen either
agrees (same result, same gradient or tangent as torch.autograd / torch's forward-mode AD) or,
where a test says so, refuses the function with a documented ``propgen.PropgenError`` naming
this file and the offending line.  These tests are expected to fail until the compiler is
fixed; they are kept apart from the fuzz tests so that each bug has a name and a short program.
"""

from __future__ import annotations

import inspect
import os
import traceback

import pytest
import torch
from torch.autograd import forward_ad

import propgen

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-10}
G = torch.linspace(-1.0, 1.0, 4, dtype=F64)


def rn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def autograd_grad(f, *args, wrt=(0,)):
    """The gradient torch.autograd computes for ``f(*args)`` (a scalar) w.r.t. ``args[wrt]``."""
    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    inputs = []
    for i in wrt:
        args[i] = args[i].requires_grad_(True)
        inputs.append(args[i])
    out = f(*args)
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    grads = tuple(torch.zeros_like(a) if g is None else g for a, g in zip(inputs, grads))
    return grads[0] if len(grads) == 1 else grads


def torch_jvp(f, x, t, *rest):
    """The tangent of ``f(x, *rest)`` along ``t`` by torch's forward-mode AD."""
    with forward_ad.dual_level():
        out = f(forward_ad.make_dual(x.clone(), t), *rest)
        tangent = forward_ad.unpack_dual(out).tangent
    return torch.zeros_like(out) if tangent is None else tangent


def marked(fn, marker: str = "# BUG") -> str:
    """``file.py:LINE`` of the line of ``fn`` holding ``marker``."""
    lines, start = inspect.getsourcelines(fn)
    hits = [start + k for k, text in enumerate(lines) if marker in text]
    assert len(hits) == 1
    return f"{os.path.basename(inspect.getsourcefile(fn))}:{hits[0]}"


def assert_refused_at(err: BaseException, fn) -> None:
    """A documented error naming the marked line of ``fn``."""
    assert isinstance(err, propgen.PropgenError), repr(err)
    assert marked(fn) in str(err), str(err)


# --------------------------------------------------------------------------------------------
# Reverse mode
# --------------------------------------------------------------------------------------------


def ifexp_constant_branch(x, flag):
    y = x if flag else G  # BUG
    return y.sum()


@pytest.mark.parametrize("flag", [True, False])
def test_conditional_expression_with_a_constant_branch(flag):
    """Fuzz: ``a if c else CONSTANT`` makes the compiler emit a backward ``else:`` with an
    empty body; ``propgen.grad`` fails with an internal IndentationError raised by
    ``compile`` in ``api.py:compile_reverse``.  The gradient is ones where the branch is x.
    (Fixed in 9c38bc9.)"""
    x = rn(4)
    got = propgen.grad(ifexp_constant_branch)(x, flag)
    torch.testing.assert_close(got, torch.ones_like(x) if flag else torch.zeros_like(x), **TIGHT)


def rebind_to_constant(x):
    v = x * 2.0
    v = torch.ones(4, dtype=F64)
    return (v * x).sum()


def rebind_to_float(x):
    v = x * 2.0
    v = 3.0
    return (v * x).sum()


@pytest.mark.parametrize("fn", [rebind_to_constant, rebind_to_float], ids=["tensor", "float"])
def test_rebinding_to_a_value_without_gradient(fn):
    """Fuzz: rebinding a name that carried gradient to a value that does not (a constant
    tensor, a Python number) leaves the backward pass's ``d_v`` of the new value in place, and
    it flows on into the old value: a wrong gradient (``d_x = 1 + 2x``), or for a float a
    RuntimeError in ``unbroadcast`` in the backward.  torch: the gradient is ``v``.
    (Fixed in 9c38bc9.)"""
    x = rn(4)
    torch.testing.assert_close(propgen.grad(fn)(x), autograd_grad(fn, x), **TIGHT)


def loop_variable_after_break(x):
    for i in range(4):
        if i == 1:
            break
    return (x * i).sum()


def test_loop_variable_after_break_reverse():
    """Fuzz: after ``break`` at a Python-valued test, the loop variable holds the range's last
    value (3), not the value at the break (1): wrong result and gradient.  With a ``while``
    loop counting on from that variable the generated function never ended (found as a
    hang).  (Fixed in 601390d.)"""
    x = rn(4)
    grads, result = propgen.grad(loop_variable_after_break, preserve_result=True)(x)
    torch.testing.assert_close(result, loop_variable_after_break(x), **TIGHT)
    torch.testing.assert_close(grads, torch.ones_like(x), **TIGHT)


def test_loop_variable_after_break_forward():
    x, t = rn(4), rn(4, seed=1)
    tangent, result = propgen.autodiff(loop_variable_after_break, mode="forward",
                                       preserve_result=True)(x, tangents=t)
    torch.testing.assert_close(result, loop_variable_after_break(x), **TIGHT)
    torch.testing.assert_close(tangent, t.sum(), **TIGHT)


def unbound_local(x):
    if x.sum() > 100.0:
        y = x * 2.0
    return (y * x).sum()


def test_unbound_local_is_a_name_error():
    """Fuzz: a local read on a path where it was never assigned.  Python raises
    UnboundLocalError; propgen.grad's generated forward reads None instead and fails with
    ``TypeError: unsupported operand type(s) for *: 'NoneType' and 'Tensor'`` (forward mode
    raises UnboundLocalError, as Python does)."""
    with pytest.raises(NameError):
        propgen.grad(unbound_local)(rn(4))


def nested_function_as_value(x):
    def inner(t):
        repr(outer)  # BUG
        return t * 2.0

    def outer(t):
        return inner(t)

    return outer(x).sum()


def test_nested_function_used_as_a_value_inside_another():
    """Fuzz: ``fns = [inner]`` in the function itself is refused ("using the nested function
    'inner' as a value is not supported"), but the same use inside another nested function
    passes the compiler, and the generated forward raises ``NameError: name 'outer' is not
    defined``.  Python runs the function (gradient 2)."""
    x = rn(4)
    try:
        got = propgen.grad(nested_function_as_value)(x)
    except Exception as err:  # noqa: BLE001 - judged below
        assert_refused_at(err, nested_function_as_value)
    else:
        torch.testing.assert_close(got, 2.0 * torch.ones_like(x), **TIGHT)


def append_without_argument(x):
    kept = [x]
    kept.append()  # BUG
    return torch.stack(kept).sum()


def test_append_without_argument_is_not_an_internal_error():
    """Fuzz: ``list.append()`` with no argument on a list that carries gradient crashes the
    compiler with ``IndexError: list index out of range`` at ``transform.py`` ``rev_expr``
    (``value = call.args[0]``).  Python raises TypeError when the line runs; propgen may raise
    that, or refuse the line.  (Fixed in 601390d: refused.)"""
    with pytest.raises((TypeError, propgen.PropgenError)) as info:
        propgen.grad(append_without_argument)(rn(4))
    if isinstance(info.value, propgen.PropgenError):
        assert_refused_at(info.value, append_without_argument)


def method_through_getattr(x):
    return getattr(x, "cos")().sum()  # noqa: B009 - the dynamic lookup is what is tested


def test_method_called_through_getattr():
    """Fuzz: ``getattr(x, 'cos')()`` runs, but no gradient reaches x (zeros); torch gives
    ``-sin(x)``.  Either the gradient or a documented refusal would do; zeros is wrong."""
    x = rn(4)
    try:
        got = propgen.grad(method_through_getattr)(x)
    except propgen.PropgenError as err:
        assert "method_through_getattr" in str(err) or "test_fuzz_regressions.py" in str(err)
    else:
        torch.testing.assert_close(got, -torch.sin(x), **TIGHT)


def alias_under_no_grad(x):
    with torch.no_grad():
        y = x
    return (y * y).sum()


def in_place_update_under_no_grad(x):
    h = x * 1.0
    with torch.no_grad():
        h *= 2.0
    return (h * x).sum()


def in_place_updates_under_no_grad_in_a_loop(x):
    h = x * 1.0
    for k in range(3):
        with torch.no_grad():
            h += x * k
            kept = [h]
        h = h * x
    return (kept[0] * h).sum()


@pytest.mark.parametrize("fn", [alias_under_no_grad, in_place_update_under_no_grad,
                                in_place_updates_under_no_grad_in_a_loop],
                         ids=["alias", "in-place", "loop"])
def test_no_grad_block_forward_mode(fn):
    """The no_grad cases below in forward mode: the update changes the value, not the
    tangent; ``y = x`` keeps x's tangent."""
    x, t = rn(4), rn(4, seed=5)
    got = propgen.autodiff(fn, mode="forward")(x, tangents=t)
    torch.testing.assert_close(got, (autograd_grad(fn, x) * t).sum(), **TIGHT)


@pytest.mark.parametrize("fn", [alias_under_no_grad, in_place_update_under_no_grad,
                                in_place_updates_under_no_grad_in_a_loop],
                         ids=["alias", "in-place", "loop"])
def test_no_grad_block_keeps_gradient_of_values_it_does_not_compute(fn):
    """Fuzz: under ``torch.no_grad()`` propgen treats every name assigned in the block as
    carrying no gradient.  In torch, ``y = x`` in the block is still x (gradient 2x), and an
    in-place update in the block changes the value without cutting the value's own graph
    (gradient ``x + 2x``).  propgen gives zeros for the alias and drops the first term for the
    in-place update."""
    x = rn(4)
    torch.testing.assert_close(propgen.grad(fn)(x), autograd_grad(fn, x), **TIGHT)


def augmented_assignment_on_alias(x):
    y = x * 1.0
    z = y
    y -= 1.0  # BUG
    return (z * x).sum()


def augmented_assignment_on_loop_rows(x):
    h = x * 1.0
    for row in h:
        row += 1.0  # BUG
    return (h * h).sum()


def augmented_assignment_in_a_helper(t):
    t *= 2.0  # BUG
    return t.sum()


def augmented_assignment_through_a_helper(x):
    y = x * 1.0
    s = augmented_assignment_in_a_helper(y)
    return s + (y * x).sum()


def store_seen_by_a_view(x):
    h = x * 1.0
    first = h[0]
    h[0] = x[1] * 3.0  # BUG
    return (first * x[0]).sum()


def augmented_assignment_on_a_transpose(x):
    y = x * 1.0
    yt = y.T
    yt += 1.0  # BUG
    return (y * x).sum()


def augmented_assignment_to_a_list_element(x):
    y = x * 1.0
    kept = [y]
    y += 1.0  # BUG
    return (kept[0] * x).sum()


ALIASED = [augmented_assignment_on_alias, augmented_assignment_on_loop_rows,
           augmented_assignment_through_a_helper, store_seen_by_a_view,
           augmented_assignment_on_a_transpose, augmented_assignment_to_a_list_element]


@pytest.mark.parametrize("fn", ALIASED, ids=[f.__name__ for f in ALIASED])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_augmented_assignment_updates_the_tensor_in_place(fn, mode):
    """Fuzz: ``y -= 1.0`` on a tensor is ``y.__isub__(1.0)``, an in-place update that every
    alias of y (and the tensor a row view comes from) sees.  propgen compiled it as
    ``y = y - 1.0``, so the alias kept the old value: wrong result and gradient (``2x``
    where torch has ``2x - 1``, resp. ``2x`` where torch has ``2(x + 1)``).  Now refused
    (propgen/aliases.py), at the line of the update, when another name sharing the tensor
    is read afterwards; a right gradient would do as well."""
    x = rn(4, 3) if fn in (augmented_assignment_on_loop_rows, augmented_assignment_on_a_transpose,
                           store_seen_by_a_view) else rn(4)
    target = augmented_assignment_in_a_helper if fn is augmented_assignment_through_a_helper \
        else fn
    try:
        if mode == "reverse":
            grads, result = propgen.grad(fn, preserve_result=True)(x)
        else:
            t = rn(*x.shape, seed=3)
            grads, result = propgen.autodiff(fn, mode="forward", preserve_result=True)(
                x, tangents=t)
    except propgen.PropgenError as err:
        assert_refused_at(err, target)
        return
    torch.testing.assert_close(result, fn(x.clone()), **TIGHT)
    want = autograd_grad(fn, x)
    torch.testing.assert_close(grads, want if mode == "reverse" else (want * t).sum(), **TIGHT)


def residual_update_in_a_loop(x):
    h = x * 1.0
    for _ in range(3):
        prev = h
        h = torch.tanh(h * 0.5)
        h += prev
    return h.sum()


def update_after_the_alias_is_dead(x):
    y = x * 1.0
    z = y
    total = (z * x).sum()
    y -= 1.0
    return total + (y * y).sum()


def counter_copied_then_incremented(x, n: int):
    k = n
    k -= 1
    return x.sum() * k * n


def update_of_a_rebound_alias(x):
    y = x * 1.0
    z = y
    z = z * 2.0
    y += 1.0
    return (y * z).sum()


def residual_update_in_a_loop_ref(x):
    h = x * 1.0
    for _ in range(3):
        prev = h
        h = torch.tanh(h * 0.5)
        h = h + prev
    return h.sum()


def update_after_the_alias_is_dead_ref(x):
    y = x * 1.0
    z = y
    total = (z * x).sum()
    y = y - 1.0
    return total + (y * y).sum()


def _made_in_a_while_then_updated(a):
    k = 0
    while k < 2:
        v = torch.sin(a)
        k += 1
    v += a
    return v


def list_of_values_updated_before_appending(x):
    hs = []
    for _ in range(1):  # one pass: nothing appended before is updated after
        hs.append(_made_in_a_while_then_updated(x))
    return (hs[0] * hs[-1]).sum()


def list_of_values_updated_before_appending_ref(x):
    return (torch.sin(x) + x).square().sum()


NOT_ALIASED = [residual_update_in_a_loop, update_after_the_alias_is_dead,
               counter_copied_then_incremented, update_of_a_rebound_alias,
               list_of_values_updated_before_appending]
# eager autograd refuses to differentiate an in-place update of a value it saved: the
# reference runs the out-of-place spelling, which means the same here (no live alias)
REFERENCE = {residual_update_in_a_loop: residual_update_in_a_loop_ref,
             update_after_the_alias_is_dead: update_after_the_alias_is_dead_ref,
             list_of_values_updated_before_appending: list_of_values_updated_before_appending_ref}


@pytest.mark.parametrize("fn", NOT_ALIASED, ids=[f.__name__ for f in NOT_ALIASED])
def test_augmented_assignment_without_a_live_alias_is_compiled(fn):
    """The alias check refuses only what a live alias would see: a residual update in a loop,
    an alias read only before the update, a number, an alias rebound first all compile, with
    torch's gradient."""
    x = rn(4)
    args = (x, 3) if fn is counter_copied_then_incremented else (x,)
    grads, result = propgen.grad(fn, preserve_result=True)(*args)
    ref = REFERENCE.get(fn, fn)
    torch.testing.assert_close(result, ref(x.clone(), *args[1:]), **TIGHT)
    torch.testing.assert_close(grads, autograd_grad(ref, *args), **TIGHT)


def list_augmented_concatenation(x):
    parts = [x * 1.0, x * 2.0]
    parts += parts
    return torch.stack(parts).sum()


def test_augmented_concatenation_of_a_list():
    """Fuzz: ``parts += parts`` on a list is ``parts.extend(parts)``; propgen differentiates
    it as a tensor addition, and the backward fails in ``unbroadcast`` (templates/helpers.py)
    with ``AttributeError: 'list' object has no attribute 'sum'``.  torch: gradient 6."""
    x = rn(4)
    got = propgen.grad(list_augmented_concatenation)(x)
    torch.testing.assert_close(got, 6.0 * torch.ones_like(x), **TIGHT)


def builtin_max_of_a_vector(x):
    return max(x)


def builtin_sum_of_a_vector(x):
    return sum(x) * 2.0


@pytest.mark.parametrize("fn, expected", [(builtin_max_of_a_vector, [0.0, 1.0, 0.0]),
                                          (builtin_sum_of_a_vector, [2.0, 2.0, 2.0])],
                         ids=["max", "sum"])
def test_builtin_reduction_over_a_tensor(fn, expected):
    """Fuzz: Python's ``max(x)`` / ``sum(x)`` over a vector (iterating its elements) gives
    the gradient as a list (``[None, None, None]`` for max, one 0-d tensor per element for
    sum) instead of a tensor of x's shape; torch: one-hot at the maximum, resp. 2."""
    x = torch.tensor([0.5, 2.0, -1.0], dtype=F64)
    got = propgen.grad(fn)(x)
    assert isinstance(got, torch.Tensor), got
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), **TIGHT)


def enumerate_counter_returned(x):
    for i, _row in enumerate(x):
        return i * 2.0


def test_float_result_from_an_enumerate_counter():
    """Fuzz: returning a float computed from ``enumerate``'s counter: the counter is taken to
    carry gradient (it sits in one tuple with the row), and the backward fails in
    ``unbroadcast`` (templates/helpers.py) with ``AttributeError: 'float' object has no
    attribute 'sum'``.  The result does not depend on x: the gradient is zeros, as propgen
    gives for ``return 3.0``."""
    x = rn(5, 3)
    torch.testing.assert_close(propgen.grad(enumerate_counter_returned)(x), torch.zeros_like(x),
                               rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Forward mode
# --------------------------------------------------------------------------------------------


def in_place_method_on_tangent(x):
    y = torch.sin(x)
    y.exp_()  # BUG
    return y.sum()


def in_place_method_on_argument(x):
    x.mul_(2.0)  # BUG
    return x.prod()


@pytest.mark.parametrize("fn", [in_place_method_on_tangent, in_place_method_on_argument],
                         ids=["local", "argument"])
def test_forward_mode_in_place_method(fn):
    """Fuzz: reverse mode refuses an in-place method on a value that carries gradient
    (``the in-place tensor method exp_() ... is not supported``), forward mode accepts it and
    returns a wrong tangent (the tangent of the value before the update).  Either refuse the
    line as reverse mode does, or return torch's tangent."""
    x, t = rn(4), rn(4, seed=1)
    try:
        got = propgen.autodiff(fn, mode="forward")(x.clone(), tangents=t)
    except propgen.PropgenError as err:
        assert_refused_at(err, fn)
    else:
        torch.testing.assert_close(got, torch_jvp(fn, x, t), **TIGHT)


def swap_then_loop(x, y):
    x, y = y, x
    for _ in range(2):
        x = x + y
    return x.sum()


def swap_in_untaken_branch(x, y):
    if x.sum() > 100.0:
        y, x = x, y
    x = x * 2.0
    return x.sum()


@pytest.mark.parametrize("fn", [swap_then_loop, swap_in_untaken_branch],
                         ids=["then-loop", "in-branch"])
def test_forward_mode_swap_with_a_name_without_tangent(fn):
    """Fuzz: ``x, y = y, x`` where only x (the differentiated argument) has a tangent.
    Followed by a loop reading both, the generated JVP adds a tangent that is None
    (``TypeError: unsupported operand type(s) for +: 'Tensor' and 'NoneType'``); inside a
    branch that is not taken, x's tangent is lost (0).  torch: ``2 t.sum()`` both times."""
    x, y, t = rn(4), rn(4, seed=2), rn(4, seed=1)
    got = propgen.autodiff(fn, mode="forward")(x, y, tangents=t)
    torch.testing.assert_close(got, torch_jvp(fn, x, t, y), **TIGHT)


def rebind_through_a_list(x):
    x = [x][0]
    x = x * 2.0
    return x.sum()


def rebind_through_a_dict(x):
    x = {"a": x}["a"]
    x = x - 1.0
    return x.sum()


@pytest.mark.parametrize("fn, scale", [(rebind_through_a_list, 2.0),
                                       (rebind_through_a_dict, 1.0)], ids=["list", "dict"])
def test_forward_mode_argument_rebound_through_a_container(fn, scale):
    """Fuzz: the differentiated argument rebound to itself taken out of a list or dict, then
    rebound again: the JVP returns 0 (reverse mode is right, and with another name than x
    forward mode is right too).  torch: ``scale * t.sum()``."""
    x, t = rn(4), rn(4, seed=1)
    got = propgen.autodiff(fn, mode="forward")(x, tangents=t)
    torch.testing.assert_close(got, scale * t.sum(), **TIGHT)


def bool_accumulator_in_loop(x):
    acc = False
    for i in range(3):
        if i == 2:
            acc = acc * x
    return acc.sum()


def test_forward_mode_accumulator_starting_as_bool():
    """Fuzz: a name bound to ``False`` and later, in a loop branch, to a tensor: the JVP
    multiplies a None tangent (``TypeError: unsupported operand type(s) for *: 'NoneType' and
    'Tensor'``); reverse mode is right, and with ``acc = 0.0`` forward mode is right too."""
    x, t = rn(4), rn(4, seed=1)
    got = propgen.autodiff(bool_accumulator_in_loop, mode="forward")(x, tangents=t)
    torch.testing.assert_close(got, torch_jvp(bool_accumulator_in_loop, x, t), **TIGHT)


def list_made_under_no_grad(x):
    with torch.no_grad():
        out = []
    out.append(x * 2.0)
    return torch.stack(out).sum()


def test_forward_mode_list_made_under_no_grad():
    """Fuzz: an empty list made under ``torch.no_grad()`` and filled after the block: reverse
    mode gives the gradient 2, forward mode drops the tangent (0).  The list holds nothing
    computed under no_grad, so the tangent is ``2 * t.sum()`` in both modes' semantics."""
    x, t = rn(4), rn(4, seed=1)
    got = propgen.autodiff(list_made_under_no_grad, mode="forward")(x, tangents=t)
    torch.testing.assert_close(got, 2.0 * t.sum(), **TIGHT)
    torch.testing.assert_close(propgen.grad(list_made_under_no_grad)(x),
                               2.0 * torch.ones_like(x), **TIGHT)


def amin_beside_infinity(x):
    return (x / torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=F64)).amin()


def test_forward_mode_amin_with_an_infinite_element():
    """Fuzz: the tangent of ``amin`` is NaN when another element of the input is infinite
    (the template multiplies the tangent, inf there, by a 0/1 mask of the minima).  torch's
    tangent is the tangent of the minimum, finite; reverse mode is right."""
    x = torch.tensor([1.0, -1.0, 2.0, 3.0], dtype=F64)
    t = torch.tensor([0.5, 0.25, -1.0, 2.0], dtype=F64)
    got = propgen.autodiff(amin_beside_infinity, mode="forward")(x, tangents=t)
    torch.testing.assert_close(got, torch_jvp(amin_beside_infinity, x, t), **TIGHT)


def plus_sort_indices(x):
    vals, idx = x.sort(dim=1)
    return x.sum() + idx


def test_forward_mode_tangent_keeps_dtype_next_to_integer_tensor():
    """Fuzz: ``x.sum() + idx`` with ``idx`` the int64 indices of ``sort``: the result is
    float64, its tangent comes out float32 (the indices get a zero tangent of the default
    dtype, which wins the promotion against a 0-d float64), losing precision."""
    x, t = rn(3, 4), rn(3, 4, seed=1)
    got = propgen.autodiff(plus_sort_indices, mode="forward")(x, tangents=t)
    torch.testing.assert_close(got, torch_jvp(plus_sort_indices, x, t), **TIGHT)


# --------------------------------------------------------------------------------------------
# Families of the bugs above (lists joined and extended, builtins over tensors, getattr)
# --------------------------------------------------------------------------------------------


def list_joined_in_front(x):
    parts = [x * 1.0, x * 2.0]
    both = [x * 3.0] + parts
    return torch.stack(both).sum() + (both[0] * both[1]).sum()


def list_joined_with_a_comprehension(x):
    parts = [x * 1.0, x.sin()]
    both = parts + [t * t for t in parts]
    return (both[3] * both[0]).sum()


def list_extended_with_another(x):
    parts = [x * 1.0]
    more = [x.cos(), x * x]
    parts += more
    return (parts[0] * parts[2] + parts[1]).sum()


def builtin_sum_over_matrix_rows(x):
    return (sum(x) * torch.arange(3.0, dtype=x.dtype)).sum()


def builtin_max_with_a_tie(x):
    return max(x * 0.0 + torch.tensor([1.0, 3.0, 3.0], dtype=x.dtype)) * x[2]


def attribute_through_getattr(x):
    n = getattr(x, "shape")[0]  # noqa: B009
    return getattr(torch, "tanh")(x).sum() * n  # noqa: B009


FAMILY = [list_joined_in_front, list_joined_with_a_comprehension, list_extended_with_another,
          builtin_sum_over_matrix_rows, builtin_max_with_a_tie, attribute_through_getattr]


@pytest.mark.parametrize("fn", FAMILY, ids=[f.__name__ for f in FAMILY])
def test_family_matches_autograd(fn):
    """Reverse and forward mode agree with torch on variants of the bugs above."""
    x = rn(4, 3) if fn is builtin_sum_over_matrix_rows else rn(3)
    grads, result = propgen.grad(fn, preserve_result=True)(x)
    torch.testing.assert_close(result, fn(x.clone()), **TIGHT)
    torch.testing.assert_close(grads, autograd_grad(fn, x), **TIGHT)
    t = rn(*x.shape, seed=2)
    jvp = propgen.autodiff(fn, mode="forward")(x, tangents=t)
    torch.testing.assert_close(jvp, (autograd_grad(fn, x) * t).sum(), **TIGHT)


def list_repeated(x):
    parts = [x * 1.0]
    both = parts * 2  # BUG
    return torch.stack(both).sum()


def test_repeating_a_list_is_refused():
    """``parts * 2`` on a list was differentiated as a tensor product (gradient 3 where torch
    has 2, silently); it is refused, naming the line."""
    with pytest.raises(propgen.PropgenError) as info:
        propgen.grad(list_repeated)(rn(3))
    assert_refused_at(info.value, list_repeated)


# --------------------------------------------------------------------------------------------
# Reverse mode: in-place updates in every spelling
# --------------------------------------------------------------------------------------------


def relu_function_in_place(x):
    h = x * 1.0
    torch.relu_(h)  # BUG
    return h.sum()


def functional_inplace_flag(x):
    h = x * 1.0
    h = torch.nn.functional.relu(h, inplace=True)  # BUG
    return h.sum()


def add_into_a_constant_tensor(x):
    h = torch.zeros(4, dtype=x.dtype)
    h.add_(x)  # BUG
    return (h * h).sum()


IN_PLACE_SPELLINGS = [relu_function_in_place, functional_inplace_flag,
                      add_into_a_constant_tensor]


@pytest.mark.parametrize("fn", IN_PLACE_SPELLINGS, ids=[f.__name__ for f in IN_PLACE_SPELLINGS])
def test_reverse_mode_in_place_update_in_any_spelling(fn):
    """``torch.relu_(h)``, ``F.relu(h, inplace=True)`` and ``h.add_(x)`` into a tensor without
    gradient gave silently wrong gradients in reverse mode (only the method form on a value
    carrying gradient was refused).  Now refused at the line, or right."""
    x = rn(4)
    try:
        got = propgen.grad(fn)(x)
    except propgen.PropgenError as err:
        assert_refused_at(err, fn)
    else:
        torch.testing.assert_close(got, autograd_grad(fn, x), **TIGHT)


def range_without_arguments(x):
    for _ in range():
        x = x * 2.0
    return x.sum()


def range_with_a_zero_step(x):
    for _ in range(0, 3, 0):
        x = x * 2.0
    return x.sum()


@pytest.mark.parametrize("fn, error", [(range_without_arguments, TypeError),
                                       (range_with_a_zero_step, ValueError)],
                         ids=["no-arguments", "zero-step"])
def test_bad_constant_range_raises_what_python_raises(fn, error):
    """Fuzz (clean-clone CI): the alias check's trip count of a constant range called
    ``range()`` itself and crashed the compiler with TypeError; now the call raises where
    Python raises it, when the function runs."""
    with pytest.raises(error):
        fn(rn(3))
    with pytest.raises(error) as info:
        propgen.grad(fn)(rn(3))
    frames = [f.filename for f in traceback.extract_tb(info.tb)]
    assert not any(os.sep + "propgen" + os.sep in f for f in frames[-1:]), frames
