"""Tangent templates of the helpers that generated backward code calls (``helpers.py``,
``propgen.runtime``), so that forward mode reads propgen's own generated code as readable
source (forward over reverse: Hessian-vector products) instead of going through
``torch.func.jvp``.

Most helpers are linear in the gradient they carry (``g``) and read their other arguments
only for a shape, a dtype or a piecewise-constant mask: their tangent is the helper applied
to ``t[g]``.  A helper that also depends smoothly on another tensor argument gets one more
term for it: the helper itself again where it is linear in that argument too (matmul's
gradients, the result in ``pow_grad_exponent``), else ``<helper>_d<arg>(..., t[arg])``, the
derivative in that argument alone, the others held fixed, written out below the templates.
The compiler drops the terms of arguments that do not vary.

Arguments that are only shape references (a ``runtime.TensorMeta``, a Python number, None)
never have their tangent read.  An argument that reaches the backward through its saved
values may turn out at run time to have no tangent (a None weight, an integer exponent): the
``_d<arg>`` functions then return zeros.  Helpers with a parameter named ``result`` (the op's
result, passed back in) name their own result ``out``.
"""

from __future__ import annotations

import math

import torch
from propgen.templates import helpers
from propgen.templates.helpers import (
    _class_weight,
    _expand_class,
    _onehot,
    _per_sample_scale,
    cat_grads,
    class_dim_grad,
    cross_entropy_grad,
    cross_entropy_target_grad,
    cumprod_grad,
    embedding_grad,
    expand_like,
    expand_reduced,
    getitem_grad,
    kl_div_target_grad,
    like,
    linalg_norm_grad,
    loss_scale,
    loss_weight_grad,
    masked_select_grad,
    matmul_grad_input,
    matmul_grad_other,
    minmax_grad,
    nll_loss_grad,
    norm_grad,
    pairwise_grad,
    picked_grad,
    pow_grad_base,
    pow_grad_exponent,
    prod_others,
    relu_backward,
    repeat_grad,
    reverse_cumsum,
    roll_grad,
    scatter_grad,
    sigmoid_backward,
    split_ties,
    stack_grads,
    tanh_backward,
    unbroadcast,
    unbroadcast_each,
    vector_norm_grad,
)

from propgen import runtime, runtime_forward
from propgen.runtime import (
    acc,
    grad_or_zeros,
    pop_adjoint,
    seq_adjoint,
    store_grad_buffer,
    store_grad_value,
    unpack_adjoint,
    unpop_adjoint,
)
from propgen.runtime_forward import tangent_or_zeros
from propgen.template import nondifferentiable

# What generated code keeps of a tensor only for its shape, and the seed of a backward pass.
_constant = nondifferentiable(runtime.meta, runtime_forward.ones_seed)

# Helpers that compute shapes, dims, modes and boolean masks: nothing to differentiate.
_bookkeeping = nondifferentiable(
    helpers.clamp_pass, helpers.clamp_min_wins, helpers.clamp_max_wins, helpers.reduced_dims,
    helpers.reversed_dims, helpers.shape_arg, helpers.split_sizes, helpers.inverse_permutation,
    helpers.var_dim, helpers.var_correction, helpers.implicit_softmax_dim,
    helpers.reduction_mode, helpers.normalized_dims,
)

from propgen.template import t, tangent  # noqa: E402


@tangent(list)
def list_(result, iterable=()):
    """A copy of a list (the backward's own copy of the forward's stack)."""
    t[result] = list(t[iterable])


@tangent(tuple)
def tuple_(result, iterable=()):
    t[result] = tuple(t[iterable])


# ==========================================================================================
# Gradient accumulation and container adjoints (propgen.runtime)
# ==========================================================================================


@tangent(runtime.acc)
def acc_tangent(result, a, b):
    """a + b with None for zero: a None gradient has a None tangent, so the same sum of the
    tangents is right whichever side is None."""
    t[result] = acc(t[a], t[b])


