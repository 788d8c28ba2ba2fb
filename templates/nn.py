"""Adjoint templates of ``torch.nn.functional`` ops (and the softmax family of torch).

Activations state their derivative directly; losses first find the gradient that reaches each
element of the unreduced loss (``loss_scale``, from the reduction and the optional weight)
and then apply the elementwise derivative.  Non-smooth points follow torch: relu'(0) = 0,
leaky_relu'(0) = negative_slope, elu'(0) = alpha, hardtanh passes no gradient at its bounds.
"""

from __future__ import annotations

import torch
from propgen.templates.helpers import (
    cross_entropy_grad,
    cross_entropy_target_grad,
    embedding_grad,
    gelu_slope,
    implicit_softmax_dim,
    kl_div_target_grad,
    like,
    loss_scale,
    loss_weight_grad,
    matmul_grad_input,
    matmul_grad_other,
    nll_loss_grad,
    normalized_dims,
    or_one,
    reduction_mode,
    unbroadcast,
    vector_norm_grad,
)

from propgen.template import adjoint, d

F = torch.nn.functional
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

# ==========================================================================================
# Activations
# ==========================================================================================


@adjoint(F.relu6)
def relu6(result, input, inplace=False):
    """Slope 1 strictly inside (0, 6), 0 at and beyond the bounds."""
    d[input] = d[result] * ((input > 0) & (input < 6))


@adjoint(F.hardtanh)
def hardtanh(result, input, min_val=-1.0, max_val=1.0, inplace=False):
    """Slope 1 strictly inside (min_val, max_val), 0 at and beyond the bounds (torch)."""
    d[input] = d[result] * ((input > min_val) & (input < max_val))


@adjoint(F.hardsigmoid)
def hardsigmoid(result, input, inplace=False):
    """hardsigmoid(x) = clamp(x / 6 + 1/2, 0, 1): slope 1/6 strictly inside (-3, 3)."""
    d[input] = d[result] * ((input > -3) & (input < 3)) / 6


@adjoint(F.leaky_relu)
def leaky_relu(result, input, negative_slope=0.01, inplace=False):
    """Slope 1 for x > 0, negative_slope for x <= 0."""
    d[input] = d[result] * torch.where(input > 0, 1.0, negative_slope)


@adjoint(F.elu)
def elu(result, input, alpha=1.0, inplace=False):
    """elu(x) = x for x > 0, alpha (e^x - 1) otherwise: slope alpha e^x for x <= 0."""
    d[input] = d[result] * torch.where(input > 0, 1.0, alpha * torch.exp(input))


@adjoint(F.selu)
def selu(result, input, inplace=False):
    """selu(x) = scale * elu(x, alpha) with fixed scale and alpha."""
    slope = torch.where(input > 0, 1.0, SELU_ALPHA * torch.exp(input))
    d[input] = d[result] * SELU_SCALE * slope


@adjoint(F.celu)
def celu(result, input, alpha=1.0, inplace=False):
    """celu(x) = x for x > 0, alpha (e^(x / alpha) - 1) otherwise."""
    d[input] = d[result] * torch.where(input > 0, 1.0, torch.exp(input / alpha))


@adjoint(F.gelu)
def gelu(result, input, approximate="none"):
    """gelu(x) = x Phi(x):  slope Phi(x) + x phi(x)  (see ``gelu_slope`` for the tanh form)."""
    d[input] = d[result] * gelu_slope(input, approximate)


@adjoint(F.silu)
def silu(result, input, inplace=False):
    """silu(x) = x s(x), s = sigmoid:  slope s (1 + x (1 - s))"""
    s = torch.sigmoid(input)
    d[input] = d[result] * s * (1 + input * (1 - s))


@adjoint(F.mish)
def mish(result, input, inplace=False):
    """mish(x) = x tanh(softplus(x)):  slope tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2)"""
    t = torch.tanh(F.softplus(input))
    d[input] = d[result] * (t + input * torch.sigmoid(input) * (1 - t * t))


