"""Propagators: configuration objects naming the template parts a node is built from.

A propagator holds no tensors of a run and does no work: it says which template pairs of
``templates/propagators.py`` the compiler inlines at a ``manager.forward`` call site, and
holds the default keywords (``dist_class``, ``dist_params``, ...) that call sites may
override.  Its :meth:`structure` is what the generated code depends on; keyword values are
read when the code runs, so changing them (a new noise scale, a new target tensor) never
recompiles.

Composition follows the Proppo paper's sequence propagators: a propagator is a sequence of
parts run forward in order and backward in reverse, with optional members switched by
keywords (``LRProp(baseline=False)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from propgen.templates import propagators as tp

__all__ = [
    "Part", "Propagator", "BackPropagator", "RPProp", "LRProp", "TotalProp", "LossProp",
    "BaselineProp", "SkipProp", "PauseProp", "SumProp", "ComboProp", "ChainProp",
    "ResampleProp", "GSLoss", "GSProp", "ProxProp",
]


@dataclass(frozen=True)
class Part:
    """One template pair.  ``forward`` returns the node output (a propagator none of whose parts
    has a forward passes its input through); ``backward`` runs in the backward pass."""

    forward: Callable | None = None
    backward: Callable | None = None


_NOISE_KEYS = ("dist_class", "dist_params")
_BASELINES = {"loo": tp.loo_baseline_backward, "mean": tp.mean_baseline_backward}


class Propagator:
    """The identity node: stores nothing, returns its input; gradients and messages pass on.

    Subclasses list their parts (:meth:`parts`) and the call-site keywords they accept
    (``keywords``); constructor keywords among those become defaults for every call site.
    """

    keywords: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # constructor options that change the generated code
    internal: tuple[str, ...] = ()  # attributes the templates read at run time (state)

    def __init__(self, **defaults: Any) -> None:
        unknown = sorted(set(defaults) - set(self.keywords))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got the keyword(s) {unknown}, which it does not accept;"
                f" it accepts {list(self.keywords) or 'none'}")
        self.defaults = dict(defaults)

    def parts(self) -> list[Part]:
        """The template pairs spliced at each call site, in forward order (the backward
        templates run in reverse)."""
        return [Part(tp.identity_forward, tp.identity_backward)]

    def structure(self) -> tuple:
        """What the generated code depends on: the class, its options, and which keywords
        have defaults (their values are read at run time)."""
        opts = tuple((k, _key(getattr(self, k))) for k in self.options)
        dist = self.defaults.get("dist_class")
        return (type(self), opts, tuple(sorted(self.defaults)), dist)

    def loss_propagator(self) -> LossProp:
        """The loss node ``manager.backward`` appends when this is the default propagator
        and the manager names none."""
        return LossProp()

    @property
    def label(self) -> str:
        """How generated code and error messages name this propagator."""
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options)
        return f"{type(self).__name__}({opts})"

    def __repr__(self) -> str:
        return self.label


def _key(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return id(v)


class BackPropagator(Propagator):
    """Backpropagates the gradient through the node (in propgen, plain differentiation)."""


class RPProp(Propagator):
    """Reparameterization: the node adds noise drawn from ``dist_class(**dist_params)`` and the
    gradient flows through it with the noise held fixed.

    ``backprop=False`` keeps the gradient from being sent upstream by the node itself; the
    manager's terminal step then sends it (with the default terminal BackPropagator the result
    is the same, since propgen differentiates in one reverse sweep).
    """

    keywords = _NOISE_KEYS
    options = ("backprop",)

    def __init__(self, backprop: bool = True, **defaults: Any) -> None:
        super().__init__(**defaults)
        self.backprop = bool(backprop)

    def parts(self) -> list[Part]:
        return [Part(tp.rp_forward, tp.rp_backward)]


def _baseline_part(baseline: Any) -> Part | None:
    if baseline in (False, None, "none"):
        return Part(None, tp.no_baseline_backward)
    if baseline is True:
        baseline = "loo"
    if callable(baseline):
        return Part(None, tp.user_baseline_backward)
    if baseline not in _BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}: use 'loo' (leave-one-out, the "
                         "default), 'mean', None, or a function of the per-sample loss")
    return Part(None, _BASELINES[baseline])


class LRProp(Propagator):
    """Likelihood ratio (score function): the node adds noise and sends its input the score
    times the per-sample cost-to-go minus a baseline (leave-one-out by default)."""

    keywords = _NOISE_KEYS
    options = ("backprop", "baseline")

    def __init__(self, backprop: bool = True, baseline: Any = "loo", **defaults: Any) -> None:
        super().__init__(**defaults)
        self.backprop = bool(backprop)
        _baseline_part(baseline)  # refuse a bad baseline now, not at the first call
        self.baseline = baseline

    def parts(self) -> list[Part]:
        return [Part(tp.lr_forward, tp.lr_backward), _baseline_part(self.baseline)]

    def structure(self) -> tuple:
        b = self.baseline
        return super().structure()[:-1] + ("func" if callable(b) else b,)

    def loss_propagator(self) -> LossProp:
        return LossProp(lossgrad=False)

    @property
    def baseline_func(self) -> Callable | None:
        """The user's baseline function, when ``baseline`` is one (else None)."""
        return self.baseline if callable(self.baseline) else None


