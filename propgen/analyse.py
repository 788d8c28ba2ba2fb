"""Stage 4, analyse: which names carry gradient, which are reassigned, what is a tensor.

*Activity* is the usual pair: a name is **varied** when it depends differentiably on a
differentiated input (or an implicit leaf: a global tensor with requires_grad, a module's
parameters reached through an opaque call), **useful** when the output depends differentiably
on it; **active** names are both and are the only ones that get an adjoint.  The analysis is
flow-insensitive over names, which is conservative for reassigned names and exact in ANF.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import gast

from propgen.normalize import Callee

__all__ = ["Activity", "analyse", "flows", "assigned_names"]

# Ops that return a tuple (or a named tuple) rather than one tensor.
MULTI_OUTPUT = {
    "split", "chunk", "unbind", "max", "min", "sort", "topk", "kthvalue", "median", "mode",
    "aminmax", "tensor_split", "broadcast_tensors", "meshgrid", "hsplit", "vsplit", "dsplit",
    "unique", "frexp", "qr", "svd", "eig", "eigh", "slogdet", "lu", "var_mean", "std_mean",
}
CONTAINER_GROWTH = {"append", "extend", "insert", "update", "setdefault"}


@dataclass
class Activity:
    varied: set = field(default_factory=set)
    useful: set = field(default_factory=set)
    multi: set = field(default_factory=set)  # assigned more than once, or inside a loop
    tensor: set = field(default_factory=set)  # surely a tensor: its adjoint adds with +

    @property
    def active(self) -> set:
        return self.varied & self.useful

    def is_active(self, node: gast.AST | None) -> bool:
        return isinstance(node, gast.Name) and node.id in self.varied and node.id in self.useful


def _atoms(nodes: list) -> list[str]:
    return [n.id for n in nodes if isinstance(n, gast.Name)]


def flows(stmt: gast.AST) -> tuple[str | None, list[str], bool]:
    """(target, sources, seeds) of the differentiable data flow of one IR statement.

    ``seeds`` is True when the statement creates gradient by itself (an opaque call into a
    module with parameters).  Non-differentiable statements have no sources.
    """
    if isinstance(stmt, gast.Assign):
        tgt = stmt.targets[0]
        value = stmt.value
        if getattr(stmt, "pg_nograd", False):
            return None, [], False
        if isinstance(tgt, gast.Subscript):  # buf[i] = v: buf now holds v
            return tgt.value.id, _atoms([value, tgt.value]), False
        target = tgt.id
        if getattr(stmt, "pg_node_output", False):  # a node: its output depends on its input
            return target, list(value.pg_callee.sources), False
        if isinstance(value, gast.Name):
            return target, [value.id], False
        if isinstance(value, (gast.List, gast.Tuple)):
            return target, _atoms(value.elts), False
        if isinstance(value, gast.Dict):
            return target, _atoms(value.values), False
        callee: Callee | None = getattr(value, "pg_callee", None)
        if isinstance(value, gast.Attribute):
            if getattr(value, "pg_static", False):
                return target, [], False
            kind = callee.kind if callee else "nondiff"
            return target, (_atoms([value.value]) if kind == "template" else []), False
        if callee is None or callee.kind in ("nondiff",):
            return target, [], False
        return target, _call_sources(value), callee.kind == "opaque" and callee.has_params
    if isinstance(stmt, gast.Expr) and isinstance(stmt.value, gast.Call):
        call = stmt.value
        callee = getattr(call, "pg_callee", None)
        if callee is not None and callee.kind == "container" and callee.label in CONTAINER_GROWTH:
            recv = call.func.value
            if isinstance(recv, gast.Name):
                return recv.id, _atoms(call.args) + [recv.id], False
    return None, [], False


def _call_sources(value: gast.AST) -> list[str]:
    if isinstance(value, gast.BinOp):
        return _atoms([value.left, value.right])
    if isinstance(value, gast.UnaryOp):
        return _atoms([value.operand])
    if isinstance(value, gast.Subscript):
        return _atoms([value.value])
    if isinstance(value, gast.Call):
        srcs = _atoms(value.args) + _atoms([k.value for k in value.keywords])
        if isinstance(value.func, gast.Attribute) and not getattr(value.func, "pg_static", False):
            srcs = _atoms([value.func.value]) + srcs
        return srcs
    return []


def walk_statements(body: list, depth: int = 0):
    """Yield (statement, loop depth) for every IR statement, nested ones included."""
    for s in body:
        yield s, depth
        if isinstance(s, gast.If):
            yield from walk_statements(s.body, depth)
            yield from walk_statements(s.orelse, depth)
        elif isinstance(s, (gast.For, gast.While)):
            yield from walk_statements(s.body, depth + 1)


def assigned_names(stmt: gast.AST) -> list[str]:
    if isinstance(stmt, gast.Assign) and isinstance(stmt.targets[0], gast.Name):
        return [stmt.targets[0].id]
    if isinstance(stmt, gast.For):
        return [stmt.target.id]
    return []


CONSTRUCTORS = {
    "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like", "full_like",
    "arange", "linspace", "logspace", "eye", "randn", "rand", "randint", "randn_like",
    "rand_like", "tensor", "as_tensor",
}


def _is_tensor_value(value: gast.AST, tensors: set) -> bool:
    callee: Callee | None = getattr(value, "pg_callee", None)
    if callee is not None and callee.kind == "nondiff" and callee.label in CONSTRUCTORS:
        return True
    if isinstance(value, (gast.BinOp, gast.UnaryOp)):  # (list + list is a list)
        return (callee is not None and callee.kind == "template"
                and callee.obj is not operator.concat)
    if isinstance(value, gast.Attribute):
        return callee is not None and callee.kind == "template"
    if isinstance(value, gast.Subscript):
        return isinstance(value.value, gast.Name) and value.value.id in tensors
    if isinstance(value, gast.Call) and callee is not None and callee.kind == "template":
        name = getattr(callee.obj, "__name__", callee.label)
        return name not in MULTI_OUTPUT and callee.label not in MULTI_OUTPUT
    return False


def analyse(params: list[str], body: list, seeds: list[str], ret: gast.AST) -> Activity:
    """Activity of every name of a normalized function; ``seeds`` are the wrt params and leaves."""
    act = Activity()
    edges: list[tuple[str, list[str]]] = []
    counts: dict[str, int] = {p: 1 for p in params}
    defs: dict[str, list] = {}
    varied = set(seeds)
    for stmt, depth in walk_statements(body):
        target, sources, seed = flows(stmt)
        if target is not None and sources:
            edges.append((target, sources))
        if seed and target is not None:
            varied.add(target)
        if getattr(stmt, "pg_node_reads_grad", False):  # a node that reads its output grad
            varied.add(stmt.targets[0].id)
        for n in assigned_names(stmt):
            counts[n] = counts.get(n, 0) + (2 if depth else 1)
            if isinstance(stmt, gast.Assign):
                defs.setdefault(n, []).append(stmt.value)
        if isinstance(stmt, gast.While):
            pass
    act.multi = {n for n, c in counts.items() if c > 1}
    changed = True
    while changed:
        changed = False
        for target, sources in edges:
            if target not in varied and any(s in varied for s in sources):
                varied.add(target)
                changed = True
    useful: set = set()
    if isinstance(ret, gast.Name) and ret.id in varied:
        useful.add(ret.id)
    for stmt, _ in walk_statements(body):
        # a propagation node may create gradient for its input (a loss node, an LR node):
        # its output counts as used even when nothing downstream reads it
        if getattr(stmt, "pg_node_output", False):
            if stmt.targets[0].id in varied:
                useful.add(stmt.targets[0].id)
            for x in getattr(stmt, "pg_node_input", None) or []:
                if x in varied:
                    useful.add(x)
    changed = True
    while changed:
        changed = False
        for target, sources in edges:
            if target in useful:
                for s in sources:
                    if s in varied and s not in useful:
                        useful.add(s)
                        changed = True
    act.varied, act.useful = varied, useful
    # tensor kinds: every definition is an op that returns one tensor
    tensors: set = set()
    changed = True
    while changed:
        changed = False
        for n, values in defs.items():
            if n not in tensors and n not in params and all(
                _is_tensor_value(v, tensors) for v in values
            ):
                tensors.add(n)
                changed = True
    act.tensor = tensors
    return act
