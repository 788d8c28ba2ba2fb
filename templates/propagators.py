"""Propagator templates: what a node computes going forward and sends going backward.

A propagator is a sequence of *parts*; each part is a pair of templates spliced into the
generated code at every ``manager.forward(x, ...)`` call site that uses it:

* ``<part>_forward(x, <keywords>)`` runs in the forward pass.  Its parameters are the node
  input ``x`` and the keywords the part accepts (given at the call site or to the
  propagator); its locals are kept for the backward; what it returns is the node's output.
  Only the base part of a propagator returns the output; the others have no forward.
* ``<part>_backward(output, x, <forward locals>, <keywords>)`` runs in the backward pass,
  in reverse part order.  ``d[output]`` is the gradient arriving at the node's output;
  assigning ``d[x]`` sends a gradient to its input (gradients do not pass through a node
  unless its template says so).  ``m['name']`` is the message of that name arriving from
  later nodes (None when none did); assigning it sets what flows on to earlier nodes.
  Messages not assigned flow on unchanged.

In a forward template ``m['name']`` is a message flowing *forward*, from earlier nodes to
later ones (None before any node set it; signal propagation's target stream travels this
way).  Both kinds of template may call a function for its side effect (an optimizer step,
``.grad`` written by ProxProp): such calls are always kept.  Besides the keywords, templates
may name ``site`` (the call site's ``file:line`` text), ``grad_enabled`` (whether the caller
records gradients: False under ``torch.no_grad()``), ``world`` (the processes the node spans,
:class:`propgen.distributed.World`: batch statistics are taken over all of them) and the
propagator's ``internal`` objects.

The math lives in these templates and in the small functions of
:mod:`propgen.templates.estimators`, :mod:`~propgen.templates.layers`,
:mod:`~propgen.templates.proximal` and :mod:`~propgen.templates.sigprop`.
"""

from __future__ import annotations

from propgen.templates.estimators import (
    batch_average,
    batch_cholesky,
    batch_mean,
    batch_size,
    batch_sum,
    batch_weights,
    flat_matmul,
    gaussian_curvature,
    inverse_variance_weight,
    leave_one_out,
    location_score,
    make_distribution,
    mean_gradient,
    mix_params_grads,
    pathwise_params_grad,
    per_row_dot,
    per_sample_loss,
    sample_like,
    score_params_grad,
    standard_normal_like,
)
from propgen.templates.layers import apply_layer, layer_input_grad, proximal_step
from propgen.templates.sigprop import finish_step, learn_forward, make_stream

from propgen.template import contribution, d, m

# --------------------------------------------------------------------- identity, backprop


def identity_forward(x):
    return x


def identity_backward(output, x):
    d[x] = d[output]


# ------------------------------------------------------------ reparameterization (RP)


def rp_forward(x, dist_class, dist_params, world):
    dist = make_distribution(dist_class, dist_params, x)
    noise = sample_like(dist, x, True, world)
    return x + noise


def rp_backward(output, x, dist_params, dist, noise):
    # the node is x + loc + scale * eps with eps held fixed: the gradient passes unchanged to
    # x, and reaches loc and scale when the program computed them (a learned noise model)
    d[x] = d[output]
    d[dist_params] = pathwise_params_grad(dist_params, dist, noise, d[output])


# ------------------------------------------------------------------ likelihood ratio (LR)


def lr_forward(x, dist_class, dist_params, world):
    dist = make_distribution(dist_class, dist_params, x)
    noise = sample_like(dist, x, False, world)
    score = location_score(dist, noise)
    return x + noise


def lr_backward(output, x, score, site, dist_params, dist, noise, world):
    # score-function gradient of the batch mean: score * (cost - baseline) / B
    cost = per_sample_loss(m["baselined_loss"], score, site)
    weight = batch_weights(cost, score, world)
    d[x] = score * weight
    d[dist_params] = score_params_grad(dist_params, dist, noise, weight)


# ----------------------------------------------------------------- total propagation (TP)


def tp_forward(x, dist_class, dist_params, ivw_target, world):
    dist = make_distribution(dist_class, dist_params, x)
    noise = sample_like(dist, x, False, world)
    score = location_score(dist, noise)
    return x + noise


def tp_backward(output, x, score, ivw_target, site, dist_params, dist, noise, world):
    cost = per_sample_loss(m["baselined_loss"], score, site)
    weight = batch_weights(cost, score, world)
    g_rp = d[output]
    g_lr = score * weight
    c_rp = contribution(g_rp, x, ivw_target)
    c_lr = contribution(g_lr, x, ivw_target)
    k_lr = inverse_variance_weight(c_rp, c_lr, x.shape[0], world)
    d[x] = k_lr * g_lr + (1 - k_lr) * g_rp
    d[dist_params] = mix_params_grads(k_lr, score_params_grad(dist_params, dist, noise, weight),
                                      pathwise_params_grad(dist_params, dist, noise, g_rp))


