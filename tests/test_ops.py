"""Every adjoint template against torch.autograd (an OpInfo-style table).

Each entry of ``CASES`` names a module-level function that calls one op (in its function,
method and operator spellings) and reduces the result to a scalar with a random weight passed
as an argument, how to make its inputs, which arguments to differentiate, and which registry
keys it exercises.  ``test_op_gradient`` compares ``propgen.grad`` with ``torch.autograd.grad``
for every entry, dtype and device; ``test_every_template_is_tested`` fails when a template
has no entry.  The private tape evaluator in ``_template_eval`` is a second, compiler-free
check of the same templates.
"""

from __future__ import annotations

import builtins
import operator
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from _template_eval import tape_keys, template_grad
from propgen.templates import TEMPLATE_MODULES
from propgen.templates.helpers import update_under_no_grad

import propgen
from propgen.template import Registry, Template

# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


class Gen:
    """Makes an entry's inputs: the same values for every dtype (drawn in float64)."""

    def __init__(self, seed: int, dtype: torch.dtype, device: str) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.dtype, self.device = dtype, device

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype=self.dtype, device=self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return self._out(torch.randn(shape, generator=self.g, dtype=torch.float64))

    def uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        u = torch.rand(shape, generator=self.g, dtype=torch.float64)
        return self._out(lo + (hi - lo) * u)

    def pos(self, *shape: int) -> torch.Tensor:
        """Positive and away from 0: for log, sqrt, division."""
        return self.uniform(0.5, 2.0, *shape)

    def unit(self, *shape: int) -> torch.Tensor:
        """Inside (-0.9, 0.9): for asin, atanh, erfinv."""
        return self.uniform(-0.9, 0.9, *shape)

    def prob(self, *shape: int) -> torch.Tensor:
        return self.uniform(0.05, 0.95, *shape)

    def with_zeros(self, *shape: int, every: int = 3) -> torch.Tensor:
        """randn with every ``every``-th element exactly 0 (non-smooth points)."""
        t = torch.randn(shape, generator=self.g, dtype=torch.float64)
        t.view(-1)[::every] = 0.0
        return self._out(t)

    def tensor(self, data) -> torch.Tensor:
        return self._out(torch.tensor(data, dtype=torch.float64))

    def mat(self, *shape: int) -> torch.Tensor:
        """Well-conditioned square matrices (a batch of them for more dims)."""
        n = shape[-1]
        a = torch.randn(shape, generator=self.g, dtype=torch.float64) / n**0.5
        return self._out(a + 2 * torch.eye(n, dtype=torch.float64))

    def spd(self, n: int) -> torch.Tensor:
        a = torch.randn(n, n, generator=self.g, dtype=torch.float64)
        return self._out(a @ a.T / n + torch.eye(n, dtype=torch.float64))

    def index(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(high, shape, generator=self.g).to(self.device)

    def longs(self, data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

    def mask(self, *shape: int) -> torch.Tensor:
        return (torch.rand(shape, generator=self.g) > 0.5).to(self.device)


@dataclass(frozen=True)
class OpCase:
    fn: Callable
    make: Callable[[Gen], tuple]
    wrt: tuple = (0,)
    keys: tuple = ()
    tol: float = 1.0  # tolerance multiplier
    devices: tuple = ("cpu", "cuda")
    float32: bool = True
    evaluator: bool = True  # also check with the compiler-free tape evaluator
    hvp: str = ""  # why forward-over-reverse is not checked for this entry ("" = it is)
    jvp_tol: float = 1.0  # tolerance multiplier of the forward-mode check

    @property
    def name(self) -> str:
        return self.fn.__name__.removeprefix("f_")


CASES: list[OpCase] = []


def case(fn, make, wrt=(0,), keys=(), **kw) -> None:
    CASES.append(OpCase(fn, make, tuple(wrt), tuple(keys), **kw))


T = torch.Tensor

# ------------------------------------------------------------------------------------------
# Arithmetic with broadcasting
# ------------------------------------------------------------------------------------------


def f_add(x, y, w):
    out = x + y + torch.add(x, y, alpha=2.0) + x.add(y) + (2 + x) + (x + 2.5) + y.add(x, alpha=-1)
    return (out * w).sum()


case(f_add, lambda m: (m.randn(3, 4), m.randn(4), m.randn(3, 4)), (0, 1),
     (operator.add, torch.add, T.add))


def f_add_scalar_tensor(x, s, w):
    return ((x + s) * w).sum() + (s + s * x).sum()


case(f_add_scalar_tensor, lambda m: (m.randn(2, 3), m.randn(), m.randn(2, 3)), (0, 1),
     (operator.add, operator.mul))


def f_sub(x, y, w):
    out = x - y + (2 - x) + (x - 2) + torch.sub(x, y, alpha=3) + torch.subtract(y, x)
    out = out + x.sub(y) + x.subtract(y, alpha=0.5)
    return (out * w).sum()


case(f_sub, lambda m: (m.randn(3, 4), m.randn(3, 1), m.randn(3, 4)), (0, 1),
     (operator.sub, torch.sub, torch.subtract, T.sub, T.subtract))


def f_rsub(x, y, w):
    return ((torch.rsub(x, y) + torch.rsub(x, y, alpha=2) + torch.rsub(x, 2.0)) * w).sum()


case(f_rsub, lambda m: (m.randn(3, 4), m.randn(4), m.randn(3, 4)), (0, 1), (torch.rsub,))


def f_mul(x, y, w):
    out = x * y + 3 * x + x * 0.5 + torch.mul(x, y) + torch.multiply(y, x) + x.mul(y)
    return (out * w + x.multiply(x) * w).sum()


case(f_mul, lambda m: (m.randn(2, 3, 4), m.randn(3, 1), m.randn(2, 3, 4)), (0, 1),
     (operator.mul, torch.mul, torch.multiply, T.mul, T.multiply))


def f_div(x, y, w):
    out = x / y + 2 / y + x / 2 + torch.div(x, y) + torch.divide(y, x) + torch.true_divide(x, y)
    out = out + x.div(y) + x.divide(y) + x.true_divide(y)
    return (out * w).sum() + (torch.div(x, y, rounding_mode="floor") * w).sum()


case(f_div, lambda m: (m.pos(3, 4), m.pos(4), m.randn(3, 4)), (0, 1),
     (operator.truediv, torch.div, torch.divide, torch.true_divide, T.div, T.divide,
      T.true_divide))


def f_pow(x, y, w):
    out = x**y + x**2 + 2**y + torch.pow(x, y) + x.pow(3) + x**0.5 + torch.pow(2.0, y)
    return (out * w).sum()


case(f_pow, lambda m: (m.pos(3, 4), m.randn(4), m.randn(3, 4)), (0, 1),
     (operator.pow, torch.pow, T.pow))


def f_pow_at_zero(x, y, w):
    """torch's conventions at x = 0: d/dx is 0 where p == 0, d/dp is 0 where p >= 0."""
    return ((x**y + x**2 + x**0) * w).sum()


case(f_pow_at_zero,
     lambda m: (m.tensor([0.0, 0.0, 2.0, 1.5]), m.tensor([0.0, 2.0, 0.0, 1.3]), m.randn(4)),
     (0, 1), (operator.pow,),
     hvp="x = 0 and p = 0 are sampled on purpose: x**p has no second derivative at x = 0 "
         "(autograd's double backward gives NaN), and at p = 0 torch's zero gradient 'where "
         "p == 0' makes autograd's mixed second derivative asymmetric (it returns H^T v, "
         "not H v)")


def f_remainder(x, y, w):
    out = x % y + torch.remainder(x, y) + x.remainder(2.5) + x % 1.5
    return (out * w).sum()


case(f_remainder, lambda m: (m.uniform(0.1, 0.4, 3, 4) + m.index(5, 3, 4), m.pos(4), m.randn(3, 4)),
     (0, 1), (operator.mod, torch.remainder, T.remainder))


def f_fmod(x, y, w):
    return ((torch.fmod(x, y) + x.fmod(1.5)) * w).sum()


case(f_fmod, lambda m: (m.uniform(0.1, 0.4, 3, 4) - m.index(5, 3, 4), m.pos(4), m.randn(3, 4)),
     (0, 1), (torch.fmod, T.fmod))


def f_neg_pos(x, w):
    out = -x + torch.neg(x) + torch.negative(x) + x.neg() + x.negative()
    out = out + (+x) + torch.positive(x) + x.positive() + operator.pos(x)
    return (out * w).sum()


case(f_neg_pos, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,),
     (operator.neg, torch.neg, torch.negative, T.neg, T.negative, operator.pos, torch.positive,
      T.positive))


def f_abs(x, w):
    """abs'(0) = 0"""
    out = abs(x) + torch.abs(x) + torch.absolute(x) + x.abs() + x.absolute() + operator.abs(x)
    return (out * w).sum()


case(f_abs, lambda m: (m.with_zeros(3, 4), m.randn(3, 4)), (0,),
     (builtins.abs, operator.abs, torch.abs, torch.absolute, T.abs, T.absolute))


def f_atan2(x, y, w):
    out = torch.atan2(x, y) + torch.arctan2(y, x) + x.atan2(y) + x.arctan2(y)
    return (out * w).sum()


case(f_atan2, lambda m: (m.randn(3, 4), m.randn(4), m.randn(3, 4)), (0, 1),
     (torch.atan2, torch.arctan2, T.atan2, T.arctan2))


def f_hypot(x, y, w):
    return ((torch.hypot(x, y) + x.hypot(y)) * w).sum()


case(f_hypot, lambda m: (m.randn(3, 4), m.randn(3, 1), m.randn(3, 4)), (0, 1),
     (torch.hypot, T.hypot))


def f_maximum_minimum(x, y, w):
    """Ties split the gradient 0.5 / 0.5."""
    out = torch.maximum(x, y) + x.maximum(y) * 2 + torch.minimum(x, y) * 3 + x.minimum(y) * 4
    return (out * w).sum()


case(f_maximum_minimum,
     lambda m: (m.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]), m.tensor([2.0, 2.0, 1.0]),
                m.randn(2, 3)),
     (0, 1), (torch.maximum, T.maximum, torch.minimum, T.minimum))


