"""Stage 5b, transform (forward side): the primal function that saves what the backward reads.

Runs after the reverse pass is generated, because only then is it known which values the
backward reads: a reassigned name is pushed on ``_stack`` only when the backward reads it,
a buffer's overwritten slot is saved only when the backward reads the buffer (a push whose
pop is dead is never emitted).
"""

from __future__ import annotations

import gast

from propgen import ir
from propgen.templates import helpers
from propgen.transform import Comment, Pop, PopAppend, PopSlot, Reverse, UndoPop

__all__ = ["build"]


def _loads(code: list) -> list[str]:
    out: list[str] = []
    for stmt in code:
        if isinstance(stmt, (Pop, PopSlot, PopAppend, Comment)):
            continue
        for n in ir.walk(stmt):
            if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Load) and n.id not in out:
                out.append(n.id)
    return out


def _walk_code(code: list):
    for s in code:
        yield s
        for attr in ("body", "orelse"):
            if isinstance(getattr(s, attr, None), list):
                yield from _walk_code(getattr(s, attr))


class Primal:
    def __init__(self, rev: Reverse, restore: set, reads: set, meta_only: set) -> None:
        self.rev = rev
        self.meta_only = meta_only  # names the backward reads only for shape, dtype, device
        self.ctx = rev.ctx
        self.restore = restore
        self.reads = reads
        self.pre_init: list[str] = []
        self.pushes = False

    def push(self, value: gast.AST) -> gast.Expr:
        self.pushes = True
        append = gast.Attribute(value=ir.name(self.rev.stack), attr="append", ctx=gast.Load())
        return gast.Expr(value=gast.Call(func=append, args=[value], keywords=[]))

    def push_name(self, n: str, bound: set, needed: bool = True) -> list:
        if n not in self.restore or not needed:
            return []
        if n not in bound and n not in self.pre_init:
            self.pre_init.append(n)
        return [self.push(self.saved_value(n))]

    def saved_value(self, n: str) -> gast.AST:
        """What the forward keeps of ``n``: its shape, dtype and device alone when that is all
        the backward reads (a tensor kept only for its shape would hold its memory)."""
        if n in self.meta_only:
            return gast.Call(func=self.rev.rt("meta"), args=[ir.name(n)], keywords=[])
        return ir.name(n)

    def block(self, stmts: list, bound: set) -> list:
        out: list = []
        for s in stmts:
            out += self.stmt(s, bound)
        return out

    def stmt(self, s: gast.AST, bound: set) -> list:
        rev = self.rev
        head = rev.comment(s, "")
        if isinstance(s, gast.Assign):
            tgt = s.targets[0]
            if isinstance(tgt, gast.Subscript):
                code = []
                if tgt.value.id in self.reads:
                    from propgen.transform import _index_value

                    save = gast.Call(func=rev.rt("save_slot"),
                                     args=[ir.name(tgt.value.id), _index_value(tgt.slice)],
                                     keywords=[])
                    code.append(self.push(save))
                return head + code + [ir.clone(s)]
            t = tgt.id
            code = []
            for alias, name in getattr(s, "pg_save_before", []):
                code += self.push_name(alias, bound)
                code.append(ir.assign(alias, ir.name(name)))
                bound.add(alias)
            code += self.push_name(t, bound, rev.rebinds.get(id(s), True))
            if any(k[0] == id(s) for k in rev.tracked):
                code += self.opaque(s)
                bound.update(v for k, v in rev.tracked.items() if k[0] == id(s) and v)
            else:
                code.append(ir.clone(s))
            bound.add(t)
            return head + code
        if isinstance(s, gast.Expr):
            return head + [ir.clone(s)]
        if isinstance(s, gast.If):
            b1, b2 = set(bound), set(bound)
            body = self.block(s.body, b1)
            orelse = self.block(s.orelse, b2)
            bound |= b1 & b2
            rev.last_comment = None
            return head + [gast.If(test=ir.clone(s.test), body=body or [gast.Pass()],
                                   orelse=orelse)]
        if isinstance(s, gast.For):
            pre = self.push_name(s.target.id, bound, rev.rebinds.get(id(s), True))
            inner = set(bound) | {s.target.id}
            body = self.block(s.body, inner)
            rev.last_comment = None
            loop = gast.For(target=ir.clone(s.target), iter=ir.clone(s.iter),
                            body=body or [gast.Pass()], orelse=[], type_comment=None)
            return head + pre + [loop]
        if isinstance(s, gast.While):
            count = rev.counts.get(id(s))
            pre: list = []
            body_pre: list = []
            if count is not None:
                nested = id(s) in rev.nested_whiles
                pre = self.push_name(count, bound, nested) + [ir.assign(count, ir.const(0))]
                bound.add(count)
                inc = gast.BinOp(left=ir.name(count), op=gast.Add(), right=ir.const(1))
                body_pre = [ir.assign(count, inc)]
            body = body_pre + self.block(s.body, set(bound))
            rev.last_comment = None
            return head + pre + [gast.While(test=ir.clone(s.test), body=body, orelse=[])]
        if isinstance(s, gast.With):
            return []  # insert_grad_of: code for the backward only
        if isinstance(s, (gast.Assert, gast.Raise)):
            return head + [ir.clone(s)]
        return []

    def opaque(self, s: gast.Assign) -> list:
        """``t = f(a)`` through torch.autograd: fresh leaves in, a graph under enable_grad."""
        rev = self.rev
        value = ir.clone(s.value)
        code: list = []
        callee = s.value.pg_callee
        label = getattr(callee, "label", "call")
        what = f".{label}" if getattr(callee, "obj", None) is getattr else f"{label}()"
        code.append(Comment(f"opaque: {what} has no adjoint template; torch.autograd records "
                            "its vector-Jacobian product"))
        mapping = {}
        for (sid, arg), leaf in rev.tracked.items():
            if sid == id(s) and arg is not None:
                mapping[arg] = leaf
                if leaf in self.restore:
                    if leaf not in self.pre_init:
                        self.pre_init.append(leaf)
                    code.append(self.push(ir.name(leaf)))
                track = gast.Call(func=rev.rt("track"), args=[ir.name(arg)], keywords=[])
                code.append(ir.assign(leaf, track))
        for n in ir.walk(value):
            if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Load) and n.id in mapping:
                n.id = mapping[n.id]
        enable = gast.Call(
            func=gast.Attribute(value=rev.torch_ref(), attr="enable_grad", ctx=gast.Load()),
            args=[], keywords=[])
        with_node = gast.With(items=[gast.withitem(context_expr=enable, optional_vars=None)],
                              body=[ir.assign(s.targets[0].id, value)], type_comment=None)
        code.append(with_node)
        return code


