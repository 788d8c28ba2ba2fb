"""Forward mode over the families of the forward-mode fuzz regressions.

Each bug of ``tests/test_fuzz_regressions.py`` (forward mode section) was one program of a
family; the programs here are its relatives, each compared in float64 with torch.autograd:
with its forward mode (``torch.autograd.forward_ad``, as ``torch_jvp``), or, where torch's
forward mode does not apply propgen's semantics (updates under ``torch.no_grad()``), with
<its reverse-mode gradient, the direction>.

* in-place updates: tensor methods (``y.exp_()``, ``y.mul_(x)``, ``y.copy_(z)``...), in-place
  functions (``torch.relu_(y)``, ``F.elu_(y)``, ``F.leaky_relu(y, inplace=True)``,
  ``torch.nn.init.zeros_(y)``), updates that give the value a new tangent (from the tangent
  template of the op's out-of-place form, or torch.func.jvp) or none (fills, ``floor_``), and
  the updates propgen refuses by name;
* swaps and rotations of names of which only some carry a tangent;
* accumulators that start as a bool or an int;
* lists made without tangents and filled afterwards;
* the differentiated argument rebound through a container.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import propgen
from tests.test_fuzz_regressions import F64, TIGHT, autograd_grad, marked, rn, torch_jvp

MAT = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)


def jvp(fn, x, t, *rest):
    """propgen's tangent of ``fn(x, *rest)`` along ``t``; x is copied (fn may update it)."""
    return propgen.autodiff(fn, mode="forward")(x.clone(), *rest, tangents=t)


def assert_jvp_matches_torch(fn, x, t, *rest, reference=None):
    """propgen's tangent equals torch's (of ``reference``, fn itself by default); random
    functions draw the same numbers in both."""
    torch.manual_seed(7)
    got = jvp(fn, x, t, *rest)
    torch.manual_seed(7)
    torch.testing.assert_close(got, torch_jvp(reference or fn, x, t, *rest), **TIGHT)


# --------------------------------------------------------------------------------------------
# In-place updates
# --------------------------------------------------------------------------------------------


def exp_of_a_local(x):
    y = torch.sin(x)
    y.exp_()
    return y.sum()


def sin_of_a_local(x):  # the tangent reads the old value: a copy is kept
    y = x * 1.5
    y.sin_()
    return y.sum()


def mul_by_the_argument(x):
    y = x.exp()
    y.mul_(x)
    return y.sum()


def add_with_alpha(x):
    y = x.cos()
    y.add_(x, alpha=2.0)
    return y.sum()


def clamp_between_bounds(x):
    y = x * 2.0
    y.clamp_(min=-0.5, max=0.5)
    return y.sum()


def pow_of_a_local(x):
    y = x.exp()
    y.pow_(3)
    return y.sum()


def lerp_towards_the_argument(x):
    y = x.exp()
    y.lerp_(x, 0.25)
    return y.sum()


def masked_fill_of_a_local(x):
    y = x.exp()
    y.masked_fill_(x > 0, 0.0)
    return y.sum()


def unsqueeze_of_a_local(x):  # the update changes the shape
    y = x * 2.0
    y.unsqueeze_(1)
    return (y * torch.arange(16.0, dtype=F64).reshape(4, 4)).sum()


def transpose_of_a_local(x):
    y = x.reshape(2, 2) * 1.0
    y.t_()
    return (y * MAT).sum()


def updates_of_the_argument(x):
    x.mul_(3.0)
    x.sub_(1.0)
    return (x * x).sum()


def result_bound_to_another_name(x):
    y = torch.sin(x)
    z = y.exp_()
    return (z * y).sum()


def rebound_to_its_update(x):
    y = x * 2.0 - 0.5
    y = torch.relu_(y)
    return (y * x).sum()


def result_of_an_update_without_template(x):
    y = x * 1.0
    z = y.index_add_(0, torch.tensor([1]), x[:1] * 2.0)
    return (z * x).sum()


def updates_in_a_loop(x):
    y = x * 1.0
    for _ in range(3):
        y.mul_(x)
        y.tanh_()
    return y.sum()


def update_in_a_branch(x):
    y = x * 1.0
    if x.sum() > -100.0:
        y.sigmoid_()
    return y.sum()


def floor_of_a_local(x):  # no tangent after the update
    y = x * 3.0
    y.floor_()
    return (y * x).sum()


def zero_of_a_local(x):
    y = x * 3.0
    y.zero_()
    return (y + x).sum()


def fill_of_a_local(x):
    y = x * 3.0
    y.fill_(2.0)
    return (y * x).sum()


def uniform_of_a_local(x):
    y = x * 2.0
    y.uniform_()
    return (y * x).sum()


def copy_of_another_tensor(x):  # no tangent template: torch.func.jvp
    y = x * 2.0
    z = x.sin()
    y.copy_(z)
    return (y + z).sum()


def index_add_of_a_tensor(x):
    y = x * 1.0
    src = x[:2] * 3.0
    y.index_add_(0, torch.tensor([0, 2]), src)
    return (y * src.sum()).sum()


