"""Tangent (forward-mode) templates of the ops in ``ops.py``.

Each template is paired with the op's adjoint template (``@tangent(ops.tanh)``): same
signature, same callables.  ``t[x]`` is the tangent of ``x`` and the template assigns
``t[result]`` with an expression linear in the tangents it reads.  A tangent that is zero
(an argument that does not vary) drops the terms it multiplies when the compiler splices the
template, so ``t[result] = t[input] * other + input * t[other]`` costs one product when only
``input`` varies.  Broadcasting ops return a tangent of the result's shape and dtype
(``expand_like``), since the result of ``x + y`` has ``x``'s shape even when only a smaller
``y`` varies.  Ops that select elements (max, clamp, maximum) pick the selected tangents with
``torch.where`` (``_selected``), never ``tangent * mask``: an infinite tangent of an element
that was not selected does not reach the result.

Each tangent is the transpose of its adjoint, conventions at non-smooth points included
(relu'(0) = 0, abs'(0) = 0, clamp passes the tangent at its bounds, tied maxima share it):
``<adjoint(g), v> == <g, tangent(v)>``.  Reductions sum the tangent over the reduced dims
(``_sum_reduced``), the transpose of the adjoints' ``expand_reduced``.  Ops that return
(values, indices) get a tangent of the same type with None for the indices.
"""

from __future__ import annotations

import builtins
import math

import torch
from propgen.templates import ops
from propgen.templates.helpers import (
    clamp_max_wins,
    clamp_min_wins,
    clamp_pass,
    expand_like,
    expand_reduced,
    like,
    linalg_norm_grad,
    norm_grad,
    prod_others,
    reduced_dims,
    relu_backward,
    sigmoid_backward,
    tanh_backward,
    var_correction,
    var_dim,
    vector_norm_grad,
)
from propgen.templates.ops import LOG2, LOG10, TWO_OVER_SQRT_PI

from propgen.template import t, tangent

# ==========================================================================================
# Arithmetic (broadcasting: the tangent is expanded to the result's shape)
# ==========================================================================================


@tangent(ops.add)
def add(result, input, other, alpha=1):
    """Each tangent in the result's shape and dtype before the sum (an integer operand's zero
    tangent has the default dtype: summed first, it would round a 0-d float64 tangent)."""
    t[result] = expand_like(t[input], result) + expand_like(t[other] * alpha, result)


@tangent(ops.sub)
def sub(result, input, other, alpha=1):
    """Each tangent in the result's shape and dtype first, as in ``add``."""
    t[result] = expand_like(t[input], result) - expand_like(t[other] * alpha, result)


@tangent(ops.rsub)
def rsub(result, input, other, alpha=1):
    """result = other - alpha * input (each tangent in the result's shape and dtype first)"""
    t[result] = expand_like(t[other], result) - expand_like(t[input] * alpha, result)


@tangent(ops.mul)
def mul(result, input, other):
    t[result] = expand_like(t[input] * other + input * t[other], result)


@tangent(ops.div)
def div(result, input, other, rounding_mode=None):
    """d(x / y) = (dx - (x / y) dy) / y; with a rounding_mode the result is piecewise
    constant: a zero tangent."""
    t[result] = (expand_like((t[input] - result * t[other]) / other, result)
                 if rounding_mode is None else torch.zeros_like(result))


@tangent(ops.pow)
def pow(result, input, exponent):
    """d x**p = p x**(p-1) dx + x**p log(x) dp, with torch's conventions at p == 0 and x == 0."""
    t[result] = expand_like(t[input] * _pow_slope_base(input, exponent)
                            + t[exponent] * _pow_slope_exponent(result, input, exponent), result)


@tangent(ops.remainder)
def remainder(result, input, other):
    """x mod y = x - floor(x / y) * y"""
    t[result] = expand_like(t[input] - t[other] * torch.floor(input / other), result)


@tangent(ops.fmod)
def fmod(result, input, other):
    """fmod(x, y) = x - trunc(x / y) * y"""
    t[result] = expand_like(t[input] - t[other] * torch.trunc(input / other), result)