@tangent(runtime.acc_into)
def acc_into_tangent(result, a, fresh):
    """The sum written into ``fresh``: its tangent is the sum of the tangents, made out of
    place (the tangent of a fresh gradient may be another value's tangent)."""
    t[result] = acc(t[a], t[fresh])


@tangent(runtime.grad_or_zeros)
def grad_or_zeros_tangent(result, g, x):
    """The returned gradient: summed to x's shape (linear), zeros when none arrived."""
    t[result] = grad_or_zeros(t[g], x)


@tangent(runtime.seq_adjoint)
def seq_adjoint_tangent(result, seq, index, g):
    t[result] = seq_adjoint(seq, index, t[g])


@tangent(runtime.unpack_adjoint)
def unpack_adjoint_tangent(result, d_seq, index):
    """An element of a container adjoint (zeros where the container's tangent holds None
    for an element that is a gradient)."""
    t[result] = tangent_or_zeros(unpack_adjoint(t[d_seq], index), result)


@tangent(runtime.store_grad_value)
def store_grad_value_tangent(result, d_buffer, index, value):
    t[result] = tangent_or_zeros(store_grad_value(t[d_buffer], index, value), result)


@tangent(runtime.store_grad_buffer)
def store_grad_buffer_tangent(result, d_buffer, index):
    t[result] = store_grad_buffer(t[d_buffer], index)


@tangent(runtime.pop_adjoint)
def pop_adjoint_tangent(result, d_items, count=None):
    t[result] = pop_adjoint(t[d_items], count)


@tangent(runtime.unpop_adjoint)
def unpop_adjoint_tangent(result, d_items, items, d_value):
    """Linear in the two adjoints; items only gives the length."""
    t[result] = unpop_adjoint(t[d_items], items, t[d_value])


# ==========================================================================================
# Fused elementwise derivatives
# ==========================================================================================


@tangent(helpers.tanh_backward)
def tanh_backward_tangent(result, g, y):
    """g (1 - y^2)"""
    t[result] = tanh_backward(t[g], y) - 2 * g * y * t[y]


@tangent(helpers.sigmoid_backward)
def sigmoid_backward_tangent(result, g, y):
    """g y (1 - y)"""
    t[result] = sigmoid_backward(t[g], y) + g * (1 - 2 * y) * t[y]


@tangent(helpers.relu_backward)
def relu_backward_tangent(result, g, y):
    """g (y > 0): the mask is piecewise constant in y."""
    t[result] = relu_backward(t[g], y)


# ==========================================================================================
# Broadcasting, casts, shapes (linear in g; the other arguments give shapes)
# ==========================================================================================


@tangent(helpers.unbroadcast)
def unbroadcast_tangent(result, g, x):
    t[result] = unbroadcast(t[g], x)


@tangent(helpers.unbroadcast_each)
def unbroadcast_each_tangent(result, g, xs):
    t[result] = unbroadcast_each(t[g], xs)


@tangent(helpers.like)
def like_tangent(result, g, x):
    t[result] = like(t[g], x)


@tangent(helpers.expand_reduced)
def expand_reduced_tangent(result, g, x, dim=None, keepdim=False):
    t[result] = expand_reduced(t[g], x, dim, keepdim)


@tangent(helpers.expand_like)
def expand_like_tangent(out, tangent, result):
    t[out] = expand_like(t[tangent], result)


@tangent(helpers.reverse_cumsum)
def reverse_cumsum_tangent(result, g, dim):
    t[result] = reverse_cumsum(t[g], dim)


@tangent(helpers.repeat_grad)
def repeat_grad_tangent(result, g, x, repeats):
    t[result] = repeat_grad(t[g], x, repeats)


@tangent(helpers.roll_grad)
def roll_grad_tangent(result, g, shifts, dims):
    t[result] = roll_grad(t[g], shifts, dims)


# ==========================================================================================
# Selections: max / min, sort, indexing, joining (linear in g; masks and indices are
# piecewise constant)
# ==========================================================================================


@tangent(helpers.split_ties)
def split_ties_tangent(out, g, x, result, dim, keepdim):
    t[out] = split_ties(t[g], x, result, dim, keepdim)


