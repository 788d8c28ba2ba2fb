"""Adjoint templates of torch ops, Python operators and builtins.

Each template states how the gradient of one op's result flows back to its arguments: the
first parameter is the op's result, the others mirror the op's signature.  ``d[result]`` is the
incoming gradient; ``d[arg] = expr`` adds ``expr`` to ``arg``'s gradient (the compiler drops the
statement when ``arg`` carries no gradient).  Broadcasting ops sum the gradient back down to
each operand's shape with ``unbroadcast``.

Non-smooth points follow torch's conventions: relu'(0) = 0, abs'(0) = 0, clamp passes the
gradient at its bounds, ties of a maximum share the gradient (see ``maximum``, ``amax``).
"""

from __future__ import annotations

import builtins
import math
import operator

import torch
from propgen.templates.helpers import (
    cat_grads,
    clamp_max_wins,
    clamp_min_wins,
    clamp_pass,
    cumprod_grad,
    expand_reduced,
    getitem_grad,
    inverse_permutation,
    like,
    linalg_norm_grad,
    masked_select_grad,
    matmul_grad_input,
    matmul_grad_other,
    minmax_grad,
    norm_grad,
    pairwise_grad,
    picked_grad,
    pow_grad_base,
    pow_grad_exponent,
    prod_others,
    reduced_dims,
    relu_backward,
    repeat_grad,
    reverse_cumsum,
    reversed_dims,
    roll_grad,
    scatter_grad,
    shape_arg,
    sigmoid_backward,
    split_sizes,
    split_ties,
    stack_grads,
    tanh_backward,
    unbroadcast,
    unbroadcast_each,
    update_under_no_grad,
    var_correction,
    var_dim,
    vector_norm_grad,
)

from propgen.runtime import seq_adjoint
from propgen.template import adjoint, d, nondifferentiable

F = torch.nn.functional
LOG2 = math.log(2.0)
LOG10 = math.log(10.0)
TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)

# ==========================================================================================
# Arithmetic (broadcasting: each operand gets the gradient summed down to its own shape)
# ==========================================================================================


@adjoint(operator.add, torch.add, torch.Tensor.add)
def add(result, input, other, alpha=1):
    """result = input + alpha * other"""
    d[input] = unbroadcast(d[result], input)
    d[other] = unbroadcast(d[result] * alpha, other)


@adjoint(operator.sub, torch.sub, torch.subtract, torch.Tensor.sub, torch.Tensor.subtract)
def sub(result, input, other, alpha=1):
    """result = input - alpha * other  (``2 - x`` arrives here with input = 2)"""
    d[input] = unbroadcast(d[result], input)
    d[other] = unbroadcast(-d[result] * alpha, other)


@adjoint(torch.rsub)
def rsub(result, input, other, alpha=1):
    """result = other - alpha * input"""
    d[input] = unbroadcast(-d[result] * alpha, input)
    d[other] = unbroadcast(d[result], other)


@adjoint(operator.mul, torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.multiply)
def mul(result, input, other):
    d[input] = unbroadcast(d[result] * other, input)
    d[other] = unbroadcast(d[result] * input, other)


@adjoint(
    operator.truediv,
    torch.div,
    torch.divide,
    torch.true_divide,
    torch.Tensor.div,
    torch.Tensor.divide,
    torch.Tensor.true_divide,
)
def div(result, input, other, rounding_mode=None):
    """result = input / other.  With a rounding_mode the result is piecewise constant: no
    gradient (torch's convention)."""
    smooth = 1.0 if rounding_mode is None else 0.0
    d[input] = unbroadcast(d[result] / other * smooth, input)
    d[other] = unbroadcast(-d[result] * input / (other * other) * smooth, other)


@adjoint(operator.pow, torch.pow, torch.Tensor.pow)
def pow(result, input, exponent):
    """d x**p = p x**(p-1) dx + x**p log(x) dp  (``2 ** x`` arrives with input = 2)."""
    d[input] = pow_grad_base(d[result], input, exponent)
    d[exponent] = pow_grad_exponent(d[result], result, input, exponent)


@adjoint(operator.mod, torch.remainder, torch.Tensor.remainder)
def remainder(result, input, other):
    """x mod y = x - floor(x / y) * y"""
    d[input] = unbroadcast(d[result], input)
    d[other] = unbroadcast(-d[result] * torch.floor(input / other), other)


@adjoint(torch.fmod, torch.Tensor.fmod)
def fmod(result, input, other):
    """fmod(x, y) = x - trunc(x / y) * y"""
    d[input] = unbroadcast(d[result], input)
    d[other] = unbroadcast(-d[result] * torch.trunc(input / other), other)