def _resolve(code: list, restore: set, reads: set, rev: Reverse) -> list:
    """Turn Pop markers into real pops (or nothing) and drop compound statements left empty."""
    out: list = []
    for s in code:
        if isinstance(s, Pop):
            if s.name in restore and s.needed:
                pop = gast.Call(func=gast.Attribute(value=ir.name(rev.stack), attr="pop",
                                                    ctx=gast.Load()), args=[], keywords=[])
                out.append(ir.assign(s.name, pop))
            continue
        if isinstance(s, PopSlot):
            if s.buffer in reads:
                pop = gast.Call(func=gast.Attribute(value=ir.name(rev.stack), attr="pop",
                                                    ctx=gast.Load()), args=[], keywords=[])
                call = gast.Call(func=rev.rt("restore_slot"),
                                 args=[ir.name(s.buffer), ir.clone(s.index), pop,
                                       ir.name(rev.redo)],
                                 keywords=[])
                rev.redo_used = True
                out.append(gast.Expr(value=call))
            continue
        if isinstance(s, UndoPop):
            if s.items in reads:
                call = gast.Call(func=rev.rt("undo_pop"),
                                 args=[ir.name(s.items), ir.name(s.value), ir.name(rev.redo)],
                                 keywords=[])
                out.append(gast.Expr(value=call))
                rev.redo_used = True
            continue
        if isinstance(s, PopAppend):
            if s.items in reads:
                if s.count is None:
                    call = gast.Call(func=rev.rt("undo_append"),
                                     args=[ir.name(s.items), ir.name(rev.redo)], keywords=[])
                else:
                    call = gast.Call(func=rev.rt("undo_extend"),
                                     args=[ir.name(s.items), ir.clone(s.count),
                                           ir.name(rev.redo)], keywords=[])
                out.append(gast.Expr(value=call))
                rev.redo_used = True
            continue
        if isinstance(s, (gast.If, gast.For, gast.While)):
            s.body = _resolve(s.body, restore, reads, rev)
            s.orelse = _resolve(s.orelse, restore, reads, rev)
            if not _has_code(s.body) and not _has_code(s.orelse):
                continue
            if not s.body:
                s.body = [gast.Pass()]
        out.append(s)
    # a comment with nothing after it in its block says nothing
    while out and isinstance(out[-1], Comment):
        out.pop()
    return out


def _has_code(code: list) -> bool:
    return any(not isinstance(s, (Comment, gast.Pass)) for s in code)


def _marker_loads(code: list, restore: set, reads: set) -> set:
    out: set = set()
    for s in _walk_code(code):
        if isinstance(s, PopSlot) and s.buffer in reads:
            out.update(ir.names_in(s.index))
        if isinstance(s, PopAppend) and s.items in reads and s.count is not None:
            out.update(ir.names_in(s.count))
        if isinstance(s, UndoPop) and s.items in reads:
            out.add(s.value)
    return out