@tangent(helpers.pairwise_grad)
def pairwise_grad_tangent(result, g, wins, ties, x):
    t[result] = pairwise_grad(t[g], wins, ties, x)


@tangent(helpers.minmax_grad)
def minmax_grad_tangent(out, g, result, input, dim, keepdim, other, largest):
    t[out] = minmax_grad(t[g], result, input, dim, keepdim, other, largest)


@tangent(helpers.scatter_grad)
def scatter_grad_tangent(result, g, x, indices, dim):
    t[result] = scatter_grad(t[g], x, indices, dim)


@tangent(helpers.picked_grad)
def picked_grad_tangent(out, g, result, args):
    t[out] = picked_grad(t[g], result, args)


@tangent(helpers.getitem_grad)
def getitem_grad_tangent(result, g, x, index):
    t[result] = getitem_grad(t[g], x, index)


@tangent(helpers.masked_select_grad)
def masked_select_grad_tangent(result, g, x, mask):
    t[result] = masked_select_grad(t[g], x, mask)


@tangent(helpers.cat_grads)
def cat_grads_tangent(result, grads, outputs, dim):
    t[result] = cat_grads(t[grads], outputs, dim)


@tangent(helpers.stack_grads)
def stack_grads_tangent(result, grads, outputs, dim):
    t[result] = stack_grads(t[grads], outputs, dim)


@tangent(helpers.embedding_grad)
def embedding_grad_tangent(result, g, input, weight, padding_idx, scale_grad_by_freq):
    t[result] = embedding_grad(t[g], input, weight, padding_idx, scale_grad_by_freq)


# ==========================================================================================
# Products, matmul, pow
# ==========================================================================================


@tangent(helpers.prod_others)
def prod_others_tangent(result, x, dim):
    """prod_{j != i} x_j:  sum_{j != i} t[x]_j prod_{k != i, j} x_k"""
    t[result] = prod_others_dx(x, dim, t[x])


@tangent(helpers.cumprod_grad)
def cumprod_grad_tangent(out, g, x, result, dim):
    t[out] = cumprod_grad(t[g], x, result, dim) + cumprod_grad_dx(g, x, result, dim, t[x]) \
        + cumprod_grad_dresult(g, x, result, dim, t[result])


@tangent(helpers.matmul_grad_input)
def matmul_grad_input_tangent(result, g, input, other):
    """g @ other^T: bilinear in (g, other); input only gives the shape."""
    t[result] = matmul_grad_input(t[g], input, other) + matmul_grad_input(g, input, t[other])


@tangent(helpers.matmul_grad_other)
def matmul_grad_other_tangent(result, g, input, other):
    """input^T @ g: bilinear in (input, g); other only gives the shape."""
    t[result] = matmul_grad_other(t[g], input, other) + matmul_grad_other(g, t[input], other)


@tangent(helpers.pow_grad_base)
def pow_grad_base_tangent(result, g, input, exponent):
    """g p x^(p-1), summed to x's shape:  d/dx = p (p-1) x^(p-2),
    d/dp = x^(p-1) + p x^(p-1) log x  (torch's zeros where p = 0 or x = 0)."""
    t[result] = pow_grad_base(t[g], input, exponent) \
        + pow_grad_base_dinput(g, input, exponent, t[input]) \
        + pow_grad_base_dexponent(g, input, exponent, t[exponent])


@tangent(helpers.pow_grad_exponent)
def pow_grad_exponent_tangent(out, g, result, input, exponent):
    """g x^p log x, summed to p's shape, with the result x^p passed in: linear in g and in
    the result;  d/dx (result held) = result / x."""
    t[out] = pow_grad_exponent(t[g], result, input, exponent) \
        + pow_grad_exponent(g, t[result], input, exponent) \
        + pow_grad_exponent_dinput(g, result, input, exponent, t[input])


# ==========================================================================================
# Norms
# ==========================================================================================