@adjoint(operator.neg, torch.neg, torch.negative, torch.Tensor.neg, torch.Tensor.negative)
def neg(result, input):
    d[input] = -d[result]


@adjoint(operator.pos, torch.positive, torch.Tensor.positive)
def pos(result, input):
    d[input] = d[result]


@adjoint(
    operator.abs, builtins.abs, torch.abs, torch.absolute, torch.Tensor.abs, torch.Tensor.absolute
)
def abs(result, input):
    """abs'(x) = sign(x), with abs'(0) = 0."""
    d[input] = d[result] * torch.sgn(input)


@adjoint(torch.atan2, torch.arctan2, torch.Tensor.atan2, torch.Tensor.arctan2)
def atan2(result, input, other):
    """atan2(y, x):  d/dy = x / (x^2 + y^2),  d/dx = -y / (x^2 + y^2)"""
    r2 = input * input + other * other
    d[input] = unbroadcast(d[result] * other / r2, input)
    d[other] = unbroadcast(-d[result] * input / r2, other)


@adjoint(torch.hypot, torch.Tensor.hypot)
def hypot(result, input, other):
    """hypot(x, y) = sqrt(x^2 + y^2):  d/dx = x / hypot"""
    d[input] = unbroadcast(d[result] * input / result, input)
    d[other] = unbroadcast(d[result] * other / result, other)


@adjoint(torch.maximum, torch.Tensor.maximum)
def maximum(result, input, other):
    """Each side gets the gradient where it is the larger; ties split it 0.5 / 0.5."""
    d[input] = pairwise_grad(d[result], input > other, input == other, input)
    d[other] = pairwise_grad(d[result], other > input, input == other, other)


@adjoint(torch.minimum, torch.Tensor.minimum)
def minimum(result, input, other):
    """Each side gets the gradient where it is the smaller; ties split it 0.5 / 0.5."""
    d[input] = pairwise_grad(d[result], input < other, input == other, input)
    d[other] = pairwise_grad(d[result], other < input, input == other, other)


@adjoint(torch.fmax, torch.Tensor.fmax)
def fmax(result, input, other):
    """Like maximum, but NaNs lose and a tie goes to input."""
    first = (input >= other) | other.isnan()
    d[input] = unbroadcast(d[result] * first, input)
    d[other] = unbroadcast(d[result] * ~first, other)


@adjoint(torch.fmin, torch.Tensor.fmin)
def fmin(result, input, other):
    """Like minimum, but NaNs lose and a tie goes to input."""
    first = (input <= other) | other.isnan()
    d[input] = unbroadcast(d[result] * first, input)
    d[other] = unbroadcast(d[result] * ~first, other)


@adjoint(torch.lerp, torch.Tensor.lerp)
def lerp(result, input, end, weight):
    """lerp = input + weight * (end - input)"""
    d[input] = unbroadcast(d[result] * (1 - weight), input)
    d[end] = unbroadcast(d[result] * weight, end)
    d[weight] = unbroadcast(d[result] * (end - input), weight)


@adjoint(torch.xlogy, torch.Tensor.xlogy)
def xlogy(result, input, other):
    """xlogy(x, y) = x log(y), defined as 0 where x == 0: d/dx = log(y) (0 where also y <= 0)."""
    zero_zero = (input == 0) & (other <= 0)
    d[input] = unbroadcast(torch.where(zero_zero, 0.0, d[result] * torch.log(other)), input)
    # torch's formula, unmasked: masking x == 0 would hide the cross term d2/dx dy = 1/y
    d[other] = unbroadcast(d[result] * input / other, other)


# ==========================================================================================
# Matrix products
# ==========================================================================================


@adjoint(operator.matmul, torch.matmul, torch.Tensor.matmul)
def matmul(result, input, other):
    """C = A @ B:  dA = dC @ B^T,  dB = A^T @ dC  (1-D operands and batch broadcasting handled
    like torch.matmul)."""
    d[input] = matmul_grad_input(d[result], input, other)
    d[other] = matmul_grad_other(d[result], input, other)


@adjoint(torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm)
def mm(result, input, mat2):
    """C = A @ B (matrices, or batches of matrices for bmm):  dA = dC @ B^T,  dB = A^T @ dC"""
    d[input] = d[result] @ mat2.mT
    d[mat2] = input.mT @ d[result]


@adjoint(torch.mv, torch.Tensor.mv)
def mv(result, input, vec):
    """y = A v:  dA = dy v^T,  dv = A^T dy"""
    d[input] = torch.outer(d[result], vec)
    d[vec] = input.mT @ d[result]


@adjoint(torch.dot, torch.Tensor.dot)
def dot(result, input, tensor):
    """s = <a, b> (1-D):  da = ds * b"""
    d[input] = d[result] * tensor
    d[tensor] = d[result] * input


