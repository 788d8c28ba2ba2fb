"""Tangent (forward-mode) templates of the ``torch.nn.functional`` ops in ``nn.py``.

Same conventions as ``tangents.py``: each template is paired with its adjoint template and
assigns ``t[result]`` linearly in the tangents it reads.  Activations multiply the tangent by
the slope their adjoint uses (so non-smooth points follow torch the same way); losses find the
tangent of each element of the unreduced loss and then reduce it as the loss does
(``_reduce_loss``, ``_reduce_samples``).  Like the adjoints, no tangent flows from the weights
of binary_cross_entropy(_with_logits), cross_entropy and nll_loss.
"""

from __future__ import annotations

from typing import Any

import torch
from propgen.templates import nn
from propgen.templates.helpers import (
    expand_like,
    gelu_slope,
    implicit_softmax_dim,
    kl_div_target_grad,
    like,
    normalized_dims,
    or_one,
    reduction_mode,
    vector_norm_grad,
)

from propgen.template import t, tangent

F = torch.nn.functional
SELU_ALPHA = nn.SELU_ALPHA
SELU_SCALE = nn.SELU_SCALE

# ==========================================================================================
# Activations: the tangent times the slope
# ==========================================================================================


@tangent(nn.relu6)
def relu6(result, input, inplace=False):
    """Slope 1 strictly inside (0, 6), 0 at and beyond the bounds."""
    t[result] = t[input] * ((input > 0) & (input < 6))


@tangent(nn.hardtanh)
def hardtanh(result, input, min_val=-1.0, max_val=1.0, inplace=False):
    """Slope 1 strictly inside (min_val, max_val), 0 at and beyond the bounds (torch)."""
    t[result] = t[input] * ((input > min_val) & (input < max_val))


@tangent(nn.hardsigmoid)
def hardsigmoid(result, input, inplace=False):
    """Slope 1/6 strictly inside (-3, 3)."""
    t[result] = t[input] * ((input > -3) & (input < 3)) / 6


@tangent(nn.leaky_relu)
def leaky_relu(result, input, negative_slope=0.01, inplace=False):
    """Slope 1 for x > 0, negative_slope for x <= 0."""
    t[result] = t[input] * torch.where(input > 0, 1.0, negative_slope)


@tangent(nn.elu)
def elu(result, input, alpha=1.0, inplace=False):
    """Slope alpha e^x for x <= 0."""
    t[result] = t[input] * torch.where(input > 0, 1.0, alpha * torch.exp(input))


@tangent(nn.selu)
def selu(result, input, inplace=False):
    slope = torch.where(input > 0, 1.0, SELU_ALPHA * torch.exp(input))
    t[result] = t[input] * SELU_SCALE * slope


@tangent(nn.celu)
def celu(result, input, alpha=1.0, inplace=False):
    """Slope e^(x / alpha) for x <= 0."""
    t[result] = t[input] * torch.where(input > 0, 1.0, torch.exp(input / alpha))


@tangent(nn.gelu)
def gelu(result, input, approximate="none"):
    t[result] = t[input] * gelu_slope(input, approximate)


@tangent(nn.silu)
def silu(result, input, inplace=False):
    """silu(x) = x s(x), s = sigmoid:  slope s (1 + x (1 - s))"""
    s = torch.sigmoid(input)
    t[result] = t[input] * s * (1 + input * (1 - s))


@tangent(nn.mish)
def mish(result, input, inplace=False):
    """mish(x) = x tanh(softplus(x)):  slope tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2)"""
    tsp = torch.tanh(F.softplus(input))
    t[result] = t[input] * (tsp + input * torch.sigmoid(input) * (1 - tsp * tsp))


@tangent(nn.softplus)
def softplus(result, input, beta=1.0, threshold=20.0):
    """Slope sigmoid(beta x), and 1 where beta x > threshold (softplus is the identity)."""
    slope = torch.where(input * beta > threshold, 1.0, torch.sigmoid(input * beta))
    t[result] = t[input] * slope


@tangent(nn.logsigmoid)
def logsigmoid(result, input):
    """Slope sigmoid(-x)."""
    t[result] = t[input] * torch.sigmoid(-input)


@tangent(nn.softsign)
def softsign(result, input):
    """Slope 1 / (1 + |x|)^2."""
    t[result] = t[input] / (1 + input.abs()) ** 2


# ==========================================================================================
# Softmax family
# ==========================================================================================


@tangent(nn.softmax)
def softmax(result, input, dim, dtype=None):
    """y = softmax(x):  dy = y * (dx - sum(y * dx, dim))"""
    t[result] = like(result * (t[input] - (t[input] * result).sum(dim, keepdim=True)), result)


