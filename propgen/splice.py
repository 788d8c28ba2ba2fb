"""Stage 5c, node backward: splice a propagator's backward templates where the backward pass
reaches its node.

In a backward template ``d[p]`` reads or sends a gradient, ``m['name']`` reads or sets a
message (a variable of the generated backward; an unset message flows on unchanged), and
``c = contribution(g, x, target)`` becomes the adjoint of the code between ``target`` and the
node seeded with ``g`` -- the per-sample contributions total propagation weighs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gast

from propgen import ir
from propgen.analyse import analyse
from propgen.nodes import NodeSite
from propgen.template import Template

if TYPE_CHECKING:
    from propgen.transform import Reverse

__all__ = ["rev_node", "Deliver", "Route", "expand_routing", "number_nodes"]


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

_DEF, _MAYBE = "def", "maybe"


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


class _Splicer:
    def __init__(self, rev: Reverse, s: gast.With, site: NodeSite, state: dict) -> None:
        self.rev, self.s, self.site, self.state = rev, s, site, state
        self.locals: dict[str, str] = {}
        self.accs: set[int] = set()  # ids of statements that send gradients (kept if active)

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
            return [gast.If(test=self.expr(tmpl, stmt.test), body=self.block(tmpl, stmt.body),
                            orelse=self.block(tmpl, stmt.orelse))]
        if not (isinstance(stmt, gast.Assign) and len(stmt.targets) == 1):
            raise TypeError(f"propagator template {tmpl.name}: backward templates hold "
                            "assignments and if statements")
        tgt, value = stmt.targets[0], stmt.value
        if _is_sub(tgt, "d", tmpl):
            return self.send(tmpl, tgt.slice, value)
        if _is_sub(tgt, "m", tmpl):
            return [ir.assign(self.channel(tgt.slice, tmpl), self.expr(tmpl, value))]
        if isinstance(tgt, gast.Name) and _is_intrinsic(value, tmpl, "contribution"):
            return self.contribution(tmpl, self.local(tmpl, tgt.id), value)
        if isinstance(tgt, gast.Name):
            return [ir.assign(self.local(tmpl, tgt.id), self.expr(tmpl, value))]
        raise TypeError(f"propagator template {tmpl.name}: assign names, d[...] or m[...]")

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

    # ---------------------------------------------------------- contribution
    def contribution(self, tmpl: Template, result: str, call: gast.Call) -> list:
        """The adjoint, seeded with ``g`` at the node input, of the straight-line code between
        the target and the node (the paths from the target to this node that pass through no
        other node), read at the target: per-sample when the target has the batch first."""
        from propgen.transform import Comment, Pop, PopAppend, PopSlot, Reverse

        rev, site = self.rev, self.site
        g = self.expr(tmpl, call.args[0])
        x = site.mapping.get("x")
        target = self.expr(tmpl, call.args[2])
        loc = getattr(self.s, "pg_loc", None)
        from propgen.errors import ConfigurationError

        if not isinstance(target, gast.Name):
            return self.deferred(result, ConfigurationError(
                loc, f"{site.label} needs ivw_target, the tensor whose gradient variance "
                "weighs its RP and LR messages",
                "pass ivw_target=t at the call site or to the propagator: a parameter the code "
                "before this node uses (W), or a per-sample view of one (beta.expand(B, 1))"))
        segment = self.segment(target.id)
        act = analyse([], segment, [target.id], x)
        if not isinstance(x, gast.Name) or x.id not in act.varied:
            return self.deferred(result, ConfigurationError(
                loc, f"the ivw_target ({target.id}) does not reach this node",
                "use as target a tensor the code between the previous node (or the start of "
                "the loop body or function) and this one uses"))
        sub = Reverse(rev.ctx, rev.name, [], segment, [target.id], act, [])
        sub.tracked, sub.temps = rev.tracked, rev.temps  # an opaque call is recorded once
        sub.dprefix = "c_"
        sub.rebinds = rev.rebinds  # whether a name is bound before is a whole-function fact
        key = ("contribution", id(site), result)
        names = rev.__dict__.setdefault("contribution_names", {}).setdefault(key, {})
        sub.dnames = names  # stable names across passes over a loop body
        seed = rev.temp(key, f"{site.hint}_seed")
        sub.dnames[x.id] = seed
        sub_state = {seed: _DEF}
        body: list = []
        before: dict[str, str] = {}  # a name the segment reassigns -> its earlier value
        saves: list = []
        for st in reversed(segment):
            code = sub.rev_stmt(st, sub_state)
            code = [_rename_loads(c, before) for c in code]
            for c in code:
                if isinstance(c, Pop) and c.needed and c.name == st.targets[0].id:
                    # earlier statements read the value ``c.name`` had before ``st``: the
                    # forward keeps it under another name (the main backward has not
                    # restored it yet where the node is)
                    known = {n: a for a, n in getattr(st, "pg_save_before", [])}
                    alias = known.get(c.name) or rev.ctx.fresh(f"{c.name}_before")
                    before[c.name] = alias
                    saves.append((st, alias, c.name))
            body += [c for c in code if not isinstance(c, (Pop, PopSlot, PopAppend, Comment))]
        if sub.redo_used:
            rev.fail(self.s, "TotalProp weights through a buffer store",
                     "compute the node's input without assigning into a buffer")
        for st in segment:
            tracked = any(k[0] == id(st) for k in rev.tracked)
            if tracked and st.targets[0].id not in rev.act.active:
                rev.fail(st, "TotalProp weights through an opaque call that carries no "
                         "gradient", "give the call an adjoint template, or make the target "
                         "reach the node through ops that have one")
        body = [_no_side_effects(c, rev) for c in body]
        rev.maybe_vars |= sub.maybe_vars
        read = {n for c in body for n in ir.names_in(c)}
        for st, alias, name in saves:
            have = getattr(st, "pg_save_before", [])
            if alias in read and (alias, name) not in have:  # (loops are reversed twice)
                st.pg_save_before = have + [(alias, name)]
                rev.primal.add(alias)
                rev.act.multi.add(alias)
        d_t = sub.dnames.get(target.id)
        value = ir.name(d_t) if d_t and sub_state.get(d_t) else None
        if value is None:
            raise AssertionError(f"{loc}: contribution lost")  # excluded by the check above
        # copies of the target (an inlined function's parameter) accumulate for it too
        aliases = {target.id}
        for st in segment:
            if isinstance(st.value, gast.Name) and st.value.id in aliases:
                aliases.add(st.targets[0].id)
        alias_d = {sub.dnames[a]: a for a in aliases if a in sub.dnames}
        for d_a, a in alias_d.items():
            body = [_per_sample(st, d_a, a, rev) for st in body]
        from propgen import runtime

        via_autograd = {n.id for st in body if isinstance(st, gast.Assign)
                        and isinstance(st.value, gast.Call) and isinstance(st.value.func, gast.Name)
                        and getattr(rev.ctx.namespace.get(st.value.func.id), "value", None)
                        is runtime.opaque_grad
                        for n in ir.walk(st.targets[0]) if isinstance(n, gast.Name)}
        if not all(_per_sample_form(st, d_a, rev, via_autograd | set(alias_d))
                   for st in body for d_a in alias_d):
            return self.vmap_fallback(segment, target.id, x.id, g, result)
        return [ir.assign(seed, g)] + body + [ir.assign(result, value)]

    def vmap_fallback(self, segment: list, t: str, x: str, g: gast.AST, result: str) -> list:
        """Per-sample contributions with torch.func, for a target reached through an op whose
        adjoint has no per-sample form: the segment becomes a function of the target and its
        inputs, and ``per_sample_vjp`` maps its vector-Jacobian product over the batch."""
        from propgen.templates import estimators

        rev = self.rev
        key = (id(self.site), t)
        cache = rev.__dict__.setdefault("segment_fns", {})
        if key not in cache:
            stored: set = set()
            inputs: list = []
            first_store: dict = {}
            for st in segment:
                for n in ir.names_in(st.value):
                    if (n not in stored and n != t and n not in inputs
                            and n not in rev.ctx.namespace):
                        inputs.append(n)
                name = st.targets[0].id
                stored.add(name)
                first_store.setdefault(name, st)
            aliases = []
            for n in inputs:
                st = first_store.get(n)
                if st is None:
                    aliases.append(n)
                    continue
                # the segment reassigns this input: the forward keeps its value from before
                known = {nm: a for a, nm in getattr(st, "pg_save_before", [])}
                alias = known.get(n) or rev.ctx.fresh(f"{n}_before")
                if n not in known:
                    st.pg_save_before = getattr(st, "pg_save_before", []) + [(alias, n)]
                    rev.primal.add(alias)
                    rev.act.multi.add(alias)
                aliases.append(alias)
            from propgen.primal import _fdef

            fname = rev.ctx.fresh(f"{self.site.hint}_segment")
            body = [ir.clone(st) for st in segment] + [gast.Return(value=ir.name(x))]
            rev.__dict__.setdefault("extra_defs", []).append(
                _fdef(fname, [t] + inputs, body, rev.ctx))
            cache[key] = (fname, aliases)
        fname, aliases = cache[key]
        fn = rev.ctx.bind("value", estimators, "per_sample_vjp", estimators.per_sample_vjp,
                          "per_sample_vjp")
        call = gast.Call(func=ir.name(fn), args=[
            ir.name(fname), ir.name(t), g,
            gast.Tuple(elts=[ir.name(a) for a in aliases], ctx=gast.Load())], keywords=[])
        rev.ctx.used.add(fname)
        return [ir.assign(result, call)]

    def deferred(self, result: str, error: Exception) -> list:
        """The error of a node that cannot work as configured, raised if the node runs: at
        the top level of the function it is raised now; in a branch or loop, which may not
        run, the generated code raises it (naming the call site) when it does."""
        block, _ = self.rev.node_chain(self.site.first_stmt)[-1]
        if block is self.rev.body and len(self.rev.node_chain(self.site.first_stmt)) == 1:
            raise error
        call = gast.Call(func=self.rev.rt("configuration_error"), args=[ir.const(str(error))],
                         keywords=[])
        return [ir.assign(result, call)]

    def segment(self, target: str) -> list:
        """The straight-line statements between the previous node (or the start of the loop
        body or function) and this node; from inside a branch, the statements before the
        branch count too (its test computes no gradient)."""
        out: list = []
        for block, index in self.rev.node_chain(self.site.first_stmt):
            start, stop = 0, False
            for i, st in enumerate(block[:index]):
                if _holds_node(st) or (
                    isinstance(st, gast.Assign) and isinstance(st.targets[0], gast.Name)
                    and st.targets[0].id == target
                ):
                    start, stop = i + 1, True
            part = []
            for st in block[start:index]:
                if isinstance(st, gast.Assign) and isinstance(st.targets[0], gast.Name):
                    part.append(st)
                elif isinstance(st, (gast.If, gast.For, gast.While)) and _assigns(st):
                    self.rev.fail(self.s, "a TotalProp node whose input is computed with a "
                                  "loop or a branch since the previous node",
                                  "compute the node's input with straight-line code, or use a "
                                  "node (e.g. propgen.Propagator()) before the loop or branch")
            out = part + out
            if stop:
                break
        return out


def _holds_node(st: gast.AST) -> bool:
    return any(getattr(n, "pg_node", None) is not None for n in ir.walk(st))


def _assigns(st: gast.AST) -> bool:
    """Whether a compound statement assigns anything but bookkeeping (an if's copied test)."""
    return any(isinstance(n, gast.Assign) and not getattr(n, "pg_nograd", False)
               for n in ir.walk(st))


class _Subst(gast.NodeTransformer):
    def __init__(self, sp: _Splicer, tmpl: Template) -> None:
        self.sp, self.tmpl = sp, tmpl

    def visit_Subscript(self, node: gast.Subscript) -> gast.AST:
        if _is_sub(node, "d", self.tmpl):
            key = node.slice
            if not (isinstance(key, gast.Name) and key.id in self.sp.site.mapping):
                raise TypeError(f"template {self.tmpl.name}: d[...] must name a parameter")
            return self.sp.grad_of(self.sp.site.mapping[key.id])
        if _is_sub(node, "m", self.tmpl):
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
        value = g[node.id] if node.id in g else __builtins__[node.id] if isinstance(
            __builtins__, dict) else getattr(__builtins__, node.id)
        return ir.name(sp.rev.ctx.bind("value", self.tmpl, node.id, value, node.id))


def _no_side_effects(stmt: gast.AST, rev: Reverse) -> gast.AST:
    """A contribution differentiates through an opaque call with ``opaque_grad``, which leaves
    parameters' ``.grad`` alone (the main backward accumulates them once)."""
    from propgen import runtime

    vjp = rev.ctx.namespace
    for n in ir.walk(stmt):
        if isinstance(n, gast.Call) and isinstance(n.func, gast.Name):
            b = vjp.get(n.func.id)
            if getattr(b, "value", None) is runtime.opaque_vjp:
                n.func = rev.rt("opaque_grad")
    return stmt


def _per_sample_form(stmt: gast.AST, d_t: str, rev: Reverse, via_autograd: set) -> bool:
    """Whether a statement accumulating the target's contribution keeps the batch."""
    from propgen import runtime
    from propgen.templates import estimators, helpers

    if not (isinstance(stmt, gast.Assign) and isinstance(stmt.targets[0], gast.Name)
            and stmt.targets[0].id == d_t):
        return True
    per_sample = {estimators.per_sample_unbroadcast, estimators.factored_outer,
                  runtime.opaque_grad}
    passing = {runtime.acc, runtime.acc_into, helpers.like}

    def ok(e: gast.AST) -> bool:  # the last reduction keeps the batch
        if isinstance(e, gast.Name):  # (another contribution variable may be batch-summed)
            return e.id in via_autograd or e.id == d_t
        if isinstance(e, gast.Constant):
            return True
        if isinstance(e, gast.Call) and isinstance(e.func, gast.Name):
            fn = getattr(rev.ctx.namespace.get(e.func.id), "value", None)
            return fn in per_sample or (fn in passing and all(ok(a) for a in e.args))
        if isinstance(e, gast.BinOp) and isinstance(e.op, gast.Add):
            return ok(e.left) and ok(e.right)
        if isinstance(e, gast.Attribute) and e.attr in ("mT", "T"):
            return ok(e.value)
        return False

    return ok(stmt.value)


def _rename_loads(node: gast.AST, names: dict) -> gast.AST:
    if names:
        for n in ir.walk(node):
            if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Load) and n.id in names:
                n.id = names[n.id]
    return node