def f_fmax_fmin(x, y, w):
    """Ties go to the first operand."""
    out = torch.fmax(x, y) + x.fmax(y) * 2 + torch.fmin(x, y) * 3 + x.fmin(y) * 4
    return (out * w).sum()


case(f_fmax_fmin,
     lambda m: (m.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]), m.tensor([2.0, 2.0, 1.0]),
                m.randn(2, 3)),
     (0, 1), (torch.fmax, T.fmax, torch.fmin, T.fmin))


def f_lerp(x, y, t, w):
    return ((torch.lerp(x, y, t) + x.lerp(y, 0.3)) * w).sum()


case(f_lerp, lambda m: (m.randn(3, 4), m.randn(4), m.uniform(0, 1, 3, 1), m.randn(3, 4)),
     (0, 1, 2), (torch.lerp, T.lerp))


def f_xlogy(x, y, w):
    return ((torch.xlogy(x, y) + x.xlogy(y)) * w).sum()


case(f_xlogy, lambda m: (m.with_zeros(3, 4), m.pos(3, 4), m.randn(3, 4)), (0, 1),
     (torch.xlogy, T.xlogy))

# ------------------------------------------------------------------------------------------
# Matrix products
# ------------------------------------------------------------------------------------------


def f_matmul(a, b, w):
    return ((a @ b + torch.matmul(a, b) + a.matmul(b)) * w).sum()


case(f_matmul, lambda m: (m.randn(3, 4), m.randn(4, 5), m.randn(3, 5)), (0, 1),
     (operator.matmul, torch.matmul, T.matmul))


def f_matmul_vectors(a, b, v, u, w):
    """1-D cases: vector @ vector, matrix @ vector, vector @ matrix, batch @ vector."""
    out = (a @ b) + ((v @ a) * w).sum() + ((a @ u) * w).sum() * 2
    return out + ((torch.stack([v, v * 2]) @ a) ** 2).sum() + (b @ torch.stack([u, u])).sum()


case(f_matmul_vectors,
     lambda m: (m.randn(4), m.randn(4), m.randn(3, 4), m.randn(4, 3), m.randn(3)),
     (0, 1, 2, 3), (operator.matmul,))


def f_matmul_batched(a, b, c, w):
    """Batch dims broadcast: (2, 3, 4) @ (4, 5) and (2, 1, 3, 4) @ (5, 4, 2)."""
    return ((a @ b) * w).sum() + (torch.matmul(a.unsqueeze(1), c) ** 2).sum()


case(f_matmul_batched,
     lambda m: (m.randn(2, 3, 4), m.randn(4, 5), m.randn(5, 4, 2), m.randn(2, 3, 5)),
     (0, 1, 2), (operator.matmul, torch.matmul))


def f_mm_bmm(a, b, x, y, w, v):
    return ((torch.mm(a, b) + a.mm(b)) * w).sum() + ((torch.bmm(x, y) + x.bmm(y)) * v).sum()


case(f_mm_bmm,
     lambda m: (m.randn(3, 4), m.randn(4, 5), m.randn(2, 3, 4), m.randn(2, 4, 5), m.randn(3, 5),
                m.randn(2, 3, 5)),
     (0, 1, 2, 3), (torch.mm, T.mm, torch.bmm, T.bmm))


def f_mv_dot_outer(a, v, u, w):
    out = ((torch.mv(a, v) + a.mv(v)) * u).sum() + torch.dot(v, v * 2) + v.dot(v)
    o = torch.outer(u, v) + u.outer(v) + torch.ger(u, v) + u.ger(v)
    return out + (o * w).sum()


case(f_mv_dot_outer, lambda m: (m.randn(3, 4), m.randn(4), m.randn(3), m.randn(3, 4)),
     (0, 1, 2), (torch.mv, T.mv, torch.dot, T.dot, torch.outer, T.outer, torch.ger, T.ger))


def f_addmm(c, a, b, w):
    out = torch.addmm(c, a, b) + c.addmm(a, b, beta=0.5, alpha=2.0)
    return (out * w).sum()


case(f_addmm, lambda m: (m.randn(5), m.randn(3, 4), m.randn(4, 5), m.randn(3, 5)), (0, 1, 2),
     (torch.addmm, T.addmm))

# ------------------------------------------------------------------------------------------
# Elementwise math
# ------------------------------------------------------------------------------------------


def f_exp(x, w):
    return ((torch.exp(x) + x.exp() + torch.exp2(x) + x.exp2()) * w).sum()


case(f_exp, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,),
     (torch.exp, T.exp, torch.exp2, T.exp2))


def f_expm1_log1p(x, w):
    return ((torch.expm1(x) + x.expm1() + torch.log1p(x) + x.log1p()) * w).sum()


case(f_expm1_log1p, lambda m: (m.unit(3, 4), m.randn(3, 4)), (0,),
     (torch.expm1, T.expm1, torch.log1p, T.log1p))


def f_log(x, w):
    out = torch.log(x) + x.log() + torch.log2(x) + x.log2() + torch.log10(x) + x.log10()
    return (out * w).sum()


case(f_log, lambda m: (m.pos(3, 4), m.randn(3, 4)), (0,),
     (torch.log, T.log, torch.log2, T.log2, torch.log10, T.log10))


def f_sqrt(x, w):
    out = torch.sqrt(x) + x.sqrt() + torch.rsqrt(x) + x.rsqrt()
    out = out + torch.reciprocal(x) + x.reciprocal() + torch.square(x) + x.square()
    return (out * w).sum()


case(f_sqrt, lambda m: (m.pos(3, 4), m.randn(3, 4)), (0,),
     (torch.sqrt, T.sqrt, torch.rsqrt, T.rsqrt, torch.reciprocal, T.reciprocal, torch.square,
      T.square))


def f_trig(x, w):
    out = torch.sin(x) + x.sin() + torch.cos(x) + x.cos() + torch.tan(x) + x.tan()
    return (out * w).sum()


case(f_trig, lambda m: (m.unit(3, 4), m.randn(3, 4)), (0,),
     (torch.sin, T.sin, torch.cos, T.cos, torch.tan, T.tan))


def f_inverse_trig(x, w):
    out = torch.asin(x) + x.asin() + torch.arcsin(x) + x.arcsin()
    out = out + torch.acos(x) + x.acos() + torch.arccos(x) + x.arccos()
    out = out + torch.atan(x) + x.atan() + torch.arctan(x) + x.arctan()
    return (out * w).sum()


case(f_inverse_trig, lambda m: (m.unit(3, 4), m.randn(3, 4)), (0,),
     (torch.asin, T.asin, torch.arcsin, T.arcsin, torch.acos, T.acos, torch.arccos, T.arccos,
      torch.atan, T.atan, torch.arctan, T.arctan))


def f_hyperbolic(x, w):
    out = torch.sinh(x) + x.sinh() + torch.cosh(x) + x.cosh() + torch.tanh(x) + x.tanh()
    out = out + F.tanh(x) + torch.asinh(x) + x.asinh() + torch.arcsinh(x) + x.arcsinh()
    out = out + torch.atanh(x) + x.atanh() + torch.arctanh(x) + x.arctanh()
    return (out * w).sum()