@tangent(helpers.vector_norm_grad)
def vector_norm_grad_tangent(out, g, x, result, ord, dim, keepdim):
    t[out] = vector_norm_grad(t[g], x, result, ord, dim, keepdim) \
        + vector_norm_grad_dx(g, x, result, ord, dim, keepdim, t[x]) \
        + vector_norm_grad_dnorm(g, x, result, ord, dim, keepdim, t[result])


@tangent(helpers.norm_grad)
def norm_grad_tangent(out, g, x, result, p, dim, keepdim):
    t[out] = norm_grad(t[g], x, result, p, dim, keepdim) \
        + vector_norm_grad_dx(g, x, result, norm_ord(p), dim, keepdim, t[x]) \
        + vector_norm_grad_dnorm(g, x, result, norm_ord(p), dim, keepdim, t[result])


@tangent(helpers.linalg_norm_grad)
def linalg_norm_grad_tangent(out, g, x, result, ord, dim, keepdim):
    t[out] = linalg_norm_grad(t[g], x, result, ord, dim, keepdim) \
        + vector_norm_grad_dx(g, x, result, norm_ord(ord), dim, keepdim, t[x]) \
        + vector_norm_grad_dnorm(g, x, result, norm_ord(ord), dim, keepdim, t[result])


# ==========================================================================================
# nn.functional: activations and losses
# ==========================================================================================


@tangent(helpers.gelu_slope)
def gelu_slope_tangent(result, x, approximate):
    t[result] = gelu_curvature(x, approximate) * t[x]


@tangent(helpers.or_one)
def or_one_tangent(result, weight):
    """weight, or the constant 1 (whose tangent is 0)."""
    t[result] = tangent_or_zeros(t[weight], result)


@tangent(helpers.loss_scale)
def loss_scale_tangent(result, g, elementwise, reduction, weight, mean_over_weights):
    """Linear in g; elementwise only gives the shape; the weight multiplies (and, for a
    mean over weights, divides)."""
    t[result] = loss_scale(t[g], elementwise, reduction, weight, mean_over_weights) \
        + loss_scale_dweight(g, elementwise, reduction, weight, mean_over_weights, t[weight])


@tangent(helpers.loss_weight_grad)
def loss_weight_grad_tangent(out, g, result, elementwise, weight, reduction,
                             mean_over_weights):
    """Linear in g, and jointly linear in (result, elementwise): g (e - result) / sum(w)
    or (gradient reaching each element) * e."""
    t[out] = loss_weight_grad(t[g], result, elementwise, weight, reduction, mean_over_weights) \
        + loss_weight_grad(g, t[result], t[elementwise], weight, reduction, mean_over_weights) \
        + loss_weight_grad_dweight(g, result, elementwise, weight, reduction, mean_over_weights,
                                   t[weight])


@tangent(helpers.kl_div_target_grad)
def kl_div_target_grad_tangent(result, per, input, target, log_target):
    t[result] = kl_div_target_grad(t[per], input, target, log_target) \
        + kl_div_target_grad_dinput(per, target, log_target) * t[input] \
        + kl_div_target_grad_dtarget(per, input, target, log_target) * t[target]


@tangent(helpers.nll_loss_grad)
def nll_loss_grad_tangent(result, g, input, target, weight, ignore_index, reduction):
    """Linear in g; input only gives the shape; class weights multiply (and divide, for
    'mean')."""
    t[result] = nll_loss_grad(t[g], input, target, weight, ignore_index, reduction) \
        + nll_loss_grad_dweight(g, input, target, weight, ignore_index, reduction, t[weight])


@tangent(helpers.cross_entropy_grad)
def cross_entropy_grad_tangent(result, g, input, target, weight, ignore_index, reduction,
                               label_smoothing):
    """Linear in g; the logits enter through the softmax of the pullback through
    log_softmax; probability targets and class weights enter linearly."""
    t[result] = cross_entropy_grad(t[g], input, target, weight, ignore_index, reduction,
                                   label_smoothing) \
        + cross_entropy_grad_dinput(g, input, target, weight, ignore_index, reduction,
                                    label_smoothing, t[input]) \
        + cross_entropy_grad_dtarget(g, input, target, weight, reduction, label_smoothing,
                                     t[target]) \
        + cross_entropy_grad_dweight(g, input, target, weight, ignore_index, reduction,
                                     label_smoothing, t[weight])