@tangent(nn.softmax_f)
def softmax_f(result, input, dim=None, _stacklevel=3, dtype=None):
    """y = softmax(x):  dy = y * (dx - sum(y * dx, dim))"""
    axis = implicit_softmax_dim(dim, input.dim())
    t[result] = like(result * (t[input] - (t[input] * result).sum(axis, keepdim=True)), result)


@tangent(nn.log_softmax)
def log_softmax(result, input, dim, dtype=None):
    """y = log_softmax(x):  dy = dx - sum(softmax(x) * dx, dim)"""
    t[result] = like(t[input] - (torch.exp(result) * t[input]).sum(dim, keepdim=True), result)


@tangent(nn.log_softmax_f)
def log_softmax_f(result, input, dim=None, _stacklevel=3, dtype=None):
    """y = log_softmax(x):  dy = dx - sum(softmax(x) * dx, dim)"""
    axis = implicit_softmax_dim(dim, input.dim())
    t[result] = like(t[input] - (torch.exp(result) * t[input]).sum(axis, keepdim=True), result)


# ==========================================================================================
# Layers
# ==========================================================================================


@tangent(nn.linear)
def linear(result, input, weight, bias=None):
    """y = x W^T + b:  dy = dx W^T + x dW^T + db"""
    t[result] = expand_like(
        F.linear(t[input], weight) + F.linear(input, t[weight]) + t[bias], result
    )


@tangent(nn.layer_norm)
def layer_norm(result, input, normalized_shape, weight=None, bias=None, eps=1e-05):
    """y = w * xhat + b with xhat = (x - mean) / sqrt(var + eps) over the normalized dims:
    with dc = dx - mean(dx),  dxhat = (dc - xhat * mean(dc * xhat)) / sqrt(var + eps)."""
    dims = normalized_dims(input, normalized_shape)
    rstd = torch.rsqrt(input.var(dims, unbiased=False, keepdim=True) + eps)
    xhat = (input - input.mean(dims, keepdim=True)) * rstd
    centered = t[input] - t[input].mean(dims, keepdim=True)
    t_xhat = (centered - xhat * (centered * xhat).mean(dims, keepdim=True)) * rstd
    t[result] = expand_like(t_xhat * or_one(weight) + xhat * t[weight] + t[bias], result)


@tangent(nn.normalize)
def normalize(result, input, p=2.0, dim=1, eps=1e-12, out=None):
    """y = x / n with n = max(||x||_p, eps):  dy = dx / n - x dn / n^2, where
    dn = <d||x||_p / dx, dx> only where ||x||_p >= eps."""
    norm = torch.linalg.vector_norm(input, p, dim, keepdim=True)
    n = norm.clamp_min(eps)
    slope = vector_norm_grad(torch.ones_like(norm), input, norm, p, dim, True)
    t_norm = (slope * t[input]).sum(dim, keepdim=True) * (norm >= eps)
    t[result] = t[input] / n - input * t_norm / (n * n)


@tangent(nn.embedding)
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
    """y = weight[input]: the tangent's rows, scaled as the adjoint scales the gradient (none
    for padding_idx, 1 / count with scale_grad_by_freq)."""
    t[result] = F.embedding(input, t[weight]) * _lookup_scale(
        input, weight, padding_idx, scale_grad_by_freq
    )


# ==========================================================================================
# Losses: the tangent of each element of the unreduced loss, reduced as the loss is
# ==========================================================================================


