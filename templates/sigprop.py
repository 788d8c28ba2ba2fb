"""Signal propagation (sigprop): learning in the forward pass, one layer at a time.

The input x and a *context* (the one-hot target, say) enter the network side by side.  The
first node projects both into the first hidden shape: ``h1 = layer(x)``, ``t1 =
context_layer(t0)``.  Every hidden node then applies its layer to both streams, ``h = layer(h)``
and ``t = layer(t)``, and trains the layer on a loss comparing the two; the layer's own
optimizer steps at once and both streams leave detached, so nothing flows between layers and
no backward pass is needed (training and inference are the same forward pass).  The output
layer is trained ordinarily, by the loss at the end of the program.

Losses compare a batch of input-stream rows ``h_i`` with target-stream rows ``t_j`` through the
similarity logits ``s_ij = <h_i, t_j>`` (for feature maps ``[B, C, H, W]``: the mean over
positions of the channel inner products):

* :func:`input_target_max`: soft-target cross-entropy ``mean_i sum_j -T_ij log softmax_j(s_i)``
  with ``T_ij = 1`` where ``<t0_i, t0_j>`` is maximal in row i (the samples whose context is
  closest to sample i's: with one-hot contexts, the samples of the same class).  When
  same-class samples share one target vector ``t_c``, ``s_ij = s_ic`` for every j of class c, so
  the loss is the count-weighted cross-entropy over classes
  ``-n_{y_i} log(exp(s_{i y_i}) / sum_c n_c exp(s_ic))`` (n_c: the batch count of class c).
* :func:`input_target_argmax`: cross-entropy against the first j where that row is maximal.
* :func:`input_target_topk`: the soft-target loss with ``T_ij = 1`` at the k largest
  ``<t0_i, t0_j>`` of each row.
* :func:`label_direct`: the target stream holds one row per class (the identity context,
  ``SignalProp(classes=True)``) and the loss is the cross-entropy of ``s_ic`` against the label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from propgen.templates.layers import layer_name, site_error

__all__ = [
    "Stream", "Step", "input_target_max", "input_target_argmax", "input_target_topk",
    "label_direct", "similarity", "accuracy", "make_stream", "learn_forward", "finish_step",
]


@dataclass
class Stream:
    """What flows forward beside the input stream: the target stream ``target`` (the context
    as transformed by the layers so far), the context ``context`` it started from (``t0``), and
    the class of each sample (``labels``; None for a context that is not a class)."""

    target: torch.Tensor
    context: torch.Tensor
    labels: torch.Tensor | None
    classes: bool = False  # one target row per class (label_direct) instead of per sample


@dataclass
class Step:
    """One node's forward-learning step: its output, the stream it sends on, and the loss
    whose optimizer step waits for the backward pass (``update='backward'``)."""

    output: torch.Tensor
    stream: Stream | None
    pending: tuple | None = None


# ------------------------------------------------------------------------------ losses


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``s_ij = <a_i, b_j>``; for ``[B, C, ...]`` feature maps the mean over positions of the
    channel inner products."""
    if a.dim() <= 2:
        return a.flatten(1) @ b.flatten(1).t()
    a_ = a.flatten(2).permute(2, 0, 1)  # [P, B, C]
    b_ = b.flatten(2).permute(2, 1, 0)  # [P, C, B']
    return (a_ @ b_).mean(0)


