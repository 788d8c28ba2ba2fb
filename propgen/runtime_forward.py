"""Small helpers called by forward-mode (JVP) code.

Tangents mirror their primal values: a tensor's tangent is a tensor of its shape, a list's
tangent is a list of its items' tangents, and None stands for a zero tangent wherever one
may sit (inside a container, or a variable a branch did not set).  Like ``runtime``, these
are plain functions with no state.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "tangent_or_zeros",
    "zeros_tangent",
    "store_tangent",
    "zero_tangents",
    "tangent_items",
    "method_of",
    "operation_of",
    "opaque_jvp",
    "ones_seed",
]


def zeros_tangent(x: Any) -> Any:
    """The zero tangent of ``x``: zeros of its shape for a floating tensor, 0.0 for a float,
    the same structure for containers, None for what has no tangent (ints, shapes, None)."""
    if isinstance(x, torch.Tensor):
        return torch.zeros_like(x) if x.is_floating_point() or x.is_complex() else None
    if isinstance(x, (float, complex)):
        return 0.0
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # named tuples (torch.max's result)
        return type(x)(*(zeros_tangent(e) for e in x))
    if isinstance(x, (list, tuple)):
        return type(x)(zeros_tangent(e) for e in x)
    if isinstance(x, dict):
        return {k: zeros_tangent(v) for k, v in x.items()}
    return None


def tangent_or_zeros(t: Any, x: Any) -> Any:
    """``t``, with zeros of ``x``'s shape where it is None (at any depth of a container)."""
    if t is None:
        return zeros_tangent(x)
    if isinstance(t, (list, tuple)) and isinstance(x, (list, tuple)):
        items = [tangent_or_zeros(a, b) for a, b in zip(t, x)]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    if isinstance(t, dict) and isinstance(x, dict):
        return {k: tangent_or_zeros(t.get(k), v) for k, v in x.items()}
    return t


def zero_tangents(items: Any) -> Any:
    """The tangent mirror of a container that holds no tangent yet."""
    if isinstance(items, dict):
        return dict.fromkeys(items)
    return [None] * len(items)


def tangent_items(t: Any, items: Any) -> list:
    """The tangents of ``items`` as a list to extend a tangent list with."""
    return [None] * len(items) if t is None else list(t)


def store_tangent(t_buffer: Any, buffer: Any, index: Any, t_value: Any) -> Any:
    """``buffer[index] = value`` done to the buffer's tangent; returns the tangent buffer.

    The store happens in place where the tangent already exists, so names that share the
    buffer share its tangent, as they share the primal store."""
    if isinstance(buffer, torch.Tensor):
        if t_buffer is None:
            if t_value is None:
                return None
            t_buffer = torch.zeros_like(buffer)
        t_buffer[index] = 0.0 if t_value is None else t_value
        return t_buffer
    if t_buffer is None:
        t_buffer = zero_tangents(buffer)
    t_buffer[index] = t_value
    return t_buffer


def method_of(name: str) -> Callable:
    """``f(receiver, *args)`` calling ``receiver.name(*args)``: an opaque method call."""

    def call(receiver: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(receiver, name)(*args, **kwargs)

    call.__name__ = name
    return call


_OPERATORS = {
    "Add": operator.add, "Sub": operator.sub, "Mult": operator.mul, "Div": operator.truediv,
    "MatMult": operator.matmul, "Pow": operator.pow, "Mod": operator.mod,
    "FloorDiv": operator.floordiv, "USub": operator.neg, "UAdd": operator.pos,
}


def operation_of(kind: str, name: str) -> Callable:
    """The function computing an operator or attribute read that has no tangent template."""
    if kind == "Attribute":
        return operator.attrgetter(name)
    if kind == "Subscript":
        return operator.getitem
    return _OPERATORS[name]


def _tensor_args(args: tuple, tangents: tuple) -> list:
    """Positions whose argument carries a tangent, as (index, primal, tangent) in tensors."""
    out = []
    for i, (x, t) in enumerate(zip(args, tangents)):
        if t is None:
            continue
        t = tangent_or_zeros(t, x)
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            x = torch.as_tensor(x, dtype=torch.get_default_dtype())
            t = torch.as_tensor(t, dtype=x.dtype)
        out.append((i, x, t))
    return out


def opaque_jvp(fn: Callable, args: tuple, kwargs: dict, tangents: tuple,
               tangent_kwargs: dict) -> tuple:
    """``(fn(*args, **kwargs), its tangent)`` for a call propgen cannot read, through
    ``torch.func.jvp``; arguments without a tangent are held fixed."""
    names = list(kwargs)
    flat_args = tuple(args) + tuple(kwargs[k] for k in names)
    flat_tans = tuple(tangents) + tuple(tangent_kwargs.get(k) for k in names)
    moving = _tensor_args(flat_args, flat_tans)
    if not moving:
        return fn(*args, **kwargs), None

    def call(*values: Any) -> Any:
        full = list(flat_args)
        for (i, _, _), v in zip(moving, values):
            full[i] = v
        pos = full[:len(args)]
        kw = dict(zip(names, full[len(args):]))
        return fn(*pos, **kw)

    primals = tuple(x for _, x, _ in moving)
    tans = tuple(t for _, _, t in moving)
    return torch.func.jvp(call, primals, tans)


def ones_seed(result: Any) -> Any:
    """The gradient seed of a scalar result: 1 of its type."""
    return torch.ones_like(result) if isinstance(result, torch.Tensor) else 1.0