def _stored_in(tmpl: Template, name: str) -> bool:
    return any(isinstance(n, gast.Name) and n.id == name and isinstance(n.ctx, gast.Store)
               for s in tmpl.body for n in ir.walk(s))


def _is_sub(node: Any, base: str, tmpl: Template) -> bool:
    """``d[...]`` / ``m[...]``, also spelled ``propgen.d[...]`` (the template language's own
    objects, whatever the template module calls them)."""
    if not isinstance(node, gast.Subscript):
        return False
    from propgen import template

    v = node.value
    if isinstance(v, gast.Name):
        return tmpl.globals.get(v.id) is getattr(template, base)
    if isinstance(v, gast.Attribute) and isinstance(v.value, gast.Name):
        mod = tmpl.globals.get(v.value.id)
        return getattr(mod, v.attr, None) is getattr(template, base)
    return False


def _is_intrinsic(node: Any, tmpl: Template, name: str) -> bool:
    from propgen import template

    return (isinstance(node, gast.Call) and isinstance(node.func, gast.Name)
            and tmpl.globals.get(node.func.id) is getattr(template, name))


def _per_sample(stmt: gast.AST, d_t: str, t: str, rev: Reverse) -> gast.AST:
    """In a statement that accumulates the target's contribution, keep the batch: the reducing
    helpers become their per-sample forms (a shared weight's contributions stay per sample,
    factored for a linear map)."""
    from propgen.templates import estimators, helpers

    if not (isinstance(stmt, gast.Assign) and isinstance(stmt.targets[0], gast.Name)
            and stmt.targets[0].id == d_t):
        return stmt
    swap = {helpers.unbroadcast: estimators.per_sample_unbroadcast,
            helpers.matmul_grad_other: estimators.factored_outer}
    for n in ir.walk(stmt.value):
        if isinstance(n, gast.Call) and isinstance(n.func, gast.Name) and len(n.args) >= 2:
            b = rev.ctx.namespace.get(n.func.id)
            new = swap.get(getattr(b, "value", None))
            last = n.args[-1]
            reads_t = t in ir.names_in(last)
            if new is not None and reads_t:
                n.func = ir.name(rev.ctx.bind("value", estimators, new.__name__, new,
                                              new.__name__))
    return stmt


def _prune(code: list, sp: _Splicer) -> list:
    """Keep what sends gradients or messages, and what those read."""
    channels = set(sp.rev.channels.values())
    needed: set = set()
    kept: list = []
    for stmt in reversed(code):
        stores = {n.id for n in ir.walk(stmt) if isinstance(n, gast.Name)
                  and isinstance(n.ctx, gast.Store)}
        if id(stmt) in sp.accs or stores & channels or stores & needed:
            kept.insert(0, stmt)
            needed |= {n.id for n in ir.walk(stmt) if isinstance(n, gast.Name)
                       and isinstance(n.ctx, gast.Load)}
    return kept


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