@tangent(helpers.cross_entropy_target_grad)
def cross_entropy_target_grad_tangent(result, g, input, target, weight, reduction,
                                      label_smoothing):
    """-(1 - eps) w logp * g: linear in g and in the class weights; logp = log_softmax."""
    t[result] = cross_entropy_target_grad(t[g], input, target, weight, reduction,
                                          label_smoothing) \
        + cross_entropy_target_grad_dinput(g, input, weight, reduction, label_smoothing,
                                           t[input]) \
        + cross_entropy_target_grad_dweight(g, input, target, weight, reduction,
                                            label_smoothing, t[weight])


# ==========================================================================================
# The derivatives the templates above call: each is the derivative of one helper in one
# argument (the others held fixed) applied to that argument's tangent.
# ==========================================================================================


def prod_others_dx(x: torch.Tensor, dim, t_x: torch.Tensor) -> torch.Tensor:
    """Tangent of ``prod_others(x, dim)``: ``sum_{j != i} t_j prod_{k != i, j} x_k``.

    Without zeros that is ``prod_others(x) * (sum_j t_j / x_j - t_i / x_i)``; with zeros each
    position's product is differentiated on its own (quadratic in the length of ``dim``).
    """
    if dim is None or x.dim() == 0:
        return prod_others_dx(x.reshape(-1), 0, t_x.reshape(-1)).reshape(x.shape)
    if bool((x != 0).all()):
        ratio = t_x / x
        return prod_others(x, dim) * (ratio.sum(dim, keepdim=True) - ratio)
    xs, ts = x.movedim(dim, -1), t_x.movedim(dim, -1)
    left_out = torch.eye(xs.shape[-1], dtype=torch.bool, device=x.device)
    rows = torch.where(left_out, 1.0, xs.unsqueeze(-2))  # row i: x with x_i replaced by 1
    t_rows = torch.where(left_out, 0.0, ts.unsqueeze(-2))
    return (t_rows * prod_others(rows, -1)).sum(-1).movedim(-1, dim)


def cumprod_tangent(z: torch.Tensor, t_z: torch.Tensor, dim: int) -> torch.Tensor:
    """Tangent of ``cumprod(z, dim)``, exact with zeros: ``c_i = c_{i-1} z_i`` gives
    ``t_c_i = t_c_{i-1} z_i + c_{i-1} t_z_i``."""
    c = z.cumprod(dim)
    out = [t_z.select(dim, 0)]
    for i in range(1, z.shape[dim]):
        out.append(out[-1] * z.select(dim, i) + c.select(dim, i - 1) * t_z.select(dim, i))
    return torch.stack(out, dim)


def cumprod_grad_dx(g, x, result, dim, t_x):
    """Derivative of ``cumprod_grad(g, x, result, dim)`` in x (result held fixed).

    Without zeros cumprod_grad is ``reverse_cumsum(g * result) / x``; with zeros it is
    ``sum_{j >= i} g_j P[i, j]`` with ``P[i] = cumprod(x with x_i replaced by 1)``.
    """
    if x.dim() == 0:
        return torch.zeros_like(x)
    if bool((x != 0).all()):
        return -cumprod_grad(g, x, result, dim) * t_x / x
    xs, ts = x.movedim(dim, -1), t_x.movedim(dim, -1)
    n = xs.shape[-1]
    left_out = torch.eye(n, dtype=torch.bool, device=x.device)
    rows = torch.where(left_out, 1.0, xs.unsqueeze(-2))
    t_rows = torch.where(left_out, 0.0, ts.unsqueeze(-2))
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu()  # j >= i
    t_terms = cumprod_tangent(rows, t_rows, -1) * upper * g.movedim(dim, -1).unsqueeze(-2)
    return t_terms.sum(-1).movedim(-1, dim)