@adjoint(torch.outer, torch.Tensor.outer, torch.ger, torch.Tensor.ger)
def outer(result, input, vec2):
    """M = a b^T:  da = dM b,  db = dM^T a"""
    d[input] = d[result] @ vec2
    d[vec2] = d[result].mT @ input


@adjoint(torch.addmm, torch.Tensor.addmm)
def addmm(result, input, mat1, mat2, beta=1, alpha=1):
    """result = beta * input + alpha * mat1 @ mat2"""
    d[input] = unbroadcast(d[result] * beta, input)
    d[mat1] = alpha * d[result] @ mat2.mT
    d[mat2] = alpha * mat1.mT @ d[result]


# ==========================================================================================
# Elementwise functions of one tensor
# ==========================================================================================


@adjoint(torch.exp, torch.Tensor.exp)
def exp(result, input):
    d[input] = d[result] * result


@adjoint(torch.exp2, torch.Tensor.exp2)
def exp2(result, input):
    d[input] = d[result] * result * LOG2


@adjoint(torch.expm1, torch.Tensor.expm1)
def expm1(result, input):
    d[input] = d[result] * (result + 1)


@adjoint(torch.log, torch.Tensor.log)
def log(result, input):
    d[input] = d[result] / input


@adjoint(torch.log2, torch.Tensor.log2)
def log2(result, input):
    d[input] = d[result] / (input * LOG2)


@adjoint(torch.log10, torch.Tensor.log10)
def log10(result, input):
    d[input] = d[result] / (input * LOG10)


@adjoint(torch.log1p, torch.Tensor.log1p)
def log1p(result, input):
    d[input] = d[result] / (1 + input)


@adjoint(torch.sqrt, torch.Tensor.sqrt)
def sqrt(result, input):
    d[input] = d[result] / (2 * result)


@adjoint(torch.rsqrt, torch.Tensor.rsqrt)
def rsqrt(result, input):
    """x^(-1/2)' = -x^(-3/2) / 2"""
    d[input] = -0.5 * d[result] * result * result * result


@adjoint(torch.reciprocal, torch.Tensor.reciprocal)
def reciprocal(result, input):
    d[input] = -d[result] * result * result


@adjoint(torch.square, torch.Tensor.square)
def square(result, input):
    d[input] = 2 * d[result] * input


@adjoint(torch.sin, torch.Tensor.sin)
def sin(result, input):
    d[input] = d[result] * torch.cos(input)


@adjoint(torch.cos, torch.Tensor.cos)
def cos(result, input):
    d[input] = -d[result] * torch.sin(input)


@adjoint(torch.tan, torch.Tensor.tan)
def tan(result, input):
    d[input] = d[result] * (1 + result * result)


@adjoint(torch.asin, torch.arcsin, torch.Tensor.asin, torch.Tensor.arcsin)
def asin(result, input):
    d[input] = d[result] / torch.sqrt(1 - input * input)


@adjoint(torch.acos, torch.arccos, torch.Tensor.acos, torch.Tensor.arccos)
def acos(result, input):
    d[input] = -d[result] / torch.sqrt(1 - input * input)


@adjoint(torch.atan, torch.arctan, torch.Tensor.atan, torch.Tensor.arctan)
def atan(result, input):
    d[input] = d[result] / (1 + input * input)


@adjoint(torch.sinh, torch.Tensor.sinh)
def sinh(result, input):
    d[input] = d[result] * torch.cosh(input)


@adjoint(torch.cosh, torch.Tensor.cosh)
def cosh(result, input):
    d[input] = d[result] * torch.sinh(input)


@adjoint(torch.tanh, torch.Tensor.tanh, F.tanh)
def tanh(result, input):
    """tanh'(x) = 1 - tanh(x)^2, in terms of the result."""
    d[input] = tanh_backward(d[result], result)


@adjoint(torch.asinh, torch.arcsinh, torch.Tensor.asinh, torch.Tensor.arcsinh)
def asinh(result, input):
    d[input] = d[result] / torch.sqrt(input * input + 1)


@adjoint(torch.acosh, torch.arccosh, torch.Tensor.acosh, torch.Tensor.arccosh)
def acosh(result, input):
    d[input] = d[result] / torch.sqrt(input * input - 1)


@adjoint(torch.atanh, torch.arctanh, torch.Tensor.atanh, torch.Tensor.arctanh)
def atanh(result, input):
    d[input] = d[result] / (1 - input * input)


@adjoint(torch.sigmoid, torch.Tensor.sigmoid, torch.special.expit, F.sigmoid)
def sigmoid(result, input):
    """sigmoid'(x) = sigmoid(x) (1 - sigmoid(x)), in terms of the result."""
    d[input] = sigmoid_backward(d[result], result)