case(f_hyperbolic, lambda m: (m.unit(3, 4), m.randn(3, 4)), (0,),
     (torch.sinh, T.sinh, torch.cosh, T.cosh, torch.tanh, T.tanh, F.tanh, torch.asinh, T.asinh,
      torch.arcsinh, T.arcsinh, torch.atanh, T.atanh, torch.arctanh, T.arctanh))


def f_acosh(x, w):
    return ((torch.acosh(x) + x.acosh() + torch.arccosh(x) + x.arccosh()) * w).sum()


case(f_acosh, lambda m: (m.uniform(1.5, 3.0, 3, 4), m.randn(3, 4)), (0,),
     (torch.acosh, T.acosh, torch.arccosh, T.arccosh))


def f_sigmoid(x, w):
    out = torch.sigmoid(x) + x.sigmoid() + F.sigmoid(x) + torch.special.expit(x)
    return (out * w).sum()


case(f_sigmoid, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,),
     (torch.sigmoid, T.sigmoid, F.sigmoid, torch.special.expit))


def f_logit(x, w):
    return ((torch.logit(x) + x.logit(eps=0.2)) * w).sum()


case(f_logit, lambda m: (m.uniform(0.05, 0.95, 3, 4), m.randn(3, 4)), (0,),
     (torch.logit, T.logit))


def f_erf(x, w):
    out = torch.erf(x) + x.erf() + torch.erfc(x) + x.erfc() + torch.erfinv(x) + x.erfinv()
    return (out * w).sum()


case(f_erf, lambda m: (m.unit(3, 4), m.randn(3, 4)), (0,),
     (torch.erf, T.erf, torch.erfc, T.erfc, torch.erfinv, T.erfinv))


def f_frac(x, w):
    return ((torch.frac(x) + x.frac()) * w).sum()


case(f_frac, lambda m: (m.uniform(0.1, 0.4, 3, 4) + m.index(5, 3, 4), m.randn(3, 4)), (0,),
     (torch.frac, T.frac))


def f_clamp(x, w):
    """Bounds included: x == min and x == max pass the gradient, like torch."""
    out = torch.clamp(x, -1.0, 1.0) + x.clamp(min=0.0) + torch.clip(x, max=0.5) + x.clip(-0.5, 2)
    return (out * w).sum()


case(f_clamp,
     lambda m: (m.tensor([[-2.0, -1.0, -0.5, 0.0], [0.5, 1.0, 2.0, 0.3]]), m.randn(2, 4)),
     (0,), (torch.clamp, T.clamp, torch.clip, T.clip))


def f_clamp_tensor_bounds(x, lo, hi, w):
    """Tensor bounds get the gradient where they are the output; where lo > hi, hi wins."""
    out = torch.clamp(x, lo, hi) + x.clamp(min=lo) * 2 + x.clamp(max=hi) * 3
    return (out * w).sum()


case(f_clamp_tensor_bounds,
     lambda m: (m.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 0.5, 0.0]),
                m.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0]),
                m.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]), m.randn(7)),
     (0, 1, 2), (torch.clamp, T.clamp))


def f_clamp_min_max(x, lo, w):
    out = torch.clamp_min(x, lo) + x.clamp_min(0.0) + torch.clamp_max(x, lo) + x.clamp_max(0.5)
    return (out * w).sum()


case(f_clamp_min_max,
     lambda m: (m.tensor([-1.0, 0.0, 0.5, 2.0]), m.tensor([0.0, 0.0, 1.0, 1.0]), m.randn(4)),
     (0, 1), (torch.clamp_min, T.clamp_min, torch.clamp_max, T.clamp_max))


def f_relu(x, w):
    """relu'(0) = 0"""
    return ((torch.relu(x) + x.relu() + F.relu(x)) * w).sum()


case(f_relu, lambda m: (m.with_zeros(3, 4), m.randn(3, 4)), (0,), (torch.relu, T.relu, F.relu))


def f_where(c, x, y, w):
    out = torch.where(c, x, y) + torch.where(c, x, 0.0) + torch.where(c, 1.0, y) + x.where(c, y)
    return (out * w).sum()


case(f_where, lambda m: (m.mask(3, 4), m.randn(3, 4), m.randn(4), m.randn(3, 4)), (1, 2),
     (torch.where, T.where))


def f_masked_fill(x, v, mask, w):
    out = torch.masked_fill(x, mask, v) + x.masked_fill(mask, 2.0)
    return (out * w).sum()


case(f_masked_fill, lambda m: (m.randn(3, 4), m.randn(), m.mask(3, 4), m.randn(3, 4)), (0, 1),
     (torch.masked_fill, T.masked_fill))

# ------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------


def f_sum(x, w, v):
    out = torch.sum(x) + (x.sum(1) * w).sum() + (torch.sum(x, (0, 2), keepdim=True) * v).sum()
    return out + x.sum(dim=-1).sum() + torch.sum(x, dtype=torch.float64).to(x.dtype)


case(f_sum, lambda m: (m.randn(2, 3, 4), m.randn(2, 4), m.randn(1, 3, 1)), (0,),
     (torch.sum, T.sum))


def f_builtin_sum(x, y, w):
    return (sum([x, y * 2, x * y]) * w).sum() + sum([x.sum(), y.sum()], 1.0)


case(f_builtin_sum, lambda m: (m.randn(3, 4), m.randn(4), m.randn(3, 4)), (0, 1),
     (builtins.sum,))


def f_builtin_sum_over_rows(x, w):
    """sum(x) and max(x) iterate over x's rows (Python's own loop, not torch.sum)."""
    return (sum(x) * w).sum() + max(x[:, 0]) * 2.0


case(f_builtin_sum_over_rows, lambda m: (m.randn(3, 4), m.randn(4)), (0, 1),
     (builtins.sum, builtins.max))


def f_list_concat(x, y):
    parts = [x, y * 2.0]
    both = [x * y] + parts
    return (torch.stack(both) ** 2).sum() + (both[0] * both[2]).sum()


case(f_list_concat, lambda m: (m.randn(3), m.randn(3)), (0, 1), (operator.concat,))


def f_update_under_no_grad(x, y):
    h = x * y
    with torch.no_grad():
        h *= 2.0
    return (h * x).sum()


case(f_update_under_no_grad, lambda m: (m.randn(3), m.randn(3)), (0, 1),
     (update_under_no_grad,))


def f_mean(x, w, v):
    out = torch.mean(x) + (x.mean(1) * w).sum() + (torch.mean(x, (0, 2), keepdim=True) * v).sum()
    return out + x.mean(dim=-1).sum()


case(f_mean, lambda m: (m.randn(2, 3, 4), m.randn(2, 4), m.randn(1, 3, 1)), (0,),
     (torch.mean, T.mean))


def f_var_std(x, w):
    out = torch.var(x) + x.var(1).sum() + torch.var(x, 0, True, True).sum()
    out = out + (x.var(dim=1, correction=0) * w).sum() + torch.var(x, False)
    out = out + torch.std(x) + (x.std(1) * w).sum() + torch.std(x, (0, 1), keepdim=True).sum()
    return out + (torch.std(x, dim=1, unbiased=False) * w).sum() + x.std(dim=0, correction=2).sum()


case(f_var_std, lambda m: (m.randn(4, 3), m.randn(4)), (0,), (torch.var, T.var, torch.std, T.std))


def f_norm(x, w):
    out = torch.norm(x) + (x.norm(dim=1) * w).sum() + torch.norm(x, p=1, dim=1).sum()
    out = out + (x.norm(3, 1, keepdim=True) * w.unsqueeze(1)).sum() + x.norm(float("inf"))
    out = out + torch.norm(x, "fro", (0, 1))
    return out


case(f_norm, lambda m: (m.randn(4, 3), m.randn(4)), (0,), (torch.norm, T.norm))


def f_linalg_norm(x, w):
    out = torch.linalg.norm(x) + (torch.linalg.norm(x, dim=1) * w).sum()
    out = out + torch.linalg.norm(x, 1, dim=1).sum() + torch.linalg.norm(x, "fro")
    out = out + (torch.linalg.vector_norm(x, dim=1) * w).sum() + torch.linalg.vector_norm(x, 3.0)
    return out + torch.linalg.vector_norm(x, float("-inf"), dim=(0, 1), keepdim=True).sum()


case(f_linalg_norm, lambda m: (m.randn(4, 3), m.randn(4)), (0,),
     (torch.linalg.norm, torch.linalg.vector_norm))


