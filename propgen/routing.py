"""Message targets: where a node sends its messages when not to the previous node.

Nodes get a run-time index (``_node``, counting executed nodes) only when some node of the
function has a target; each node then merges what other nodes addressed to it (``Deliver``)
and a node with a target sends its in-flight messages there (``Route``).  The markers are
expanded once every message name of the function is known.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gast

from propgen import ir

if TYPE_CHECKING:
    from propgen.transform import Reverse

__all__ = ["Deliver", "Route", "number_nodes", "expand_routing"]


class Deliver(gast.stmt):
    """Marker: merge the messages other nodes addressed to this node into the in-flight ones
    (expanded once every message name of the function is known)."""

    _fields = ()

    def __init__(self, index: str) -> None:
        super().__init__()
        self.index = index


class Route(gast.stmt):
    """Marker: send the in-flight messages to the node's target instead of the previous node."""

    _fields = ()

    def __init__(self, index: str, target: gast.AST, site: str, default: Any) -> None:
        super().__init__()
        self.index, self.target, self.site, self.default = index, target, site, default


def number_nodes(ctx: Any, body: list, sites: list) -> None:
    """Give every node a run-time index (``_node``, counting executed nodes), needed when some
    node sends its messages to a target other than the previous node."""
    index = ctx.internal("node")
    markers = {id(site): site for site in sites}

    def walk(block: list) -> None:
        i = 0
        while i < len(block):
            st = block[i]
            site = getattr(st, "pg_node", None)
            if site is not None and id(site) in markers:
                inc = ir.assign(index, gast.BinOp(left=ir.name(index), op=gast.Add(),
                                                  right=ir.const(1)))
                _mark(inc, st)
                block.insert(i, inc)
                site.index = index
                i += 1
            for attr in ("body", "orelse"):
                inner = getattr(st, attr, None)
                if isinstance(inner, list) and site is None:
                    walk(inner)
            i += 1

    walk(body)
    _check_static_targets(body)
    init = ir.assign(index, ir.const(0))
    _mark(init, body[0])
    body.insert(0, init)


def _check_static_targets(body: list) -> None:
    """Where a node's position is known when compiling (straight-line code before any loop
    or branch holding nodes), a constant target before the first node is an error now."""
    from propgen.errors import ConfigurationError

    position = 0
    for st in body:
        site = getattr(st, "pg_node", None)
        if site is not None:
            t = site.target
            if isinstance(t, gast.Constant) and isinstance(t.value, int) and (
                    position + t.value < -1 or t.value >= 0):
                raise ConfigurationError(
                    getattr(st, "pg_loc", None),
                    f"message target {t.value} from node {position}: the nodes before it are "
                    f"0..{position - 1}",
                    "use a negative relative target (-1 = the previous node) reaching a node "
                    "recorded before this one")
            position += 1
        elif isinstance(st, (gast.If, gast.For, gast.While)) and any(
                getattr(n, "pg_node", None) is not None for n in ir.walk(st)):
            return


def _mark(stmt: gast.AST, like: gast.AST) -> None:
    stmt.pg_nograd = True
    stmt.pg_bookkeeping = True
    if getattr(like, "pg_loc", None) is not None:
        stmt.pg_loc = like.pg_loc
        stmt.lineno = like.pg_loc.lineno


def expand_routing(code: list, rev: Reverse) -> list:
    """Replace Deliver/Route markers by code over every message name of the function."""
    mail = None
    names = sorted(rev.channels.items())

    def expand(block: list) -> list:
        nonlocal mail
        out: list = []
        for st in block:
            if isinstance(st, (Deliver, Route)):
                if mail is None:
                    mail = rev.ctx.internal("mail")
                if isinstance(st, Deliver):
                    for key, var in names:
                        call = gast.Call(func=rev.rt("receive"), args=[
                            ir.name(mail), ir.name(st.index), ir.const(key), ir.name(var)],
                            keywords=[])
                        out.append(ir.assign(var, call))
                else:
                    msgs = gast.Dict(keys=[ir.const(k) for k, _ in names],
                                     values=[ir.name(v) for _, v in names])
                    call = gast.Call(func=rev.rt("route"), args=[
                        ir.name(mail), ir.name(st.index), ir.clone(st.target),
                        ir.const(st.site), msgs], keywords=[])
                    if st.default != -1 and not isinstance(st.target, gast.Constant):
                        call.args.append(ir.const(st.default))
                    out.append(gast.Expr(value=call))
                    out += [ir.assign(v, ir.const(None)) for _, v in names]
                continue
            for attr in ("body", "orelse"):
                inner = getattr(st, attr, None)
                if isinstance(inner, list):
                    setattr(st, attr, expand(inner))
            out.append(st)
        return out

    code = expand(code)
    rev.mail = mail
    return code