def build(rev: Reverse, fwd_name: str, bwd_name: str) -> tuple[gast.FunctionDef, gast.FunctionDef]:
    """Generate the backward, then the forward that saves what it reads."""
    body, ret = rev.body[:-1], rev.body[-1]
    ret_atom = ret.value
    state: dict = {}
    seed = None
    active_result = isinstance(ret_atom, gast.Name) and ret_atom.id in rev.act.active
    if active_result or rev.ctx.propagation is not None:
        # (propagation: node templates send messages even where no gradient flows)
        if active_result:
            seed = rev.dname(ret_atom.id)
            state[seed] = "def"
        else:
            seed = rev.ctx.fresh("d_result")
        code = rev.rev_block(body, state)
        if rev.ctx.propagation is not None:
            from propgen.routing import expand_routing

            code = expand_routing(code, rev)
    else:
        seed = rev.ctx.fresh("d_result")
        code = []
    primal = rev.primal
    reads = {n for n in _loads([s for s in _walk_code(code)]) if n in primal}
    for _ in range(3):  # undoing a store reads its index: iterate to a fixpoint
        extra = {n for n in _marker_loads(code, set(), reads) if n in primal} - reads
        if not extra:
            break
        reads |= extra
    restore = reads & rev.act.multi
    bwd_code = _resolve(code, restore, reads, rev)
    # leaves and results
    tail: list = []
    for leaf in rev.leaves:
        d = rev.dnames.get(leaf)
        if d is not None and state.get(d) is not None:
            if state.get(d) == "maybe":
                rev.maybe_vars.add(d)
            call = gast.Call(func=rev.rt("accumulate_grad"), args=[ir.name(leaf), ir.name(d)],
                             keywords=[])
            tail.append(gast.Expr(value=call))
    results = []
    for p in rev.wrt:
        d = rev.dnames.get(p)
        results.append(ir.name(d) if d is not None and state.get(d) is not None
                       else ir.const(None))
        if d is not None and state.get(d) == "maybe":
            rev.maybe_vars.add(d)
    # forward
    rev.last_comment = None
    # (arguments stay whole: the caller holds them anyway)
    prim = Primal(rev, restore, reads, _meta_only(bwd_code + tail, rev) - set(rev.params))
    fwd_code = prim.block(body, set(rev.params))
    saved: list[str] = []
    for n in _loads_outside_own_loops(bwd_code + tail, set()):
        if n in primal and n not in saved:
            saved.append(n)
    bound_at_end: set = set(rev.params)
    _collect_bound(body, bound_at_end)
    for n in saved:
        if n not in bound_at_end and n not in prim.pre_init:
            prim.pre_init.append(n)
    stack_used = prim.pushes
    head = [ir.assign(n, ir.const(None)) for n in prim.pre_init]
    fwd_code = _guard_unbound(fwd_code + [gast.Return(value=ir.clone(ret_atom))],
                              set(prim.pre_init), set(rev.params), rev)[:-1]
    if stack_used:
        head.append(ir.assign(rev.stack, gast.List(elts=[], ctx=gast.Load())))
        saved.append(rev.stack)
    saved_tuple = gast.Tuple(elts=[prim.saved_value(n) for n in saved], ctx=gast.Load())
    fwd_ret = gast.Return(value=gast.Tuple(elts=[ir.clone(ret_atom), saved_tuple],
                                           ctx=gast.Load()))
    fwd = _fdef(fwd_name, list(rev.params), head + fwd_code + [fwd_ret], rev.ctx)
    saved_param = rev.ctx.fresh("saved")
    unpack = []
    if saved:
        target = gast.Tuple(elts=[ir.name(n, True) for n in saved], ctx=gast.Store())
        unpack = [ir.assign(target, ir.name(saved_param))]
    inits = [ir.assign(d, ir.const(None)) for d in sorted(rev.maybe_vars) if d != seed]
    if stack_used:
        # pop from a copy: the saved values stay whole, so the backward can run again
        inits.append(ir.assign(rev.stack, gast.Call(func=ir.name("list"),
                                                    args=[ir.name(rev.stack)], keywords=[])))
    if rev.redo_used:
        inits.append(ir.assign(rev.redo, gast.List(elts=[], ctx=gast.Load())))
        tail.append(gast.Expr(value=gast.Call(func=rev.rt("redo_all"),
                                              args=[ir.name(rev.redo)], keywords=[])))
    bwd_params = [saved_param, seed]
    if rev.ctx.propagation is not None:
        # messages flow in from later nodes (the loss) and what remains flows out
        msgs = rev.ctx.internal("messages")
        bwd_params.append(msgs)
        for key, var in sorted(rev.channels.items()):
            get = gast.Call(func=gast.Attribute(value=ir.name(msgs), attr="get",
                                                ctx=gast.Load()),
                            args=[ir.const(key)], keywords=[])
            inits.append(ir.assign(var, get))
        if getattr(rev, "mail", None):
            inits.append(ir.assign(rev.mail, gast.Dict(keys=[], values=[])))
        out = gast.Dict(keys=[ir.const(k) for k in sorted(rev.channels)],
                        values=[ir.name(v) for _, v in sorted(rev.channels.items())])
        if getattr(rev, "mail", None):
            out = gast.Call(func=rev.rt("remaining"), args=[ir.name(rev.mail), out],
                            keywords=[])
        results = results + [out]
    ret_node = gast.Return(value=gast.Tuple(elts=results, ctx=gast.Load()))
    bwd = _fdef(bwd_name, bwd_params, unpack + inits + bwd_code + tail + [ret_node], rev.ctx)
    return fwd, bwd