def f_norm_ties_and_zero(x, z, w):
    """inf-norm ties share the gradient; the gradient of a zero 2-norm is 0 (torch)."""
    return (x.norm(float("inf"), dim=1) * w).sum() + torch.linalg.vector_norm(z)


case(f_norm_ties_and_zero,
     lambda m: (m.tensor([[1.0, -3.0, 3.0], [2.0, 0.5, -1.0]]), m.tensor([0.0, 0.0]), m.randn(2)),
     (0, 1), (T.norm, torch.linalg.vector_norm),
     hvp="the 2-norm of z = 0 has no second derivative (autograd's double backward gives NaN)")


def f_std_constant(x, w):
    """The gradient of a zero standard deviation is 0 (torch)."""
    return (x.std(1) * w).sum() + torch.std(x[0])


case(f_std_constant, lambda m: (m.tensor([[2.0, 2.0, 2.0], [1.0, -1.0, 0.5]]), m.randn(2)), (0,),
     (T.std, torch.std))


def f_prod(x, w):
    return torch.prod(x) + (x.prod(1) * w).sum() + torch.prod(x, 0, keepdim=True).sum()


case(f_prod, lambda m: (m.uniform(0.5, 1.5, 3, 4), m.randn(3)), (0,), (torch.prod, T.prod))


def f_prod_with_zeros(x, w):
    """One zero in a row: only the zero gets gradient; two zeros: none."""
    return (x.prod(1) * w).sum() + x[0].prod()


case(f_prod_with_zeros,
     lambda m: (m.tensor([[0.0, 2.0, 3.0], [0.0, 0.0, 3.0], [1.5, 2.0, 0.5]]), m.randn(3)), (0,),
     (T.prod,))


def f_cumsum_cumprod(x, w):
    out = torch.cumsum(x, 1) + x.cumsum(0) + torch.cumprod(x, 1) + x.cumprod(dim=0)
    return (out * w).sum()


case(f_cumsum_cumprod, lambda m: (m.uniform(0.5, 1.5, 3, 4), m.randn(3, 4)), (0,),
     (torch.cumsum, T.cumsum, torch.cumprod, T.cumprod))


def f_cumprod_with_zeros(x, w):
    return (torch.cumprod(x, 1) * w).sum()


case(f_cumprod_with_zeros,
     lambda m: (m.tensor([[0.5, 0.0, 2.0, 3.0], [0.0, 1.5, 0.0, 2.0]]), m.randn(2, 4)), (0,),
     (torch.cumprod,))


def f_logsumexp(x, w):
    return (torch.logsumexp(x, 1) * w).sum() + x.logsumexp((0, 1), keepdim=True).sum()


case(f_logsumexp, lambda m: (m.randn(3, 4), m.randn(3)), (0,), (torch.logsumexp, T.logsumexp))


def f_amax_amin(x, w):
    """Ties share the gradient evenly."""
    out = torch.amax(x) + (x.amax(1) * w).sum() + torch.amin(x, 1).sum() * 2
    return out + x.amin((0, 1), keepdim=True).sum() * 3


case(f_amax_amin, lambda m: (m.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, -1.0]]), m.randn(2)), (0,),
     (torch.amax, T.amax, torch.amin, T.amin))


def f_max_min(x, y, w):
    """max(x): ties share; max(x, dim): the returned index gets it; max(x, y): like maximum."""
    out = torch.max(x) + x.min() * 2 + x.max() * 3 + torch.min(x) * 4
    out = out + (torch.max(x, 1)[0] * w).sum() + x.min(dim=1, keepdim=True).values.sum() * 3
    out = out + (x.max(1).values * w).sum() + torch.min(x, 0)[0].sum()
    out = out + (torch.max(x, y) * y).sum() + x.min(y).sum() + torch.max(x, other=y).sum()
    out = out + x.max(y).sum() * 2 + torch.min(y, x).sum() * 3
    return out


case(f_max_min,
     lambda m: (m.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, -1.0]]), m.tensor([1.0, 2.0, 0.0]),
                m.randn(2)),
     (0, 1), (torch.max, T.max, torch.min, T.min, ".values"))


def f_builtin_max_min(x, y, w):
    """Builtin max/min return one of their arguments (the first of equal ones)."""
    a, b = x.sum(), y.sum()
    out = max(a, b) + min(a, b) * 2 + max(x[0], y[0], x[1]) * 3 + max(a, a * 1.0) * w
    return out + min([x[2], y[1], y[2]]) + max((b, a)) * 4


case(f_builtin_max_min, lambda m: (m.randn(3), m.randn(3), m.randn()), (0, 1),
     (builtins.max, builtins.min))


def f_sort_topk(x, w):
    out = (torch.sort(x, 1)[0] * w).sum() + (x.sort(dim=0, descending=True).values * w).sum()
    return out + (torch.topk(x, 2)[0] ** 2).sum() + x.topk(1, dim=0, largest=False)[0].sum()


case(f_sort_topk, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,),
     (torch.sort, T.sort, torch.topk, T.topk))


def f_sort_ties(x, w):
    """Tied values: each output's gradient goes to the index sort returned."""
    return (torch.sort(x)[0] * w).sum() + (x.sort(descending=True, stable=True)[0] * w).sum()


case(f_sort_ties, lambda m: (m.tensor([1.0, 1.0, 0.0, 1.0]), m.randn(4)), (0,),
     (torch.sort, T.sort))


def f_trace(x):
    return torch.trace(x) + x.trace() * 2


case(f_trace, lambda m: (m.randn(3, 4),), (0,), (torch.trace, T.trace))

# ------------------------------------------------------------------------------------------
# Linear algebra
# ------------------------------------------------------------------------------------------


def f_det(a, b, w):
    return torch.det(a) + a.det() + (torch.linalg.det(b) * w).sum()


case(f_det, lambda m: (m.mat(3, 3), m.mat(2, 4, 4), m.randn(2)), (0, 1),
     (torch.det, T.det, torch.linalg.det), tol=10)


def f_logdet(a, w):
    return torch.logdet(a) + a.logdet() * w


case(f_logdet, lambda m: (m.spd(3), m.randn()), (0,), (torch.logdet, T.logdet), tol=10)


def f_inverse(a, w):
    return ((torch.inverse(a) + a.inverse() + torch.linalg.inv(a)) * w).sum()


case(f_inverse, lambda m: (m.mat(2, 3, 3), m.randn(2, 3, 3)), (0,),
     (torch.inverse, T.inverse, torch.linalg.inv), tol=10)

# ------------------------------------------------------------------------------------------
# Indexing
# ------------------------------------------------------------------------------------------


def f_getitem_basic(x, w):
    """Ints, slices with steps, negative indices, None and Ellipsis."""
    out = (x[0] * w[0]).sum() + x[:, 1:3].sum() + (x[..., ::2] ** 2).sum() + x[-1, None, 2].sum()
    return out + (x[1:, ..., -2:] * 3).sum() + x.__getitem__((0, 1)).sum()


case(f_getitem_basic, lambda m: (m.randn(3, 4, 5), m.randn(3, 4, 5)), (0,),
     (operator.getitem, T.__getitem__))


def f_getitem_advanced(x, idx, mask, w):
    """Repeated indices accumulate; masks, lists and index tensors mixed with slices."""
    out = (x[idx] * w).sum() + x[[0, 0, 2]].sum() + x[mask].sum() + x[:, [1, 1, 3]].sum()
    out = out + x[idx, 1:].sum() + x[idx, idx].sum() + (x[x > 0] ** 2).sum()
    return out + x[None, ..., idx[:2]].sum() + x[:, mask[0]].sum() + x[1, idx].sum()


case(f_getitem_advanced,
     lambda m: (m.randn(3, 4), m.longs([2, 0, 2, 2]), m.mask(3, 4), m.randn(4, 4)), (0,),
     (operator.getitem,))


def f_getitem_containers(x, y, w):
    """Indexing Python lists, tuples and dicts of tensors: only the selected one gets gradient."""
    xs = [x, y * 2, x * y]
    pair = (x, y)
    named = {"a": x, "b": y}
    out = (xs[1] * w).sum() + xs[-1].sum() + pair[0].sum() + named["b"].sum() + xs[2][0].sum()
    for t in xs[0:2]:
        out = out + (t * t).sum()
    return out


case(f_getitem_containers, lambda m: (m.randn(3, 4), m.randn(4), m.randn(3, 4)), (0, 1),
     (operator.getitem,))


def f_select_narrow(x, w):
    out = (torch.select(x, 1, 2) * w).sum() + x.select(0, -1).sum() + torch.narrow(x, 1, 1, 2).sum()
    return out + (x.narrow(0, 0, 2) ** 2).sum()