class TotalProp(LRProp):
    """Total propagation: at each node the RP and LR messages are mixed with the weight
    k_LR = V_RP / (V_LR + V_RP) computed from the batch variances of their per-sample
    contributions to ``ivw_target``; ``k_interval`` > 1 reuses a weight for that many nodes."""

    keywords = _NOISE_KEYS + ("ivw_target",)
    options = ("backprop", "baseline", "k_interval")

    def __init__(self, backprop: bool = True, baseline: Any = "loo", k_interval: int = 1,
                 **defaults: Any) -> None:
        super().__init__(backprop, baseline, **defaults)
        if not isinstance(k_interval, int) or k_interval < 1:
            raise ValueError(f"k_interval must be a positive int, not {k_interval!r}")
        self.k_interval = k_interval

    def parts(self) -> list[Part]:
        back = tp.tp_backward if self.k_interval == 1 else tp.tp_reuse_backward
        return [Part(tp.tp_forward, back), _baseline_part(self.baseline)]

    def loss_propagator(self) -> LossProp:
        return LossProp(lossgrad=True)


class LossProp(Propagator):
    """A loss node: the per-sample cost at the call site (shape (B,) or (B, 1)) joins the
    ``local_loss`` message flowing backward (the cost-to-go the LR and TP nodes read) and, with
    ``lossgrad`` (the default), its batch mean is differentiated.  ``manager.backward(loss)``
    appends one for the final loss.

    ``baseline`` ('loo', 'mean' or a function of the per-sample loss) also sends the
    ``baselined_loss`` message, which LR and TP nodes without a baseline of their own use;
    ``backprop`` is accepted for Proppo programs (propgen's gradient is sent by ``lossgrad``).
    """

    options = ("lossgrad", "baseline")

    def __init__(self, backprop: bool = True, lossgrad: bool = True, baseline: Any = None
                 ) -> None:
        super().__init__()
        self.backprop = bool(backprop)
        self.lossgrad = bool(lossgrad)
        _baseline_part(baseline)
        self.baseline = baseline

    def parts(self) -> list[Part]:
        back = tp.loss_backward if self.lossgrad else tp.loss_nograd_backward
        if self.baseline in (None, False, "none"):
            return [Part(None, back)]
        # backward runs parts in reverse: the loss joins the message, then the baseline
        return [_baseline_part(self.baseline), Part(None, back)]

    def apply_baseline(self, loss: torch.Tensor, world: Any = None) -> torch.Tensor | None:
        """The ``baselined_loss`` message ``manager.backward`` sends with the final loss
        (``world``: the processes whose samples the baseline averages)."""
        b = self.baseline
        if b in (None, False, "none"):
            return None
        if callable(b):
            return loss - b(loss)
        return loss - (tp.leave_one_out(loss, world) if b in (True, "loo")
                       else tp.batch_mean(loss, world))

    @property
    def baseline_func(self) -> Callable | None:
        """The user's baseline function, when ``baseline`` is one (else None)."""
        return self.baseline if callable(self.baseline) else None