def tp_reuse_backward(output, x, score, ivw_target, site, k_interval, dist_params, dist,
                      noise, world):
    # k_interval > 1: the mixing weight is recomputed at every k_interval-th node visited in
    # the backward pass and reused, sent as a message, for the nodes in between
    cost = per_sample_loss(m["baselined_loss"], score, site)
    weight = batch_weights(cost, score, world)
    g_rp = d[output]
    g_lr = score * weight
    k_lr = m["k_lr"]
    k_count = m["k_count"]
    if k_lr is None or k_count % k_interval == 0:
        c_rp = contribution(g_rp, x, ivw_target)
        c_lr = contribution(g_lr, x, ivw_target)
        k_lr = inverse_variance_weight(c_rp, c_lr, x.shape[0], world)
        k_count = 0
    m["k_lr"] = k_lr
    m["k_count"] = k_count + 1
    d[x] = k_lr * g_lr + (1 - k_lr) * g_rp
    d[dist_params] = mix_params_grads(k_lr, score_params_grad(dist_params, dist, noise, weight),
                                      pathwise_params_grad(dist_params, dist, noise, g_rp))


# --------------------------------------------------------------------------- baselines


def loo_baseline_backward(output, x, site, world):
    cost = per_sample_loss(m["local_loss"], x, site)
    m["baselined_loss"] = cost - leave_one_out(cost, world)


def mean_baseline_backward(output, x, site, world):
    cost = per_sample_loss(m["local_loss"], x, site)
    m["baselined_loss"] = cost - batch_mean(cost, world)


def user_baseline_backward(output, x, site, baseline_func):
    cost = per_sample_loss(m["local_loss"], x, site)
    m["baselined_loss"] = cost - baseline_func(cost)


def no_baseline_backward(output, x):
    # no baseline of its own: a baseline the loss node subtracted, else the cost itself
    if m["baselined_loss"] is None:
        m["baselined_loss"] = m["local_loss"]


# ------------------------------------------------------------------- message utilities


def sum_backward(output, x, sum_name, local_name):
    # adds a local message into a running sum that flows backward (e.g. returns from rewards)
    m[sum_name] = m[local_name] + (0.0 if m[sum_name] is None else m[sum_name])


# --------------------------------------------------------------------------- loss nodes


def loss_backward(output, x, site, world):
    # a per-sample cost inside the program: joins the cost-to-go flowing backward, and its
    # batch mean is differentiated
    cost = per_sample_loss(output, output, site)
    m["local_loss"] = cost + (0.0 if m["local_loss"] is None else m["local_loss"])
    m["baselined_loss"] = None  # made from the old cost-to-go: earlier nodes redo it
    d[x] = d[output] + mean_gradient(output, world)


def loss_nograd_backward(output, x, site):
    cost = per_sample_loss(output, output, site)
    m["local_loss"] = cost + (0.0 if m["local_loss"] is None else m["local_loss"])
    m["baselined_loss"] = None
    d[x] = d[output]


# ----------------------------------------------------------- Gaussian shaping (GS)


def resample_forward(x, world):
    # fit a Gaussian to the batch and draw a new batch from it: mean + eps @ chol^T
    mean = batch_average(x, world)
    chol = batch_cholesky(x, mean, world)
    eps = standard_normal_like(x, world)
    return mean + flat_matmul(eps, chol.transpose(-1, -2))


def resample_backward(output, x, mean, chol, eps, world):
    # pathwise gradient through the fitted mean and covariance (Price's and Stein's identities)
    g = d[output]
    g_mean = batch_sum(g, world)
    g_cov = gaussian_curvature(g, eps, chol, world)
    n = batch_size(x, world)
    d[x] = g_mean / n + 2.0 * flat_matmul(x - mean, g_cov) / (n - 1)


def gs_loss_backward(output, x, mean, chol, eps, world):
    # Gaussian shaping: replace the cost-to-go by the LR-type surrogate whose score-function
    # gradient is d E[c] through the fitted mean and covariance
    g = d[output]
    g_mean = batch_sum(g, world)
    g_cov = gaussian_curvature(g, eps, chol, world)
    centred = x - mean
    m["local_loss"] = per_row_dot(centred, g_mean) + per_row_dot(flat_matmul(centred, g_cov),
                                                                centred)


# --------------------------------------------------- proximal backpropagation (ProxProp)


def prox_forward(x, layer, site):
    return apply_layer(layer, x, site)


def prox_backward(output, x, layer, tau, mode, linear, site):
    # upstream: the ordinary backprop message; the layer's parameters: the proximal direction
    # (J^T J + I/tau)^-1 J^T d[output], with which SGD at lr 1 lands on the proximal point
    d[x] = layer_input_grad(layer, x, d[output])
    proximal_step(layer, x, d[output], tau, mode, linear, site)


# ---------------------------------------------- signal propagation (forward learning)


def signal_forward(x, layer, context, context_layer, num_classes, loss, optimizer, monitor,
                   classes, update, grad_enabled, state, site):
    # the first node: h = layer(x) and t = context_layer(one-hot context), trained together
    stream = make_stream(context, num_classes, classes, x, site)
    step = learn_forward(layer, context_layer, x, stream, loss, optimizer, monitor, grad_enabled,
                         update, state, site, True)
    m["signal"] = step.stream
    return step.output


def sigprop_forward(x, layer, loss, optimizer, monitor, update, grad_enabled, state, site):
    # a hidden node: the layer applied to both streams, trained on their comparison
    step = learn_forward(layer, layer, x, m["signal"], loss, optimizer, monitor, grad_enabled,
                         update, state, site, False)
    m["signal"] = step.stream
    return step.output


def sigprop_deferred_backward(output, x, step):
    # update="backward": the layer's optimizer steps when the backward pass reaches the node
    finish_step(step)
