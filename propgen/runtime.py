"""Small helpers called by generated code.

Everything here is a plain function of its arguments: generated code does the work and these
only cover what would be noisy to inline (None-aware accumulation, container adjoints, the
vector-Jacobian product of an opaque call).  No state lives in this module.
"""

from __future__ import annotations

from collections.abc import ItemsView, KeysView, ValuesView
from typing import Any

import torch

__all__ = [
    "acc",
    "grad_or_zeros",
    "accumulate_grad",
    "track",
    "opaque_vjp",
    "seq_adjoint",
    "unpack_adjoint",
    "store_grad_value",
    "store_grad_buffer",
    "check_scalar",
    "check_bound",
    "pop_adjoint",
    "save_slot",
    "restore_slot",
    "meta",
    "undo_append",
    "undo_extend",
    "undo_pop",
    "unpop_adjoint",
    "redo_all",
    "receive",
    "route",
    "AbsoluteTarget",
    "check_finite",
    "remaining",
    "opaque_grad",
    "configuration_error",
]


def acc(a: Any, b: Any) -> Any:
    """``a + b`` where either may be None (no gradient yet); containers add elementwise."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, (list, tuple)):
        return [acc(x, y) for x, y in zip(a, b)]
    if isinstance(a, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = acc(out.get(k), v)
        return out
    return a + b


class TensorMeta:
    """A tensor's shape, dtype and device: what the backward keeps of a tensor it reads only
    to undo broadcasting or a reduction, so that the tensor's memory is freed."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, t: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device

    def dim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"TensorMeta(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


def meta(x: Any) -> Any:
    """``TensorMeta`` of a tensor; anything else as it is."""
    return TensorMeta(x) if isinstance(x, torch.Tensor) else x


def acc_into(a: Any, fresh: Any) -> Any:
    """``a + fresh`` for a ``fresh`` tensor that nothing else refers to: the sum is written
    into ``fresh`` when shapes, dtypes and devices agree (one allocation saved per
    accumulation, as in autograd's engine); otherwise it is ``acc(a, fresh)``."""
    if (
        isinstance(a, torch.Tensor)
        and isinstance(fresh, torch.Tensor)
        and a.shape == fresh.shape
        and a.dtype == fresh.dtype
        and a.device == fresh.device
        and not fresh.requires_grad
    ):
        return fresh.add_(a)
    return acc(a, fresh)


def grad_or_zeros(g: Any, x: Any) -> Any:
    """The gradient returned to the caller for ``x``: zeros shaped like x when none arrived."""
    if g is not None:
        if isinstance(x, torch.Tensor) and isinstance(g, torch.Tensor) and g.shape != x.shape:
            g = g.sum_to_size(x.shape) if x.dim() else g.sum()
        return g
    if isinstance(x, torch.Tensor):
        return torch.zeros_like(x)
    if isinstance(x, (list, tuple)):
        return type(x)(grad_or_zeros(None, e) for e in x)
    if isinstance(x, dict):
        return {k: grad_or_zeros(None, v) for k, v in x.items()}
    return 0.0


def accumulate_grad(leaf: Any, g: Any) -> None:
    """Add ``g`` to ``leaf.grad`` as ``loss.backward()`` would, for a leaf that requires grad."""
    if g is None or not isinstance(leaf, torch.Tensor) or not leaf.requires_grad:
        return
    if leaf.grad_fn is not None:  # a non-leaf tensor: autograd owns its history
        torch.autograd.backward(leaf, g)
        return
    if g.shape != leaf.shape:
        g = g.sum_to_size(leaf.shape)
    if leaf.grad is None:
        leaf.grad = g.detach().clone()
    else:
        leaf.grad += g


def track(x: Any) -> Any:
    """A fresh autograd leaf standing for ``x`` at the input of an opaque call."""
    if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
        return x.detach().requires_grad_()
    if isinstance(x, (list, tuple)):
        return type(x)(track(e) for e in x)
    if isinstance(x, dict):
        return {k: track(v) for k, v in x.items()}
    return x


