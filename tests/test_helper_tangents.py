"""The tangent templates of the helpers that generated backward code calls
(``templates/helper_tangents.py``), each checked on its own.

Each entry of ``CASES`` is a module-level function that calls one helper (``helpers.py`` or
``propgen.runtime``) with some of its arguments varying.  ``propgen.autodiff(fn,
mode='forward')`` must splice the helper's tangent template (no ``opaque_jvp`` in the
generated code) and agree with ``torch.func.jvp`` of the same function, or with central
finite differences where the helper returns None inside a container (which torch.func
cannot carry) -- float64 throughout.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from propgen.templates import helper_tangents, helpers

import propgen
from propgen import runtime
from propgen.template import Registry

F64 = torch.float64


class Gen:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.g, dtype=F64)

    def uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=self.g, dtype=F64)

    def pos(self, *shape: int) -> torch.Tensor:
        return self.uniform(0.5, 2.0, *shape)

    def away(self, *shape: int) -> torch.Tensor:
        """randn kept away from 0 (for masks such as y > 0 and for sign(x))."""
        x = self.randn(*shape)
        return x + 0.3 * torch.sign(x)

    def index(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(high, shape, generator=self.g)


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable
    make: Callable[[Gen], tuple]
    wrt: tuple
    finite_differences: bool = False  # the output holds None: torch.func.jvp cannot run it


CASES: list[Case] = []


def case(fn, make, wrt, name: str | None = None, **kw) -> None:
    CASES.append(Case(name or fn.__name__.removeprefix("h_"), fn, make, tuple(wrt), **kw))


# ------------------------------------------------------------------------------------------
# Fused elementwise derivatives
# ------------------------------------------------------------------------------------------


def h_tanh_backward(g, y):
    return helpers.tanh_backward(g, y)


def h_sigmoid_backward(g, y):
    return helpers.sigmoid_backward(g, y)


def h_relu_backward(g, y):
    return helpers.relu_backward(g, y)


case(h_tanh_backward, lambda m: (m.randn(3, 4), m.uniform(-0.9, 0.9, 3, 4)), (0, 1))
case(h_sigmoid_backward, lambda m: (m.randn(3, 4), m.uniform(0.1, 0.9, 3, 4)), (0, 1))
case(h_relu_backward, lambda m: (m.randn(3, 4), m.away(3, 4).relu()), (0, 1))

# ------------------------------------------------------------------------------------------
# Broadcasting, casts and shapes
# ------------------------------------------------------------------------------------------


def h_unbroadcast(g, x):
    return helpers.unbroadcast(g, x)


def h_unbroadcast_meta(g, x):
    return helpers.unbroadcast(g, runtime.meta(x))


def h_unbroadcast_number(g):
    return helpers.unbroadcast(g, 2.5)


def h_unbroadcast_each(g, x, y):
    return helpers.unbroadcast_each(g, [x, y])


def h_like(g, x):
    return helpers.like(g, x)


def h_expand_reduced(g, x):
    return helpers.expand_reduced(g, x, (0, 2), False)


def h_expand_reduced_keepdim(g, x):
    return helpers.expand_reduced(g, x, 1, True)


def h_expand_like(tangent, result):
    return helpers.expand_like(tangent, result)


def h_reverse_cumsum(g):
    return helpers.reverse_cumsum(g, 1)


def h_repeat_grad(g, x):
    return helpers.repeat_grad(g, x, (2, 1, 3))


def h_roll_grad(g):
    return helpers.roll_grad(g, (1, -2), (0, 1))


case(h_unbroadcast, lambda m: (m.randn(2, 3, 4), m.randn(3, 1)), (0,))
case(h_unbroadcast_meta, lambda m: (m.randn(2, 3, 4), m.randn(4)), (0,))
case(h_unbroadcast_number, lambda m: (m.randn(2, 3),), (0,))
case(h_unbroadcast_each, lambda m: (m.randn(3, 4), m.randn(4), m.randn(3, 4)), (0,))
case(h_like, lambda m: (m.randn(3, 4), m.randn(3, 4).float()), (0,))
case(h_expand_reduced, lambda m: (m.randn(3), m.randn(2, 3, 4)), (0,))
case(h_expand_reduced_keepdim, lambda m: (m.randn(2, 1, 4), m.randn(2, 3, 4)), (0,))
case(h_expand_like, lambda m: (m.randn(4), m.randn(3, 4)), (0,))
case(h_reverse_cumsum, lambda m: (m.randn(3, 4),), (0,))
case(h_repeat_grad, lambda m: (m.randn(2, 3, 12), m.randn(3, 4)), (0,))
case(h_roll_grad, lambda m: (m.randn(3, 4),), (0,))

# ------------------------------------------------------------------------------------------
# Selections
# ------------------------------------------------------------------------------------------


def h_split_ties(g, x, result):
    return helpers.split_ties(g, x, result, 1, False)


def h_pairwise_grad(g, x, y):
    return helpers.pairwise_grad(g, x > y, x == y, x)


def h_minmax_grad_all(g, result, x):
    return helpers.minmax_grad(g, result, x, None, False, None, True)


def h_minmax_grad_dim(g, x, indices):
    return helpers.minmax_grad((g, None), (g, indices), x, 1, False, None, False)


def h_minmax_grad_other(g, x, y):
    return helpers.minmax_grad(g, None, x, y, False, None, True)


def h_scatter_grad(g, x, indices):
    return helpers.scatter_grad(g, x, indices, 1)


def h_picked_grad(g, a, b):
    return helpers.picked_grad(g, b, (a, b))


def h_getitem_grad_basic(g, x):
    return helpers.getitem_grad(g, x, (slice(None), 1))


def h_getitem_grad_advanced(g, x, idx):
    return helpers.getitem_grad(g, x, (idx, idx))


def h_getitem_grad_mixed(g, x, idx):
    return helpers.getitem_grad(g, x, (slice(None), idx))


def h_getitem_grad_list(g, x, y):
    return helpers.getitem_grad(g, [x, y, x], 1)


def h_masked_select_grad(g, x, mask):
    return helpers.masked_select_grad(g, x, mask)


def h_cat_grads(g1, g3, outputs):
    return helpers.cat_grads([g1, None, g3], outputs, 1)


def h_stack_grads(g1, g2, outputs):
    return helpers.stack_grads([g1, g2, None], outputs, 0)


def h_embedding_grad(g, idx, weight):
    return helpers.embedding_grad(g, idx, weight, 1, True)


def _ties(m):
    x = torch.tensor([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]],
                     dtype=F64)
    return m.randn(3), x, x.amax(1)


def _values_indices(m):
    x = m.randn(3, 4)
    return m.randn(3), x, x.min(1).indices


case(h_split_ties, _ties, (0, 1, 2))
case(h_pairwise_grad, lambda m: (m.randn(3, 4), m.randn(3, 4), m.randn(4)), (0, 1, 2))
case(h_minmax_grad_all, lambda m: (m.randn(), _ties(m)[1].max(), _ties(m)[1]), (0, 1, 2))
case(h_minmax_grad_dim, _values_indices, (0, 1))
case(h_minmax_grad_other, lambda m: (m.randn(3, 4), m.randn(3, 4), m.randn(3, 4)), (0, 1, 2))
case(h_scatter_grad, lambda m: (m.randn(3, 2), m.randn(3, 4), m.index(4, 3, 2)), (0, 1))
case(h_picked_grad, lambda m: (m.randn(3), m.randn(3), m.randn(3)), (0, 1, 2),
     finite_differences=True)
case(h_getitem_grad_basic, lambda m: (m.randn(3, 5), m.randn(3, 4, 5)), (0, 1))
case(h_getitem_grad_advanced, lambda m: (m.randn(5), m.randn(4, 4), m.index(4, 5)), (0, 1))
case(h_getitem_grad_mixed, lambda m: (m.randn(3, 5), m.randn(3, 4), m.index(4, 5)), (0,))
case(h_getitem_grad_list, lambda m: (m.randn(4), m.randn(3, 4), m.randn(4)), (0, 1, 2),
     finite_differences=True)
case(h_masked_select_grad,
     lambda m: (m.randn(9), m.randn(3, 4), torch.tensor([True, False, True, True])), (0,),
     name="masked_select_grad")
case(h_cat_grads, lambda m: (m.randn(3, 2), m.randn(3, 1), [m.randn(3, 2), m.randn(3, 4),
                                                            m.randn(3, 1)]), (0, 1))
case(h_stack_grads, lambda m: (m.randn(4), m.randn(4), [m.randn(4) for _ in range(3)]), (0, 1))
case(h_embedding_grad, lambda m: (m.randn(2, 3, 5), m.index(4, 2, 3), m.randn(4, 5)), (0, 2))

# ------------------------------------------------------------------------------------------
# Products, matmul, pow
# ------------------------------------------------------------------------------------------


def h_prod_others(x):
    return helpers.prod_others(x, 1)


def h_prod_others_all(x):
    return helpers.prod_others(x, None)


def h_cumprod_grad(g, x, result):
    return helpers.cumprod_grad(g, x, result, 1)


def h_matmul_grad_input(g, a, b):
    return helpers.matmul_grad_input(g, a, b)


def h_matmul_grad_other(g, a, b):
    return helpers.matmul_grad_other(g, a, b)


def h_pow_grad_base(g, x, p):
    return helpers.pow_grad_base(g, x, p)


def h_pow_grad_base_scalar(g, x):
    return helpers.pow_grad_base(g, x, 2.5) + helpers.pow_grad_base(g, x, 1) \
        + helpers.pow_grad_base(g, x, 0)


def h_pow_grad_exponent(g, result, x, p):
    return helpers.pow_grad_exponent(g, result, x, p)


def h_pow_grad_exponent_number(g, result, p):
    return helpers.pow_grad_exponent(g, result, 2.0, p)


def _with_zeros(m, *shape):
    x = m.uniform(0.5, 1.5, *shape)
    x.view(-1)[::3] = 0.0
    return x


def _cumprod_args(x):
    def make(m):
        v = x(m)
        return m.randn(*v.shape), v, v.cumprod(1)
    return make


case(h_prod_others, lambda m: (m.uniform(0.5, 1.5, 3, 4),), (0,))
case(h_prod_others, lambda m: (_with_zeros(m, 3, 4),), (0,), name="prod_others_zeros")
case(h_prod_others_all, lambda m: (_with_zeros(m, 2, 3),), (0,))
case(h_cumprod_grad, _cumprod_args(lambda m: m.uniform(0.5, 1.5, 3, 4)), (0, 1, 2))
case(h_cumprod_grad, _cumprod_args(lambda m: _with_zeros(m, 3, 4)), (0, 1, 2),
     name="cumprod_grad_zeros")
for _a, _b, _g in [((3, 4), (4, 5), (3, 5)), ((4,), (4,), ()), ((2, 3, 4), (4, 5), (2, 3, 5)),
                   ((4,), (2, 4, 5), (2, 5)), ((2, 3, 4), (4,), (2, 3))]:
    _make = (lambda a, b, g: lambda m: (m.randn(*g), m.randn(*a), m.randn(*b)))(_a, _b, _g)
    case(h_matmul_grad_input, _make, (0, 2), name=f"matmul_grad_input_{len(_a)}d_{len(_b)}d")
    case(h_matmul_grad_other, _make, (0, 1), name=f"matmul_grad_other_{len(_a)}d_{len(_b)}d")
case(h_pow_grad_base, lambda m: (m.randn(3, 4), m.pos(3, 4), m.randn(4)), (0, 1, 2))
case(h_pow_grad_base_scalar, lambda m: (m.randn(3, 4), m.pos(3, 4)), (0, 1))
case(h_pow_grad_exponent, lambda m: (m.randn(3, 4), m.pos(3, 4), m.pos(3, 4), m.randn(4)),
     (0, 1, 2, 3))
case(h_pow_grad_exponent_number, lambda m: (m.randn(3, 4), m.pos(3, 4), m.randn(4)), (0, 1, 2))

# ------------------------------------------------------------------------------------------
# Norms
# ------------------------------------------------------------------------------------------


def _norm_case(ord):
    def h(g, x, result):
        return helpers.vector_norm_grad(g, x, result, ord, 1, False)

    def make(m):
        x = m.away(3, 4)
        return m.randn(3), x, torch.linalg.vector_norm(x, ord, 1)

    h.__name__ = f"h_vector_norm_grad_{ord}"
    return h, make


# the function objects are kept at module level: propgen reads their source
NORM_FNS = {ord: _norm_case(ord) for ord in (2, 3.0, 1.5, 1, math.inf, 0.5)}
for _ord, (_h, _make) in NORM_FNS.items():
    case(_h, _make, (0, 1, 2), name=f"vector_norm_grad_ord_{_ord}")


def h_norm_grad(g, x, result):
    return helpers.norm_grad(g, x, result, "fro", None, True)


def h_linalg_norm_grad(g, x, result):
    return helpers.linalg_norm_grad(g, x, result, 3.0, (0,), False)


case(h_norm_grad, lambda m: (m.randn(1, 1), x := m.randn(3, 4), x.norm(keepdim=True)), (0, 1, 2))
case(h_linalg_norm_grad,
     lambda m: (m.randn(4), x := m.away(3, 4), torch.linalg.vector_norm(x, 3.0, 0)), (0, 1, 2))

# ------------------------------------------------------------------------------------------
# nn.functional
# ------------------------------------------------------------------------------------------


def h_gelu_slope(x):
    return helpers.gelu_slope(x, "none")


def h_gelu_slope_tanh(x):
    return helpers.gelu_slope(x, "tanh")


def h_or_one(weight):
    return helpers.or_one(weight)


def _loss_scale_fn(reduction, mean_over_weights):
    def h(g, weight):
        e = torch.ones(3, 4, dtype=F64)
        return helpers.loss_scale(g, e, reduction, weight, mean_over_weights)

    h.__name__ = f"h_loss_scale_{reduction}_{mean_over_weights}"
    return h


def _loss_weight_grad_fn(reduction, mean_over_weights):
    def h(g, result, elementwise, weight):
        return helpers.loss_weight_grad(g, result, elementwise, weight, reduction,
                                        mean_over_weights)

    h.__name__ = f"h_loss_weight_grad_{reduction}_{mean_over_weights}"
    return h


LOSS_MODES = [("none", False), ("mean", True), ("mean", False), ("batchmean", False),
              ("sum", True)]
LOSS_SCALE_FNS = {mode: _loss_scale_fn(*mode) for mode in LOSS_MODES}
LOSS_WEIGHT_FNS = {mode: _loss_weight_grad_fn(*mode) for mode in LOSS_MODES}


def _g_for(reduction, m):
    return m.randn(3, 4) if reduction == "none" else m.randn()


for (_red, _mow), _h in LOSS_SCALE_FNS.items():
    case(_h, (lambda r: lambda m: (_g_for(r, m), m.pos(3, 4)))(_red), (0, 1),
         name=f"loss_scale_{_red}_{_mow}")
for (_red, _mow), _h in LOSS_WEIGHT_FNS.items():
    case(_h, (lambda r: lambda m: (_g_for(r, m), m.randn(), m.randn(3, 4), m.pos(3, 4)))(_red),
         (0, 1, 2, 3), name=f"loss_weight_grad_{_red}_{_mow}")


def h_kl_div_target_grad(per, x, target):
    return helpers.kl_div_target_grad(per, x, target, False)


def h_kl_div_target_grad_log(per, x, target):
    return helpers.kl_div_target_grad(per, x, target, True)


def _nll_fn(reduction):
    def h(g, logp, target, weight):
        return helpers.nll_loss_grad(g, logp, target, weight, 2, reduction)

    h.__name__ = f"h_nll_loss_grad_{reduction}"
    return h


def _ce_fn(reduction, smoothing):
    def h(g, logits, target, weight):
        return helpers.cross_entropy_grad(g, logits, target, weight, 2, reduction, smoothing)

    h.__name__ = f"h_cross_entropy_grad_{reduction}"
    return h


def _ce_target_fn(reduction):
    def h(g, logits, target, weight):
        return helpers.cross_entropy_target_grad(g, logits, target, weight, reduction, 0.2)

    h.__name__ = f"h_cross_entropy_target_grad_{reduction}"
    return h


NLL_FNS = {r: _nll_fn(r) for r in ("mean", "sum", "none")}
CE_FNS = {r: _ce_fn(r, 0.1) for r in ("mean", "sum", "none")}
CE_TARGET_FNS = {r: _ce_target_fn(r) for r in ("mean", "sum", "none")}


def _classes(reduction, probabilities):
    def make(m):
        g = m.randn(5) if reduction == "none" else m.randn()
        target = m.randn(5, 4).softmax(1) if probabilities else torch.tensor([0, 2, 1, 3, 2])
        return g, m.randn(5, 4), target, m.pos(4)
    return make


case(h_gelu_slope, lambda m: (m.randn(3, 4),), (0,))
case(h_gelu_slope_tanh, lambda m: (m.randn(3, 4),), (0,))
case(h_or_one, lambda m: (m.pos(4),), (0,))
case(h_kl_div_target_grad, lambda m: (m.randn(3, 4), m.randn(3, 4), m.away(3, 4).abs() * (
    torch.arange(12).reshape(3, 4) % 3 != 0)), (0, 1, 2))
case(h_kl_div_target_grad_log, lambda m: (m.randn(3, 4), m.randn(3, 4), m.randn(3, 4)),
     (0, 1, 2))
for _r, _h in NLL_FNS.items():
    case(_h, _classes(_r, False), (0, 3), name=f"nll_loss_grad_{_r}")
for _r, _h in CE_FNS.items():
    case(_h, _classes(_r, False), (0, 1, 3), name=f"cross_entropy_grad_{_r}")
    case(_h, _classes(_r, True), (0, 1, 2, 3), name=f"cross_entropy_grad_probs_{_r}")
for _r, _h in CE_TARGET_FNS.items():
    case(_h, _classes(_r, True), (0, 1, 3), name=f"cross_entropy_target_grad_{_r}")

# ------------------------------------------------------------------------------------------
# propgen.runtime: accumulation and container adjoints
# ------------------------------------------------------------------------------------------


def h_acc(a, b):
    return runtime.acc(a, b)


def h_acc_none(b):
    return runtime.acc(None, b)


def h_acc_lists(a, b, c):
    return runtime.acc([a, None], [b, c])


def h_acc_into(a, b):
    return runtime.acc_into(a, b * 2.0)


def h_grad_or_zeros(g, x):
    return runtime.grad_or_zeros(g, x)


def h_grad_or_zeros_none(x):
    return runtime.grad_or_zeros(None, x) + x


def h_seq_adjoint(seq, g):
    return runtime.seq_adjoint([seq, seq, seq], 1, g)


def h_unpack_adjoint(a, b):
    return runtime.unpack_adjoint([a, None, b], 2)


def h_store_grad_value(d_buffer, value):
    return runtime.store_grad_value(d_buffer, (slice(None), 1), value)


def h_store_grad_buffer(d_buffer):
    return runtime.store_grad_buffer(d_buffer, (0, slice(1, 3)))


def h_pop_adjoint(a, b, c):
    return runtime.pop_adjoint([a, b, c], 2)


def h_unpop_adjoint(a, b, value):
    return runtime.unpop_adjoint([a, None, b], [1, 2, 3], value)


def h_unpop_adjoint_none(value):
    return runtime.unpop_adjoint(None, [1, 2], value)


case(h_acc, lambda m: (m.randn(3, 4), m.randn(4)), (0, 1))
case(h_acc, lambda m: (m.randn(3, 4), m.randn(3, 4)), (1,), name="acc_one_side")
case(h_acc_none, lambda m: (m.randn(3, 4),), (0,))
case(h_acc_lists, lambda m: (m.randn(3), m.randn(3), m.randn(2)), (0, 1, 2))
case(h_acc_into, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0, 1))
case(h_grad_or_zeros, lambda m: (m.randn(3, 4), m.randn(4)), (0,))
case(h_grad_or_zeros_none, lambda m: (m.randn(3, 4),), (0,))
case(h_seq_adjoint, lambda m: (m.randn(3), m.randn(3)), (1,), finite_differences=True)
case(h_unpack_adjoint, lambda m: (m.randn(3), m.randn(2)), (0, 1))
case(h_store_grad_value, lambda m: (m.randn(3, 4), m.randn(3)), (0,))
case(h_store_grad_buffer, lambda m: (m.randn(3, 4),), (0,))
case(h_pop_adjoint, lambda m: (m.randn(3), m.randn(2), m.randn(4)), (0, 1, 2))
case(h_unpop_adjoint, lambda m: (m.randn(3), m.randn(2), m.randn(4)), (0, 1, 2),
     finite_differences=True)
case(h_unpop_adjoint, lambda m: (m.randn(3), m.randn(2), m.randn(4)), (2,),
     finite_differences=True, name="unpop_adjoint_value")
case(h_unpop_adjoint_none, lambda m: (m.randn(4),), (0,), finite_differences=True)

# ------------------------------------------------------------------------------------------
# Forward over reverse: arguments that reach the backward through its saved values may be
# None or integer tensors at run time (no tangent), though the compiler cannot know it
# ------------------------------------------------------------------------------------------


def loss_mse(x, t, weight, exponent):
    return torch.nn.functional.mse_loss(x ** exponent, t, weight=weight)


def loss_cross_entropy(x, t, weight, exponent):
    return torch.nn.functional.cross_entropy(x ** exponent, t, weight=weight,
                                             label_smoothing=0.1)


def loss_cross_entropy_probabilities(x, t, weight, exponent):
    return torch.nn.functional.cross_entropy(x ** exponent, t.softmax(1), weight=weight)


def loss_nll(x, t, weight, exponent):
    return torch.nn.functional.nll_loss((x ** exponent).log_softmax(1), t, weight=weight)


def loss_binary(x, t, weight, exponent):
    return torch.nn.functional.binary_cross_entropy_with_logits(x ** exponent, t, weight)


UNVARYING = [loss_mse, loss_cross_entropy, loss_cross_entropy_probabilities, loss_nll,
             loss_binary]


@pytest.mark.parametrize("weighted", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("fn", UNVARYING, ids=lambda f: f.__name__)
def test_hvp_with_arguments_that_do_not_vary(fn, weighted) -> None:
    """H v of losses whose weight is None (or a tensor) and whose exponent is an integer
    tensor, both passed as arguments: the backward reads them from its saved values."""
    m = Gen(zlib.crc32(fn.__name__.encode()))
    x = m.pos(5, 4)
    if fn in (loss_cross_entropy, loss_nll):
        t = torch.tensor([0, 2, 1, 3, 2])
    elif fn is loss_binary:
        t = m.uniform(0, 1, 5, 4)
    else:
        t = m.randn(5, 4)
    weight = (m.pos(5, 4) if fn in (loss_mse, loss_binary) else m.pos(4)) if weighted else None
    exponent = torch.tensor(3)
    v = m.randn(5, 4)
    got = propgen.hvp(fn, wrt=0)(x, t, weight, exponent, tangents=v)
    want = torch.autograd.functional.hvp(lambda a: fn(a, t, weight, exponent), x, v)[1]
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------


def _inputs(c: Case) -> tuple:
    return c.make(Gen(zlib.crc32(c.name.encode())))


def _direction(c: Case, args: tuple) -> tuple:
    g = torch.Generator().manual_seed(zlib.crc32(c.name.encode()) + 1)
    return tuple(torch.randn(args[i].shape, generator=g, dtype=F64).to(args[i].dtype)
                 for i in c.wrt)


def _with(c: Case, args: tuple, values: tuple) -> list:
    full = list(args)
    for i, v in zip(c.wrt, values):
        full[i] = v
    return full


def _combine(a, b, fn):
    """fn over the tensors of two results of the same structure; None is zero."""
    if isinstance(a, (list, tuple)):
        return [_combine(x, y, fn) for x, y in zip(a, b)]
    if a is None and b is None:
        return None
    if a is None:
        a = torch.zeros_like(b)
    if b is None:
        b = torch.zeros_like(a)
    return fn(a, b)


def _finite_differences(c: Case, args: tuple, tans: tuple, eps: float = 1e-6):
    plus = c.fn(*_with(c, args, tuple(args[i] + eps * v for i, v in zip(c.wrt, tans))))
    minus = c.fn(*_with(c, args, tuple(args[i] - eps * v for i, v in zip(c.wrt, tans))))
    return _combine(plus, minus, lambda p, q: (p - q) / (2 * eps))


def _reference(c: Case, args: tuple, tans: tuple):
    if c.finite_differences:
        return _finite_differences(c, args, tans)

    def of_wrt(*values):
        return c.fn(*_with(c, args, values))

    return torch.func.jvp(of_wrt, tuple(args[i] for i in c.wrt), tans)[1]


def _assert_close(got, want, tol: float, where: str = "tangent") -> None:
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (where, got)
        for k, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, tol, f"{where}[{k}]")
        return
    if want is None or got is None:
        other = got if want is None else want
        assert other is None or not bool(other.abs().max() > tol), (where, got, want)
        return
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, check_dtype=False,
                               msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_helper_tangent(c: Case) -> None:
    args = _inputs(c)
    tans = _direction(c, args)
    jf = propgen.autodiff(c.fn, mode="forward", wrt=c.wrt)
    got = jf(*args, tangents=tans if len(tans) > 1 else tans[0])
    assert "opaque_jvp" not in jf.source, jf.source
    want = _reference(c, args, tans)
    _assert_close(got, want, 1e-6 if c.finite_differences else 1e-9)


def test_every_helper_called_by_a_template_has_a_tangent() -> None:
    """Each helper that an adjoint template of ops.py / nn.py calls has a tangent template or
    is marked nondifferentiable (it computes shapes, dims or masks)."""
    from propgen.templates import nn, ops

    reg = Registry.default()
    called = set()
    for module in (ops, nn):
        for value in vars(module).values():
            if getattr(value, "__propgen_adjoint__", None) is None:
                continue
            names = value.__code__.co_names
            called |= {n for n in names if callable(getattr(helpers, n, None))}
    called.add("seq_adjoint")
    missing = sorted(n for n in called
                     if reg.lookup_tangent(getattr(helpers, n)) is None
                     and reg.lookup(getattr(helpers, n)) is None)
    assert not missing, f"helpers without a tangent template: {missing}"


def test_every_tangent_template_is_tested() -> None:
    covered = {c.fn.__code__.co_names for c in CASES}
    called = {n for names in covered for n in names}
    untested = []
    for value in vars(helper_tangents).values():
        for key in getattr(value, "__propgen_tangent__", ()):
            if key in (list, tuple):
                continue
            if key.__name__ not in called:
                untested.append(key.__name__)
    assert not untested, f"tangent templates without a case here: {untested}"