@tangent(ops.neg)
def neg(result, input):
    t[result] = -t[input]


@tangent(ops.pos)
def pos(result, input):
    t[result] = t[input]


@tangent(ops.abs)
def abs(result, input):
    """abs'(x) = sign(x), with abs'(0) = 0."""
    t[result] = t[input] * torch.sgn(input)


@tangent(ops.atan2)
def atan2(result, input, other):
    """d atan2(y, x) = (x dy - y dx) / (x^2 + y^2)"""
    t[result] = expand_like((t[input] * other - t[other] * input) / (input * input + other * other),
                            result)


@tangent(ops.hypot)
def hypot(result, input, other):
    """d hypot(x, y) = (x dx + y dy) / hypot(x, y)"""
    t[result] = expand_like((t[input] * input + t[other] * other) / result, result)


@tangent(ops.maximum)
def maximum(result, input, other):
    """The larger side's tangent; ties take half of each."""
    t[result] = expand_like(_share(t[input], input > other, input == other)
                            + _share(t[other], other > input, input == other), result)


@tangent(ops.minimum)
def minimum(result, input, other):
    """The smaller side's tangent; ties take half of each."""
    t[result] = expand_like(_share(t[input], input < other, input == other)
                            + _share(t[other], other < input, input == other), result)


@tangent(ops.fmax)
def fmax(result, input, other):
    """Like maximum, but NaNs lose and a tie goes to input."""
    first = (input >= other) | other.isnan()
    t[result] = expand_like(_selected(t[input], first) + _selected(t[other], ~first), result)


@tangent(ops.fmin)
def fmin(result, input, other):
    """Like minimum, but NaNs lose and a tie goes to input."""
    first = (input <= other) | other.isnan()
    t[result] = expand_like(_selected(t[input], first) + _selected(t[other], ~first), result)


@tangent(ops.lerp)
def lerp(result, input, end, weight):
    """lerp = input + weight * (end - input)"""
    t[result] = expand_like(t[input] * (1 - weight) + t[end] * weight
                            + t[weight] * (end - input), result)


@tangent(ops.xlogy)
def xlogy(result, input, other):
    """d(x log y) = log(y) dx + x / y dy, with xlogy's zeros where x == 0 (see the adjoint)."""
    t[result] = expand_like(
        torch.where((input == 0) & (other <= 0), 0.0, t[input] * torch.log(other))
        + torch.where(input == 0, 0.0, t[other] * input / other), result)


# ==========================================================================================
# Matrix products
# ==========================================================================================


@tangent(ops.matmul)
def matmul(result, input, other):
    t[result] = t[input] @ other + input @ t[other]


@tangent(ops.mm)
def mm(result, input, mat2):
    t[result] = t[input] @ mat2 + input @ t[mat2]


@tangent(ops.mv)
def mv(result, input, vec):
    t[result] = t[input] @ vec + input @ t[vec]


@tangent(ops.dot)
def dot(result, input, tensor):
    t[result] = torch.dot(t[input], tensor) + torch.dot(input, t[tensor])


@tangent(ops.outer)
def outer(result, input, vec2):
    t[result] = torch.outer(t[input], vec2) + torch.outer(input, t[vec2])


@tangent(ops.addmm)
def addmm(result, input, mat1, mat2, beta=1, alpha=1):
    """result = beta * input + alpha * mat1 @ mat2"""
    t[result] = expand_like(t[input] * beta + alpha * (t[mat1] @ mat2 + mat1 @ t[mat2]), result)


# ==========================================================================================
# Elementwise functions of one tensor
# ==========================================================================================


@tangent(ops.exp)
def exp(result, input):
    t[result] = t[input] * result


@tangent(ops.exp2)
def exp2(result, input):
    t[result] = t[input] * result * LOG2


@tangent(ops.expm1)
def expm1(result, input):
    t[result] = t[input] * (result + 1)


@tangent(ops.log)
def log(result, input):
    t[result] = t[input] / input


@tangent(ops.log2)
def log2(result, input):
    t[result] = t[input] / (input * LOG2)


@tangent(ops.log10)
def log10(result, input):
    t[result] = t[input] / (input * LOG10)