@adjoint(torch.logit, torch.Tensor.logit)
def logit(result, input, eps=None):
    """logit(x) = log(x / (1 - x)), x clamped to [eps, 1 - eps] when eps is given."""
    inside = clamp_pass(input, eps, None if eps is None else 1 - eps)
    d[input] = d[result] / (input * (1 - input)) * inside


@adjoint(torch.erf, torch.Tensor.erf)
def erf(result, input):
    d[input] = d[result] * TWO_OVER_SQRT_PI * torch.exp(-input * input)


@adjoint(torch.erfc, torch.Tensor.erfc)
def erfc(result, input):
    d[input] = -d[result] * TWO_OVER_SQRT_PI * torch.exp(-input * input)


@adjoint(torch.erfinv, torch.Tensor.erfinv)
def erfinv(result, input):
    """erfinv'(x) = sqrt(pi) / 2 * exp(erfinv(x)^2)"""
    d[input] = d[result] / TWO_OVER_SQRT_PI * torch.exp(result * result)


@adjoint(torch.frac, torch.Tensor.frac)
def frac(result, input):
    """frac(x) = x - trunc(x): slope 1 between the jumps."""
    d[input] = d[result]


@adjoint(torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip)
def clamp(result, input, min=None, max=None):
    """The input gets the gradient where min <= x <= max (bounds included, like torch); a
    tensor bound gets it where it is the output (the upper bound wins where min > max)."""
    d[input] = d[result] * clamp_pass(input, min, max)
    d[min] = unbroadcast(d[result] * clamp_min_wins(input, min, max), min)
    d[max] = unbroadcast(d[result] * clamp_max_wins(input, min, max), max)


@adjoint(torch.clamp_min, torch.Tensor.clamp_min)
def clamp_min(result, input, min):
    d[input] = d[result] * (input >= min)
    d[min] = unbroadcast(d[result] * (input < min), min)


@adjoint(torch.clamp_max, torch.Tensor.clamp_max)
def clamp_max(result, input, max):
    d[input] = d[result] * (input <= max)
    d[max] = unbroadcast(d[result] * (input > max), max)


@adjoint(torch.relu, torch.Tensor.relu, F.relu)
def relu(result, input, inplace=False):
    """relu'(x) = 1 for x > 0, and relu'(0) = 0."""
    d[input] = relu_backward(d[result], result)


@adjoint(torch.where)
def where(result, condition, input=None, other=None):
    """Each branch gets the gradient where it was selected."""
    d[input] = unbroadcast(torch.where(condition, d[result], 0.0), input)
    d[other] = unbroadcast(torch.where(condition, 0.0, d[result]), other)


@adjoint(torch.Tensor.where)
def where_method(result, input, condition, other):
    """x.where(condition, other)"""
    d[input] = unbroadcast(torch.where(condition, d[result], 0.0), input)
    d[other] = unbroadcast(torch.where(condition, 0.0, d[result]), other)


@adjoint(torch.masked_fill, torch.Tensor.masked_fill)
def masked_fill(result, input, mask, value):
    """Filled positions come from value, the others from input."""
    d[input] = d[result].masked_fill(mask, 0.0)
    d[value] = unbroadcast(d[result] * mask, value)


# ==========================================================================================
# Reductions
# ==========================================================================================


@adjoint(torch.sum, torch.Tensor.sum)
def sum(result, input, dim=None, keepdim=False, dtype=None):
    """Every summed element gets the gradient of its sum."""
    d[input] = expand_reduced(d[result], input, dim, keepdim)


@adjoint(update_under_no_grad)
def update_under_no_grad(result, old, new):
    """An in-place update under no_grad: invisible to the gradient, which goes to ``old``."""
    d[old] = d[result]


@adjoint(operator.concat)
def concat(result, a, b):
    """a + b of two lists: each list gets its own part of the joined list's gradient."""
    d[a] = d[result][:len(a)]
    d[b] = d[result][len(a):]


@adjoint(builtins.sum)
def builtin_sum(result, iterable, start=0):
    """sum([a, b, ...], start) = start + a + b + ...: each term gets the (unbroadcast) gradient."""
    d[iterable] = unbroadcast_each(d[result], iterable)
    d[start] = unbroadcast(d[result], start)


@adjoint(torch.mean, torch.Tensor.mean)
def mean(result, input, dim=None, keepdim=False, dtype=None):
    """Every averaged element gets the gradient divided by the number of elements averaged."""
    d[input] = expand_reduced(d[result], input, dim, keepdim) * (result.numel() / input.numel())


