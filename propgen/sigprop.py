"""Signal propagation (forward learning) as propagators, and a preset that runs an existing
``nn.Sequential`` with them.

* :class:`SignalProp` at the first node: ``h = layer(x)``, ``t = context_layer(one-hot context)``.
* :class:`SigProp` at the hidden nodes: the layer applied to both streams, trained on
  ``loss(h, t, stream)`` by its own optimizer.
* ``BackPropagator`` at the output node: trained by the program's loss, as usual.

The target stream travels forward between nodes as a forward message (``m['signal']`` in the
templates).  With ``update='forward'`` (the default) each layer's optimizer steps during the
forward pass; ``update='backward'`` defers the steps to ``manager.backward``, with the same
numbers (each layer's loss reads only its own parameters and detached inputs).  A call with
no context (``net(x)``) computes the input stream alone: inference.  The math is in
:mod:`propgen.templates.sigprop`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from propgen.manager import PropagationManager, propagate
from propgen.propagators import BackPropagator, Part, Propagator
from propgen.templates import propagators as tp
from propgen.templates.layers import layer_name as _name
from propgen.templates.layers import site_error as _error
from propgen.templates.sigprop import (
    input_target_argmax,
    input_target_max,
    input_target_topk,
    label_direct,
)

__all__ = [
    "SignalProp", "SigProp", "Monitor", "SigpropManager", "LayerNetwork", "input_target_max",
    "input_target_argmax", "input_target_topk", "label_direct",
]

_UPDATES = ("forward", "backward")


class LocalLearning:
    """What a forward-learning propagator keeps across calls: each layer's optimizer, built on
    first use from the ``optimizer`` factory."""

    def __init__(self) -> None:
        self.optimizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def parameters(self, layer: Any, target_layer: Any) -> list:
        seen: dict = {}
        for mod in (layer, target_layer):
            if isinstance(mod, torch.nn.Module):
                for p in mod.parameters():
                    if p.requires_grad:
                        seen[id(p)] = p
        return list(seen.values())

    def optimizer(self, optimizer: Any, layer: Any, params: list, site: str) -> Any:
        key = layer if isinstance(layer, torch.nn.Module) else self
        opt = self.optimizers.get(key)
        if opt is not None:
            return opt
        if optimizer is None:
            raise _error(site, f"the forward-learning layer {_name(layer)} has no optimizer",
                         "give the propagator optimizer=lambda params: torch.optim.Adam("
                         "params, lr=5e-4) (a factory called once per layer) or an optimizer "
                         "holding the layer's parameters")
        if isinstance(optimizer, torch.optim.Optimizer):
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            missing = [p for p in params if id(p) not in held]
            if missing:
                raise _error(site, f"the optimizer given for the layer {_name(layer)} does not "
                             f"hold {len(missing)} of its {len(params)} parameters",
                             "pass a factory (optimizer=lambda params: ...) so that each layer "
                             "gets its own, or an optimizer over all of them")
            opt = optimizer
        elif callable(optimizer):
            opt = optimizer(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise _error(site, f"the optimizer factory returned {type(opt).__name__}",
                             "return a torch.optim.Optimizer over the parameters given")
        else:
            raise _error(site, f"optimizer={optimizer!r}", "pass a torch.optim.Optimizer or "
                         "a factory: optimizer=lambda params: torch.optim.Adam(params)")
        self.optimizers[key] = opt
        return opt


class _Learning(Propagator):
    options = ("update",)
    internal = ("state",)

    def __init__(self, update: str = "forward", **defaults: Any) -> None:
        if update not in _UPDATES:
            raise ValueError(f"{type(self).__name__}(update={update!r}): use 'forward' (the "
                             "layer steps during the forward pass) or 'backward'")
        super().__init__(**defaults)
        self.update = update
        self.state = LocalLearning()

    def _parts(self, forward: Callable) -> list[Part]:
        back = tp.sigprop_deferred_backward if self.update == "backward" else None
        return [Part(forward, back)]


class SignalProp(_Learning):
    """The first node of signal propagation: ``manager.forward(x, layer=input_layer,
    context=labels)`` computes ``h = input_layer(x)`` (x itself without a layer) and starts the
    target stream ``t = context_layer(one_hot(labels))``, reshaped to h's shape when it has as
    many elements; both layers are trained on ``loss(h, t, stream)``.  Class labels need
    ``num_classes``; a float context is used as given.  ``classes=True`` makes the target
    stream one row per class (the identity context) for :func:`label_direct`."""

    keywords = ("layer", "context", "context_layer", "num_classes", "loss", "optimizer",
                "monitor")
    options = ("update", "classes")

    def __init__(self, update: str = "forward", classes: bool = False, **defaults: Any) -> None:
        super().__init__(update, **defaults)
        self.classes = bool(classes)

    def parts(self) -> list[Part]:
        return self._parts(tp.signal_forward)


class SigProp(_Learning):
    """A hidden node of signal propagation: ``manager.forward(h, layer=block)`` applies the
    block to the input stream and to the target stream, trains it on ``loss(h, t, stream)``
    with its own optimizer, and sends both on detached."""

    keywords = ("layer", "loss", "optimizer", "monitor")

    def parts(self) -> list[Part]:
        return self._parts(tp.sigprop_forward)


class Monitor:
    """Per-layer loss and accuracy of forward-learning layers, averaged over the batches
    recorded since :meth:`reset` (accuracy: how often a row's most similar target row is a
    right one).  Layers are named by :meth:`watch`, else by class and call site."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self.labels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def watch(self, model: torch.nn.Module, prefix: str = "") -> None:
        """Name ``model``'s submodules by their attribute paths (``layers.1``)."""
        for name, mod in model.named_modules(prefix=prefix):
            if name and mod not in self.labels:
                self.labels[mod] = f"{name} ({type(mod).__name__})"

    def label(self, layer: Any, site: str) -> str:
        """The name ``layer`` is reported under: its :meth:`watch` name, else its class, a
        number and the call site ``site`` where it first ran."""
        if not isinstance(layer, torch.nn.Module):
            return site
        if layer not in self.labels:
            self.labels[layer] = f"{type(layer).__name__}#{len(self.labels)} at {site}"
        return self.labels[layer]

    def record(self, layer: Any, site: str, loss: torch.Tensor, correct: torch.Tensor,
               count: int) -> None:
        """Add one batch of ``count`` samples: the layer's mean ``loss`` and the number of
        ``correct`` rows (called by the forward-learning templates)."""
        t = self.totals.setdefault(self.label(layer, site), [0.0, 0.0, 0.0])
        t[0] += float(loss) * count
        t[1] += float(correct)
        t[2] += count

    def summary(self) -> dict[str, tuple[float, float]]:
        """name -> (mean loss, accuracy), in the order the layers ran."""
        return {k: (v[0] / v[2], v[1] / v[2]) for k, v in self.totals.items() if v[2]}

    def reset(self) -> None:
        """Forget the totals (call it at the start of an epoch); names are kept."""
        self.totals.clear()

    def __str__(self) -> str:
        rows = [f"{name}: loss {loss:.4f}  acc {acc:.3f}"
                for name, (loss, acc) in self.summary().items()]
        return "\n".join(rows) if rows else "(nothing recorded)"