@tangent(ops.log1p)
def log1p(result, input):
    t[result] = t[input] / (1 + input)


@tangent(ops.sqrt)
def sqrt(result, input):
    t[result] = t[input] / (2 * result)


@tangent(ops.rsqrt)
def rsqrt(result, input):
    """x^(-1/2)' = -x^(-3/2) / 2"""
    t[result] = t[input] * (-0.5 * result * result * result)


@tangent(ops.reciprocal)
def reciprocal(result, input):
    t[result] = -t[input] * result * result


@tangent(ops.square)
def square(result, input):
    t[result] = 2 * t[input] * input


@tangent(ops.sin)
def sin(result, input):
    t[result] = t[input] * torch.cos(input)


@tangent(ops.cos)
def cos(result, input):
    t[result] = -t[input] * torch.sin(input)


@tangent(ops.tan)
def tan(result, input):
    t[result] = t[input] * (1 + result * result)


@tangent(ops.asin)
def asin(result, input):
    t[result] = t[input] / torch.sqrt(1 - input * input)


@tangent(ops.acos)
def acos(result, input):
    t[result] = -t[input] / torch.sqrt(1 - input * input)


@tangent(ops.atan)
def atan(result, input):
    t[result] = t[input] / (1 + input * input)


@tangent(ops.sinh)
def sinh(result, input):
    t[result] = t[input] * torch.cosh(input)


@tangent(ops.cosh)
def cosh(result, input):
    t[result] = t[input] * torch.sinh(input)


@tangent(ops.tanh)
def tanh(result, input):
    """tanh'(x) = 1 - tanh(x)^2, in terms of the result (fused: t * (1 - result^2))."""
    t[result] = tanh_backward(t[input], result)


@tangent(ops.asinh)
def asinh(result, input):
    t[result] = t[input] / torch.sqrt(input * input + 1)


@tangent(ops.acosh)
def acosh(result, input):
    t[result] = t[input] / torch.sqrt(input * input - 1)


@tangent(ops.atanh)
def atanh(result, input):
    t[result] = t[input] / (1 - input * input)


@tangent(ops.sigmoid)
def sigmoid(result, input):
    """sigmoid'(x) = sigmoid(x) (1 - sigmoid(x)), in terms of the result (fused)."""
    t[result] = sigmoid_backward(t[input], result)


@tangent(ops.logit)
def logit(result, input, eps=None):
    """logit'(x) = 1 / (x (1 - x)), and 0 where eps clamps x."""
    slope = t[input] / (input * (1 - input))
    t[result] = slope if eps is None else slope * clamp_pass(input, eps, 1 - eps)


@tangent(ops.erf)
def erf(result, input):
    t[result] = t[input] * TWO_OVER_SQRT_PI * torch.exp(-input * input)


@tangent(ops.erfc)
def erfc(result, input):
    t[result] = -t[input] * TWO_OVER_SQRT_PI * torch.exp(-input * input)


@tangent(ops.erfinv)
def erfinv(result, input):
    """erfinv'(x) = sqrt(pi) / 2 * exp(erfinv(x)^2)"""
    t[result] = t[input] / TWO_OVER_SQRT_PI * torch.exp(result * result)


@tangent(ops.frac)
def frac(result, input):
    """frac(x) = x - trunc(x): slope 1 between the jumps."""
    t[result] = t[input]


@tangent(ops.clamp)
def clamp(result, input, min=None, max=None):
    """The input's tangent where min <= x <= max (bounds included), a tensor bound's where it
    is the output (the upper bound wins where min > max)."""
    t[result] = expand_like(_selected(t[input], clamp_pass(input, min, max))
                            + _selected(t[min], clamp_min_wins(input, min, max))
                            + _selected(t[max], clamp_max_wins(input, min, max)), result)


@tangent(ops.clamp_min)
def clamp_min(result, input, min):
    t[result] = expand_like(_selected(t[input], input >= min) + _selected(t[min], input < min),
                            result)


@tangent(ops.clamp_max)
def clamp_max(result, input, max):
    t[result] = expand_like(_selected(t[input], input <= max) + _selected(t[max], input > max),
                            result)