case(f_select_narrow, lambda m: (m.randn(3, 4), m.randn(3)), (0,),
     (torch.select, T.select, torch.narrow, T.narrow))


def f_index_select_gather(x, idx, gidx, w):
    """Rows and positions read several times accumulate."""
    out = (torch.index_select(x, 0, idx) * w).sum() + x.index_select(1, idx).sum()
    return out + (torch.gather(x, 1, gidx) ** 2).sum() + x.gather(0, gidx[:2] % 3).sum()


case(f_index_select_gather,
     lambda m: (m.randn(3, 4), m.longs([2, 0, 2]), m.longs([[0, 0, 3], [1, 2, 1], [3, 3, 3]]),
                m.randn(3, 4)),
     (0,), (torch.index_select, T.index_select, torch.gather, T.gather))


def f_masked_select(x, mask, row_mask, w):
    return (torch.masked_select(x, mask) ** 2).sum() + (x.masked_select(row_mask) * 3).sum()


case(f_masked_select, lambda m: (m.randn(3, 4), m.mask(3, 4), m.mask(4), m.randn(1)), (0,),
     (torch.masked_select, T.masked_select))


def f_diagonal_tril_triu(x, w):
    out = (torch.diagonal(x) * w).sum() + x.diagonal(1).sum() + torch.diagonal(x, -1, 1, 0).sum()
    out = out + (torch.tril(x) ** 2).sum() + x.tril(-1).sum() + torch.triu(x, 1).sum()
    return out + x.triu().sum()


case(f_diagonal_tril_triu, lambda m: (m.randn(4, 4), m.randn(4)), (0,),
     (torch.diagonal, T.diagonal, torch.tril, T.tril, torch.triu, T.triu))

# ------------------------------------------------------------------------------------------
# Joining and splitting
# ------------------------------------------------------------------------------------------


def f_cat_stack(x, y, w, v):
    out = (torch.cat([x, y], 0) * w).sum() + (torch.concat((x, x * 2), dim=1) ** 2).sum()
    out = out + torch.concatenate([y, x], axis=0).sum()
    return out + (torch.stack([x, x * y[0]], 1) * v).sum() + torch.stack((x, x), dim=-1).sum()


case(f_cat_stack,
     lambda m: (m.randn(2, 3), m.randn(1, 3), m.randn(3, 3), m.randn(2, 2, 3)), (0, 1),
     (torch.cat, torch.concat, torch.concatenate, torch.stack))


def f_split_chunk(x, w):
    """Unused pieces get no gradient (zeros where the pieces are concatenated back)."""
    a, b = torch.split(x, 2, 1)
    c, d, e = torch.split(x, [1, 1, 1], dim=0)
    f, g = x.split(3, dim=1)
    h, i = torch.chunk(x, 2, 1)
    j = x.chunk(3)[1]
    k, m, n = torch.tensor_split(x, 3, dim=1)
    o = x.tensor_split(2)[0]
    out = (a * w[:, :2]).sum() + (b**2).sum() + c.sum() + (e * 3).sum() + f.sum() + i.sum()
    return out + (h * 2).sum() + j.sum() + (k + m).sum() + o.sum()


case(f_split_chunk, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,),
     (torch.split, T.split, torch.chunk, T.chunk, torch.tensor_split, T.tensor_split))


def f_unbind(x, w):
    a, b, c = torch.unbind(x)
    d, e, f, g = x.unbind(1)
    return (a * w).sum() + (c**2).sum() + (e * 3).sum()


case(f_unbind, lambda m: (m.randn(3, 4), m.randn(4)), (0,), (torch.unbind, T.unbind))

# ------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------


def f_reshape(x, w):
    out = (torch.reshape(x, (4, 6)) * w).sum() + (x.reshape(6, 4) ** 2).sum()
    out = out + (x.reshape((24,)) * 2).sum() + (x.view(4, 6) * w).sum() + x.view((2, 12)).sum()
    out = out + (x.view(-1) ** 3).sum() + (x.reshape_as(w) * w).sum() + (x.view_as(w) ** 2).sum()
    return out


case(f_reshape, lambda m: (m.randn(2, 3, 4), m.randn(4, 6)), (0,),
     (torch.reshape, T.reshape, T.view, T.reshape_as, T.view_as))


def f_flatten_squeeze(x, w):
    out = (torch.flatten(x) ** 2).sum() + (x.flatten(1) * w).sum() + x.flatten(0, 1).sum()
    out = out + (torch.unflatten(x, 2, (2, 2)) ** 2).sum() + x.unflatten(1, (3, 1)).sum()
    out = out + (torch.squeeze(x.unsqueeze(0)) ** 2).sum() + x.unsqueeze(2).squeeze(2).sum()
    return out + (torch.unsqueeze(x, 1) ** 3).sum() + x[:, :1].squeeze(dim=1).sum()


case(f_flatten_squeeze, lambda m: (m.randn(2, 3, 4), m.randn(2, 12)), (0,),
     (torch.flatten, T.flatten, torch.unflatten, T.unflatten, torch.squeeze, T.squeeze,
      torch.unsqueeze, T.unsqueeze))


def f_transpose(x, w):
    out = (torch.transpose(x, 0, 1) * w).sum() + (x.transpose(1, 0) ** 2).sum()
    out = out + (torch.t(x) * w).sum() + (x.t() ** 3).sum() + (x.T * w).sum() + (x.mT**2).sum()
    out = out + (x.H * w).sum() + (x.mH * 2).sum() + (torch.swapaxes(x, 0, 1) * w).sum()
    return out + x.swapaxes(0, 1).sum() + torch.swapdims(x, 1, 0).sum() + x.swapdims(0, 1).sum()


case(f_transpose, lambda m: (m.randn(3, 4), m.randn(4, 3)), (0,),
     (torch.transpose, T.transpose, torch.t, T.t, ".T", ".mT", ".H", ".mH", torch.swapaxes,
      T.swapaxes, torch.swapdims, T.swapdims))


def f_permute_movedim(x, w):
    out = (torch.permute(x, (2, 0, 1)) * w).sum() + (x.permute(2, 0, 1) ** 2).sum()
    out = out + (x.permute((1, 2, 0)) * 3).sum() + (x.permute(-1, 0, 1) * w).sum()
    out = out + (torch.movedim(x, 2, 0) * w).sum() + x.movedim((0, 1), (1, 2)).sum()
    return out + (torch.moveaxis(x, 0, -1) ** 2).sum() + x.moveaxis(2, 0).sum()


case(f_permute_movedim, lambda m: (m.randn(2, 3, 4), m.randn(4, 2, 3)), (0,),
     (torch.permute, T.permute, torch.movedim, T.movedim, torch.moveaxis, T.moveaxis))


def f_expand(x, w, v):
    out = (x.expand(2, 3, 4) * w).sum() + (x.expand((3, 4)) ** 2).sum() + x.expand(-1, 4).sum()
    return out + (x.expand_as(w) * w).sum() + (torch.broadcast_to(x, (2, 3, 4)) * w).sum() + (
        x.broadcast_to((3, 4)) * v
    ).sum()


case(f_expand, lambda m: (m.randn(3, 1), m.randn(2, 3, 4), m.randn(3, 4)), (0,),
     (T.expand, T.expand_as, torch.broadcast_to, T.broadcast_to))


def f_repeat_tile(x, w, v):
    out = (x.repeat(2, 1, 2) * w).sum() + (x.repeat((1, 3)) ** 2).sum()
    return out + (torch.tile(x, (2,)) * v).sum() + (x.tile((2, 1, 1)) ** 2).sum()


case(f_repeat_tile, lambda m: (m.randn(2, 3), m.randn(2, 2, 6), m.randn(2, 6)), (0,),
     (T.repeat, torch.tile, T.tile))


def f_flip_roll(x, w):
    out = (torch.flip(x, (0,)) * w).sum() + (x.flip(1) * w).sum() + (x.flip(0, 1) * w).sum()
    out = out + (x.flip((0, 1)) * w).sum() + (torch.roll(x, 1, 0) * w).sum()
    return out + (x.roll((1, -2), (0, 1)) * w).sum() + (torch.roll(x, 5) * w).sum()


case(f_flip_roll, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,),
     (torch.flip, T.flip, torch.roll, T.roll))


def f_clone(x, w):
    return ((torch.clone(x) + x.clone() + x.t().contiguous().t()) * w).sum()


case(f_clone, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,),
     (torch.clone, T.clone, T.contiguous))

# ------------------------------------------------------------------------------------------
# Casts
# ------------------------------------------------------------------------------------------


