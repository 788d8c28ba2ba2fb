"""Stage 2a, normalize (control flow): early return, break and continue become flags.

The reverse pass of a loop or branch only needs to know how often a loop ran and which
branch was taken, so every jump is rewritten into structured code: a jump sets a flag and the
statements after it run under ``if not flag``.  A function whose only return is its last
statement, with no break/continue, is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import gast

__all__ = ["lower_jumps", "has_jumps"]


def _name(id_: str, ctx: type = gast.Load) -> gast.Name:
    return gast.Name(id=id_, ctx=ctx(), annotation=None, type_comment=None)


def _assign(target: str, value: gast.AST, like: gast.AST) -> gast.Assign:
    node = gast.Assign(targets=[_name(target, gast.Store)], value=value, type_comment=None)
    gast.copy_location(node, like)
    node.pg_bookkeeping = True
    return node


def _assign_to(target: gast.AST, value: gast.AST, like: gast.AST) -> gast.Assign:
    node = gast.Assign(targets=[target], value=value, type_comment=None)
    gast.copy_location(node, like)  # the user's for line: its target takes the value
    return node


def _const(v: object) -> gast.Constant:
    return gast.Constant(value=v, kind=None)


def _any_of(flags: list[str]) -> gast.AST:
    if len(flags) == 1:
        return _name(flags[0])
    return gast.BoolOp(op=gast.Or(), values=[_name(f) for f in flags])


def _not(expr: gast.AST) -> gast.AST:
    return gast.UnaryOp(op=gast.Not(), operand=expr)


def has_jumps(body: list) -> bool:
    """True when the body has a return that is not its final statement, or any break/continue."""
    for i, stmt in enumerate(body):
        for node in gast.walk(stmt):
            if isinstance(node, (gast.Break, gast.Continue)):
                return True
            if isinstance(node, gast.Return) and not (i == len(body) - 1 and node is stmt):
                return True
    return False


class _Lowering:
    def __init__(self, fresh: Callable[[str], str]) -> None:
        self.fresh = fresh
        self.returned = fresh("returned")
        self.retval = fresh("return_value")
        self.used_return = False
        self.loops: list[dict] = []

    def block(self, stmts: list, loop: dict | None) -> tuple[list, list[str]]:
        """Lower a statement list; returns it and the flags that may be set when it ends."""
        out: list = []
        exits: list[str] = []
        for i, stmt in enumerate(stmts):
            new, flags = self.stmt(stmt, loop)
            out.extend(new)
            if flags:
                for f in flags:
                    if f not in exits:
                        exits.append(f)
                rest = stmts[i + 1 :]
                if rest and not isinstance(stmt, (gast.Return, gast.Break, gast.Continue)):
                    rest_out, rest_flags = self.block(rest, loop)
                    if rest_out:
                        guard = gast.If(test=_not(_any_of(flags)), body=rest_out, orelse=[])
                        gast.copy_location(guard, rest[0])
                        guard.pg_bookkeeping = True
                        out.append(guard)
                    for f in rest_flags:
                        if f not in exits:
                            exits.append(f)
                break
        return out, exits

    def stmt(self, stmt: gast.AST, loop: dict | None) -> tuple[list, list[str]]:
        if isinstance(stmt, gast.Return):
            self.used_return = True
            value = stmt.value if stmt.value is not None else _const(None)
            a = _assign(self.retval, value, stmt)
            a.pg_bookkeeping = False  # the returned value is user data
            flags = [self.returned]
            out = [a, _assign(self.returned, _const(True), stmt)]
            for enclosing in self.loops:  # a return leaves every enclosing loop
                enclosing["brk_used"] = True
                out.append(_assign(enclosing["brk"], _const(True), stmt))
            return out, flags
        if isinstance(stmt, gast.Break):
            loop["brk_used"] = True
            return [_assign(loop["brk"], _const(True), stmt)], [loop["brk"]]
        if isinstance(stmt, gast.Continue):
            loop["cont_used"] = True
            return [_assign(loop["cont"], _const(True), stmt)], [loop["cont"]]
        if isinstance(stmt, gast.If):
            body, f1 = self.block(stmt.body, loop)
            orelse, f2 = self.block(stmt.orelse, loop)
            stmt.body = body or [gast.Pass()]
            stmt.orelse = orelse
            return [stmt], f1 + [f for f in f2 if f not in f1]
        if isinstance(stmt, (gast.For, gast.While)):
            return self.loop(stmt)
        if isinstance(stmt, gast.With):
            body, flags = self.block(stmt.body, loop)
            stmt.body = body or [gast.Pass()]
            return [stmt], flags
        return [stmt], []

    def loop(self, stmt: gast.AST) -> tuple[list, list[str]]:
        info = {
            "brk": self.fresh("broke"),
            "cont": self.fresh("skip"),
            "brk_used": False,
            "cont_used": False,
        }
        self.loops.append(info)
        body, flags = self.block(stmt.body, info)
        self.loops.pop()
        outer = [f for f in flags if f == self.returned]
        pre: list = []
        if info["cont_used"]:
            body.insert(0, _assign(info["cont"], _const(False), stmt))
        if info["brk_used"]:
            pre.append(_assign(info["brk"], _const(False), stmt))
            if isinstance(stmt, gast.While):
                # test the flag first: after a break the user's condition is not evaluated
                stmt.test = gast.BoolOp(op=gast.And(), values=[_not(_name(info["brk"])), stmt.test])
            else:
                # the loop's own target would go on taking values after the break: iterate
                # into a fresh name and assign the user's target inside the guard
                item = self.fresh("item")
                body = [_assign_to(stmt.target, _name(item), stmt)] + body
                stmt.target = gast.Name(id=item, ctx=gast.Store(), annotation=None,
                                        type_comment=None)
                body = [_guard(info["brk"], body, stmt)]
        stmt.body = body or [gast.Pass()]
        return pre + [stmt], outer


def _guard(flag: str, body: list, like: gast.AST) -> gast.If:
    node = gast.If(test=_not(_name(flag)), body=body, orelse=[])
    gast.copy_location(node, like)
    node.pg_bookkeeping = True
    return node


def lower_jumps(body: list, fresh: Callable[[str], str], like: gast.AST) -> list:
    """Rewrite early returns, break and continue in a function body into flags.

    The result ends with one ``return`` statement (or none when the function returns None).
    """
    if not has_jumps(body):
        return body
    low = _Lowering(fresh)
    out, _ = low.block(body, None)
    if low.used_return:
        init = [
            _assign(low.returned, _const(False), like),
            _assign(low.retval, _const(None), like),
        ]
        ret = gast.Return(value=_name(low.retval))
        gast.copy_location(ret, body[-1] if body else like)
        ret.pg_bookkeeping = True
        return init + out + [ret]
    return out