@adjoint(torch.var, torch.Tensor.var)
def var(result, input, dim=None, unbiased=None, keepdim=False, correction=None):
    """var = sum (x - mean)^2 / (N - correction)  ⇒  dx = 2 (x - mean) / (N - correction) dvar
    (``torch.var(x, False)`` passes ``unbiased`` in dim's place)."""
    dims = reduced_dims(var_dim(dim), input.dim())
    n = input.numel() / result.numel() - var_correction(dim, unbiased, correction)
    centered = input - input.mean(dims, keepdim=True)
    d[input] = expand_reduced(d[result], input, var_dim(dim), keepdim) * 2 * centered / n


@adjoint(torch.std, torch.Tensor.std)
def std(result, input, dim=None, unbiased=None, keepdim=False, correction=None):
    """std = sqrt(var)  ⇒  dx = (x - mean) / ((N - correction) std) dstd, and 0 where std = 0."""
    dims = reduced_dims(var_dim(dim), input.dim())
    n = input.numel() / result.numel() - var_correction(dim, unbiased, correction)
    centered = input - input.mean(dims, keepdim=True)
    per_std = torch.where(result == 0, 0.0, d[result] / result)
    d[input] = expand_reduced(per_std, input, var_dim(dim), keepdim) * centered / n


@adjoint(torch.norm, torch.Tensor.norm)
def norm(result, input, p="fro", dim=None, keepdim=False, out=None, dtype=None):
    """Vector p-norms over dim and the Frobenius norm; see ``vector_norm_grad`` for the math."""
    d[input] = norm_grad(d[result], input, result, p, dim, keepdim)


@adjoint(torch.linalg.norm)
def linalg_norm(result, input, ord=None, dim=None, keepdim=False, out=None, dtype=None):
    """Vector norms and the Frobenius norm (2-norm of the selected elements)."""
    d[input] = linalg_norm_grad(d[result], input, result, ord, dim, keepdim)


@adjoint(torch.linalg.vector_norm)
def vector_norm(result, x, ord=2, dim=None, keepdim=False, out=None, dtype=None):
    """||x||_ord:  dx = sign(x) |x|^(ord-1) / ||x||^(ord-1)  (x / ||x|| for ord = 2)."""
    d[x] = vector_norm_grad(d[result], x, result, ord, dim, keepdim)


@adjoint(torch.prod, torch.Tensor.prod)
def prod(result, input, dim=None, keepdim=False, dtype=None):
    """d prod / d x_i = product of the other elements (exact with zeros: no division)."""
    d[input] = expand_reduced(d[result], input, dim, keepdim) * prod_others(input, dim)


@adjoint(torch.cumsum, torch.Tensor.cumsum)
def cumsum(result, input, dim, dtype=None):
    """y_j = sum_{i <= j} x_i  ⇒  dx_i = sum_{j >= i} dy_j"""
    d[input] = like(reverse_cumsum(d[result], dim), input)


@adjoint(torch.cumprod, torch.Tensor.cumprod)
def cumprod(result, input, dim, dtype=None):
    """y_j = prod_{i <= j} x_i  ⇒  dx_i = sum_{j >= i} dy_j prod_{k <= j, k != i} x_k"""
    d[input] = like(cumprod_grad(d[result], input, result, dim), input)


@adjoint(torch.logsumexp, torch.Tensor.logsumexp)
def logsumexp(result, input, dim, keepdim=False):
    """d logsumexp / dx = softmax(x) = exp(x - logsumexp(x))"""
    lse = expand_reduced(result, input, dim, keepdim)
    d[input] = expand_reduced(d[result], input, dim, keepdim) * torch.exp(input - lse)


@adjoint(torch.amax, torch.Tensor.amax, torch.amin, torch.Tensor.amin)
def amax(result, input, dim=(), keepdim=False):
    """Ties share the gradient evenly (torch's convention for amax / amin)."""
    d[input] = split_ties(d[result], input, result, dim, keepdim)


@adjoint(torch.max, torch.Tensor.max)
def max(result, input, dim=None, keepdim=False, other=None):
    """Three overloads: max(x) → ties share the gradient evenly; max(x, dim) → (values,
    indices), the values' gradient goes to the returned index; max(x, y) → maximum(x, y)
    (y arrives as dim unless passed as other=)."""
    d[input] = minmax_grad(d[result], result, input, dim, keepdim, other, True)
    d[dim] = pairwise_grad(d[result], dim > input, input == dim, dim)
    d[other] = pairwise_grad(d[result], other > input, input == other, other)


@adjoint(torch.min, torch.Tensor.min)
def min(result, input, dim=None, keepdim=False, other=None):
    """Like max: min(x) shares ties, min(x, dim) picks the index, min(x, y) is minimum."""
    d[input] = minmax_grad(d[result], result, input, dim, keepdim, other, False)
    d[dim] = pairwise_grad(d[result], dim < input, input == dim, dim)
    d[other] = pairwise_grad(d[result], other < input, input == other, other)


