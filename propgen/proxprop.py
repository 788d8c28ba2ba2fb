"""ProxProp outside propagated programs: layer classes for ordinary PyTorch code.

Inside a ``@propgen.propagate`` program a layer node with :class:`propgen.ProxProp` is the way
to take proximal steps.  For a model trained with ``loss.backward()``,
:func:`proxprop_module` turns any layer class linear in its parameters into one whose backward
sends the ordinary gradient to its input and the proximal direction to its parameters' ``.grad``
(the same math: :mod:`propgen.templates.proximal`)::

    ProxConv3d = propgen.proxprop_module(torch.nn.Conv3d)
    conv = ProxConv3d(3, 8, 3, tau=0.1, mode="cg3")     # or ProxPropLayer(nn.Conv3d(...), ...)
"""

from __future__ import annotations

from typing import Any

import torch

from propgen.templates.layers import LinearLayers
from propgen.templates.proximal import check_settings, layer_input_grad, proximal_direction

__all__ = ["ProxPropLayer", "proxprop_module", "ProxPropLinear", "ProxPropConv2d"]


class _ProximalCall(torch.autograd.Function):
    """``layer(x)`` whose backward gives the parameters the proximal direction."""

    @staticmethod
    def forward(ctx: Any, layer: torch.nn.Module, tau: float, mode: str, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.layer, ctx.tau, ctx.mode = layer, tau, mode
        ctx.save_for_backward(x)
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        gx = layer_input_grad(ctx.layer, x, g) if ctx.needs_input_grad[3] else None
        steps = proximal_direction(ctx.layer, x, g, ctx.tau, ctx.mode)
        return (None, None, None, gx, *steps)


class ProxPropLayer(torch.nn.Module):
    """``layer`` (linear in its parameters) taking proximal steps in ordinary PyTorch code:
    ``loss.backward()`` sends the ordinary gradient to its input and the proximal direction
    ``(J^T J + I/tau)^-1 J^T g`` to its parameters' ``.grad``.  ``mode``: 'exact', 'cg<N>' or
    'gradient'.  A layer that is not linear in its parameters is refused on its first batch."""

    def __init__(self, layer: torch.nn.Module, tau: float = 1.0, mode: str = "cg1") -> None:
        super().__init__()
        check_settings(tau, mode)
        self.layer, self.tau, self.mode = layer, float(tau), mode
        self._linear = LinearLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)``; while recording gradients, through a function whose backward gives
        the parameters the proximal direction."""
        params = [p for p in self.layer.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not params:
            return self.layer(x)
        self._linear.check(self.layer, x, type(self).__name__)
        return _ProximalCall.apply(self.layer, self.tau, self.mode, x, *params)

    def extra_repr(self) -> str:
        """``tau`` and ``mode``, shown after the wrapped layer when the module prints."""
        return f"tau={self.tau}, mode={self.mode!r}"


def proxprop_module(base: type[torch.nn.Module]) -> type[ProxPropLayer]:
    """A layer class taking proximal steps, made from ``base`` (a class linear in its
    parameters): it takes ``base``'s arguments plus ``tau`` and ``mode``, and holds the
    ``base`` instance as ``.layer``."""

    def __init__(self: Any, *args: Any, tau: float = 1.0, mode: str = "cg1", **kwargs: Any
                 ) -> None:
        ProxPropLayer.__init__(self, base(*args, **kwargs), tau, mode)

    return type(f"ProxProp{base.__name__}", (ProxPropLayer,), {
        "__init__": __init__,
        "__doc__": f"{base.__name__} taking proximal steps (made by propgen.proxprop_module).",
    })


ProxPropLinear = proxprop_module(torch.nn.Linear)
ProxPropConv2d = proxprop_module(torch.nn.Conv2d)