class BaselineProp(Propagator):
    """Subtracts a baseline from the ``local_loss`` message, sending ``baselined_loss`` on."""

    options = ("baseline",)

    def __init__(self, baseline: Any = "loo") -> None:
        super().__init__()
        _baseline_part(baseline)
        self.baseline = baseline

    def parts(self) -> list[Part]:
        return [_baseline_part(self.baseline)]

    @property
    def baseline_func(self) -> Callable | None:
        """The user's baseline function, when ``baseline`` is one (else None)."""
        return self.baseline if callable(self.baseline) else None


class SkipProp(Propagator):
    """Passes gradients through and sends the messages ``skip`` nodes back (``skip=1`` is the
    previous node, as in Proppo), so the nodes in between receive none."""

    options = ("skip",)

    def __init__(self, skip: int = 1) -> None:
        super().__init__()
        if not isinstance(skip, int) or skip < 1:
            raise ValueError(f"SkipProp(skip={skip!r}): skip must be a positive int")
        self.skip = skip
        self.target = -skip


class PauseProp(Propagator):
    """Collects every gradient reaching its output before sending their sum on.  A compiled
    backward always sums a value's gradients before differentiating through it, so this is
    the identity node; it exists so Proppo programs run unchanged (``backprop`` as in
    :class:`RPProp`)."""

    options = ("backprop",)

    def __init__(self, backprop: bool = True) -> None:
        super().__init__()
        self.backprop = bool(backprop)


class SumProp(Propagator):
    """Adds the message ``local_name`` into the running sum ``sum_name`` flowing backward
    (e.g. rewards into returns)."""

    options = ("sum_name", "local_name")

    def __init__(self, sum_name: str, local_name: str) -> None:
        super().__init__()
        if not (isinstance(sum_name, str) and isinstance(local_name, str)):
            raise TypeError("SumProp(sum_name, local_name) takes two message names (strings)")
        self.sum_name, self.local_name = sum_name, local_name

    def parts(self) -> list[Part]:
        return [Part(tp.identity_forward, tp.identity_backward), Part(None, tp.sum_backward)]


class ComboProp(Propagator):
    """One node built from several propagators' parts, run forward in order and backward in
    reverse (Proppo's sequence propagators).  At most one member may compute the output."""

    def __init__(self, *propagators: Propagator) -> None:
        if len(propagators) == 1 and isinstance(propagators[0], (list, tuple)):
            propagators = tuple(propagators[0])
        for p in propagators:
            if not isinstance(p, Propagator):
                raise TypeError(f"ComboProp members must be propagators, not {p!r}")
        self.members = tuple(propagators)
        outputs = [p for p in propagators
                   if any(pt.forward not in (None, tp.identity_forward) for pt in p.parts())]
        if len(outputs) > 1:
            raise ValueError("ComboProp: more than one member computes the node output "
                             f"({outputs}); use ChainProp to apply them one after another")
        self.keywords = tuple(dict.fromkeys(k for p in propagators for k in p.keywords))
        defaults: dict = {}
        for p in propagators:
            defaults.update(p.defaults)
        super().__init__(**defaults)
        self.target = next((p.target for p in propagators if getattr(p, "target", None)), None)

    def parts(self) -> list[Part]:
        parts = [pt for p in self.members for pt in p.parts()]
        # identity parts only pass the gradient; with a computing member they would add a
        # second path
        if any(pt.forward not in (None, tp.identity_forward) for pt in parts):
            parts = [pt for pt in parts if pt.forward is not tp.identity_forward]
        return parts

    def structure(self) -> tuple:
        return (type(self), tuple(p.structure() for p in self.members))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "members":
            raise AttributeError(name)
        for p in self.members:  # options (k_interval, baseline, ...) of the members
            if name in getattr(p, "options", ()):
                return getattr(p, name)
        raise AttributeError(name)

    @property
    def options(self) -> tuple:  # type: ignore[override]
        """The members' structural options (what changes their generated code)."""
        return tuple(dict.fromkeys(o for p in self.members for o in p.options))

    @property
    def label(self) -> str:
        return f"ComboProp({', '.join(p.label for p in self.members)})"

    def loss_propagator(self) -> LossProp:
        return self.members[-1].loss_propagator() if self.members else LossProp()