@adjoint(torch.sort, torch.Tensor.sort)
def sort(result, input, dim=-1, descending=False, stable=False):
    """(values, indices): each value's gradient goes back to the position it came from."""
    d[input] = scatter_grad(d[result][0], input, result[1], dim)


@adjoint(torch.topk, torch.Tensor.topk)
def topk(result, input, k, dim=-1, largest=True, sorted=True):
    """(values, indices): each value's gradient goes back to the position it came from."""
    d[input] = scatter_grad(d[result][0], input, result[1], dim)


@adjoint(torch.trace, torch.Tensor.trace)
def trace(result, input):
    """tr(A) = sum_i A_ii:  dA = dtr * I"""
    d[input] = d[result] * torch.eye(input.shape[0], input.shape[1], dtype=input.dtype,
                                     device=input.device)


# ==========================================================================================
# Linear algebra
# ==========================================================================================


@adjoint(torch.det, torch.Tensor.det)
def det(result, input):
    """Jacobi's formula: d det(A) / dA = det(A) A^{-T}  (A invertible)."""
    d[input] = (d[result] * result)[..., None, None] * torch.linalg.inv(input).mT


@adjoint(torch.linalg.det)
def linalg_det(result, A):
    """Jacobi's formula: d det(A) / dA = det(A) A^{-T}  (A invertible)."""
    d[A] = (d[result] * result)[..., None, None] * torch.linalg.inv(A).mT


@adjoint(torch.logdet, torch.Tensor.logdet)
def logdet(result, input):
    """d log det(A) / dA = A^{-T}"""
    d[input] = d[result][..., None, None] * torch.linalg.inv(input).mT


@adjoint(torch.inverse, torch.Tensor.inverse)
def inverse(result, input):
    """B = A^{-1}:  dA = -B^T dB B^T"""
    d[input] = -result.mT @ d[result] @ result.mT


@adjoint(torch.linalg.inv)
def linalg_inv(result, A):
    """B = A^{-1}:  dA = -B^T dB B^T"""
    d[A] = -result.mT @ d[result] @ result.mT


# ==========================================================================================
# Indexing
# ==========================================================================================


@adjoint(operator.getitem, torch.Tensor.__getitem__)
def getitem(result, input, index):
    """x[index]: the gradient goes back to the positions read (an advanced index that reads a
    position twice adds both); for a list, tuple or dict, to the selected element(s)."""
    d[input] = getitem_grad(d[result], input, index)


@adjoint(torch.select, torch.Tensor.select)
def select(result, input, dim, index):
    d[input] = torch.select_scatter(torch.zeros_like(input), d[result], dim, index)


@adjoint(torch.narrow, torch.Tensor.narrow)
def narrow(result, input, dim, start, length):
    gx = torch.zeros_like(input)
    d[input] = torch.slice_scatter(gx, d[result], dim, start, start + length)


@adjoint(torch.index_select, torch.Tensor.index_select)
def index_select(result, input, dim, index):
    """Rows read several times add up."""
    d[input] = torch.zeros_like(input).index_add(dim, index, d[result])


@adjoint(torch.gather, torch.Tensor.gather)
def gather(result, input, dim, index, sparse_grad=False):
    """Positions read several times add up."""
    d[input] = torch.zeros_like(input).scatter_add(dim, index, d[result])


@adjoint(torch.masked_select, torch.Tensor.masked_select)
def masked_select(result, input, mask):
    d[input] = masked_select_grad(d[result], input, mask)


@adjoint(torch.diagonal, torch.Tensor.diagonal)
def diagonal(result, input, offset=0, dim1=0, dim2=1):
    gx = torch.zeros_like(input)
    d[input] = torch.diagonal_scatter(gx, d[result], offset, dim1, dim2)


@adjoint(torch.tril, torch.Tensor.tril)
def tril(result, input, diagonal=0):
    d[input] = d[result].tril(diagonal)


@adjoint(torch.triu, torch.Tensor.triu)
def triu(result, input, diagonal=0):
    d[input] = d[result].triu(diagonal)


# ==========================================================================================
# Joining and splitting
# ==========================================================================================


@adjoint(torch.cat, torch.concat)
def cat(result, tensors, dim=0):
    """Each input gets its own slice of the gradient."""
    d[tensors] = list(d[result].split(split_sizes(tensors, dim), dim))


@adjoint(torch.concatenate)
def concatenate(result, tensors, axis=0):
    d[tensors] = list(d[result].split(split_sizes(tensors, axis), axis))


@adjoint(torch.stack)
def stack(result, tensors, dim=0):
    d[tensors] = list(d[result].unbind(dim))