def addcmul_of_the_argument(x):
    y = x.exp()
    y.addcmul_(x, x, value=0.5)
    return y.sum()


def copy_into_a_value_set_in_a_branch(x):
    y = torch.ones(4, dtype=F64)
    if x.sum() > 100.0:
        y = x * 2.0
    z = x.sin()
    y.copy_(z)
    return (y + z).sum()


def torch_relu_(x):
    y = x * 2.0 - 0.5
    torch.relu_(y)
    return (y * x).sum()


def torch_exp_(x):
    y = x * 2.0
    torch.exp_(y)
    return y.sum()


def functional_elu_(x):
    y = x * 2.0
    F.elu_(y)
    return (y * x).sum()


def leaky_relu_in_place(x):
    y = x * 2.0
    F.leaky_relu(y, 0.1, inplace=True)
    return (y * x).sum()


def dropout_in_place(x):  # inplace by position; random: the same numbers as torch
    y = x * 2.0
    F.dropout(y, 0.5, True, True)
    return (y * x).sum()


def init_zeros_(x):
    y = x * 2.0
    torch.nn.init.zeros_(y)
    return (y + x).sum()


IN_PLACE = [exp_of_a_local, sin_of_a_local, mul_by_the_argument, add_with_alpha,
            clamp_between_bounds, pow_of_a_local, lerp_towards_the_argument,
            masked_fill_of_a_local, unsqueeze_of_a_local, transpose_of_a_local,
            updates_of_the_argument, result_bound_to_another_name, rebound_to_its_update,
            result_of_an_update_without_template, updates_in_a_loop,
            update_in_a_branch, floor_of_a_local, zero_of_a_local, fill_of_a_local,
            uniform_of_a_local, copy_of_another_tensor, index_add_of_a_tensor,
            addcmul_of_the_argument, copy_into_a_value_set_in_a_branch, torch_relu_, torch_exp_,
            functional_elu_, leaky_relu_in_place, dropout_in_place, init_zeros_]


@pytest.mark.parametrize("fn", IN_PLACE, ids=[f.__name__ for f in IN_PLACE])
def test_in_place_update_gives_the_new_tangent(fn):
    """Was: the update kept the tangent of the value before it (test_fuzz_regressions.py::
    test_forward_mode_in_place_method)."""
    assert_jvp_matches_torch(fn, rn(4), rn(4, seed=1))


def update_in_place_sees_the_argument_as_both_operands(x):
    y = x + 1.0
    y.mul_(y)
    return y.sum()


def square_out_of_place(x):
    y = x + 1.0
    y = y * y
    return y.sum()


def test_in_place_update_reading_its_own_tensor():
    """``y.mul_(y)`` is ``y * y``: tangent ``2 y t``.  (torch's forward mode gives another
    value for the in-place form, and its reverse mode refuses it.)"""
    assert_jvp_matches_torch(update_in_place_sees_the_argument_as_both_operands, rn(4),
                             rn(4, seed=1), reference=square_out_of_place)


def in_place_update_under_no_grad(x):
    y = x * 1.0
    with torch.no_grad():
        y.mul_(2.0)
        torch.exp_(y)
    return (y * x).sum()


def test_in_place_update_under_no_grad_keeps_the_tangent():
    """Under no_grad the update changes the value, not its tangent (autograd: the gradient
    flows through the update as through the identity)."""
    x, t = rn(4), rn(4, seed=1)
    torch.testing.assert_close(jvp(in_place_update_under_no_grad, x, t),
                               (autograd_grad(in_place_update_under_no_grad, x) * t).sum(),
                               **TIGHT)


def update_of_a_constant_tensor(x):
    y = torch.zeros(4, dtype=F64)
    y.add_(x)  # refused
    return y.sum()


def update_by_a_value_used_nowhere_else(x):
    y = x.exp()
    y.div_(x.cos() + 3.0)  # refused
    return y.sum()


def result_written_into_out(x):
    y = torch.zeros(4, dtype=F64)
    torch.mul(x, 3.0, out=y)  # refused
    return y.sum()


REFUSED = [update_of_a_constant_tensor, update_by_a_value_used_nowhere_else,
           result_written_into_out]


@pytest.mark.parametrize("fn", REFUSED, ids=[f.__name__ for f in REFUSED])
def test_in_place_update_propgen_cannot_follow_is_refused(fn):
    """A tangent that reaches the result only through an in-place update (into a tensor
    without tangent, or from a value nothing else reads) is not computed by the analysis, and
    torch.autograd does not differentiate ``out=``: a documented error at the line."""
    with pytest.raises(propgen.UnsupportedSyntaxError) as info:
        jvp(fn, rn(4), rn(4, seed=1))
    assert marked(fn, "# refused") in str(info.value)


# --------------------------------------------------------------------------------------------
# Swaps with names without tangent
# --------------------------------------------------------------------------------------------