def cumprod_grad_dresult(g, x, result, dim, t_result):
    """Derivative of ``cumprod_grad(g, x, result, dim)`` in result: only the formula without
    zeros, ``reverse_cumsum(g * result) / x``, reads it."""
    if x.dim() == 0 or not bool((x != 0).all()):
        return torch.zeros_like(x)
    return reverse_cumsum(g * t_result, dim) / x


def pow_grad_base_dinput(g, input, exponent, t_input):
    """Derivative of ``pow_grad_base`` in x: ``g p (p-1) x^(p-2) t_x``, summed to x's shape
    (torch's zero gradient where p = 0 has zero derivative, and so has x^0 where p = 1)."""
    if not isinstance(exponent, torch.Tensor):
        if exponent in (0, 1):
            return torch.zeros_like(input)
        return unbroadcast(g * exponent * (exponent - 1) * input ** (exponent - 2) * t_input,
                           input)
    curvature = exponent * (exponent - 1) * input ** (exponent - 2)
    curvature = torch.where((exponent == 0) | (exponent == 1), 0.0, curvature)
    return unbroadcast(g * curvature * t_input, input)


def pow_grad_base_dexponent(g, input, exponent, t_exponent):
    """Derivative of ``pow_grad_base`` in p: ``g x^(p-1) (1 + p log x) t_p``, summed to x's
    shape, with torch's zero for the log term where x = 0 and p - 1 >= 0, and 0 where
    x = p = 0 (where x^p jumps).

    At p = 0 and x != 0 this is 1 / x: torch's zero gradient "where p == 0" only matters at
    x = 0, so it is not differentiated in p here (autograd's double backward does, which
    makes its Hessian asymmetric there)."""
    if t_exponent is None:  # an integer exponent
        return torch.zeros_like(input)
    power = input ** (exponent - 1)
    log_term = torch.where((input == 0) & (exponent - 1 >= 0), 0.0, power * torch.log(input))
    slope = torch.where((exponent == 0) & (input == 0), 0.0, power + exponent * log_term)
    return unbroadcast(g * slope * t_exponent, input)


def pow_grad_exponent_dinput(g, result, input, exponent, t_input):
    """Derivative of ``pow_grad_exponent`` (``g result log x``) in x, the result held fixed:
    ``g result / x t_x`` (0 where x = 0 and p >= 0, like the gradient itself), summed to p's
    shape."""
    if t_input is None:  # a number base does not vary
        return torch.zeros_like(exponent)
    slope = torch.where((input == 0) & (exponent >= 0), 0.0, result / input)
    return unbroadcast(g * slope * t_input, exponent)


def norm_ord(p):
    """The vector-norm order that norm_grad / linalg_norm_grad compute with."""
    return 2 if p is None or p == "fro" else p


def vector_norm_grad_dx(g, x, result, ord, dim, keepdim, t_x):
    """Derivative of ``vector_norm_grad`` in x, the norm held fixed:
    ``t_x / n`` for ord 2, ``(ord-1) |x|^(ord-2) / n^(ord-1) t_x`` in general, zero for the
    orders whose gradient is piecewise constant (0, 1, inf)."""
    if ord in (0, 1) or math.isinf(ord):
        return torch.zeros_like(x)
    g = expand_reduced(g, x, dim, keepdim)
    norm = expand_reduced(result, x, dim, keepdim)
    if ord == 2:
        slope = t_x / norm
    else:
        slope = (ord - 1) * (x.abs() / norm) ** (ord - 2) / norm * t_x
    return g * torch.where(norm == 0, 0.0, slope)


def vector_norm_grad_dnorm(g, x, result, ord, dim, keepdim, t_result):
    """Derivative of ``vector_norm_grad`` in the norm n, x held fixed: the gradient is
    proportional to ``n^(1-ord)``, so its derivative is ``(1-ord) gradient / n``."""
    if ord in (0, 1) or math.isinf(ord):
        return torch.zeros_like(x)
    norm = expand_reduced(result, x, dim, keepdim)
    t_norm = expand_reduced(t_result, x, dim, keepdim)
    grad = vector_norm_grad(g, x, result, ord, dim, keepdim)
    return torch.where(norm == 0, 0.0, (1 - ord) * grad * t_norm / norm)