# What an opaque call may return besides tensors and containers of them: values that carry
# no gradient.  Anything else could hide tensors from the vector-Jacobian product.
_PLAIN = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class _Hidden:
    """Stands in the flattened output for an object propgen cannot see inside."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj


def _flatten(obj: Any, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple, ValuesView, KeysView)):
        for e in obj:
            _flatten(e, out)
    elif isinstance(obj, ItemsView):
        for _, e in obj:
            _flatten(e, out)
    elif isinstance(obj, dict):
        for e in obj.values():
            _flatten(e, out)
    elif isinstance(obj, _PLAIN):
        out.append(None)
    else:
        out.append(_Hidden(obj))


class ThroughAutograd:
    """The gradient of an object propgen cannot look inside (a torch.distributions object, say)
    that an opaque call consumed: the tensors inside it were made by earlier opaque calls,
    so torch.autograd already carried this gradient to those calls' inputs, where it waits
    in ``.grad`` until their own :func:`opaque_vjp` collects it."""

    def __add__(self, other: Any) -> Any:
        if other is None or isinstance(other, ThroughAutograd):
            return self
        raise TypeError(
            "a gradient that torch.autograd carries inside an opaque object met an ordinary "
            f"gradient ({type(other).__name__}); register an adjoint template for the calls "
            "that make and use this object (@propgen.adjoint)"
        )

    __radd__ = __add__

    def __repr__(self) -> str:
        return "<gradient carried by torch.autograd>"


THROUGH_AUTOGRAD = ThroughAutograd()


def opaque_vjp(output: Any, d_output: Any, *inputs: Any) -> tuple:
    """Vector-Jacobian product of a call propgen cannot read, through torch.autograd.

    ``inputs`` are the leaves made by :func:`track`.  Parameters the call reached (an
    nn.Module's weights) get ``.grad`` accumulated, as ``loss.backward()`` would.
    Returns the gradient of each input: zeros where none flowed, None for non-tensors, and
    ``THROUGH_AUTOGRAD`` for objects whose tensors autograd reaches by itself.
    """
    outs: list = []
    grads: list = []
    _flatten(output, outs)
    _flatten(d_output, grads)
    pairs = [
        (o, g)
        for o, g in zip(outs, grads)
        if isinstance(o, torch.Tensor) and o.requires_grad and isinstance(g, torch.Tensor)
    ]
    if pairs:
        # retain_graph: the backward may run again over the same saved values, and graphs
        # of opaque calls joined through opaque objects are walked from several calls.
        with torch.enable_grad():
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs],
                                    retain_graph=True)
    result = []
    for x in inputs:
        flat: list = []
        _flatten(x, flat)
        gs = [_collect(t) for t in flat]
        result.append(gs[0] if isinstance(x, torch.Tensor) else _rebuild(x, iter(gs)))
    return tuple(result)


def opaque_grad(output: Any, d_output: Any, *inputs: Any) -> tuple:
    """:func:`opaque_vjp` without side effects: the gradients of the tracked tensor inputs
    only, nothing accumulated into parameters (TotalProp's contributions use it)."""
    outs: list = []
    grads: list = []
    _flatten(output, outs)
    _flatten(d_output, grads)
    pairs = [(o, g) for o, g in zip(outs, grads)
             if isinstance(o, torch.Tensor) and o.requires_grad and isinstance(g, torch.Tensor)]
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    found: dict = {}
    if pairs and leaves:
        with torch.enable_grad():
            got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                      retain_graph=True, allow_unused=True)
        found = {id(x): g for x, g in zip(leaves, got)}
    return tuple(
        (found.get(id(x)) if found.get(id(x)) is not None else torch.zeros_like(x))
        if isinstance(x, torch.Tensor) and x.requires_grad else None
        for x in inputs)


def _collect(t: Any) -> Any:
    """A tracked leaf's gradient (taken, so that a second backward starts from nothing)."""
    if isinstance(t, _Hidden):
        return THROUGH_AUTOGRAD
    if not (isinstance(t, torch.Tensor) and t.requires_grad):
        return None
    g = t.grad if t.grad is not None else torch.zeros_like(t)
    t.grad = None
    return g


def _rebuild(obj: Any, it: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, (list, tuple)):
        return [_rebuild(e, it) for e in obj]
    if isinstance(obj, dict):
        return {k: _rebuild(v, it) for k, v in obj.items()}
    if isinstance(obj, (ValuesView, KeysView)):
        return [_rebuild(e, it) for e in obj]
    return next(it)


def seq_adjoint(seq: Any, index: Any, g: Any) -> Any:
    """The adjoint of a container ``seq`` when only ``seq[index]`` received gradient ``g``."""
    if isinstance(seq, dict):
        return {index: g}
    out: list = [None] * len(seq)
    out[index] = g
    return out


def unpack_adjoint(d_seq: Any, index: Any) -> Any:
    """Element ``index`` of a container adjoint, None when the container got no gradient."""
    if d_seq is None:
        return None
    if isinstance(d_seq, dict):
        return d_seq.get(index)
    if isinstance(d_seq, torch.Tensor):
        return d_seq[index]
    return d_seq[index]


def store_grad_value(d_buffer: Any, index: Any, value: Any) -> Any:
    """Gradient reaching ``value`` through ``buffer[index] = value``."""
    if d_buffer is None:
        return None
    if isinstance(d_buffer, (list, dict)):
        return unpack_adjoint(d_buffer, index)
    g = d_buffer[index]
    if isinstance(value, torch.Tensor):
        if g.shape != value.shape:
            g = g.sum_to_size(value.shape) if value.dim() else g.sum()
        return g
    return g.sum()


def store_grad_buffer(d_buffer: Any, index: Any) -> Any:
    """Gradient of the buffer before ``buffer[index] = value``: the overwritten part gets none."""
    if d_buffer is None:
        return None
    if isinstance(d_buffer, list):
        out = list(d_buffer)
        out[index] = None
        return out
    if isinstance(d_buffer, dict):
        return {k: v for k, v in d_buffer.items() if k != index}
    out = d_buffer.clone()
    out[index] = 0
    return out


def check_bound(value: Any, name: str, where: str) -> None:
    """Python's UnboundLocalError for a local read on a path that never assigned it (the
    generated forward starts such a local at None, so that it can be saved either way)."""
    if value is None:
        raise UnboundLocalError(
            f"cannot access local variable {name!r} where it is not associated with a value "
            f"(at {where})")


def check_scalar(value: Any, fn_name: str) -> None:
    """Raise ValueError unless ``value`` is a scalar (a 0-d or one-element tensor, or a number)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"propgen.grad({fn_name}) needs a scalar output, but {fn_name} returned a tensor "
                f"of shape {tuple(value.shape)}; reduce it (e.g. .sum() or .mean()) before "
                "returning, or differentiate each element separately"
            )
    elif not isinstance(value, (int, float)):
        raise ValueError(
            f"propgen.grad({fn_name}) needs a scalar output, but {fn_name} returned "
            f"{type(value).__name__}"
        )


def pop_adjoint(d_items: Any, count: int | None = None) -> tuple:
    """Split a list adjoint at ``items.append(v)`` (count None) or ``items.extend(vs)``.

    Returns (adjoint of the list before, adjoint of v or of vs).
    """
    if d_items is None:
        return None, None
    d_items = list(d_items)
    if count is None:
        return d_items[:-1], d_items[-1]
    cut = len(d_items) - count
    return d_items[:cut], d_items[cut:]


_EMPTY = object()


def _undo(fn: Any) -> Any:
    """Mark a helper that changes a container in place to undo the forward's changes: code
    calling it cannot be differentiated again (the compiler says so)."""
    fn.__propgen_undo__ = True
    return fn


def save_slot(buffer: Any, index: Any) -> Any:
    """What ``buffer[index] = ...`` is about to overwrite (a copy, for tensors)."""
    if isinstance(buffer, torch.Tensor):
        return buffer[index].clone()
    if isinstance(buffer, dict):
        return buffer.get(index, _EMPTY)
    return buffer[index]


@_undo
def restore_slot(buffer: Any, index: Any, saved: Any, redo: list) -> None:
    """Undo ``buffer[index] = ...`` with the value :func:`save_slot` kept, logging the value
    it overwrites in ``redo`` so that :func:`redo_all` can bring the buffer back."""
    redo.append((buffer, index, save_slot(buffer, index)))
    if saved is _EMPTY:
        del buffer[index]
    else:
        buffer[index] = saved


_APPEND = object()


@_undo
def undo_append(items: list, redo: list) -> None:
    """Undo ``items.append(v)``, logging ``v`` in ``redo``."""
    redo.append((items, _APPEND, [items.pop()]))


@_undo
def undo_extend(items: list, count: int, redo: list) -> None:
    """Undo ``items.extend(vs)`` where ``len(vs) == count``, logging ``vs`` in ``redo``."""
    cut = len(items) - count
    redo.append((items, _APPEND, items[cut:]))
    del items[cut:]


_POP = object()


@_undo
def undo_pop(items: list, value: Any, redo: list) -> None:
    """Undo ``value = items.pop()``: put ``value`` back, logging the pop in ``redo``."""
    items.append(value)
    redo.append((items, _POP, None))


def unpop_adjoint(d_items: Any, items: list, d_value: Any) -> list:
    """The adjoint of a list before ``value = items.pop()``: the adjoint after it (None: no
    gradient yet), with the popped value's gradient at the end."""
    before = [None] * len(items) if d_items is None else list(d_items)
    return before + [d_value]


@_undo
def redo_all(redo: list) -> None:
    """Redo, in the forward's order, what the backward undid to read earlier values: after the
    backward, buffers and lists hold what the forward left in them, as the original function
    would, and a second backward over the same saved values sees what the first one saw."""
    for container, index, value in reversed(redo):
        if index is _APPEND:
            container.extend(value)
        elif index is _POP:
            container.pop()
        else:
            restore_slot(container, index, value, [])
    redo.clear()


class AbsoluteTarget:
    """A message target given as a node's position among the nodes recorded (0 = first),
    rather than relative to the sending node (-1 = the previous node, the default)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = int(index)

    def __repr__(self) -> str:
        return f"AbsoluteTarget({self.index})"


def receive(mail: dict, count: int, name: str, current: Any) -> Any:
    """The message ``name`` at the node numbered ``count``: what flows in from the next node
    plus what other nodes addressed to this one."""
    box = mail.get(count)
    if not box or name not in box:
        return current
    value = box.pop(name)
    return value if current is None else current + value


def route(mail: dict, count: int, target: Any, site: str, messages: dict,
          default: Any = -1) -> None:
    """Send a node's messages to its target(s): ints are relative (-1 = previous node),
    :class:`AbsoluteTarget` positions absolute; each must be a node recorded before.  A
    ``None`` target (``force_targets=None``) means the propagator's own, ``default``."""
    own = count - 1  # this node's position
    if target is None:
        target = default
    for t in target if isinstance(target, (list, tuple)) else [target]:
        dest = t.index if isinstance(t, AbsoluteTarget) else own + int(t)
        if not -1 <= dest < own or (dest == -1 and isinstance(t, AbsoluteTarget)):
            raise IndexError(
                f"{site}: the message target {t!r} points to node {dest}, but the nodes "
                f"recorded before this one are 0..{own - 1} (one before the first is the "
                "terminal step); use a negative relative target (-1 = previous node) or "
                "propgen.AbsoluteTarget(k) for an earlier node")
        box = mail.setdefault(dest + 1, {})
        for name, value in messages.items():
            if value is not None:
                box[name] = value if box.get(name) is None else box[name] + value


def check_finite(where: str, what: str, value: Any) -> None:
    """The manager's NaN check: raise, naming the node, when ``value`` holds a NaN or inf."""
    items = value.items() if isinstance(value, dict) else [(what, value)]
    for name, v in items:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(
                torch.isfinite(v).all()):
            raise FloatingPointError(
                f"{where}: {name} holds NaN or inf (PropagationManager(check_nan=True) checks "
                "every node's output, the gradient it sends and its messages)")


def remaining(mail: dict, messages: dict) -> dict:
    """The messages left after the first node, with those addressed past it (the terminal
    step)."""
    for name, value in mail.get(0, {}).items():
        messages[name] = value if messages.get(name) is None else messages[name] + value
    return messages


def configuration_error(message: str) -> Any:
    """Raise the error the compiler found for a node that only matters if it runs (a node in
    a branch may never run, so the program compiles and the error waits for it)."""
    from propgen.errors import ConfigurationError

    raise ConfigurationError(None, message, "")