@tangent(ops.relu)
def relu(result, input, inplace=False):
    """relu'(x) = 1 for x > 0, and relu'(0) = 0 (fused: t * (result > 0))."""
    t[result] = relu_backward(t[input], result)


@tangent(ops.where)
def where(result, condition, input=None, other=None):
    """Each position takes the tangent of the branch it was selected from (each in the
    result's dtype first, as in ``add``: an integer branch's zero must not round the other)."""
    t[result] = torch.where(condition, expand_like(t[input], result), expand_like(t[other], result))


@tangent(ops.where_method)
def where_method(result, input, condition, other):
    """x.where(condition, other)"""
    t[result] = torch.where(condition, expand_like(t[input], result), expand_like(t[other], result))


@tangent(ops.masked_fill)
def masked_fill(result, input, mask, value):
    """Filled positions take value's tangent, the others input's."""
    t[result] = torch.masked_fill(t[input], mask, t[value])


# ==========================================================================================
# Reductions
# ==========================================================================================


@tangent(ops.sum)
def sum(result, input, dim=None, keepdim=False, dtype=None):
    t[result] = (torch.sum(t[input], dim, keepdim, dtype=dtype) if dim is not None
                 else torch.sum(t[input], dtype=dtype))


@tangent(ops.update_under_no_grad)
def update_under_no_grad(result, old, new):
    """An in-place update under no_grad keeps the tangent the value had."""
    t[result] = t[old]


@tangent(ops.concat)
def concat(result, a, b):
    """a + b of two lists: the tangents' lists joined the same way."""
    t[result] = list(t[a]) + list(t[b])


@tangent(ops.builtin_sum)
def builtin_sum(result, iterable, start=0):
    """sum([a, b, ...], start) = start + a + b + ...: the sum of the terms' tangents."""
    t[result] = expand_like(_sum_tangents(t[iterable]) + t[start], result)


@tangent(ops.mean)
def mean(result, input, dim=None, keepdim=False, dtype=None):
    t[result] = (torch.mean(t[input], dim, keepdim, dtype=dtype) if dim is not None
                 else torch.mean(t[input], dtype=dtype))


@tangent(ops.var)
def var(result, input, dim=None, unbiased=None, keepdim=False, correction=None):
    """d var = 2 sum (x - mean) dx / (N - correction)  (the mean's own change sums to 0)."""
    dims = reduced_dims(var_dim(dim), input.dim())
    n = input.numel() / result.numel() - var_correction(dim, unbiased, correction)
    centered = input - input.mean(dims, keepdim=True)
    t[result] = 2 * (centered * t[input]).sum(dims, keepdim=keepdim) / n


@tangent(ops.std)
def std(result, input, dim=None, unbiased=None, keepdim=False, correction=None):
    """d std = d var / (2 std) = sum (x - mean) dx / ((N - correction) std), 0 where std = 0."""
    dims = reduced_dims(var_dim(dim), input.dim())
    n = input.numel() / result.numel() - var_correction(dim, unbiased, correction)
    centered = input - input.mean(dims, keepdim=True)
    dvar = (centered * t[input]).sum(dims, keepdim=keepdim) / n
    t[result] = torch.where(result == 0, 0.0, dvar / result)


@tangent(ops.norm)
def norm(result, input, p="fro", dim=None, keepdim=False, out=None, dtype=None):
    """<the norm's gradient, dx> over the reduced dims (see ``vector_norm_grad``)."""
    slope = norm_grad(torch.ones_like(result), input, result, p, dim, keepdim)
    t[result] = _sum_reduced(t[input] * slope, input, result, dim, keepdim)


@tangent(ops.linalg_norm)
def linalg_norm(result, input, ord=None, dim=None, keepdim=False, out=None, dtype=None):
    """<the norm's gradient, dx> over the reduced dims (vector norms and Frobenius)."""
    slope = linalg_norm_grad(torch.ones_like(result), input, result, ord, dim, keepdim)
    t[result] = _sum_reduced(t[input] * slope, input, result, dim, keepdim)