def gelu_curvature(x, approximate):
    """gelu's second derivative (the derivative of ``gelu_slope``).

    Exact: ``phi(x) (2 - x^2)``.  approximate='tanh', with ``u = k (x + c x^3)``,
    ``th = tanh u``: ``(1 - th^2) (u' + x (u'' - 2 th u'^2) / 2)``.
    """
    if approximate == "tanh":
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        th = torch.tanh(k * (x + c * x**3))
        du = k * (1 + 3 * c * x * x)
        d2u = 6 * c * k * x
        return (1 - th * th) * (du + 0.5 * x * (d2u - 2 * th * du * du))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return pdf * (2 - x * x)


def loss_scale_dweight(g, elementwise, reduction, weight, mean_over_weights, t_weight):
    """Derivative of ``loss_scale`` in the weight: linear in it, except for a mean over the
    weights, ``g w / sum(w)``."""
    if t_weight is None:  # weight is None
        return torch.zeros_like(elementwise)
    if reduction == "mean" and mean_over_weights:
        total = weight.sum()
        t_scale = g / total * (t_weight - weight * (t_weight.sum() / total))
        return t_scale.expand(elementwise.shape)
    return loss_scale(g, elementwise, reduction, t_weight, False)


def loss_weight_grad_dweight(g, result, elementwise, weight, reduction, mean_over_weights,
                             t_weight):
    """Derivative of ``loss_weight_grad`` in the weight: only the mean over weights,
    ``g (e - result) / sum(w)``, reads it."""
    if t_weight is not None and reduction == "mean" and mean_over_weights:
        grad = loss_weight_grad(g, result, elementwise, weight, reduction, mean_over_weights)
        return -grad * (t_weight.sum() / weight.sum())
    return torch.zeros_like(elementwise)


def kl_div_target_grad_dinput(per, target, log_target):
    """d/dx of kl_div_target_grad: ``-per e^t`` (log_target) or ``-per (t > 0)``."""
    if log_target:
        return -per * torch.exp(target)
    return -per * (target > 0)


def kl_div_target_grad_dtarget(per, input, target, log_target):
    """d/dt of kl_div_target_grad: ``per e^t (t - x + 2)`` (log_target) or ``per / t``
    (0 where t <= 0)."""
    if log_target:
        return per * torch.exp(target) * (target - input + 2)
    return per * torch.where(target > 0, 1 / target, 0.0)


def _kept_weight_sum(target, weight, ignore_index):
    """The sum of the kept samples' class weights: what a 'mean' reduction divides by."""
    keep = target != ignore_index
    return (weight[torch.where(keep, target, 0)] * keep).sum()


def nll_loss_grad_dweight(g, input, target, weight, ignore_index, reduction, t_weight):
    """Derivative of ``nll_loss_grad`` in the class weights: linear in them, divided by
    their sum over the kept samples for 'mean'."""
    if t_weight is None:  # no class weights
        return torch.zeros_like(input)
    if reduction != "mean":
        return nll_loss_grad(g, input, target, t_weight, ignore_index, reduction)
    total = _kept_weight_sum(target, weight, ignore_index)
    t_total = _kept_weight_sum(target, t_weight, ignore_index)
    return nll_loss_grad(g / total, input, target, t_weight, ignore_index, "sum") \
        - nll_loss_grad(g, input, target, weight, ignore_index, reduction) * (t_total / total)