@adjoint(torch.split)
def split(result, tensor, split_size_or_sections, dim=0):
    """The pieces' gradients are concatenated back (zeros for pieces that got none)."""
    d[tensor] = cat_grads(d[result], result, dim)


@adjoint(torch.Tensor.split)
def split_method(result, input, split_size, dim=0):
    d[input] = cat_grads(d[result], result, dim)


@adjoint(torch.chunk, torch.Tensor.chunk)
def chunk(result, input, chunks, dim=0):
    d[input] = cat_grads(d[result], result, dim)


@adjoint(torch.tensor_split, torch.Tensor.tensor_split)
def tensor_split(result, input, indices_or_sections, dim=0):
    d[input] = cat_grads(d[result], result, dim)


@adjoint(torch.unbind, torch.Tensor.unbind)
def unbind(result, input, dim=0):
    d[input] = stack_grads(d[result], result, dim)


# ==========================================================================================
# Shapes: the gradient takes the input's shape back
# ==========================================================================================


@adjoint(torch.reshape)
def reshape(result, input, shape):
    """Ops that only rearrange the shape: the gradient is reshaped back (also below)."""
    d[input] = d[result].reshape(input.shape)


@adjoint(torch.Tensor.reshape, torch.Tensor.view)
def reshape_method(result, input, *shape):
    """x.view(2, 3) or x.view((2, 3))"""
    d[input] = d[result].reshape(input.shape)


@adjoint(torch.Tensor.reshape_as, torch.Tensor.view_as)
def reshape_as(result, input, other):
    d[input] = d[result].reshape(input.shape)


@adjoint(torch.flatten, torch.Tensor.flatten)
def flatten(result, input, start_dim=0, end_dim=-1):
    d[input] = d[result].reshape(input.shape)


@adjoint(torch.unflatten, torch.Tensor.unflatten)
def unflatten(result, input, dim, sizes):
    d[input] = d[result].reshape(input.shape)


@adjoint(torch.squeeze, torch.Tensor.squeeze)
def squeeze(result, input, dim=None):
    d[input] = d[result].reshape(input.shape)


@adjoint(torch.unsqueeze, torch.Tensor.unsqueeze)
def unsqueeze(result, input, dim):
    d[input] = d[result].reshape(input.shape)


@adjoint(torch.clone, torch.Tensor.clone, torch.Tensor.contiguous)
def clone(result, input, memory_format=None):
    d[input] = d[result]


@adjoint(
    torch.transpose,
    torch.Tensor.transpose,
    torch.swapaxes,
    torch.Tensor.swapaxes,
    torch.swapdims,
    torch.Tensor.swapdims,
)
def transpose(result, input, dim0, dim1):
    d[input] = d[result].transpose(dim0, dim1)


@adjoint(torch.t, torch.Tensor.t)
def t(result, input):
    d[input] = d[result].t()


@adjoint(".T")
def T(result, input):
    """x.T reverses all dims; reversing again undoes it."""
    d[input] = d[result].permute(reversed_dims(input))


@adjoint(".mT")
def mT(result, input):
    d[input] = d[result].mT


@adjoint(".H")
def H(result, input):
    d[input] = d[result].conj().permute(reversed_dims(input))


@adjoint(".mH")
def mH(result, input):
    d[input] = d[result].mH


@adjoint(".values")
def values(result, input):
    """The ``values`` field of a (values, indices) result: max(x, dim), sort, topk, ..."""
    d[input] = seq_adjoint(input, 0, d[result])


@adjoint(torch.permute)
def permute(result, input, dims):
    d[input] = d[result].permute(inverse_permutation(dims))


@adjoint(torch.Tensor.permute)
def permute_method(result, input, *dims):
    """x.permute(2, 0, 1) or x.permute((2, 0, 1))"""
    d[input] = d[result].permute(inverse_permutation(shape_arg(dims)))


@adjoint(torch.movedim, torch.Tensor.movedim, torch.moveaxis, torch.Tensor.moveaxis)
def movedim(result, input, source, destination):
    d[input] = d[result].movedim(destination, source)


@adjoint(torch.Tensor.expand)
def expand(result, input, *sizes):
    """Broadcasting copies: the gradient sums over the copies (same for the two below)."""
    d[input] = unbroadcast(d[result], input)


@adjoint(torch.Tensor.expand_as)
def expand_as(result, input, other):
    d[input] = unbroadcast(d[result], input)


@adjoint(torch.broadcast_to, torch.Tensor.broadcast_to)
def broadcast_to(result, input, size):
    d[input] = unbroadcast(d[result], input)


@adjoint(torch.Tensor.repeat)
def repeat(result, input, *repeats):
    """Tiled copies: the gradient sums over the copies."""
    d[input] = repeat_grad(d[result], input, shape_arg(repeats))