@tangent(ops.vector_norm)
def vector_norm(result, x, ord=2, dim=None, keepdim=False, out=None, dtype=None):
    """<the norm's gradient, dx> over the reduced dims: <x, dx> / ||x|| for ord = 2."""
    slope = vector_norm_grad(torch.ones_like(result), x, result, ord, dim, keepdim)
    t[result] = _sum_reduced(t[x] * slope, x, result, dim, keepdim)


@tangent(ops.prod)
def prod(result, input, dim=None, keepdim=False, dtype=None):
    """d prod = sum_i (product of the other elements) dx_i  (exact with zeros)."""
    t[result] = _sum_reduced(t[input] * prod_others(input, dim), input, result, dim, keepdim)


@tangent(ops.cumsum)
def cumsum(result, input, dim, dtype=None):
    t[result] = torch.cumsum(t[input], dim, dtype=dtype)


@tangent(ops.cumprod)
def cumprod(result, input, dim, dtype=None):
    """dy_j = sum_{i <= j} dx_i prod_{k <= j, k != i} x_k  (y_j cumsum(dx / x)_j without
    zeros)."""
    t[result] = like(_cumprod_tangent(t[input], input, result, dim), result)


@tangent(ops.logsumexp)
def logsumexp(result, input, dim, keepdim=False):
    """d logsumexp = <softmax(x), dx> = sum exp(x - logsumexp(x)) dx"""
    lse = expand_reduced(result, input, dim, keepdim)
    t[result] = _sum_reduced(t[input] * torch.exp(input - lse), input, result, dim, keepdim)


@tangent(ops.amax)
def amax(result, input, dim=(), keepdim=False):
    """The mean tangent of the elements equal to the extremum (ties share, like the adjoint)."""
    t[result] = _tied_mean(t[input], input, result, dim, keepdim)


@tangent(ops.max)
def max(result, input, dim=None, keepdim=False, other=None):
    """max(x) → mean tangent of the tied maxima; max(x, dim) → (the tangent at the returned
    index, None); max(x, y) → maximum's tangent (y arrives as dim unless passed as other=)."""
    t[result] = expand_like(_extremum_tangent(t[input], result, input, dim, keepdim, other, True)
                            + _share(t[dim], dim > input, input == dim)
                            + _share(t[other], other > input, input == other), result)


@tangent(ops.min)
def min(result, input, dim=None, keepdim=False, other=None):
    """Like max: min(x) shares ties, min(x, dim) picks the index, min(x, y) is minimum."""
    t[result] = expand_like(_extremum_tangent(t[input], result, input, dim, keepdim, other, False)
                            + _share(t[dim], dim < input, input == dim)
                            + _share(t[other], other < input, input == other), result)


@tangent(ops.sort)
def sort(result, input, dim=-1, descending=False, stable=False):
    """(values, indices): each value takes the tangent of the position it came from."""
    t[result] = _picked(t[input], result, dim, True)


@tangent(ops.topk)
def topk(result, input, k, dim=-1, largest=True, sorted=True):
    """(values, indices): each value takes the tangent of the position it came from."""
    t[result] = _picked(t[input], result, dim, True)


@tangent(ops.trace)
def trace(result, input):
    t[result] = torch.trace(t[input])


# ==========================================================================================
# Helpers of the templates above (linear in their first argument, the tangent)
# ==========================================================================================


def _pow_slope_base(input, exponent):
    """``d x**p / dx = p * x**(p-1)``, and 0 where ``p == 0`` (torch's convention)."""
    if not isinstance(exponent, torch.Tensor):
        return exponent * input ** (exponent - 1) if exponent != 0 else input * 0
    return torch.where(exponent == 0, 0.0, exponent * input ** (exponent - 1))


def _pow_slope_exponent(result, input, exponent):
    """``d x**p / dp = x**p * log(x)``, and 0 where ``x == 0`` and ``p >= 0`` (torch).

    An integer exponent tensor does not vary (its tangent is a stand-in zero): no slope, since
    0 * log(x) would be NaN for x < 0."""
    if isinstance(exponent, torch.Tensor) and not (exponent.is_floating_point()
                                                   or exponent.is_complex()):
        return torch.zeros_like(result)
    if isinstance(input, torch.Tensor):
        return torch.where((input == 0) & (exponent >= 0), 0.0, result * input.log())
    return result * math.log(input) if input != 0 else result * 0


