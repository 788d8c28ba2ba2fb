"""Stage 5d, TotalProp's statistics: per-sample contributions of a node's messages to its
``ivw_target``.

A backward template's ``c = contribution(g, x, target)`` becomes the adjoint of the
straight-line code between the target and the node (the *segment*: from the previous node,
or the start of the loop body or function, through enclosing branches), seeded with ``g``
and read at the target.  Its reductions keep the batch: ``unbroadcast`` becomes
``per_sample_unbroadcast``, a linear map's weight gradient stays factored
(``factored_outer``), an opaque call goes through ``opaque_grad``; where an adjoint has no
per-sample form the segment becomes a generated function and ``per_sample_vjp`` maps its
vector-Jacobian product over the batch with torch.func.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gast

from propgen import ir
from propgen.analyse import analyse
from propgen.template import Template

if TYPE_CHECKING:
    from propgen.transform import Reverse

__all__ = ["Contributions"]

_DEF = "def"


class Contributions:
    """Mixin of the node splicer (propgen.splice) that expands ``contribution(...)``."""

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
            gast.Tuple(elts=[ir.name(a) for a in aliases], ctx=gast.Load()),
            ir.const(self.site.site)], keywords=[])
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
