"""Stage 5c, node backward: splice a propagator's backward templates where the backward pass
reaches its node.

In a backward template ``d[p]`` reads or sends a gradient, ``m['name']`` reads or sets a
message (a variable of the generated backward; an unset message flows on unchanged), and
``c = contribution(g, x, target)`` becomes the adjoint of the code between ``target`` and the
node seeded with ``g`` (propgen.contribution); messages sent to other nodes than the previous
one go through propgen.routing.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

import gast

from propgen import ir
from propgen.contribution import Contributions
from propgen.nodes import NodeSite, unknown_template_name
from propgen.routing import Deliver, Route
from propgen.template import Template, is_template_object

if TYPE_CHECKING:
    from propgen.transform import Reverse

__all__ = ["rev_node"]

_DEF = "def"


def rev_node(rev: Reverse, s: gast.With, state: dict) -> list:
    site: NodeSite = s.pg_node
    sp = _Splicer(rev, s, site, state)
    code: list = []
    for tmpl in site.backward:
        code += sp.block(tmpl, tmpl.body)
    code = _prune(code, sp)
    if rev.ctx.propagation.manager.check_nan:
        where = ir.const(f"{site.site} [{site.label}]")
        x = site.mapping.get("x")
        if isinstance(x, gast.Name) and rev.state_of(x.id, state):
            code.append(gast.Expr(value=gast.Call(func=rev.rt("check_finite"), args=[
                where, ir.const(f"the gradient sent to {x.id}"), ir.name(rev.dname(x.id))],
                keywords=[])))
        msgs = gast.Dict(keys=[ir.const(k) for k in sorted(rev.channels)],
                         values=[ir.name(v) for _, v in sorted(rev.channels.items())])
        code.append(gast.Expr(value=gast.Call(func=rev.rt("check_finite"), args=[
            where, ir.const("messages"), msgs], keywords=[])))
    if site.index is not None:
        code = [Deliver(site.index)] + code
        if site.target is not None:
            code.append(Route(site.index, site.target, site.site, site.default_target))
    loc = getattr(s, "pg_loc", None)
    text = loc.text.strip() if loc is not None else ""
    rev.last_comment = None
    from propgen.transform import Comment

    return [Comment(f"Grad of: {site.site}  {text}   [{site.label}]")] + code


class _Splicer(Contributions):
    def __init__(self, rev: Reverse, s: gast.With, site: NodeSite, state: dict) -> None:
        self.rev, self.s, self.site, self.state = rev, s, site, state
        self.locals: dict[str, str] = {}
        self.accs: set[int] = set()  # ids of statements that send gradients (kept if active)
        self.effects: set[int] = set()  # ids of calls made for their side effects

    # ------------------------------------------------------------------ names
    def local(self, tmpl: Template, name: str) -> str:
        key = (tmpl.name, name)  # each template's locals are its own
        if key not in self.locals:
            # the same name on every pass over a loop body (the transform reverses it twice)
            self.locals[key] = self.rev.temp(("node", id(self.site), tmpl.name, name),
                                             f"{self.site.hint}_{name}")
        return self.locals[key]

    def channel(self, key: gast.AST, tmpl: Template) -> str:
        if isinstance(key, gast.Name) and key.id in self.site.mapping:
            key = self.site.mapping[key.id]
        if not (isinstance(key, gast.Constant) and isinstance(key.value, str)):
            raise TypeError(f"template {tmpl.name}: m[...] takes a message name (a string)")
        ch = self.rev.channels
        if key.value not in ch:
            ch[key.value] = self.rev.ctx.fresh(key.value)
        return ch[key.value]

    # ------------------------------------------------------------- statements
    def block(self, tmpl: Template, body: list) -> list:
        out: list = []
        for stmt in body:
            out += self.stmt(tmpl, stmt)
        return out

    def stmt(self, tmpl: Template, stmt: gast.AST) -> list:
        if isinstance(stmt, gast.If):
            return self.branch(tmpl, stmt)
        if isinstance(stmt, gast.Expr) and isinstance(stmt.value, gast.Call):
            # a side effect (ProxProp writing .grad, a deferred optimizer step): always kept
            call = gast.Expr(value=self.expr(tmpl, stmt.value))
            self.effects.add(id(call))
            return [call]
        if not (isinstance(stmt, gast.Assign) and len(stmt.targets) == 1):
            raise TypeError(f"propagator template {tmpl.name}: backward templates hold "
                            "assignments, calls and if statements")
        tgt, value = stmt.targets[0], stmt.value
        if is_template_object(tgt, "d", tmpl):
            return self.send(tmpl, tgt.slice, value)
        if is_template_object(tgt, "m", tmpl):
            return [ir.assign(self.channel(tgt.slice, tmpl), self.expr(tmpl, value))]
        if isinstance(tgt, gast.Name) and _is_intrinsic(value, tmpl, "contribution"):
            return self.contribution(tmpl, self.local(tmpl, tgt.id), value)
        if isinstance(tgt, gast.Name):
            return [ir.assign(self.local(tmpl, tgt.id), self.expr(tmpl, value))]
        raise TypeError(f"propagator template {tmpl.name}: assign names, d[...] or m[...]")

    def branch(self, tmpl: Template, stmt: gast.If) -> list:
        """An ``if`` of a template: decided now when its test reads only constants the call
        site bound (``limit is None``), else both branches, each from the state before it."""
        test = self.expr(tmpl, stmt.test)
        decided = ir.constant_test(test)
        if decided is not None:
            return self.block(tmpl, stmt.body if decided else stmt.orelse)
        state = self.state
        before = dict(state)
        body = self.block(tmpl, stmt.body)
        after_body = dict(state)
        state.clear()
        state.update(before)
        orelse = self.block(tmpl, stmt.orelse)
        from propgen.transform import MAYBE, _join

        joined = _join(after_body, state)
        # a gradient sent in one branch only may be unset after the if: start it as None
        self.rev.maybe_vars.update(k for k, v in joined.items() if v == MAYBE)
        state.clear()
        state.update(joined)
        return [gast.If(test=test, body=body or [gast.Pass()], orelse=orelse)]

    def send(self, tmpl: Template, key: gast.AST, value: gast.AST) -> list:
        if not (isinstance(key, gast.Name) and key.id in self.site.mapping):
            raise TypeError(f"template {tmpl.name}: d[...] must name a parameter")
        target = self.site.mapping[key.id]
        if not self.site.send_gradient or not self.rev.act.is_active(target):
            return []
        code = self.rev.accumulate(target.id, self.expr(tmpl, value), self.state)
        for c in code:
            self.accs.add(id(c))
        return code

    # ------------------------------------------------------------ expressions
    def expr(self, tmpl: Template, node: gast.AST) -> gast.AST:
        return _Subst(self, tmpl).visit(ir.clone(node))

    def grad_of(self, atom: gast.AST) -> gast.AST:
        """The gradient arriving at ``atom`` now: zeros when nothing reaches it."""
        rev = self.rev
        st = (rev.read(atom.id, self.state)
              if isinstance(atom, gast.Name) and atom.id in rev.act.active else None)
        if st is None:
            func = gast.Attribute(value=rev.torch_ref(), attr="zeros_like", ctx=gast.Load())
            return gast.Call(func=func, args=[ir.clone(atom)], keywords=[])
        d = rev.dname(atom.id)
        if st == _DEF:
            return ir.name(d)
        return gast.Call(func=rev.rt("grad_or_zeros"), args=[ir.name(d), ir.clone(atom)],
                         keywords=[])

class _Subst(gast.NodeTransformer):
    def __init__(self, sp: _Splicer, tmpl: Template) -> None:
        self.sp, self.tmpl = sp, tmpl

    def visit_Subscript(self, node: gast.Subscript) -> gast.AST:
        if is_template_object(node, "d", self.tmpl):
            key = node.slice
            if not (isinstance(key, gast.Name) and key.id in self.sp.site.mapping):
                raise TypeError(f"template {self.tmpl.name}: d[...] must name a parameter")
            return self.sp.grad_of(self.sp.site.mapping[key.id])
        if is_template_object(node, "m", self.tmpl):
            return ir.name(self.sp.channel(node.slice, self.tmpl))
        self.generic_visit(node)
        return node

    def visit_Name(self, node: gast.Name) -> gast.AST:
        sp = self.sp
        if node.id in sp.site.mapping:
            return ir.clone(sp.site.mapping[node.id])
        if (self.tmpl.name, node.id) in sp.locals or _stored_in(self.tmpl, node.id):
            return ir.name(sp.local(self.tmpl, node.id))
        g = self.tmpl.globals
        if node.id in g:
            value = g[node.id]
        elif hasattr(builtins, node.id):
            value = getattr(builtins, node.id)
        else:
            raise unknown_template_name(self.tmpl, node.id, sp.site.site, sp.site.mapping)
        return ir.name(sp.rev.ctx.bind("value", self.tmpl, node.id, value, node.id))


def _stored_in(tmpl: Template, name: str) -> bool:
    return any(isinstance(n, gast.Name) and n.id == name and isinstance(n.ctx, gast.Store)
               for s in tmpl.body for n in ir.walk(s))


def _is_intrinsic(node: Any, tmpl: Template, name: str) -> bool:
    from propgen import template

    return (isinstance(node, gast.Call) and isinstance(node.func, gast.Name)
            and tmpl.globals.get(node.func.id) is getattr(template, name))


def _prune(code: list, sp: _Splicer) -> list:
    """Keep what sends gradients or messages, and what those read."""
    channels = set(sp.rev.channels.values())
    needed: set = set()
    kept: list = []
    for stmt in reversed(code):
        stores = {n.id for n in ir.walk(stmt) if isinstance(n, gast.Name)
                  and isinstance(n.ctx, gast.Store)}
        # (a branch or loop is kept when something inside it sends a gradient)
        sends = any(id(n) in sp.accs or id(n) in sp.effects for n in ir.walk(stmt))
        if sends or stores & channels or stores & needed:
            kept.insert(0, stmt)
            needed |= {n.id for n in ir.walk(stmt) if isinstance(n, gast.Name)
                       and isinstance(n.ctx, gast.Load)}
    return kept