def _selected(tangent, mask):
    """``tangent`` where ``mask`` selects its operand, 0 elsewhere: a where, not the product
    ``tangent * mask``, so that the tangent of an element the op did not select never reaches
    the result, even an infinite one (inf * 0 is NaN; the output does not depend on it)."""
    return torch.where(mask, tangent, 0.0)


def _share(tangent, wins, ties):
    """A maximum's (minimum's) tangent from one operand: all of it where the operand won,
    half of it on ties (the other operand brings the other half), none where it lost."""
    return torch.where(ties, tangent * 0.5, _selected(tangent, wins))


def _sum_reduced(tangent, input, result, dim, keepdim):
    """``tangent`` (shaped like ``input``) summed over the dims a reduction of ``input`` over
    ``dim`` removed, in the result's shape and dtype: the transpose of ``expand_reduced``."""
    dims = reduced_dims(dim, input.dim())
    if dims:
        tangent = tangent.sum(dims, keepdim=keepdim)
    return like(tangent.reshape(result.shape), result)


def _tied_mean(tangent, input, result, dim, keepdim):
    """The mean tangent of the elements of ``input`` equal to the extremum ``result`` of the
    reduction over ``dim`` (ties share, as in ``split_ties``)."""
    hit = input == expand_reduced(result, input, dim, keepdim)
    count = _sum_reduced(hit.to(result.dtype), input, result, dim, keepdim)
    return _sum_reduced(_selected(tangent, hit), input, result, dim, keepdim) / count


def _picked(tangent, result, dim, keepdim):
    """The tangent of a (values, indices) result (max(x, dim), sort, topk): the input's
    tangent at the returned indices, and None for the indices."""
    indices = result[1]
    if tangent.dim() == 0:
        values = tangent
    elif keepdim:
        values = tangent.gather(dim, indices)
    else:
        values = tangent.gather(dim, indices.unsqueeze(dim)).squeeze(dim)
    return type(result)((like(values, result[0]), None))


def _extremum_tangent(tangent, result, input, dim, keepdim, other, largest):
    """torch.max / torch.min's three overloads, for ``input``'s tangent (see ``minmax_grad``):
    ties share over a full reduction, the returned index picks along ``dim``, and a tensor in
    ``dim`` or ``other`` makes it ``maximum`` / ``minimum``."""
    if other is not None:
        dim = other
    if isinstance(dim, torch.Tensor):
        wins = input > dim if largest else input < dim
        return _share(tangent, wins, input == dim)
    if dim is None:
        return _tied_mean(tangent, input, result, None, False)
    return _picked(tangent, result, dim, keepdim)


def _sum_tangents(tangents):
    """The sum of a list's tangents (None stands for a zero)."""
    return builtins.sum((x for x in tangents if x is not None), 0.0)


def _cumprod_tangent(tangent, input, result, dim):
    """``dy_j = sum_{i <= j} dx_i prod_{k <= j, k != i} x_k`` along ``dim``.

    Without zeros that is ``y_j * cumsum(dx / x)_j``; with zeros it is evaluated directly
    (quadratic in the length of ``dim``), the transpose of ``cumprod_grad``.
    """
    if input.dim() == 0:
        return tangent
    if bool((input != 0).all()):
        return result * torch.cumsum(tangent / input, dim)
    xs = input.movedim(dim, -1)
    n = xs.shape[-1]
    rows = xs.unsqueeze(-2).expand(*xs.shape[:-1], n, n).clone()  # rows[..., i, k] = x[k]
    rows.diagonal(dim1=-2, dim2=-1).fill_(1)  # ... with x[i] left out of row i
    upper = torch.ones(n, n, dtype=torch.bool, device=input.device).triu()  # j >= i
    terms = rows.cumprod(-1) * upper * tangent.movedim(dim, -1).unsqueeze(-1)
    return terms.sum(-2).movedim(-1, dim)