def f_casts(x, y, w):
    """The gradient goes back in the input's dtype."""
    out = x.to(torch.float64) * w.double() + x.double() * 2 + x.float().double()
    out = out + x.to(dtype=torch.float64) + x.type_as(y) * 3 + x.to(y) + x.cpu().double()
    out = out + x.half().double() + x.bfloat16().double()
    return out.sum()


case(f_casts, lambda m: (m.randn(3, 4), m.randn(1).double(), m.randn(3, 4)), (0,),
     (T.to, T.double, T.float, T.type_as, T.cpu, T.half, T.bfloat16), tol=100,
     devices=("cpu",),
     # a tangent through .half()/.bfloat16() is rounded like the value (torch.func.jvp too);
     # the reference <gradient, v> is not: bfloat16's 8 bits set the tolerance
     jvp_tol=300)


def f_cuda(x, w):
    return ((x.cpu() ** 2).cuda() * w).sum()


case(f_cuda, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,), (T.cuda, T.cpu), devices=("cuda",))

# ------------------------------------------------------------------------------------------
# torch.nn.functional
# ------------------------------------------------------------------------------------------


def f_activations(x, w):
    """Values at 0 included: relu6'(0) = 0, leaky_relu'(0) = slope, elu'(0) = alpha."""
    out = F.relu6(x * 4) + F.hardtanh(x) + F.hardtanh(x, -0.5, 0.5) + F.hardsigmoid(x * 4)
    out = out + F.leaky_relu(x) + F.leaky_relu(x, 0.2) + F.elu(x) + F.elu(x, alpha=2.0)
    out = out + F.selu(x) + F.celu(x, 0.5) + F.gelu(x) + F.gelu(x, approximate="tanh")
    out = out + F.silu(x) + F.mish(x) + F.softplus(x) + F.softplus(x, beta=2.0, threshold=1.0)
    return ((out + F.logsigmoid(x) + F.softsign(x)) * w).sum()


case(f_activations, lambda m: (m.with_zeros(4, 5), m.randn(4, 5)), (0,),
     (F.relu6, F.hardtanh, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
      F.mish, F.softplus, F.logsigmoid, F.softsign),
     hvp="autograd has no double backward of F.hardsigmoid (aten::hardsigmoid_backward), and "
         "the zeros sampled on purpose are kinks of elu/selu/celu's slope (no second "
         "derivative: autograd takes the x > 0 side's 0, propgen the x <= 0 side's alpha)")


def f_activation_bounds(x, w):
    """hardtanh / relu6 / hardsigmoid pass no gradient at their bounds (torch)."""
    out = F.hardtanh(x) + F.relu6(x) + F.hardsigmoid(x) + F.softplus(x, 2.0, 3.0)
    return (out * w).sum()


case(f_activation_bounds,
     lambda m: (m.tensor([-3.0, -1.0, 0.0, 1.0, 1.5, 3.0, 6.0]), m.randn(7)), (0,),
     (F.hardtanh, F.relu6, F.hardsigmoid, F.softplus),
     hvp="autograd has no double backward of F.hardsigmoid, and x = 1.5 sits on "
         "softplus(beta=2, threshold=3)'s switch, where the second derivative jumps (autograd's "
         "double backward takes the linear side there, its gradient the sigmoid side)")


def f_softmax(x, w):
    out = torch.softmax(x, 1) + x.softmax(0) + torch.special.softmax(x, -1) + F.softmax(x, 1)
    out = out + F.softmax(x, dim=0, dtype=torch.float64).to(x.dtype) + F.softmax(x)
    out = out + torch.log_softmax(x, 1) + x.log_softmax(0) + torch.special.log_softmax(x, 1)
    out = out + F.log_softmax(x, dim=1) + F.log_softmax(x)
    return (out * w).sum()


case(f_softmax, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,),
     (torch.softmax, T.softmax, torch.special.softmax, F.softmax, torch.log_softmax,
      T.log_softmax, torch.special.log_softmax, F.log_softmax))


def f_linear(x, weight, bias, v, w1, w3):
    out = (F.linear(x, weight, bias) * w1).sum() + (F.linear(x, weight) ** 2).sum()
    return out + (F.linear(v, weight, bias) * w3).sum() + F.linear(x[0], weight, bias).sum()


case(f_linear,
     lambda m: (m.randn(3, 4), m.randn(5, 4), m.randn(5), m.randn(2, 3, 4), m.randn(3, 5),
                m.randn(2, 3, 5)),
     (0, 1, 2, 3), (F.linear,))


def f_linear_1d_weight(x, weight, v, u, w1):
    """A 1-d weight is one output, which the result drops (torch takes no bias then): x w."""
    out = (F.linear(x, weight) * w1).sum() + (F.linear(v, weight) ** 2).sum()
    return out + F.linear(u, weight) * 2


case(f_linear_1d_weight,
     lambda m: (m.randn(3, 4), m.randn(4), m.randn(2, 3, 4), m.randn(4), m.randn(3)),
     (0, 1, 2, 3), (F.linear,))


def f_layer_norm(x, weight, bias, w):
    out = F.layer_norm(x, (4,), weight, bias) + F.layer_norm(x, [4]) * 2
    return (out * w).sum() + (F.layer_norm(x, (3, 4), eps=1e-3) * w).sum()


case(f_layer_norm, lambda m: (m.randn(2, 3, 4), m.randn(4), m.randn(4), m.randn(2, 3, 4)),
     (0, 1, 2), (F.layer_norm,), tol=10)


def f_normalize(x, w):
    out = F.normalize(x) + F.normalize(x, dim=0) + F.normalize(x, p=3.0, dim=1)
    return (out * w).sum() + (F.normalize(x * 0, dim=1) * w).sum()


case(f_normalize, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,), (F.normalize,),
     hvp="F.normalize(x * 0) normalizes a zero vector: the term is identically 0, but "
         "autograd's double backward through its zero norm gives NaN")


def f_embedding(idx, weight, w, v):
    """Repeated rows accumulate; padding_idx gets none; scale_grad_by_freq divides by count."""
    out = (F.embedding(idx, weight) * w).sum()
    out = out + (F.embedding(idx, weight, padding_idx=0) ** 2).sum()
    return out + (F.embedding(idx[0], weight, scale_grad_by_freq=True) * v).sum()


case(f_embedding,
     lambda m: (m.longs([[0, 2, 2], [1, 2, 4]]), m.randn(5, 3), m.randn(2, 3, 3), m.randn(3, 3)),
     (1,), (F.embedding,))

# --- losses ---------------------------------------------------------------------------------


def f_regression_losses(x, t, wt):
    out = F.mse_loss(x, t) + F.mse_loss(x, t, reduction="sum") + F.l1_loss(x, t) * 2
    out = out + (F.mse_loss(x, t, reduction="none") * wt).sum() + F.l1_loss(x, t, reduction="sum")
    out = out + (F.l1_loss(x, t, reduction="none") * wt).sum() + F.smooth_l1_loss(x, t)
    out = out + F.smooth_l1_loss(x, t, beta=0.5, reduction="sum") + F.huber_loss(x, t, delta=0.5)
    out = out + F.huber_loss(x, t, reduction="sum")
    return out + (F.huber_loss(x, t, reduction="none") * wt).sum()


case(f_regression_losses, lambda m: (m.randn(3, 4), m.randn(3, 4), m.randn(3, 4)), (0, 1),
     (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss))


def f_weighted_regression_losses(x, t, weight, wt):
    out = F.mse_loss(x, t, weight=weight) + F.mse_loss(x, t, reduction="sum", weight=weight)
    out = out + (F.mse_loss(x, t, reduction="none", weight=weight) * wt).sum()
    return out + F.huber_loss(x, t, weight=weight) + F.huber_loss(x, t, "sum", 0.5, weight)


case(f_weighted_regression_losses,
     lambda m: (m.randn(3, 4), m.randn(3, 4), m.pos(3, 4), m.randn(3, 4)), (0, 1, 2),
     (F.mse_loss, F.huber_loss))


def f_weighted_l1_loss(x, t, weight, wt):
    out = F.l1_loss(x, t, weight=weight) + F.l1_loss(x, t, reduction="sum", weight=weight)
    return out + (F.l1_loss(x, t, reduction="none", weight=weight) * wt).sum()


# F.l1_loss drops ``weight`` when it dispatches __torch_function__, so the tape evaluator
# (a TorchFunctionMode) would see an unweighted loss: checked with propgen.grad only.
case(f_weighted_l1_loss,
     lambda m: (m.randn(3, 4), m.randn(3, 4), m.pos(3, 4), m.randn(3, 4)), (0, 1, 2),
     (F.l1_loss,), evaluator=False)


