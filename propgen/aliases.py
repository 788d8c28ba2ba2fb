"""Stage 3b, alias check: an in-place update that another live name would see is refused.

propgen differentiates ``y -= c`` as ``y = y - c``: a new tensor bound to ``y``.  Python
updates the tensor itself, so every other name bound to it (``z = y``, a view ``z = y[0]``,
a loop row ``for z in y``, the caller's variable of an inlined helper's parameter) sees the
new value.  Where such a name is read after the update, the compiled function would compute
with the old value: a wrong result and gradient.  This stage finds those updates and raises
an UnsupportedSyntaxError naming the line, before anything is generated.

The analysis is a small abstract interpretation over the normalized IR.  Each name maps to a
set of abstract tensors (one per statement that makes a new value, plus one per parameter);
a plain binding, a view, an element read or a container holding values shares the sets.  A
statement run again in a loop makes a new tensor: the older ones it made are renamed apart,
so that ``prev = h; h = layer(h); h += prev`` (a residual update) is not taken for an alias.
Updates checked: augmented assignment to a name, stores ``buf[i] = v`` and in-place tensor
methods ``y.mul_(2)``, on values that may be tensors (numbers are immutable).
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, NamedTuple

import gast
import torch

from propgen.analyse import Activity
from propgen.errors import UnsupportedSyntaxError
from propgen.normalize import Callee

__all__ = ["check_aliases", "in_place_update", "Update", "KEEPS"]

# In-place tensor methods that leave the values as they are.
KEEPS = {"requires_grad_", "share_memory_"}

# In-place ops that overwrite a tensor with values that do not vary.
FILLS = {"zero_", "uniform_", "normal_", "bernoulli_", "cauchy_", "exponential_",
          "geometric_", "log_normal_", "random_"}
# Where in-place functions live (their name ends with _), and their out-of-place forms.
IN_PLACE_MODULES = (torch, torch.nn.functional, torch.Tensor)

class Update(NamedTuple):
    """A call that updates a tensor in place."""

    tensor: gast.AST  # the tensor it updates
    twin: Any  # the op's out-of-place form, or None
    name: str
    fills: bool  # it overwrites the tensor with values that do not vary


def in_place_update(value: gast.AST, callee: Callee | None) -> Update | None:
    """The update made by ``y.op_(...)``, ``torch.op_(y, ...)``, ``F.op(y, ...,
    inplace=True)`` or torch.nn.init's initializers; None for other calls."""
    if callee is None or not isinstance(value, gast.Call):
        return None
    if callee.kind == "inplace":  # a method of a local tensor
        name = callee.label
        return Update(value.func.value, getattr(torch.Tensor, name[:-1], None), name,
                       name in FILLS)
    name = getattr(callee.obj, "__name__", None)
    if not value.args or not isinstance(name, str):
        return None
    if _inplace_flag(value, callee.obj):
        return Update(value.args[0], callee.obj, name, False)
    if not name.endswith("_") or name.startswith("_"):
        return None
    if getattr(torch.nn.init, name, None) is callee.obj:
        return Update(value.args[0], None, name, True)
    for module in IN_PLACE_MODULES:
        if getattr(module, name, None) is callee.obj:
            return Update(value.args[0], getattr(module, name[:-1], None), name,
                           name in FILLS)
    return None