class SigpropManager(PropagationManager):
    """A manager preset for signal propagation over a network of layer nodes: SigProp by
    default, ``'signal'`` for the first node and ``'output'`` (BackPropagator) for the last.

    ``algorithm='backprop'`` makes every node a BackPropagator: the same program trained by
    ordinary backpropagation, for comparison.  :meth:`wrap` runs an existing ``nn.Sequential``.
    """

    def __init__(self, loss: Callable = input_target_max, optimizer: Any = None,
                 context_layer: Any = None, num_classes: int | None = None,
                 monitor: Monitor | None = None, update: str = "forward",
                 classes: bool = False, algorithm: str = "sigprop") -> None:
        if algorithm not in ("sigprop", "backprop"):
            raise ValueError(f"SigpropManager(algorithm={algorithm!r}): 'sigprop' or 'backprop'")
        if algorithm == "backprop":
            super().__init__(BackPropagator())
            self.add_propagator("signal", BackPropagator())
        else:
            common = {"loss": loss, "monitor": monitor}
            if optimizer is not None:
                common["optimizer"] = optimizer
            super().__init__(SigProp(update=update, **common))
            signal = dict(common, context_layer=context_layer)
            if num_classes is not None:
                signal["num_classes"] = num_classes
            self.add_propagator("signal", SignalProp(update=update, classes=classes, **signal))
        self.add_propagator("output", BackPropagator())
        self.algorithm = algorithm

    def wrap(self, layers: torch.nn.Sequential) -> LayerNetwork:
        """The layers of ``layers`` as nodes: the first at the signal node, the last at the
        output node, the others hidden."""
        return LayerNetwork(layers, self)


@propagate
def _layer_nodes(x, context, first, hidden, last, manager):
    h = manager.forward(x, layer=first, context=context, local_propagator="signal")
    for layer in hidden:
        h = manager.forward(h, layer=layer)
    return manager.forward(h, layer=last, local_propagator="output")


class LayerNetwork(torch.nn.Module):
    """An ``nn.Sequential`` (at least two layers) whose layers run as propagation nodes:
    ``net(x, context)`` trains as the manager says, ``net(x)`` is inference.  Call
    ``manager.backward(loss)`` with the loss of the output, as for any propagated function."""

    def __init__(self, layers: torch.nn.Sequential, manager: PropagationManager) -> None:
        super().__init__()
        mods = list(layers)
        if len(mods) < 2:
            raise ValueError("LayerNetwork needs at least two layers (signal and output)")
        self.layers = layers
        self.manager = manager
        for prop in (manager.default_propagator, *manager.propagators.values()):
            monitor = prop.defaults.get("monitor")
            if isinstance(monitor, Monitor):
                monitor.watch(layers, "layers")

    def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        mods = list(self.layers)
        return _layer_nodes(x, context, mods[0], tuple(mods[1:-1]), mods[-1], self.manager)