def f_bce(p, t, weight, wt):
    out = F.binary_cross_entropy(p, t) + F.binary_cross_entropy(p, t, weight, reduction="sum")
    return out + (F.binary_cross_entropy(p, t, reduction="none") * wt).sum()


case(f_bce, lambda m: (m.prob(3, 4), m.prob(3, 4), m.pos(4), m.randn(3, 4)), (0, 1),
     (F.binary_cross_entropy,))


def f_bce_logits(x, t, weight, pos_weight, wt):
    out = F.binary_cross_entropy_with_logits(x, t) + F.binary_cross_entropy_with_logits(
        x, t, weight, reduction="sum", pos_weight=pos_weight
    )
    return out + (F.binary_cross_entropy_with_logits(x, t, reduction="none") * wt).sum()


case(f_bce_logits,
     lambda m: (m.randn(3, 4), m.prob(3, 4), m.pos(3, 1), m.pos(4), m.randn(3, 4)), (0, 1),
     (F.binary_cross_entropy_with_logits,))


def f_cross_entropy(x, y, weight, wt):
    """Class-index targets with weights, ignore_index, reductions and label smoothing."""
    out = F.cross_entropy(x, y) + F.cross_entropy(x, y, weight) * 2
    out = out + F.cross_entropy(x, y, reduction="sum", ignore_index=1)
    out = out + (F.cross_entropy(x, y, reduction="none", label_smoothing=0.1) * wt).sum()
    out = out + F.cross_entropy(x, y, weight=weight, ignore_index=3, label_smoothing=0.2)
    return out + F.cross_entropy(x, y, weight, reduction="sum", label_smoothing=0.3)


case(f_cross_entropy,
     lambda m: (m.randn(5, 4), m.longs([0, 3, 1, 3, 2]), m.pos(4), m.randn(5)), (0,),
     (F.cross_entropy,))


def f_cross_entropy_nd(x, y, xu, yu):
    """(N, C, d) logits; an unbatched (C,) sample; class probabilities as targets."""
    out = F.cross_entropy(x, y) + F.cross_entropy(xu, y[0, 0])
    out = out + F.cross_entropy(xu[None], yu[None], label_smoothing=0.1)
    return out + F.cross_entropy(x[:, :, 0], yu.expand(2, 4), reduction="sum")


case(f_cross_entropy_nd,
     lambda m: (m.randn(2, 4, 3), m.longs([[0, 3, 1], [2, 2, 0]]), m.randn(4),
                m.tensor([0.1, 0.2, 0.3, 0.4])),
     (0, 2, 3), (F.cross_entropy,))


def f_nll_loss(x, y, weight, wt):
    logp = F.log_softmax(x, 1)
    out = F.nll_loss(logp, y) + F.nll_loss(logp, y, weight, reduction="sum")
    out = out + F.nll_loss(x, y, weight=weight, ignore_index=3)
    return out + (F.nll_loss(x, y, reduction="none") * wt).sum()


case(f_nll_loss, lambda m: (m.randn(5, 4), m.longs([0, 3, 1, 3, 2]), m.pos(4), m.randn(5)), (0,),
     (F.nll_loss, F.log_softmax))


def f_kl_div(x, t, lt):
    out = F.kl_div(x, t, reduction="batchmean") + F.kl_div(x, t, reduction="sum")
    out = out + F.kl_div(x, lt, reduction="mean", log_target=True)
    return out + (F.kl_div(x, t, reduction="none") * x).sum()


case(f_kl_div, lambda m: (m.randn(3, 4), m.prob(3, 4), m.randn(3, 4)), (0, 1, 2), (F.kl_div,))


def f_kl_div_broadcast(x, t, xr, lt, wt):
    """Input and target broadcast against each other, either way or both: the loss has the
    broadcast shape, and 'batchmean' divides by the input's first dim whatever the target's
    (xr's 4, not t's 3)."""
    out = F.kl_div(x, t, reduction="batchmean") + F.kl_div(x, t, reduction="mean")
    out = out + (F.kl_div(x, t, reduction="none") * wt).sum()
    out = out + F.kl_div(xr, t, reduction="batchmean") + F.kl_div(xr, t, reduction="sum")
    out = out + F.kl_div(x, lt, reduction="mean", log_target=True)
    out = out + F.kl_div(x, lt, reduction="batchmean", log_target=True)
    return out + F.kl_div(t, lt, reduction="batchmean", log_target=True)


case(f_kl_div_broadcast,
     lambda m: (m.randn(3, 1), m.prob(3, 4), m.randn(4), m.randn(1, 4), m.randn(3, 4)),
     (0, 1, 2, 3), (F.kl_div,))


def f_regression_losses_broadcast(x, t, wt):
    """Input (3, 1) against target (4,): each loss's gradient summed back to each shape."""
    out = F.mse_loss(x, t) + F.l1_loss(x, t, reduction="sum") + F.smooth_l1_loss(x, t)
    out = out + F.huber_loss(x, t, reduction="sum", delta=0.5)
    return out + ((F.mse_loss(x, t, reduction="none") + F.huber_loss(x, t, "none")) * wt).sum()


case(f_regression_losses_broadcast, lambda m: (m.randn(3, 1), m.randn(4), m.randn(3, 4)),
     (0, 1), (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss))

# ------------------------------------------------------------------------------------------
# Non-differentiable ops mixed into a differentiable computation
# ------------------------------------------------------------------------------------------


