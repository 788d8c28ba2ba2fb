"""Layer nodes: what a node given ``layer=module`` does with the layer.

A propagator that handles layers itself (ProxProp, the sigprop propagators) reads the module
from its ``layer`` keyword; under any other propagator the node computes ``module(x)`` as
ordinary program code first.  The proximal math is in :mod:`propgen.templates.proximal`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from propgen.templates.proximal import (
    check_settings,
    layer_input_grad,
    linear_in_params,
    proximal_direction,
)

__all__ = ["apply_layer", "layer_input_grad", "proximal_step", "LinearLayers", "layer_name",
           "site_error"]

# layers linear in their parameters by construction (the exact classes: a subclass may
# override forward, and is checked like any other layer)
_LINEAR_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


class LinearLayers:
    """Which layers a ProxProp node has checked to be linear in their parameters (each layer
    is checked once, on its first batch), held by the propagator, not by the layers."""

    def __init__(self) -> None:
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def check(self, layer: torch.nn.Module, x: torch.Tensor, site: str) -> None:
        if type(layer) in _LINEAR_TYPES or self.seen.get(layer):
            return
        if not linear_in_params(layer, x):
            raise site_error(site, f"ProxProp's layer {layer_name(layer)} is not linear in its "
                         "parameters, so the proximal step has no closed form",
                         "give ProxProp the linear part alone (manager.forward(x, layer="
                         "linear)) and apply the nonlinearity after the node")
        self.seen[layer] = True


def apply_layer(layer: Any, x: torch.Tensor, site: str) -> torch.Tensor:
    """The node's output ``layer(x)`` (the forward pass needs no graph: the backward templates
    compute what they send)."""
    if not callable(layer):
        raise site_error(site, "this node's propagator trains a layer but the call site gives "
                     f"layer={layer!r}", "write manager.forward(x, layer=module)")
    with torch.no_grad():
        return layer(x)


def proximal_step(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, tau: float,
                  mode: str, linear: LinearLayers, site: str) -> None:
    """Add the proximal direction of every trainable parameter to its ``.grad`` (added, as
    ``loss.backward()`` adds, so a layer used at several nodes gets the sum)."""
    try:
        check_settings(tau, mode)  # values given at a call site are checked here
    except ValueError as e:
        raise site_error(site, f"ProxProp(tau={tau!r}, mode={mode!r}): {e}",
                         "use a tau > 0 and mode='exact', 'cg<N>' (cg3, say) or 'gradient'"
                         ) from None
    params = [p for p in layer.parameters() if p.requires_grad]
    if not params:  # a frozen layer: only the message upstream
        return
    linear.check(layer, x, site)
    for p, step in zip(params, proximal_direction(layer, x, g, tau, mode)):
        p.grad = step if p.grad is None else p.grad + step


def layer_name(layer: Any) -> str:
    text = repr(layer).splitlines()[0]
    return text if len(text) < 60 else text[:57] + "..."


def site_error(site: str, problem: str, advice: str) -> Exception:
    from propgen.errors import ConfigurationError

    return ConfigurationError(None, f"{site}: {problem}", advice)