@adjoint(torch.tile, torch.Tensor.tile)
def tile(result, input, dims):
    d[input] = repeat_grad(d[result], input, dims)


@adjoint(torch.flip)
def flip(result, input, dims):
    d[input] = d[result].flip(dims)


@adjoint(torch.Tensor.flip)
def flip_method(result, input, *dims):
    d[input] = d[result].flip(shape_arg(dims))


@adjoint(torch.roll, torch.Tensor.roll)
def roll(result, input, shifts, dims=None):
    d[input] = roll_grad(d[result], shifts, dims)


# ==========================================================================================
# Casts and moves: the gradient goes back to the input's dtype and device
# ==========================================================================================


@adjoint(
    torch.Tensor.to,
    torch.Tensor.float,
    torch.Tensor.double,
    torch.Tensor.half,
    torch.Tensor.bfloat16,
    torch.Tensor.cpu,
    torch.Tensor.cuda,
)
def to(result, input, *args, **kwargs):
    """x.to(dtype / device), x.float(), x.cpu(), ..."""
    d[input] = like(d[result], input)


@adjoint(torch.Tensor.type_as)
def type_as(result, input, other):
    d[input] = like(d[result], input)


# ==========================================================================================
# Builtins that pick one of their arguments
# ==========================================================================================


@adjoint(builtins.max, builtins.min)
def builtin_max(result, *args, key=None, default=None):
    """max(a, b, ...) and max(iterable) return one of the elements (the first of equal ones):
    that element gets the whole gradient."""
    d[args] = picked_grad(d[result], result, args)


# ==========================================================================================
# No gradient
# ==========================================================================================

_nondiff = nondifferentiable(
    # comparisons and logic
    operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne,
    operator.not_, operator.and_, operator.or_, operator.xor, operator.invert,
    operator.floordiv, operator.is_, operator.is_not, operator.contains, operator.truth,
    torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne, torch.equal,
    torch.less, torch.less_equal, torch.greater, torch.greater_equal, torch.not_equal,
    torch.Tensor.lt, torch.Tensor.le, torch.Tensor.gt, torch.Tensor.ge, torch.Tensor.eq,
    torch.Tensor.ne, torch.Tensor.equal, torch.isclose, torch.allclose, torch.Tensor.allclose,
    torch.logical_and, torch.logical_or, torch.logical_not, torch.logical_xor,
    torch.Tensor.logical_and, torch.Tensor.logical_or, torch.Tensor.logical_not,
    torch.all, torch.any, torch.Tensor.all, torch.Tensor.any,
    torch.isnan, torch.isinf, torch.isfinite, torch.isneginf, torch.isposinf,
    torch.Tensor.isnan, torch.Tensor.isinf, torch.Tensor.isfinite,
    # piecewise-constant functions (their gradient is zero wherever it exists)
    torch.sign, torch.sgn, torch.Tensor.sign, torch.Tensor.sgn, torch.signbit,
    torch.floor, torch.ceil, torch.round, torch.trunc, torch.fix, torch.floor_divide,
    torch.Tensor.floor, torch.Tensor.ceil, torch.Tensor.round, torch.Tensor.trunc,
    torch.Tensor.floor_divide,
    # indices and counts
    torch.argmax, torch.argmin, torch.argsort, torch.Tensor.argmax, torch.Tensor.argmin,
    torch.Tensor.argsort, torch.nonzero, torch.Tensor.nonzero, torch.count_nonzero,
    torch.bucketize, torch.searchsorted, torch.unique, torch.bincount, torch.histc,
    F.one_hot,
    # constructors and random numbers
    torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.arange, torch.linspace,
    torch.logspace, torch.tensor, torch.as_tensor, torch.from_numpy,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.bernoulli, torch.multinomial, torch.poisson,
    torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
    torch.Tensor.new_empty, torch.Tensor.new_tensor,
    # metadata and conversions out of the graph
    torch.Tensor.detach, torch.detach, torch.Tensor.numel, torch.numel, torch.Tensor.size,
    torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.item, torch.Tensor.tolist,
    torch.Tensor.numpy, torch.Tensor.long, torch.Tensor.int, torch.Tensor.bool,
    torch.Tensor.short, torch.Tensor.byte, torch.Tensor.char, torch.Tensor.is_floating_point,
    torch.is_tensor, torch.is_floating_point, torch.Tensor.stride,
    torch.Tensor.data_ptr, torch.Tensor.element_size,
    ".shape", ".dtype", ".device", ".ndim", ".data", ".requires_grad", ".is_cuda", ".layout",
    ".indices",
    # Python builtins
    len, range, int, float, bool, isinstance, print, type, str, repr, hash, id,
)  # fmt: skip