def _meta_only(code: list, rev: Reverse) -> set:
    """Names that the backward reads only as the shape argument of ``unbroadcast`` or
    ``expand_reduced`` (the second), which need a tensor's shape, dtype and device only."""
    meta_funcs = {helpers.unbroadcast, helpers.expand_reduced}
    meta_pos: set = set()
    for stmt in code:
        for n in ir.walk(stmt):
            if (isinstance(n, gast.Call) and isinstance(n.func, gast.Name)
                    and len(n.args) > 1 and isinstance(n.args[1], gast.Name)):
                binding = rev.ctx.namespace.get(n.func.id)
                if getattr(binding, "value", None) in meta_funcs:
                    meta_pos.add(id(n.args[1]))
    meta, real = set(), set()
    for stmt in code:
        for n in ir.walk(stmt):
            if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Load):
                (meta if id(n) in meta_pos else real).add(n.id)
    return meta - real


def _loads_outside_own_loops(code: list, loop_vars: set) -> list[str]:
    """Names the backward reads before assigning them itself (a reversed loop's variable is
    assigned by that loop, so reading it inside the loop needs nothing saved)."""
    out: list[str] = []
    for s in code:
        if isinstance(s, (Comment, Pop, PopSlot, PopAppend)):
            continue
        if isinstance(s, gast.For):
            inner = loop_vars | {s.target.id}
            names = ir.names_in(s.iter) + _loads_outside_own_loops(s.body, inner)
        elif isinstance(s, (gast.If, gast.While)):
            test = s.test
            names = ir.names_in(test) + _loads_outside_own_loops(s.body, loop_vars)
            names += _loads_outside_own_loops(s.orelse, loop_vars)
        else:
            names = [n for n in ir.names_in(s) if n not in loop_vars]
        for n in names:
            if n not in out and n not in loop_vars:
                out.append(n)
    return out


def _guard_unbound(code: list, started: set, bound: set, rev: Reverse) -> list:
    """Check reads of the locals the forward starts at None (``started``) where they may be
    unassigned on the way there: Python raises UnboundLocalError, and so must the generated
    code, instead of computing with None.  ``bound`` holds the names assigned on every path."""
    out: list = []
    for s in code:
        if isinstance(s, gast.If):
            b1, b2 = set(bound), set(bound)
            s.body = _guard_unbound(s.body, started, b1, rev)
            s.orelse = _guard_unbound(s.orelse, started, b2, rev)
            bound |= b1 & b2
        elif isinstance(s, (gast.For, gast.While)):
            inner = set(bound) | set(ir.names_in(getattr(s, "target", None), gast.Store))
            s.body = _guard_unbound(s.body, started, inner, rev)
        else:
            loc = getattr(s, "pg_loc", None)
            if loc is not None or isinstance(s, gast.Return):
                for n in ir.names_in(s):
                    if n in started and n not in bound:
                        where = loc.short if loc is not None else "the return"
                        out.append(gast.Expr(value=gast.Call(
                            func=rev.rt("check_bound"),
                            args=[ir.name(n), ir.const(n), ir.const(where)], keywords=[])))
            bound |= set(ir.names_in(s, gast.Store))
        out.append(s)
    return out


def _collect_bound(body: list, bound: set) -> None:
    for s in body:
        if isinstance(s, gast.Assign) and isinstance(s.targets[0], gast.Name):
            bound.add(s.targets[0].id)
        elif isinstance(s, gast.If):
            b1, b2 = set(bound), set(bound)
            _collect_bound(s.body, b1)
            _collect_bound(s.orelse, b2)
            bound |= b1 & b2


def _fdef(name: str, params: list[str], body: list, ctx) -> gast.FunctionDef:
    args = gast.arguments(
        args=[gast.Name(id=p, ctx=gast.Param(), annotation=None, type_comment=None)
              for p in params],
        posonlyargs=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[])
    return gast.FunctionDef(name=name, args=args, body=body, decorator_list=[], returns=None,
                            type_comment=None, type_params=[])