def cross_entropy_logp_grad(g, input, target, weight, ignore_index, reduction,
                            label_smoothing):
    """The gradient of F.cross_entropy w.r.t. the log-probabilities, before
    ``cross_entropy_grad`` pulls it back through log_softmax (the same formulas)."""
    cdim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[cdim]
    cw = _class_weight(weight, input) if weight is not None else 1.0
    if target.is_floating_point():
        q = (1 - label_smoothing) * target + label_smoothing / n_classes
        per = g if reduction != "mean" else g / (input.numel() // n_classes)
        if reduction == "none":
            per = _expand_class(g, input)
        return -q * cw * per
    scale, w, safe = _per_sample_scale(g, target, weight, ignore_index, reduction)
    dlogp = -(1 - label_smoothing) * _onehot(safe, input) * _expand_class(w, input)
    dlogp = dlogp - (label_smoothing / n_classes) * cw
    return dlogp * _expand_class(scale, input)


def _softmax_tangent(input, t_input, cdim):
    p = input.softmax(cdim)
    return p * (t_input - (p * t_input).sum(cdim, keepdim=True))


def cross_entropy_grad_dinput(g, input, target, weight, ignore_index, reduction,
                              label_smoothing, t_input):
    """Derivative of ``cross_entropy_grad = D - softmax(x) sum_c D`` in the logits x (D, the
    gradient w.r.t. the log-probabilities, does not depend on them)."""
    cdim = 0 if input.dim() == 1 else 1
    dlogp = cross_entropy_logp_grad(g, input, target, weight, ignore_index, reduction,
                                    label_smoothing)
    return -_softmax_tangent(input, t_input, cdim) * dlogp.sum(cdim, keepdim=True)


def cross_entropy_grad_dtarget(g, input, target, weight, reduction, label_smoothing,
                               t_target):
    """Derivative of ``cross_entropy_grad`` in probability targets (class-index targets do
    not vary): ``-(1 - eps) t_target w per``, pulled back through log_softmax."""
    if t_target is None or not target.is_floating_point():
        return torch.zeros_like(input)
    cdim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[cdim]
    cw = _class_weight(weight, input) if weight is not None else 1.0
    per = g if reduction != "mean" else g / (input.numel() // n_classes)
    if reduction == "none":
        per = _expand_class(g, input)
    return class_dim_grad(-(1 - label_smoothing) * t_target * cw * per, input, True)


def cross_entropy_grad_dweight(g, input, target, weight, ignore_index, reduction,
                               label_smoothing, t_weight):
    """Derivative of ``cross_entropy_grad`` in the class weights: linear in them, divided
    by their sum over the kept samples for a 'mean' over class-index targets."""
    if t_weight is None:  # no class weights
        return torch.zeros_like(input)
    if reduction != "mean" or target.is_floating_point():
        return cross_entropy_grad(g, input, target, t_weight, ignore_index, reduction,
                                  label_smoothing)
    total = _kept_weight_sum(target, weight, ignore_index)
    t_total = _kept_weight_sum(target, t_weight, ignore_index)
    return cross_entropy_grad(g / total, input, target, t_weight, ignore_index, "sum",
                              label_smoothing) \
        - cross_entropy_grad(g, input, target, weight, ignore_index, reduction,
                             label_smoothing) * (t_total / total)


def cross_entropy_target_grad_dinput(g, input, weight, reduction, label_smoothing, t_input):
    """Derivative of ``cross_entropy_target_grad`` in the logits: logp's tangent is
    ``t_x - sum_c softmax(x)_c t_x,c``."""
    cdim = 0 if input.dim() == 1 else 1
    t_logp = t_input - (input.softmax(cdim) * t_input).sum(cdim, keepdim=True)
    cw = _class_weight(weight, input) if weight is not None else 1.0
    per = g if reduction != "mean" else g / (input.numel() // input.shape[cdim])
    if reduction == "none":
        per = _expand_class(g, input)
    return -(1 - label_smoothing) * cw * t_logp * per


def cross_entropy_target_grad_dweight(g, input, target, weight, reduction, label_smoothing,
                                      t_weight):
    """Derivative of ``cross_entropy_target_grad`` in the class weights: linear in them."""
    if t_weight is None:  # no class weights
        return torch.zeros_like(input)
    return cross_entropy_target_grad(g, input, target, t_weight, reduction, label_smoothing)
