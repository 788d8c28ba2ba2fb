"""Stage 6, optimize: remove dead gradient resets (and self-assignments).

The transform resets a gradient variable (``d_h = None``) wherever the variable's old value
must not leak into the next use; most resets are overwritten before anything reads them.
A backward liveness pass over the structured code removes those, so the generated code holds
only resets that matter (a reset inside a loop that the next iteration reads).
"""

from __future__ import annotations

import gast

from propgen import ir

__all__ = ["remove_dead_resets"]


def _is_reset(s: gast.AST, names: set) -> bool:
    return (
        isinstance(s, gast.Assign)
        and isinstance(s.targets[0], gast.Name)
        and s.targets[0].id in names
        and isinstance(s.value, gast.Constant)
        and s.value.value is None
    )


def _block(stmts: list, live: set, names: set) -> tuple[list, set]:
    out: list = []
    for s in reversed(stmts):
        if (isinstance(s, gast.Assign) and isinstance(s.targets[0], gast.Name)
                and isinstance(s.value, gast.Name) and s.value.id == s.targets[0].id):
            continue  # d_h = d_h: a gradient passed on unchanged (an update under no_grad)
        if _is_reset(s, names):
            if s.targets[0].id not in live:
                continue
            live = live - {s.targets[0].id}
        elif isinstance(s, gast.If):
            b, lb = _block(s.body, set(live), names)
            o, lo = _block(s.orelse, set(live), names)
            s.body, s.orelse = b or [gast.Pass()], o
            live = lb | lo | set(ir.names_in(s.test))
        elif isinstance(s, (gast.For, gast.While)):
            head = getattr(s, "iter", None) or getattr(s, "test", None)
            entry = set(live)
            for _ in range(3):  # the body may run again: what it reads at its top is live
                _, body_live = _block(ir.clone(s.body), entry | set(live), names)
                new = body_live | set(live)
                if new == entry:
                    break
                entry = new
            body, _ = _block(s.body, entry, names)
            s.body = body or [gast.Pass()]
            live = entry | set(ir.names_in(head))
        else:
            stores = set(ir.names_in(s, gast.Store)) if isinstance(s, gast.Assign) else set()
            live = (live - stores) | set(ir.names_in(s))
        out.append(s)
    out.reverse()
    return out, live


def remove_dead_resets(fdef: gast.FunctionDef, names: set) -> None:
    """Drop ``d = None`` statements (for d in ``names``) whose value nothing reads."""
    fdef.body, _ = _block(fdef.body, set(), names)


def _pure(value: gast.AST) -> bool:
    """True when computing ``value`` has no effect besides its result.

    Ops with adjoint templates are pure; calls without one (opaque code, random number
    generators, print) are kept even when their result is unused.
    """
    callee = getattr(value, "pg_callee", None)
    if isinstance(value, gast.Call):
        return callee is not None and callee.kind == "template"
    if isinstance(value, (gast.BinOp, gast.UnaryOp, gast.Subscript)):
        return callee is None or callee.kind in ("template", "nondiff")
    return isinstance(value, (gast.Name, gast.Constant, gast.Attribute, gast.List, gast.Tuple,
                              gast.Dict, gast.Compare))


def _prune(stmts: list, live: set) -> list:
    out = []
    for s in stmts:
        if (
            isinstance(s, gast.Assign)
            and isinstance(s.targets[0], gast.Name)
            and s.targets[0].id not in live
            and _pure(s.value)
        ):
            continue
        for attr in ("body", "orelse"):
            if isinstance(getattr(s, attr, None), list) and not isinstance(s, gast.With):
                setattr(s, attr, _prune(getattr(s, attr), live))
        out.append(s)
    return out


def prune_dead_code(body: list) -> list:
    """Drop pure assignments whose value nothing reads (in the forward or the result)."""
    while True:
        live: set = set()
        for s in ir.walk(body):
            if isinstance(s, gast.Name) and not isinstance(s.ctx, gast.Store):
                live.add(s.id)
            site = getattr(s, "pg_node", None)
            if site is not None:  # a node's backward templates read what its forward made
                live.add(site.output)
                for v in site.mapping.values():
                    live.update(ir.names_in(v))
                if site.target is not None:
                    live.update(ir.names_in(site.target))
        new = _prune(body, live)
        if sum(1 for _ in ir.walk(new)) == sum(1 for _ in ir.walk(body)):
            return new
        body = new