def rotate_three_names(x, y):
    x, y, z = y, x * 2.0, x
    return (x + y * z).sum()


def swap_in_a_loop(x, y):
    for _ in range(3):
        x, y = y, x
        x = x * 1.5
    return (x * 3.0 + y).sum()


def swap_in_a_taken_branch(x, y):
    if x.sum() < 100.0:
        y, x = x, y
    x = x * 2.0
    return (x * y).sum()


def swap_then_return_the_other(x, y):
    x, y = y, x
    x = x + y
    return y.sum() * 2.0


SWAPS = [rotate_three_names, swap_in_a_loop, swap_in_a_taken_branch, swap_then_return_the_other]


@pytest.mark.parametrize("fn", SWAPS, ids=[f.__name__ for f in SWAPS])
def test_swap_with_a_name_without_tangent(fn):
    """Was: a parameter's tangent argument overwritten with None at the top of the function
    (test_fuzz_regressions.py::test_forward_mode_swap_with_a_name_without_tangent)."""
    assert_jvp_matches_torch(fn, rn(4), rn(4, seed=1), rn(4, seed=2))


# --------------------------------------------------------------------------------------------
# Accumulators starting as a bool or an int
# --------------------------------------------------------------------------------------------


def product_from_true(x):
    acc = True
    for _ in range(3):
        acc = acc * x
    return acc.sum()


def sum_from_false(x):
    acc = False
    for i in range(3):
        acc = acc + x * i
    return acc.sum()


def sum_of_rows_from_false(x):
    acc = False
    for row in x.reshape(2, 2):
        acc = acc + row * row
    return acc.sum()


def difference_from_zero_in_a_branch(x):
    acc = 0
    if x.sum() > -100.0:
        acc = acc - x
    return acc.sum()


ACCUMULATORS = [product_from_true, sum_from_false, sum_of_rows_from_false,
                difference_from_zero_in_a_branch]


@pytest.mark.parametrize("fn", ACCUMULATORS, ids=[f.__name__ for f in ACCUMULATORS])
def test_accumulator_starting_as_a_number(fn):
    """Was: the zero tangent of a bool was None, and ``None * x`` a TypeError
    (test_fuzz_regressions.py::test_forward_mode_accumulator_starting_as_bool)."""
    assert_jvp_matches_torch(fn, rn(4), rn(4, seed=1))


# --------------------------------------------------------------------------------------------
# Lists filled after they are made
# --------------------------------------------------------------------------------------------


def list_call_then_append(x):
    out = list()
    out.append(x * 2.0)
    return torch.stack(out).sum()


def empty_range_list_then_insert(x):
    out = list(range(0))
    out.insert(0, x * 3.0)
    out.append(x)
    return (torch.stack(out) * torch.arange(2.0, dtype=F64)[:, None]).sum()


def list_call_then_extend(x):
    out = list()
    out.extend([x, x * 2.0])
    return (torch.stack(out) ** 2).sum()


def list_call_then_append_and_pop(x):
    out = list()
    out.append(x)
    out.append(x * 2.0)
    last = out.pop()
    return (last * torch.stack(out)).sum()


def list_under_no_grad_then_extend(x):
    with torch.no_grad():
        out = []
    out.extend([x.sin(), x])
    return torch.cat(out).sum()


LISTS = [list_call_then_append, empty_range_list_then_insert, list_call_then_extend,
         list_call_then_append_and_pop, list_under_no_grad_then_extend]


@pytest.mark.parametrize("fn", LISTS, ids=[f.__name__ for f in LISTS])
def test_list_without_tangents_filled_afterwards(fn):
    """Was: the tangent list was started from the list after the call that fills it, one
    None too many in front (test_fuzz_regressions.py::test_forward_mode_list_made_under_no_grad
    was the no_grad case)."""
    assert_jvp_matches_torch(fn, rn(4), rn(4, seed=1))


# --------------------------------------------------------------------------------------------
# The argument rebound through a container
# --------------------------------------------------------------------------------------------


def rebind_through_a_tuple(x):
    x = (x, 1.0)[0]
    return (x * 3.0).sum()


def rebind_to_another_item(x):
    x = [x, x * 2.0][1]
    x = x.sin()
    return x.sum()


def rebind_through_a_dict_then_square(x):
    x = {"a": x, "b": 2.0}["a"]
    x = x * x
    return x.sum()


def rebind_through_a_list_in_a_loop(x):
    for _ in range(2):
        x = [x * 2.0][0]
    return x.sum()


REBOUND = [rebind_through_a_tuple, rebind_to_another_item, rebind_through_a_dict_then_square,
           rebind_through_a_list_in_a_loop]


@pytest.mark.parametrize("fn", REBOUND, ids=[f.__name__ for f in REBOUND])
def test_argument_rebound_through_a_container(fn):
    """Was: the tangent argument overwritten with None at the top of the function
    (test_fuzz_regressions.py::test_forward_mode_argument_rebound_through_a_container)."""
    assert_jvp_matches_torch(fn, rn(4), rn(4, seed=1))