@adjoint(F.softplus)
def softplus(result, input, beta=1.0, threshold=20.0):
    """softplus(x) = log(1 + e^(beta x)) / beta: slope sigmoid(beta x), and 1 where
    beta x > threshold (where softplus is the identity)."""
    slope = torch.where(input * beta > threshold, 1.0, torch.sigmoid(input * beta))
    d[input] = d[result] * slope


@adjoint(F.logsigmoid)
def logsigmoid(result, input):
    """log sigmoid(x)' = 1 - sigmoid(x) = sigmoid(-x)"""
    d[input] = d[result] * torch.sigmoid(-input)


@adjoint(F.softsign)
def softsign(result, input):
    """softsign(x) = x / (1 + |x|):  slope 1 / (1 + |x|)^2"""
    d[input] = d[result] / (1 + input.abs()) ** 2


# ==========================================================================================
# Softmax family
# ==========================================================================================


@adjoint(torch.softmax, torch.Tensor.softmax, torch.special.softmax)
def softmax(result, input, dim, dtype=None):
    """y = softmax(x):  dx = y * (dy - sum(dy * y, dim))"""
    g = d[result]
    d[input] = like(result * (g - (g * result).sum(dim, keepdim=True)), input)


@adjoint(F.softmax)
def softmax_f(result, input, dim=None, _stacklevel=3, dtype=None):
    """y = softmax(x):  dx = y * (dy - sum(dy * y, dim))"""
    g = d[result]
    axis = implicit_softmax_dim(dim, input.dim())
    d[input] = like(result * (g - (g * result).sum(axis, keepdim=True)), input)


@adjoint(torch.log_softmax, torch.Tensor.log_softmax, torch.special.log_softmax)
def log_softmax(result, input, dim, dtype=None):
    """y = log_softmax(x):  dx = dy - softmax(x) * sum(dy, dim)"""
    g = d[result]
    d[input] = like(g - torch.exp(result) * g.sum(dim, keepdim=True), input)


@adjoint(F.log_softmax)
def log_softmax_f(result, input, dim=None, _stacklevel=3, dtype=None):
    """y = log_softmax(x):  dx = dy - softmax(x) * sum(dy, dim)"""
    g = d[result]
    axis = implicit_softmax_dim(dim, input.dim())
    d[input] = like(g - torch.exp(result) * g.sum(axis, keepdim=True), input)


# ==========================================================================================
# Layers
# ==========================================================================================


@adjoint(F.linear)
def linear(result, input, weight, bias=None):
    """y = x W^T + b:  dx = dy W,  dW = dy^T x (summed over the batch),  db = sum of dy.

    torch also takes a 1-d weight w, one output whose dim y drops (and then no bias):
    y = x w,  dx = dy w^T,  dw = x^T dy.  ``weight.t()`` is W^T and leaves a 1-d w as it is
    (``.mT`` refuses one).  ``matmul_grad_other(g, a, W)`` is a^T g summed to W's shape:
    dW = dy^T x is (g, a) = (x, dy), dw = x^T dy is (dy, x).  The weight's gradient stays one
    matmul_grad_other call, the form TotalProp's per-sample contributions keep factored."""
    matrix = weight.dim() == 2
    d[input] = matmul_grad_input(d[result], input, weight.t())
    d[weight] = matmul_grad_other(input if matrix else d[result],
                                  d[result] if matrix else input, weight)
    d[bias] = unbroadcast(d[result], bias)


@adjoint(F.layer_norm)
def layer_norm(result, input, normalized_shape, weight=None, bias=None, eps=1e-05):
    """y = w * xhat + b with xhat = (x - mean) / sqrt(var + eps) over the normalized dims:
    with gh = dy * w,  dx = (gh - mean(gh) - xhat * mean(gh * xhat)) / sqrt(var + eps)."""
    dims = normalized_dims(input, normalized_shape)
    rstd = torch.rsqrt(input.var(dims, unbiased=False, keepdim=True) + eps)
    xhat = (input - input.mean(dims, keepdim=True)) * rstd
    gh = d[result] * or_one(weight)
    mean_gh = gh.mean(dims, keepdim=True)
    d[input] = (gh - mean_gh - xhat * (gh * xhat).mean(dims, keepdim=True)) * rstd
    d[weight] = unbroadcast(d[result] * xhat, weight)
    d[bias] = unbroadcast(d[result], bias)