def _soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (-targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def _closest_contexts(stream: Stream) -> torch.Tensor:
    """``<t0_i, t0_j>``: how alike the contexts of samples i and j are."""
    return similarity(stream.context, stream.context)


def input_target_max(h: torch.Tensor, t: torch.Tensor, stream: Stream) -> torch.Tensor:
    """Soft-target cross-entropy of ``<h_i, t_j>`` against every j whose context is closest to
    sample i's (see the module docstring for its closed form)."""
    yy = _closest_contexts(stream)
    targets = (yy == yy.max(1, keepdim=True).values).to(h.dtype)
    return _soft_target_cross_entropy(similarity(h, t), targets)


def input_target_argmax(h: torch.Tensor, t: torch.Tensor, stream: Stream) -> torch.Tensor:
    """Cross-entropy of ``<h_i, t_j>`` against the first j whose context is closest to i's."""
    return F.cross_entropy(similarity(h, t), _closest_contexts(stream).argmax(1))


def input_target_topk(k: int) -> Callable:
    """The soft-target loss with targets at the ``k`` most similar contexts of each row."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"input_target_topk(k): k must be a positive int, not {k!r}")

    def input_target_topk_loss(h: torch.Tensor, t: torch.Tensor, stream: Stream) -> torch.Tensor:
        yy = _closest_contexts(stream)
        top = yy.topk(min(k, yy.shape[1]), dim=1).indices
        targets = torch.zeros_like(yy, dtype=h.dtype).scatter_(1, top, 1.0)
        return _soft_target_cross_entropy(similarity(h, t), targets)

    input_target_topk_loss.k = k
    return input_target_topk_loss


def label_direct(h: torch.Tensor, t: torch.Tensor, stream: Stream) -> torch.Tensor:
    """Cross-entropy of ``<h_i, t_c>`` (one target row per class) against the label of i."""
    if stream.labels is None:
        raise ValueError("label_direct needs class labels as the context")
    return F.cross_entropy(similarity(h, t), stream.labels)


def accuracy(h: torch.Tensor, t: torch.Tensor, stream: Stream) -> torch.Tensor:
    """How many rows' most similar target row is a right one: the label's row (one row per
    class), else a row whose context is closest to the sample's own."""
    best = similarity(h, t).argmax(1)
    if stream.classes:
        return (best == stream.labels).sum() if stream.labels is not None else best.new_zeros(())
    yy = _closest_contexts(stream)
    right = yy == yy.max(1, keepdim=True).values
    return right.gather(1, best[:, None]).sum()


# --------------------------------------------------------------------- the local step


def make_stream(context: Any, num_classes: int | None, classes: bool, like: torch.Tensor,
                site: str) -> Stream | None:
    """The context as the first target stream ``t0``: one-hot rows for class labels (ints),
    the tensor itself otherwise; with ``classes`` one row per class (the identity)."""
    if context is None:
        return None
    if not isinstance(context, torch.Tensor):
        raise site_error(site, f"the context is a {type(context).__name__}",
                     "pass class labels (an int tensor) or a float context tensor [B, ...]")
    if context.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if num_classes is None:
            raise site_error(site, "the context holds class labels but the signal propagator does "
                         "not know how many classes there are",
                         "give the SignalProp num_classes=...")
        labels = context.long()
        onehot = F.one_hot(labels, num_classes).to(like.dtype)
    else:
        labels = context.argmax(1) if context.dim() == 2 else None
        onehot = context.to(like.dtype)
    if classes:
        n = onehot.shape[1]
        onehot = torch.eye(n, dtype=like.dtype, device=like.device)
    return Stream(onehot, onehot, labels, classes)


def learn_forward(layer: Any, target_layer: Any, x: torch.Tensor, stream: Stream | None,
                  loss: Callable | None, optimizer: Any, monitor: Any, learning: bool,
                  update: str, state: Any, site: str, first: bool) -> Step:
    """Apply ``layer`` to the input stream and ``target_layer`` to the target stream, and
    train both on ``loss(h, t, stream)``: the optimizer steps now, or when the backward pass
    reaches the node (``update='backward'``).  Both streams leave detached.  ``first``: the
    signal node, whose target layer is the context's own projection."""
    learning = learning and stream is not None and _training(layer, target_layer)
    params = state.parameters(layer, target_layer) if stream is not None else []
    with torch.set_grad_enabled(learning and bool(params)):
        h = layer(x.detach()) if layer is not None else x.detach()
        if stream is None:
            return Step(h.detach(), None)
        t_in = stream.target.flatten(1) if first else stream.target.detach()
        t = target_layer(t_in) if target_layer is not None else t_in
        t = _fit_target(t, h, stream, layer, site, first)
        value = None
        if loss is not None:
            value = loss(h, t, stream)
    if monitor is not None and value is not None:
        monitor.record(layer, site, value.detach(), accuracy(h.detach(), t.detach(), stream),
                       h.shape[0])
    pending = None
    if learning and params:
        if value is None:
            raise site_error(site, f"the forward-learning layer {layer_name(layer)} has no loss",
                         "give the propagator loss=... (input_target_max, say)")
        opt = state.optimizer(optimizer, layer, params, site)
        pending = (opt, value)
        if update != "backward":
            finish_step(Step(h, None, pending))
            pending = None
    out = Stream(t.detach(), stream.context, stream.labels, stream.classes)
    return Step(h.detach(), out, pending)


def finish_step(step: Step) -> None:
    """The layer's own optimizer step on its local loss; its ``.grad`` is left empty, so an
    optimizer over the whole model does not step it a second time."""
    if step.pending is None:
        return
    opt, value = step.pending
    opt.zero_grad(set_to_none=True)
    with torch.enable_grad():
        value.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _training(layer: Any, target_layer: Any) -> bool:
    mods = [m for m in (layer, target_layer) if isinstance(m, torch.nn.Module)]
    return all(m.training for m in mods) if mods else True


def _fit_target(t: torch.Tensor, h: torch.Tensor, stream: Stream, layer: Any, site: str,
                first: bool) -> torch.Tensor:
    """The target stream must have the input stream's feature shape; at the signal node a
    flat projection of the right size is reshaped (a flat context projected to feature maps)."""
    if t.shape[1:] == h.shape[1:]:
        return t
    if first and t[0].numel() == h[0].numel():
        return t.reshape((t.shape[0],) + tuple(h.shape[1:]))
    raise site_error(site, f"at the layer {layer_name(layer)} the target stream has shape "
                 f"{list(t.shape)} where the input stream has {list(h.shape)}",
                 "make the signal's context layer project the context to the first hidden "
                 "shape (its output per row must have as many elements as the layer's)")
