"""Small helpers called by forward-mode (JVP) code.

Tangents mirror their primal values: a tensor's tangent is a tensor of its shape, a list's
tangent is a list of its items' tangents, and None stands for a zero tangent wherever one
may sit (inside a container, or a variable a branch did not set).  Like ``runtime``, these
are plain functions with no state.
"""

from __future__ import annotations

import linecache
import operator
import re
import sys
from collections.abc import Callable, ItemsView, KeysView, ValuesView
from typing import Any

import torch

from propgen.errors import Location, UnsupportedSyntaxError

__all__ = [
    "tangent_or_zeros",
    "zeros_tangent",
    "store_tangent",
    "zero_tangents",
    "tangent_items",
    "method_of",
    "operation_of",
    "opaque_jvp",
    "in_place_jvp",
    "ones_seed",
    "view_tangent",
    "item_tangent",
]

_VIEWS = (ItemsView, KeysView, ValuesView)


def zeros_tangent(x: Any) -> Any:
    """The zero tangent of ``x``: zeros of its shape for a floating tensor, 0.0 for a number,
    the same structure for containers, None for what has no tangent (shapes, None)."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex():
            return torch.zeros_like(x)
        # an integer or boolean tensor read where a template expects a tangent (a mask, the
        # indices of torch.max): a zero it can compute with
        return torch.zeros(x.shape, device=x.device)
    if isinstance(x, torch.Size):
        return None
    if isinstance(x, (float, complex, int)):
        # an int or bool that "varies" (read from a varied container, or the start of an
        # accumulator: acc = False, then acc = acc * x) is a constant
        return 0.0
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # named tuples (torch.max's result)
        return type(x)(*(zeros_tangent(e) for e in x))
    if isinstance(x, _VIEWS):
        return [zeros_tangent(e) for e in x]
    if isinstance(x, (list, tuple)):
        return type(x)(zeros_tangent(e) for e in x)
    if isinstance(x, dict):
        return {k: zeros_tangent(v) for k, v in x.items()}
    return None


def tangent_or_zeros(t: Any, x: Any) -> Any:
    """``t``, with zeros of ``x``'s shape where it is None (at any depth of a container)."""
    if t is None:
        return zeros_tangent(x)
    if isinstance(x, _VIEWS):
        x = list(x)
    if isinstance(t, (list, tuple)) and isinstance(x, (list, tuple)):
        items = [tangent_or_zeros(a, b) for a, b in zip(t, x)]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    if isinstance(t, dict) and isinstance(x, dict):
        return {k: tangent_or_zeros(t.get(k), v) for k, v in x.items()}
    return t


def item_tangent(t: Any, index: Any) -> Any:
    """``t[index]`` where ``t`` (the tangent of a container or a tensor) may be None."""
    return None if t is None else t[index]


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
        if isinstance(x, _VIEWS):
            x = list(x)
        t = tangent_or_zeros(t, x)
        if t is None or not _differentiable(x):
            continue  # integer tensors (indices), shapes, None: no tangent
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            x = torch.as_tensor(x, dtype=torch.get_default_dtype())
            t = torch.as_tensor(t, dtype=x.dtype)
        out.append((i, _dense(x), _dense(t)))
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
    try:
        return torch.func.jvp(call, primals, tans)
    except RuntimeError as exc:
        if "to return only tensors" not in str(exc):
            raise
        out = fn(*args, **kwargs)
        if _constant(out):  # sizes, dims, flags: nothing that carries a tangent
            return out, None
        frame = sys._getframe(1)
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
        raise UnsupportedSyntaxError(
            _user_line(frame.f_code.co_filename, frame.f_lineno),
            f"forward mode through the call {name}(...), which returns an object whose "
            "tensors propgen cannot see,",
            "register tangent templates (@propgen.tangent) for this call and the calls that use "
            "its result, or keep such objects inside a function of tensors to tensors",
        ) from None


def in_place_jvp(fn: Callable, args: tuple, kwargs: dict, tangents: tuple,
                 tangent_kwargs: dict) -> tuple:
    """``fn(*args, **kwargs)``, a call that updates ``args[0]`` in place, made; returns
    ``(args[0], its new tangent)``.  The call runs on a copy through torch.func.jvp (as
    ``opaque_jvp``), and the tensor takes the copy's new values."""

    def call(tensor: Any, *rest: Any, **kw: Any) -> Any:
        return fn(tensor.clone(), *rest, **kw)

    call.__name__ = getattr(fn, "__name__", "call")
    value, tangent = opaque_jvp(call, args, kwargs, tangents, tangent_kwargs)
    tensor = args[0]
    tensor.copy_(value)
    return tensor, tangent


def _dense(t: Any) -> Any:
    """A tangent torch.func.jvp accepts: an expanded tangent (``expand_like``'s stride-0 view)
    is materialized, since forward AD refuses tangents whose elements share memory."""
    if isinstance(t, (list, tuple)):
        return type(t)(_dense(e) for e in t)
    if isinstance(t, torch.Tensor) and t.numel() > 1 and 0 in t.stride():
        return t.contiguous()
    return t


def _differentiable(x: Any) -> bool:
    """A value torch.func.jvp can move: a floating tensor, a float, or a list or tuple of
    floating tensors."""
    if isinstance(x, torch.Tensor):
        return x.is_floating_point() or x.is_complex()
    if isinstance(x, (list, tuple)):
        return bool(x) and all(isinstance(e, torch.Tensor) and _differentiable(e) for e in x)
    return isinstance(x, float)


def _constant(value: Any) -> bool:
    """Whether ``value`` holds nothing a tangent could ride on (no floating tensor, and no
    object that might hide one)."""
    if value is None or isinstance(value, (bool, int, str, torch.Size, torch.dtype,
                                           torch.device)):
        return True
    if isinstance(value, torch.Tensor):
        return not (value.is_floating_point() or value.is_complex())
    if isinstance(value, (list, tuple)):
        return all(_constant(v) for v in value)
    if isinstance(value, dict):
        return all(_constant(v) for v in value.values())
    return False


def _user_line(path: str, lineno: int) -> Location | None:
    """The user's line that generated code at path:lineno came from (the provenance comment
    above it), or None when there is none."""
    for i in range(lineno, 0, -1):
        m = re.match(r"\s*# (\S+):(\d+)  (.*)", linecache.getline(path, i))
        if m:
            return Location(m.group(1), int(m.group(2)), m.group(3))
    return None


def view_tangent(t_receiver: Any, receiver: Any, name: str, args: tuple, t_args: tuple) -> Any:
    """The tangent of ``receiver.name(*args)`` for a dict's reading methods (values, items,
    get, keys); another receiver (a tensor's ``.values()``) goes through torch.func.jvp."""
    if not isinstance(receiver, dict):
        return opaque_jvp(method_of(name), (receiver, *args), {}, (t_receiver, *t_args), {})[1]
    mirror = t_receiver if t_receiver is not None else dict.fromkeys(receiver)
    if name == "values":
        return [mirror.get(k) for k in receiver]
    if name == "items":
        return [(None, mirror.get(k)) for k in receiver]
    if name == "get":
        if args[0] in receiver:
            return mirror.get(args[0])
        return t_args[1] if len(t_args) > 1 else None
    return None  # keys carry no tangent


def ones_seed(result: Any) -> Any:
    """The gradient seed of a scalar result: 1 of its type."""
    return torch.ones_like(result) if isinstance(result, torch.Tensor) else 1.0