@adjoint(F.normalize)
def normalize(result, input, p=2.0, dim=1, eps=1e-12, out=None):
    """y = x / max(||x||_p, eps):  dx = dy / n - (sum(dy * x) / n^2) dn/dx, the second term only
    where ||x||_p >= eps (n = max(||x||_p, eps))."""
    norm = torch.linalg.vector_norm(input, p, dim, keepdim=True)
    n = norm.clamp_min(eps)
    dn = -(d[result] * input).sum(dim, keepdim=True) / (n * n) * (norm >= eps)
    d[input] = d[result] / n + vector_norm_grad(dn, input, norm, p, dim, True)


@adjoint(F.embedding)
def embedding(
    result,
    input,
    weight,
    padding_idx=None,
    max_norm=None,
    norm_type=2.0,
    scale_grad_by_freq=False,
    sparse=False,
):
    """y = weight[input]: rows read several times add up; the padding row gets nothing."""
    d[weight] = embedding_grad(d[result], input, weight, padding_idx, scale_grad_by_freq)


# ==========================================================================================
# Losses
# ==========================================================================================


@adjoint(F.mse_loss)
def mse_loss(result, input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """loss = reduce(w (x - t)^2):  dx = 2 (x - t) * (gradient reaching that element)."""
    mode = reduction_mode(size_average, reduce, reduction)
    diff = input - target
    per = loss_scale(d[result], diff, mode, weight, True)
    d[input] = unbroadcast(2 * diff * per, input)
    d[target] = unbroadcast(-2 * diff * per, target)
    d[weight] = loss_weight_grad(d[result], result, diff * diff, weight, mode, True)


@adjoint(F.l1_loss)
def l1_loss(result, input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """loss = reduce(w |x - t|):  dx = sign(x - t) * (gradient reaching that element)."""
    mode = reduction_mode(size_average, reduce, reduction)
    diff = input - target
    per = loss_scale(d[result], diff, mode, weight, True)
    d[input] = unbroadcast(torch.sgn(diff) * per, input)
    d[target] = unbroadcast(-torch.sgn(diff) * per, target)
    d[weight] = loss_weight_grad(d[result], result, diff.abs(), weight, mode, True)


@adjoint(F.smooth_l1_loss)
def smooth_l1_loss(
    result, input, target, size_average=None, reduce=None, reduction="mean", beta=1.0
):
    """Quadratic (x - t)^2 / (2 beta) for |x - t| < beta, linear beyond: slope
    clamp((x - t) / beta, -1, 1)."""
    mode = reduction_mode(size_average, reduce, reduction)
    diff = input - target
    per = loss_scale(d[result], diff, mode, None, True)
    slope = torch.where(diff.abs() < beta, diff / beta, torch.sgn(diff))
    d[input] = unbroadcast(slope * per, input)
    d[target] = unbroadcast(-slope * per, target)


@adjoint(F.huber_loss)
def huber_loss(result, input, target, reduction="mean", delta=1.0, weight=None):
    """Quadratic (x - t)^2 / 2 for |x - t| <= delta, linear beyond: slope clamp(x - t, ±delta).
    With a weight, 'mean' divides by the number of elements (unlike mse_loss)."""
    diff = input - target
    per = loss_scale(d[result], diff, reduction, weight, False)
    slope = diff.clamp(-delta, delta)
    quadratic = 0.5 * diff * diff
    elementwise = torch.where(diff.abs() <= delta, quadratic, delta * (diff.abs() - 0.5 * delta))
    d[input] = unbroadcast(slope * per, input)
    d[target] = unbroadcast(-slope * per, target)
    d[weight] = loss_weight_grad(d[result], result, elementwise, weight, reduction, False)


@adjoint(F.binary_cross_entropy)
def binary_cross_entropy(
    result, input, target, weight=None, size_average=None, reduce=None, reduction="mean"
):
    """loss = -w (t log x + (1 - t) log(1 - x)):  dx = w (x - t) / (x (1 - x)),
    dt = w (log(1 - x) - log(x)) (logs clamped at -100 and the denominator at 1e-12, as torch)."""
    mode = reduction_mode(size_average, reduce, reduction)
    per = loss_scale(d[result], input, mode, None, False) * or_one(weight)
    d[input] = per * (input - target) / (input * (1 - input)).clamp_min(1e-12)
    d[target] = per * (torch.log1p(-input).clamp_min(-100) - torch.log(input).clamp_min(-100))


@adjoint(F.binary_cross_entropy_with_logits)
def binary_cross_entropy_with_logits(
    result,
    input,
    target,
    weight=None,
    size_average=None,
    reduce=None,
    reduction="mean",
    pos_weight=None,
):
    """loss = -w (pw t log s(x) + (1 - t) log(1 - s(x))), s = sigmoid:
    dx = w (s (1 - t + pw t) - pw t),  dt = -w (pw log s(x) - log s(-x)).
    Like torch, no gradient for weight and pos_weight."""
    mode = reduction_mode(size_average, reduce, reduction)
    per = loss_scale(d[result], input, mode, None, False)
    w = or_one(weight)
    pw = or_one(pos_weight)
    s = torch.sigmoid(input)
    log_s = F.logsigmoid(input)
    log_not_s = F.logsigmoid(-input)
    d[input] = per * w * (s * (1 - target + pw * target) - pw * target)
    d[target] = -per * w * (pw * log_s - log_not_s)


@adjoint(F.cross_entropy)
def cross_entropy(
    result,
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
):
    """loss = -sum_c q_c w_c log softmax(x)_c with q the (smoothed) target distribution:
    dx = (gradient w.r.t. log-probabilities) pulled back through log_softmax; see
    ``cross_entropy_grad`` for the reductions, ignore_index and label smoothing."""
    mode = reduction_mode(size_average, reduce, reduction)
    d[input] = cross_entropy_grad(
        d[result], input, target, weight, ignore_index, mode, label_smoothing
    )
    d[target] = cross_entropy_target_grad(d[result], input, target, weight, mode, label_smoothing)


@adjoint(F.nll_loss)
def nll_loss(
    result,
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
):
    """loss_i = -w[y_i] input[i, y_i]; 'mean' divides by the summed weights of kept samples."""
    mode = reduction_mode(size_average, reduce, reduction)
    d[input] = nll_loss_grad(d[result], input, target, weight, ignore_index, mode)


@adjoint(F.kl_div)
def kl_div(
    result, input, target, size_average=None, reduce=None, reduction="mean", log_target=False
):
    """loss = t (log t - x) (or e^t (t - x) with log_target):  dx = -t (or -e^t).

    x and t broadcast against each other (torch allows it): the unreduced loss has their
    broadcast shape, and each side's gradient is summed back to its own.  'mean' counts the
    loss's elements, but 'batchmean' divides by x's first dim whatever t's shape, as F.kl_div
    does (sum / input.size(0)): that scale is x-shaped, and broadcasts in the products."""
    mode = reduction_mode(size_average, reduce, reduction)
    loss_shape = torch.broadcast_shapes(input.shape, target.shape)
    counted = input if mode == "batchmean" else target.expand(loss_shape)  # a view: no copy
    per = loss_scale(d[result], counted, mode, None, False)
    t = torch.exp(target) if log_target else target
    d[input] = unbroadcast(-t * per, input)
    d[target] = unbroadcast(kl_div_target_grad(per, input, target, log_target), target)
