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

from propgen.templates import propagators as tp

__all__ = ["Part", "Propagator", "BackPropagator", "RPProp", "LRProp", "TotalProp", "LossProp"]


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

    def __init__(self, **defaults: Any) -> None:
        unknown = sorted(set(defaults) - set(self.keywords))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got the keyword(s) {unknown}, which it does not accept;"
                f" it accepts {list(self.keywords) or 'none'}")
        self.defaults = dict(defaults)

    def parts(self) -> list[Part]:
        return [Part(tp.identity_forward, tp.identity_backward)]

    def structure(self) -> tuple:
        """What the generated code depends on: the class, its options, and which keywords
        have defaults (their values are read at run time)."""
        opts = tuple((k, _key(getattr(self, k))) for k in self.options)
        dist = self.defaults.get("dist_class")
        return (type(self), opts, tuple(sorted(self.defaults)), dist)

    def loss_propagator(self) -> LossProp:
        return LossProp()

    @property
    def label(self) -> str:
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


class LossProp:
    """The loss node appended by ``manager.backward(loss)``: sends the per-sample loss as the
    ``local_loss`` message and, with ``lossgrad`` (the default), the gradient of its batch mean.
    """

    def __init__(self, lossgrad: bool = True) -> None:
        self.lossgrad = bool(lossgrad)

    def __repr__(self) -> str:
        return f"LossProp(lossgrad={self.lossgrad})"
