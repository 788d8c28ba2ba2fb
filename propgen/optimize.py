"""Stage 6, optimize: remove dead gradient resets.

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