class ChainProp(Propagator):
    """Several nodes at one call site, applied one after another: the output of each is the
    input of the next, and the backward visits them in reverse."""

    def __init__(self, *propagators: Propagator) -> None:
        if len(propagators) == 1 and isinstance(propagators[0], (list, tuple)):
            propagators = tuple(propagators[0])
        if not propagators:
            raise ValueError("ChainProp needs at least one propagator")
        for p in propagators:
            if not isinstance(p, Propagator):
                raise TypeError(f"ChainProp members must be propagators, not {p!r}")
        self.members = tuple(propagators)
        self.keywords = tuple(dict.fromkeys(k for p in propagators for k in p.keywords))
        super().__init__()

    def structure(self) -> tuple:
        return (type(self), tuple(p.structure() for p in self.members))

    @property
    def label(self) -> str:
        return f"ChainProp({', '.join(p.label for p in self.members)})"

    def loss_propagator(self) -> LossProp:
        return self.members[-1].loss_propagator()


class ResampleProp(Propagator):
    """Replaces the batch by a fresh one drawn from a Gaussian fitted to it (mean and full
    covariance); gradients flow back through the fitted mean and covariance."""

    def parts(self) -> list[Part]:
        return [Part(tp.resample_forward, tp.resample_backward)]


class GSLoss(Propagator):
    """Gaussian shaping at a distal node: resamples the batch from a fitted Gaussian, and
    replaces the cost-to-go sent to earlier nodes by the surrogate whose likelihood-ratio
    gradient is the gradient of the expected cost through the fitted mean and covariance,
    built from the gradients at the resampled points.  No pathwise gradient: use it with LR
    nodes upstream (GSProp adds the pathwise one for RP and TP)."""

    def parts(self) -> list[Part]:
        return [Part(tp.resample_forward, tp.gs_loss_backward)]

    def loss_propagator(self) -> LossProp:
        return LossProp(lossgrad=True)


class GSProp(Propagator):
    """Gaussian shaping with both messages: the surrogate cost-to-go of :class:`GSLoss` for LR
    and TP nodes upstream, and the pathwise gradient of :class:`ResampleProp` for RP and TP."""

    def parts(self) -> list[Part]:
        return [Part(tp.resample_forward, tp.resample_backward), Part(None, tp.gs_loss_backward)]


class ProxProp(Propagator):
    """Proximal backpropagation (Frerix et al. 2018) at a layer node,
    ``manager.forward(x, layer=module)``, for a layer linear in its parameters (Linear, Conv1d,
    Conv2d, or any module whose output is linear in its parameters: checked on its first batch).

    The node computes ``module(x)``; its backward sends the ordinary backprop message upstream
    and gives the parameters, in ``.grad``, the proximal direction
    ``(J^T J + I/tau)^-1 J^T g`` (J: the layer's Jacobian in its parameters, g: the gradient
    at its output; for Linear, ``J^T J = A^T A`` with A the input and a column of ones) so that
    any torch.optim optimizer can use it, and plain SGD with lr 1 lands on the proximal point.
    ``mode``: 'exact', 'cg<N>' (N conjugate-gradient steps on that system, from 0) or
    'gradient' (the plain gradient ``J^T g``).  ``tau`` and ``mode`` may also be given per call
    site and changed between calls without recompiling.
    """

    keywords = ("layer", "tau", "mode")
    internal = ("linear",)

    def __init__(self, tau: float = 1.0, mode: str = "cg1", **defaults: Any) -> None:
        from propgen.templates.layers import LinearLayers
        from propgen.templates.proximal import check_settings

        check_settings(tau, mode)  # refused here, not at the first backward
        super().__init__(tau=tau, mode=mode, **defaults)
        self.linear = LinearLayers()

    def parts(self) -> list[Part]:
        return [Part(tp.prox_forward, tp.prox_backward)]