def _inplace_flag(value: gast.Call, fn: Any) -> bool:
    """Whether the call passes ``inplace=True`` (by keyword or position) to ``fn``."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    if "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind(*value.args, **{k.arg: k.value for k in value.keywords})
    except TypeError:
        return False
    flag = bound.arguments.get("inplace")
    return isinstance(flag, gast.Constant) and flag.value is True

# Results that share their operand's memory (views), or are the operand itself.
VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "t", "permute", "squeeze",
    "unsqueeze", "expand", "expand_as", "flatten", "unflatten", "narrow", "select", "diagonal",
    "movedim", "moveaxis", "swapaxes", "swapdims", "detach", "as_strided", "unfold", "unbind",
    "split", "chunk", "tensor_split", "contiguous", "to", "type_as", "float", "double", "half",
    "requires_grad_", "view_as_real", "view_as_complex", "real", "imag", "T", "mT", "H", "mH",
    "data", "values", "items", "get", "copy", "pop",
})
VIEW_FUNCTIONS = frozenset(getattr(torch, n) for n in (
    "reshape", "transpose", "t", "permute", "squeeze", "unsqueeze", "flatten", "narrow",
    "select", "diagonal", "movedim", "moveaxis", "swapaxes", "swapdims", "detach", "unbind",
    "split", "chunk", "tensor_split", "view_as_real", "view_as_complex", "real", "imag",
    "as_strided"))
GROWTH = frozenset({"append", "extend", "insert", "update", "setdefault"})


def check_aliases(params: list[str], body: list, act: Activity) -> None:
    """Raise UnsupportedSyntaxError at an in-place update that a live alias would see."""
    live_after: dict[int, set] = {}
    _live_in(body, set(), live_after)
    state = {p: frozenset({("param", p)}) for p in params}
    _Walk(act, live_after).block(body, state)


# ------------------------------------------------------------------------------ liveness
def _loads(node: gast.AST) -> set:
    return {n.id for n in gast.walk(node) if isinstance(n, gast.Name)
            and isinstance(n.ctx, gast.Load)}


def _live_in(stmts: list, live: set, after: dict) -> set:
    """Names read later, before the statements (recording each statement's live-after set)."""
    for s in reversed(stmts):
        after[id(s)] = after.get(id(s), set()) | live
        if isinstance(s, gast.If):
            live = (_live_in(s.body, live, after) | _live_in(s.orelse, live, after)
                    | _loads(s.test))
        elif isinstance(s, (gast.For, gast.While)):
            head = _loads(s.iter if isinstance(s, gast.For) else s.test)
            loop = set(live) | head
            while True:  # the body's start is live after its end (the next iteration)
                new = _live_in(s.body, loop, after) | live | head
                if new <= loop:
                    break
                loop |= new
            live = loop
        else:
            if isinstance(s, gast.Assign) and isinstance(s.targets[0], gast.Name):
                live = live - {s.targets[0].id}
            live = live | _loads(s)
    return live


# ------------------------------------------------------------------------------- sharing
class _Walk:
    def __init__(self, act: Activity, live_after: dict) -> None:
        self.act = act
        self.live_after = live_after
        self.trips: dict[str, int] = {}  # names bound to range(<constants>): its length

    def block(self, stmts: list, state: dict) -> None:
        for s in stmts:
            self.stmt(s, state)

    def stmt(self, s: gast.AST, state: dict) -> None:
        if isinstance(s, gast.If):
            other = dict(state)
            self.block(s.body, state)
            self.block(s.orelse, other)
            _join_into(state, other)
        elif isinstance(s, (gast.For, gast.While)):
            if isinstance(s, gast.For) and isinstance(s.target, gast.Name):
                state[s.target.id] = frozenset()  # range counters and the like
            trips = self.trips.get(s.iter.id) if isinstance(s, gast.For) \
                and isinstance(s.iter, gast.Name) else None
            if trips == 0:
                return
            if trips is not None:  # a constant range: the body runs at least once
                self.block(s.body, state)
                trips -= 1
            for _ in range(3 if trips is None else min(trips, 3)):
                before = dict(state)  # (three passes reach the fixpoint: the sets only grow)
                self.block(s.body, state)
                _join_into(state, before)
                if state == before:
                    break
        elif isinstance(s, gast.Assign):
            self.assign(s, state)
        elif isinstance(s, gast.Expr) and isinstance(s.value, gast.Call):
            self.effect(s, s.value, state)

    def assign(self, s: gast.Assign, state: dict) -> None:
        target = s.targets[0]
        if isinstance(target, gast.Subscript):  # buf[i] = v changes buf
            if isinstance(target.value, gast.Name):
                self.update(s, target.value.id, state, "a store into")
                _forget_items(state, target.value.id)
            return
        name = target.id
        self.trips.pop(name, None)
        callee = getattr(s.value, "pg_callee", None)
        if callee is not None and callee.obj is range and all(
                isinstance(a, gast.Constant) and type(a.value) is int for a in s.value.args):
            try:
                self.trips[name] = len(range(*(a.value for a in s.value.args)))
            except (TypeError, ValueError):  # range() or a zero step: Python raises it there
                pass
        if getattr(s, "pg_inplace", False):  # y op= e: y keeps its tensor, updated
            self.update(s, name, state, "an augmented assignment to")
            return
        value = s.value
        shared = _shares(value, state)
        _forget_items(state, name)
        if isinstance(value, (gast.Tuple, gast.List)):
            for i, e in enumerate(value.elts):  # items apart: v, w = f() shares v with one
                if isinstance(e, gast.Name):
                    state[_item(name, i)] = state.get(e.id, frozenset())
        elif isinstance(value, gast.Name):
            for k in [k for k in state if k.startswith(value.id + "[")]:
                state[name + k[len(value.id):]] = state[k]
        elif isinstance(value, gast.Subscript) and isinstance(value.value, gast.Name) \
                and isinstance(value.slice, gast.Constant) \
                and _item(value.value.id, value.slice.value) in state:
            shared = state[_item(value.value.id, value.slice.value)]
        update = in_place_update(value, getattr(value, "pg_callee", None))
        if update is not None and isinstance(update.tensor, gast.Name):
            if update.name not in KEEPS:
                self.update(s, update.tensor.id, state, f"{update.name}() on")
            shared = state.get(update.tensor.id, frozenset())  # z = y.add_(1) is y
        if shared is None:  # a new value: older ones this statement made are renamed apart
            fresh = ("stmt", id(s))
            old = ("old", id(s))
            for k, locs in state.items():
                if fresh in locs:
                    state[k] = (locs - {fresh}) | {old}
            state[name] = frozenset({fresh})
        else:
            state[name] = shared

    def effect(self, s: gast.Expr, call: gast.Call, state: dict) -> None:
        update = in_place_update(call, getattr(call, "pg_callee", None))
        if update is not None:
            if isinstance(update.tensor, gast.Name) and update.name not in KEEPS:
                self.update(s, update.tensor.id, state, f"{update.name}() on")
            return
        method = _method(call)
        if method is None:
            return
        recv = call.func.value.id
        if method in GROWTH:  # the container now holds the arguments' values too
            held = set(state.get(recv, frozenset()))
            for a in call.args:
                if isinstance(a, gast.Name):
                    held |= state.get(a.id, frozenset())
            state[recv] = frozenset(held)

    def update(self, s: gast.AST, name: str, state: dict, how: str) -> None:
        """``name``'s tensor changes in place at ``s``: no other live name may hold it."""
        if name not in self.act.varied and name not in self.act.tensor:
            return  # a number, or a value whose type the analysis cannot tell
        mine = state.get(name, frozenset())
        live = self.live_after.get(id(s), set())
        others = sorted(k for k, locs in state.items()
                        if k != name and k in live and locs & mine)
        if not others:
            return
        raise UnsupportedSyntaxError(
            getattr(s, "pg_loc", None),
            f"{how} {name!r} while {', '.join(repr(o) for o in others)} shares its memory and "
            "is read afterwards (Python would change both; propgen updates by making a new "
            "tensor, so the other name would keep the old value)",
            f"make the update out of place ({name} = {name} + ...) if the others should keep "
            "the old value, or copy first (other = x.clone()); to change the tensor a row or "
            "view comes from, update it by index (buf[i] = ...) instead of through the view",
        )


def _shares(value: gast.AST, state: dict) -> frozenset | None:
    """The abstract tensors ``value`` shares with names, or None for a new value."""
    if isinstance(value, gast.Name):
        return state.get(value.id, frozenset())
    if isinstance(value, gast.Subscript) and isinstance(value.value, gast.Name):
        return state.get(value.value.id, frozenset())
    if isinstance(value, gast.Attribute) and isinstance(value.value, gast.Name) \
            and value.attr in VIEW_METHODS:
        return state.get(value.value.id, frozenset())
    if isinstance(value, (gast.List, gast.Tuple, gast.Dict)):
        elts = value.values if isinstance(value, gast.Dict) else value.elts
        return frozenset().union(*(state.get(e.id, frozenset()) for e in elts
                                   if isinstance(e, gast.Name)))
    callee = getattr(value, "pg_callee", None)
    if isinstance(value, gast.BinOp) and callee is not None \
            and callee.obj is operator.concat:
        return _shares(gast.List(elts=[value.left, value.right], ctx=gast.Load()), state)
    if isinstance(value, gast.Call):
        method = _method(value)
        if method is not None and method in VIEW_METHODS:  # (in-place calls: see assign)
            return state.get(value.func.value.id, frozenset())
        if callee is not None and _in(callee.obj, VIEW_FUNCTIONS) and value.args \
                and isinstance(value.args[0], gast.Name):
            return state.get(value.args[0].id, frozenset())
    return None


def _method(call: gast.Call) -> str | None:
    """The method name of ``recv.method(...)`` on a local name, else None."""
    func = call.func
    if isinstance(func, gast.Attribute) and isinstance(func.value, gast.Name) \
            and not getattr(func, "pg_static", False):
        return func.attr
    return None


def _in(obj: object, functions: frozenset) -> bool:
    try:
        return obj in functions
    except TypeError:  # an unhashable callee
        return False


def _item(name: str, index: object) -> str:
    """The state key of one item of a tuple or list display (never a Python name)."""
    return f"{name}[{index!r}]"


def _forget_items(state: dict, name: str) -> None:
    for k in [k for k in state if k.startswith(name + "[")]:
        del state[k]


def _join_into(state: dict, other: dict) -> None:
    for k, locs in other.items():
        state[k] = state.get(k, frozenset()) | locs