def f_nondifferentiable(x, w):
    i = torch.argmax(x, 1)
    mask = (x > 0) & ~torch.isnan(x)
    n = x.shape[0] + len(x) + x.numel() + x.size(1)
    scale = torch.ones_like(x) * torch.sign(x.detach()) + torch.floor(x)
    return (torch.where(mask, x, x * 2) * w).sum() + x[torch.arange(n // 4 - 2), i].sum() + (
        scale * x
    ).sum() + float(x.sum().item()) * 0


case(f_nondifferentiable, lambda m: (m.randn(3, 4), m.randn(3, 4)), (0,),
     (torch.where, operator.getitem, operator.mul))

# ------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------

DTYPES = {torch.float64: (1e-7, 1e-9), torch.float32: (1e-4, 1e-5)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


def _inputs(c: OpCase, dtype: torch.dtype, device: str) -> tuple:
    return c.make(Gen(zlib.crc32(c.name.encode()), dtype, device))


def _reference(c: OpCase, args: tuple) -> tuple:
    leaves = [a.detach().clone().requires_grad_() if i in c.wrt else a for i, a in enumerate(args)]
    out = c.fn(*leaves)
    grads = torch.autograd.grad(out, [leaves[i] for i in c.wrt], allow_unused=True)
    return tuple(torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(c.wrt, grads))


def _compare(got: tuple, want: tuple, c: OpCase, dtype: torch.dtype, what: str) -> None:
    rtol, atol = DTYPES[dtype]
    assert len(got) == len(want)
    for i, g, r in zip(c.wrt, got, want):
        torch.testing.assert_close(
            g, r, rtol=rtol * c.tol, atol=atol * c.tol,
            msg=lambda m, i=i: f"{what}: gradient of argument {i} of {c.name}: {m}",
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_op_gradient(c: OpCase, dtype: torch.dtype, device: str) -> None:
    if device not in c.devices:
        pytest.skip(f"{c.name} runs on {c.devices} only")
    if dtype is torch.float32 and not c.float32:
        pytest.skip(f"{c.name} is checked in float64 only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations (torch.ger, implicit softmax dim, ...)
        args = _inputs(c, dtype, device)
        want = _reference(c, args)
        # Second opinion, without the compiler: the templates run on a recorded tape.
        if c.evaluator:
            _compare(template_grad(c.fn, args, c.wrt), want, c, dtype, "template evaluator")
        if not hasattr(propgen, "grad"):
            pytest.skip("propgen.grad is not available yet")
        got = propgen.grad(c.fn, wrt=c.wrt)(*args)
    if isinstance(got, torch.Tensor):
        got = (got,)
    _compare(tuple(got), want, c, dtype, "propgen.grad")


def _tangents(c: OpCase, args: tuple) -> tuple:
    """A random direction for each differentiated argument (its own stream of numbers)."""
    g = torch.Generator().manual_seed(zlib.crc32(c.name.encode()) + 1)
    out = []
    for i in c.wrt:
        a = args[i]
        v = torch.randn(a.shape, generator=g, dtype=torch.float64)
        out.append(v.to(dtype=a.dtype, device=a.device))
    return tuple(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_op_jvp(c: OpCase, dtype: torch.dtype, device: str) -> None:
    """Forward mode: the tangent of each entry's scalar output along a random direction is
    the directional derivative, <autograd's gradient, direction>."""
    if device not in c.devices:
        pytest.skip(f"{c.name} runs on {c.devices} only")
    if dtype is torch.float32 and not c.float32:
        pytest.skip(f"{c.name} is checked in float64 only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = _inputs(c, dtype, device)
        grads = _reference(c, args)
        tans = _tangents(c, args)
        want = sum((g * v).sum() for g, v in zip(grads, tans))
        jf = propgen.autodiff(c.fn, mode="forward", wrt=c.wrt)
        got = jf(*args, tangents=tans if len(tans) > 1 else tans[0])
    rtol, atol = DTYPES[dtype]
    scale = sum(g.abs().sum() * v.abs().max() for g, v in zip(grads, tans)) + 1
    torch.testing.assert_close(got, want.to(got.dtype) if isinstance(got, torch.Tensor) else want,
                               rtol=rtol * c.tol * c.jvp_tol,
                               atol=atol * c.tol * c.jvp_tol * float(scale),
                               msg=lambda m: f"forward mode of {c.name}: {m}")


def _hvp_reference(c: OpCase, args: tuple, tans: tuple) -> tuple:
    leaves = [a.detach().clone().requires_grad_() if i in c.wrt else a for i, a in enumerate(args)]
    wrt = [leaves[i] for i in c.wrt]
    grads = torch.autograd.grad(c.fn(*leaves), wrt, create_graph=True, allow_unused=True)
    dot = sum((g * v).sum() for g, v in zip(grads, tans) if g is not None and g.requires_grad)
    if not isinstance(dot, torch.Tensor):
        return tuple(torch.zeros_like(w) for w in wrt)
    hv = torch.autograd.grad(dot, wrt, allow_unused=True)
    return tuple(torch.zeros_like(w) if h is None else h for w, h in zip(wrt, hv))


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_op_hvp(c: OpCase) -> None:
    """Forward over reverse: the forward-mode transform of propgen.grad's generated code gives
    Hessian-vector products equal to autograd's double backward (float64, CPU)."""
    if c.hvp:
        pytest.skip(c.hvp)
    if "cpu" not in c.devices:
        pytest.skip(f"{c.name} runs on {c.devices} only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = _inputs(c, torch.float64, "cpu")
        tans = _tangents(c, args)
        want = _hvp_reference(c, args, tans)
        got = propgen.hvp(c.fn, wrt=c.wrt)(*args, tangents=tans if len(tans) > 1 else tans[0])
    got = (got,) if isinstance(got, torch.Tensor) else tuple(got)
    _compare(got, want, c, torch.float64, "propgen.hvp")


# ------------------------------------------------------------------------------------------
# Forward mode where the table's random directions do not go
# ------------------------------------------------------------------------------------------

# Ops whose output selects among their inputs' elements, at x = [1, -1, 2, 3] where x[0] is
# never selected (not an extremum, clamped, or beaten by the other operand).
FAR = torch.tensor([5.0, -5.0, -5.0, -5.0], dtype=torch.float64)


def sel_amax(x):
    return x.amax()


def sel_amin(x):
    return torch.amin(x, 0)


def sel_max(x):
    return x.max() + torch.max(x, 0).values + torch.max(x, FAR) + x.max(other=FAR)


def sel_min(x):
    return x.min() + torch.min(x, 0).values + torch.min(x, -FAR) + x.min(other=-FAR)


def sel_maximum_minimum(x):
    return torch.maximum(x, FAR) + torch.minimum(-FAR, x) + torch.fmax(FAR, x) + x.fmin(-FAR)


def sel_clamp(x):
    return torch.clamp(x, -0.5, 0.5) + x.clamp_min(1.5) + torch.clamp_max(x, 0.5) + x.clamp(
        -FAR, FAR.abs() - 4.5)


SELECTIONS = [sel_amax, sel_amin, sel_max, sel_min, sel_maximum_minimum, sel_clamp]


@pytest.mark.parametrize("fn", SELECTIONS, ids=lambda f: f.__name__.removeprefix("sel_"))
def test_jvp_of_a_selection_ignores_what_it_does_not_select(fn) -> None:
    """An infinite tangent at an element the op does not select leaves the output's tangent
    finite: the templates pick the selected tangent (torch.where), not ``tangent * mask``,
    which makes inf * 0 = NaN.  (torch.func.jvp itself gives NaN for some of them.)"""
    x = torch.tensor([1.0, -1.0, 2.0, 3.0], dtype=torch.float64)
    v = torch.tensor([float("inf"), 0.25, -1.0, 2.0], dtype=torch.float64)
    want = torch.func.jvp(fn, (x,), (torch.where(v.isinf(), 0.0, v),))[1]
    got = propgen.autodiff(fn, mode="forward")(x, tangents=v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _indices(x):
    _, indices = x.sort(dim=1)  # int64: its tangent, None, is read as zeros of the default dtype
    return indices


def int_add_sub(x):
    s = x.sum()
    out = s + _indices(x) - x.mean() + torch.sub(_indices(x), s, alpha=2)
    return out + torch.rsub(s, _indices(x))


def int_mul_div_pow(x):
    s = x.sum()
    return s * _indices(x) + s / (_indices(x) + 1) + s ** _indices(x)


def int_where(x):
    return torch.where(x > 0, x.sum(), _indices(x)) + x.sum().where(x < 0, _indices(x))


def int_maximum(x):
    return torch.maximum(x.sum(), _indices(x)) + torch.clamp(x.sum(), _indices(x), None)


@pytest.mark.parametrize("fn", [int_add_sub, int_mul_div_pow, int_where, int_maximum],
                         ids=lambda f: f.__name__.removeprefix("int_"))
def test_jvp_next_to_an_integer_tensor_keeps_the_result_dtype(fn) -> None:
    """A float64 0-d value meets an int64 tensor: the result is float64, and so is its tangent,
    to float64 precision (the integer tensor's stand-in zero has the default dtype, float32:
    combined first, it would round the other tangent), and finite (``s ** indices`` with
    s < 0: the integer exponent has no slope)."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    v = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x[0, 0] = -x.sum() - 1.0  # x.sum() < 0
    want = torch.func.jvp(fn, (x,), (v,))[1]
    got = propgen.autodiff(fn, mode="forward")(x, tangents=v)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _template_keys() -> set:
    """Keys of propgen's own templates (other tests register user templates in the default
    registry: those are not this table's business)."""
    keys = set()
    for reg in (Registry.default(), Registry(TEMPLATE_MODULES)):
        for k in reg.keys():
            t = reg.lookup(k)
            if isinstance(t, Template) and t.fn.__module__ in TEMPLATE_MODULES:
                keys.add(k)
    return keys


def test_every_template_is_tested() -> None:
    """Adding a template without a table entry that exercises it fails here."""
    covered = {k for c in CASES for k in c.keys}
    missing = [k for k in _template_keys() if k not in covered]
    assert not missing, f"templates without a test entry in tests/test_ops.py: {missing}"


def test_every_template_has_a_tangent() -> None:
    """Forward mode covers what reverse mode covers: each adjoint template has a tangent
    template for the same callables."""
    reg = Registry.default()
    missing = sorted({reg.lookup(k).name for k in _template_keys()
                      if reg.lookup_tangent(k) is None})
    assert not missing, f"adjoint templates without a tangent template: {missing}"


def test_entries_call_the_ops_they_claim() -> None:
    """Each entry's keys are registered templates that its function really calls."""
    reg = Registry.default()
    templates = _template_keys()
    # Python-level operations a TorchFunctionMode does not see.
    unseen_by_tape = {builtins.sum, builtins.abs, builtins.max, builtins.min, T.cuda, ".values"}
    unseen_by_tape |= {F.tanh, F.sigmoid}
    unseen_by_tape.add(T.__getitem__)  # reported like operator.getitem
    # what propgen calls for Python-level statements (list + list, an update under no_grad)
    python_level = {operator.concat, update_under_no_grad}
    problems = []
    for c in CASES:
        if "cpu" not in c.devices:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seen = tape_keys(c.fn, _inputs(c, torch.float64, "cpu"))
        seen_templates = [reg.lookup(k) for k in seen]
        for k in c.keys:
            if k not in templates:
                problems.append(f"{c.name}: {k!r} has no template")
            elif k in python_level:
                continue
            elif getattr(k, "__module__", None) == "_operator":
                # torch reports `x + y` as Tensor.add or Tensor.__add__: match the template
                if not any(t is reg.lookup(k) for t in seen_templates):
                    problems.append(f"{c.name} never calls {k!r}")
            elif k not in seen and k not in unseen_by_tape:
                problems.append(f"{c.name} never calls {k!r}")
    assert not problems, "\n".join(problems)