@tangent(nn.mse_loss)
def mse_loss(result, input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """loss = reduce(w (x - t)^2):  each element's tangent is 2 w (x - t) (dx - dt) + dw (x - t)^2
    (``_weight_slope``: 'mean' divides by sum(w), which moves with w)."""
    mode = reduction_mode(size_average, reduce, reduction)
    diff = input - target
    t_loss = (2 * diff * (t[input] - t[target]) * or_one(weight)
              + t[weight] * _weight_slope(diff * diff, result, mode, True))
    t[result] = _reduce_loss(t_loss, diff, mode, weight, True)


@tangent(nn.l1_loss)
def l1_loss(result, input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """loss = reduce(w |x - t|):  each element's tangent is w sign(x - t) (dx - dt) + dw |x - t|."""
    mode = reduction_mode(size_average, reduce, reduction)
    diff = input - target
    t_loss = (torch.sgn(diff) * (t[input] - t[target]) * or_one(weight)
              + t[weight] * _weight_slope(diff.abs(), result, mode, True))
    t[result] = _reduce_loss(t_loss, diff, mode, weight, True)


@tangent(nn.smooth_l1_loss)
def smooth_l1_loss(
    result, input, target, size_average=None, reduce=None, reduction="mean", beta=1.0
):
    """Slope clamp((x - t) / beta, -1, 1)."""
    mode = reduction_mode(size_average, reduce, reduction)
    diff = input - target
    slope = torch.where(diff.abs() < beta, diff / beta, torch.sgn(diff))
    t[result] = _reduce_loss(slope * (t[input] - t[target]), diff, mode, None, True)


@tangent(nn.huber_loss)
def huber_loss(result, input, target, reduction="mean", delta=1.0, weight=None):
    """Slope clamp(x - t, -delta, delta); with a weight, 'mean' divides by the number of
    elements (unlike mse_loss)."""
    diff = input - target
    slope = diff.clamp(-delta, delta)
    elementwise = torch.where(
        diff.abs() <= delta, 0.5 * diff * diff, delta * (diff.abs() - 0.5 * delta)
    )
    t_loss = (slope * (t[input] - t[target]) * or_one(weight)
              + t[weight] * _weight_slope(elementwise, result, reduction, False))
    t[result] = _reduce_loss(t_loss, diff, reduction, weight, False)


@tangent(nn.binary_cross_entropy)
def binary_cross_entropy(
    result, input, target, weight=None, size_average=None, reduce=None, reduction="mean"
):
    """loss = -w (t log x + (1 - t) log(1 - x)):  slopes (x - t) / (x (1 - x)) for x and
    log(1 - x) - log(x) for t (logs clamped at -100 and the denominator at 1e-12, as torch)."""
    mode = reduction_mode(size_average, reduce, reduction)
    slope_x = (input - target) / (input * (1 - input)).clamp_min(1e-12)
    slope_t = torch.log1p(-input).clamp_min(-100) - torch.log(input).clamp_min(-100)
    t_loss = (slope_x * t[input] + slope_t * t[target]) * or_one(weight)
    t[result] = _reduce_loss(t_loss, input, mode, None, False)


@tangent(nn.binary_cross_entropy_with_logits)
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
    """loss = -w (pw t log s(x) + (1 - t) log(1 - s(x))), s = sigmoid:  slopes
    w (s (1 - t + pw t) - pw t) for x and -w (pw log s(x) - log s(-x)) for t."""
    mode = reduction_mode(size_average, reduce, reduction)
    w = or_one(weight)
    pw = or_one(pos_weight)
    s = torch.sigmoid(input)
    slope_x = w * (s * (1 - target + pw * target) - pw * target)
    slope_t = -w * (pw * F.logsigmoid(input) - F.logsigmoid(-input))
    t[result] = _reduce_loss(slope_x * t[input] + slope_t * t[target], input, mode, None, False)


@tangent(nn.cross_entropy)
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
    """A sample's loss is -sum_c q_c logp_c, with logp = log_softmax(x) over the classes and q
    the weighted, smoothed target (``_target_weights``):  d loss = -sum_c (q dlogp + dq logp),
    dlogp = dx - sum(softmax(x) dx)."""
    cdim = _class_dim(input)
    t_logp = t[input] - (torch.softmax(input, cdim) * t[input]).sum(cdim, keepdim=True)
    q = _target_weights(input, target, weight, ignore_index, label_smoothing)
    t_q = (1 - label_smoothing) * _class_weights(weight, input) * t[target]
    t[result] = _reduce_samples(
        -(q * t_logp + t_q * torch.log_softmax(input, cdim)).sum(cdim),
        input, target, weight, ignore_index, reduction_mode(size_average, reduce, reduction),
    )


@tangent(nn.nll_loss)
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
    """A sample's loss is -w[y] input[y] (0 when y is ignore_index)."""
    q = _target_weights(input, target, weight, ignore_index, 0.0)
    t[result] = _reduce_samples(
        -(q * t[input]).sum(_class_dim(input)),
        input, target, weight, ignore_index, reduction_mode(size_average, reduce, reduction),
    )


@tangent(nn.kl_div)
def kl_div(
    result, input, target, size_average=None, reduce=None, reduction="mean", log_target=False
):
    """loss = t (log t - x) (or e^t (t - x) with log_target):  slope -t (or -e^t) for x.
    x and t broadcast against each other: the loss's tangent has their broadcast shape (see
    the adjoint), and 'batchmean' divides its sum by x's first dim (``_reduce_kl_div``)."""
    mode = reduction_mode(size_average, reduce, reduction)
    p = torch.exp(target) if log_target else target
    slope_t = kl_div_target_grad(1.0, input, target, log_target)
    t[result] = _reduce_kl_div(-p * t[input] + slope_t * t[target], input, target, mode)


# ==========================================================================================
# Helpers
# ==========================================================================================


def _lookup_scale(input: torch.Tensor, weight: torch.Tensor, padding_idx: Any,
                  scale_grad_by_freq: bool) -> Any:
    """What multiplies each looked-up row of an embedding's tangent: 0 for padding_idx rows,
    1 / (times the row is read) with scale_grad_by_freq, else 1 (as ``embedding_grad``)."""
    if padding_idx is None and not scale_grad_by_freq:
        return 1.0
    scale = torch.ones(input.shape, dtype=weight.dtype, device=weight.device)
    if scale_grad_by_freq:
        counts = torch.bincount(input.reshape(-1), minlength=weight.shape[0])
        scale = scale / counts[input]
    if padding_idx is not None:
        scale = scale * (input != padding_idx % weight.shape[0])
    return scale.unsqueeze(-1)


def _weight_slope(elementwise: torch.Tensor, result: torch.Tensor, reduction: str,
                  mean_over_weights: bool) -> torch.Tensor:
    """d(w e)/dw for an element of ``reduce(w * e)``: e; e - loss when 'mean' divides by
    sum(w) (d[sum(w e) / sum(w)] = sum(dw (e - loss)) / sum(w))."""
    if reduction == "mean" and mean_over_weights:
        return elementwise - result
    return elementwise


def _reduce_loss(t_loss: torch.Tensor, elementwise: torch.Tensor, reduction: str, weight: Any,
                 mean_over_weights: bool) -> torch.Tensor:
    """Reduce the tangent of each element of a loss (shaped like ``elementwise``, weights
    applied) as the loss is reduced: 'mean' divides by the number of elements, or by
    ``weight.sum()`` when ``mean_over_weights``; 'batchmean' by the batch size (``loss_scale``)."""
    t_loss = expand_like(t_loss, elementwise)
    if reduction == "none":
        return t_loss
    if reduction == "mean":
        count = weight.sum() if weight is not None and mean_over_weights else elementwise.numel()
        return t_loss.sum() / count
    if reduction == "batchmean":
        return t_loss.sum() / (elementwise.shape[0] if elementwise.dim() else 1)
    return t_loss.sum()


def _reduce_kl_div(t_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                   reduction: str) -> torch.Tensor:
    """Reduce the tangent of kl_div's unreduced loss, which has the broadcast shape of input
    and target: as ``_reduce_loss``, except that 'batchmean' divides the sum by input's first
    dim whatever target's shape (F.kl_div's sum / input.size(0); no division for a 0-d
    input)."""
    t_loss = t_loss.expand(torch.broadcast_shapes(input.shape, target.shape))
    if reduction == "batchmean":
        return t_loss.sum() / (input.shape[0] if input.dim() else 1)
    return _reduce_loss(t_loss, t_loss, reduction, None, False)


def _class_dim(logits: torch.Tensor) -> int:
    """The class dim of (C,) or (N, C, d1, ...) logits."""
    return 0 if logits.dim() == 1 else 1


def _class_weights(weight: Any, logits: torch.Tensor) -> Any:
    """Class weights shaped to broadcast along the class dim of ``logits`` (1 when absent)."""
    if weight is None:
        return 1.0
    shape = [1] * logits.dim()
    shape[_class_dim(logits)] = -1
    return weight.reshape(shape)


def _target_weights(input: torch.Tensor, target: torch.Tensor, weight: Any, ignore_index: int,
                    label_smoothing: float) -> torch.Tensor:
    """q with a sample's loss = -sum_c q_c logp_c: ``w_c ((1 - eps) target_c + eps / C)`` for
    class probabilities; ``(1 - eps) w[y] onehot(y) + (eps / C) w_c`` for class indices, zero
    for samples whose class is ignore_index (as ``cross_entropy_grad``)."""
    cdim = _class_dim(input)
    smooth = label_smoothing / input.shape[cdim]
    cw = _class_weights(weight, input)
    if target.is_floating_point():
        return cw * ((1 - label_smoothing) * target + smooth)
    keep = target != ignore_index
    safe = torch.where(keep, target, 0)
    onehot = torch.zeros_like(input).scatter(cdim, safe.unsqueeze(cdim), 1.0)
    return cw * ((1 - label_smoothing) * onehot + smooth) * keep.unsqueeze(cdim)


def _reduce_samples(t_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                    weight: Any, ignore_index: int, reduction: str) -> torch.Tensor:
    """Reduce per-sample tangents of cross_entropy / nll_loss: 'mean' divides by the summed
    class weights of the kept samples (by the number of samples for class probabilities)."""
    if reduction == "none":
        return t_loss
    if reduction != "mean":
        return t_loss.sum()
    if target.is_floating_point():
        return t_loss.sum() / (input.numel() // input.shape[_class_dim(input)])
    keep = target != ignore_index
    w = weight[torch.where(keep, target, 0)] * keep if weight is not None else keep
    return t_loss.sum() / w.sum()
