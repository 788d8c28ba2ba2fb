"""Helpers to build and inspect the normalized form (the IR the later stages work on).

After normalization a function body holds only these statements, every operand an *atom*
(a Name, a Constant, or a static reference such as ``torch.float32``):

- ``t = E`` where E is an atom, a call, a binary/unary op, a comparison, a subscript, an
  attribute read, or a list/tuple/dict display;
- ``buf[index] = atom`` (a store into a container or a tensor);
- ``call(...)`` as an expression statement;
- ``if atom:`` / ``for name in atom:`` (atom holds a ``range``) / ``while atom:``;
- ``with propgen.insert_grad_of(x) as g:`` (code for the backward pass);
- a final ``return atom``; ``assert``/``raise`` (forward only).

Annotations ride on the gast nodes as attributes: ``pg_loc`` (the user's Location),
``pg_callee`` (how a call is handled), ``pg_bookkeeping`` (compiler-made flags).
"""

from __future__ import annotations

from typing import Any

import gast

__all__ = ["name", "const", "assign", "is_atom", "names_in", "copy_anno", "attr_chain",
           "constant_test"]


def name(id_: str, store: bool = False) -> gast.Name:
    ctx = gast.Store() if store else gast.Load()
    node = gast.Name(id=id_, ctx=ctx, annotation=None, type_comment=None)
    node.pg_norm = True  # already normalized: never renamed or resolved again
    return node


def const(value: Any) -> gast.Constant:
    return gast.Constant(value=value, kind=None)


def assign(target: str | gast.AST, value: gast.AST, like: gast.AST | None = None) -> gast.Assign:
    tgt = name(target, store=True) if isinstance(target, str) else target
    node = gast.Assign(targets=[tgt], value=value, type_comment=None)
    if like is not None:
        copy_anno(node, like)
    return node


def copy_anno(node: gast.AST, like: gast.AST) -> gast.AST:
    for attr in ("lineno", "col_offset", "end_lineno", "end_col_offset", "pg_loc"):
        if hasattr(like, attr):
            setattr(node, attr, getattr(like, attr))
    return node


def attr_chain(node: gast.AST) -> list[str] | None:
    """``a.b.c`` -> ['a', 'b', 'c']; None when the expression is not a dotted name."""
    parts: list[str] = []
    while isinstance(node, gast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, gast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def is_atom(node: gast.AST) -> bool:
    if isinstance(node, (gast.Name, gast.Constant)):
        return True
    return bool(getattr(node, "pg_static", False))


def walk(node: Any):
    """Every gast node under ``node`` (depth first; faster than ast.walk for our trees)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, list):
            stack.extend(reversed(n))
            continue
        if not isinstance(n, gast.AST):
            continue
        yield n
        for f in reversed(n._fields):
            v = getattr(n, f, None)
            if isinstance(v, (gast.AST, list)):
                stack.append(v)


def names_in(node: gast.AST | None, ctx: type = gast.Load) -> list[str]:
    """Names read (or written, with ctx=gast.Store) anywhere in ``node``, in order."""
    if node is None:
        return []
    out: list[str] = []
    for n in walk(node):
        if type(n) is gast.Name and isinstance(n.ctx, ctx) and n.id not in out:
            out.append(n.id)
    return out


def clone(node: Any) -> Any:
    """Deep copy of an IR tree that shares annotations (pg_*, positions) by reference."""
    if isinstance(node, list):
        return [clone(n) for n in node]
    if not isinstance(node, gast.AST):
        return node
    new = type(node).__new__(type(node))
    for key, value in node.__dict__.items():
        if key in node._fields:
            setattr(new, key, clone(value))
        else:
            setattr(new, key, value)
    return new


def constant_test(test: gast.AST) -> bool | None:
    """The value of ``c is None`` / ``c is not None`` / a constant, when a call site bound a
    template parameter to a constant; None when it is only known at run time."""
    if isinstance(test, gast.Constant):
        return bool(test.value)
    if (isinstance(test, gast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], (gast.Is, gast.IsNot))
            and isinstance(test.left, gast.Constant)
            and isinstance(test.comparators[0], gast.Constant)):
        same = test.left.value is test.comparators[0].value
        return same if isinstance(test.ops[0], gast.Is) else not same
    return None
