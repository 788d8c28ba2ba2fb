"""Stage 5, transform: the normalized function -> a forward and a backward function.

The backward walks the statements in reverse.  Each statement's adjoint comes from its
template, spliced in with the call's atoms.  State is undone exactly: an assignment to a name
that is reassigned (or assigned in a loop) and read by the backward pushes the old value on
``_stack`` in the forward and pops it in the backward, so when the backward reaches a
statement every variable holds what it held right after that statement ran forward.  Loops
run backward over ``reversed(range)`` or an iteration count; branches test the same
condition variable.

Gradient variables are tracked while generating: a ``d_x`` that is surely unassigned gets a
plain assignment, one that surely holds a tensor gets ``d_x = d_x + g``, one that may be
None goes through ``acc``; a statement whose incoming gradient is surely absent produces no
code at all.
"""

from __future__ import annotations

import inspect
from typing import Any

import gast
import torch

from propgen import ir, runtime
from propgen.aliases import KEEPS, in_place_update
from propgen.analyse import Activity, assigned_names, walk_statements
from propgen.errors import UnsupportedSyntaxError
from propgen.normalize import Callee, Context
from propgen.template import Template
from propgen.templates import helpers

__all__ = ["Reverse", "Pop", "PopSlot", "PopAppend", "UndoPop", "Comment"]

DEF, MAYBE = "def", "maybe"
_RESULT = object()


class Pop(gast.stmt):
    """Marker: restore ``name`` from the stack here, if the backward reads it."""

    _fields = ()

    def __init__(self, name: str, needed: bool = True) -> None:
        super().__init__()
        self.name = name
        self.needed = needed  # False when the old value was never bound: nothing to restore


class PopSlot(gast.stmt):
    """Marker: undo ``buffer[index] = value`` here, if the backward reads the buffer."""

    _fields = ()

    def __init__(self, buffer: str, index: gast.AST) -> None:
        super().__init__()
        self.buffer = buffer
        self.index = index


class PopAppend(gast.stmt):
    """Marker: undo ``items.append(v)`` (n=None) or ``items.extend(vs)`` here, if read."""

    _fields = ()

    def __init__(self, items: str, count: gast.AST | None) -> None:
        super().__init__()
        self.items = items
        self.count = count


class UndoPop(PopAppend):
    """Marker: undo ``value = items.pop()`` here (put ``value`` back), if ``items`` is read."""

    _fields = ()

    def __init__(self, items: str, value: str) -> None:
        super().__init__(items, None)
        self.value = value


class Comment(gast.stmt):
    """A provenance comment line in the generated code."""

    _fields = ()

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


def _join(a: dict, b: dict) -> dict:
    out = {}
    for k in set(a) | set(b):
        out[k] = DEF if a.get(k) == DEF and b.get(k) == DEF else MAYBE
    return out


# Helpers whose result is their first argument or a new tensor computed from it.
_PASS_FRESH = (helpers.unbroadcast, helpers.like)
# Helpers whose result is always a new tensor.
_MAKE_FRESH = (helpers.tanh_backward, helpers.sigmoid_backward, helpers.relu_backward)


def _call(func: gast.AST, *args: gast.AST) -> gast.Call:
    return gast.Call(func=func, args=list(args), keywords=[])


def _index_value(node: gast.AST) -> gast.AST:
    """An index as a value: ``1:3`` -> ``slice(1, 3, None)``."""
    if isinstance(node, gast.Slice):
        bounds = (node.lower, node.upper, node.step)
        parts = [p if p is not None else ir.const(None) for p in bounds]
        return _call(ir.name("slice"), *parts)
    if isinstance(node, gast.Tuple):
        return gast.Tuple(elts=[_index_value(e) for e in node.elts], ctx=gast.Load())
    return ir.clone(node)


class Names:
    """Name helpers the reverse and forward transforms share: a fresh temporary per key, and
    the helpers of the transform's runtime module bound in the generated namespace."""

    runtime_module: Any = runtime
    ctx: Context
    temps: dict

    def temp(self, key: tuple, base: str) -> str:
        if key not in self.temps:
            self.temps[key] = self.ctx.fresh(base)
        return self.temps[key]

    def rt(self, attr: str) -> gast.Name:
        """A runtime helper, bound in the generated module's namespace."""
        mod = self.runtime_module
        return ir.name(self.ctx.bind("value", mod, attr, getattr(mod, attr), attr))


class Reverse(Names):
    """Builds the forward and backward FunctionDefs of one normalized function."""

    def __init__(self, ctx: Context, name: str, params: list[str], body: list, wrt: list[str],
                 act: Activity, leaves: list[str]) -> None:
        self.ctx = ctx
        self.name = name
        self.params = params
        self.body = body
        self.wrt = wrt
        self.act = act
        self.leaves = leaves
        self.dnames: dict[str, str] = {}
        self.temps: dict[tuple, str] = {}
        self.maybe_vars: set[str] = set()
        self.tracked: dict[tuple, str] = {}  # (id(stmt), arg) -> leaf made by track()
        self.counts: dict[int, str] = {}  # id(while) -> iteration counter
        self.nested_whiles: set[int] = set()
        for s, depth in walk_statements(body):
            if isinstance(s, gast.While) and depth:
                self.nested_whiles.add(id(s))
        self.primal: set[str] = set(params)
        for s, _ in walk_statements(body):
            self.primal.update(assigned_names(s))
        self.stack = ctx.internal("stack")
        # what the backward undoes in buffers and lists, redone at its end
        self.redo = ctx.internal("redo")
        self.redo_used = False
        self.last_comment: Any = None
        self.dprefix = "d_"  # contributions (TotalProp) use their own adjoint names
        self.channels: dict[str, str] = {}  # message name -> its variable in the backward
        self.node_blocks: dict[int, tuple[list, int]] = {}
        self.rebinds: dict[int, bool] = {}  # id(stmt) -> its target may already be bound
        _bound_pass(body, set(params), self.rebinds)
        self._reject_inplace(body)

    def _reject_inplace(self, body: list) -> None:
        """An in-place update (``y.mul_(2)``, ``torch.relu_(y)``, ``F.relu(y, inplace=True)``)
        of a value that carries gradient, or by one (``y.add_(x)``), would make a wrong
        gradient: the templates differentiate values, not updates of them."""
        for s, _ in walk_statements(body):
            call = s.value if isinstance(s, (gast.Assign, gast.Expr)) else None
            update = in_place_update(call, getattr(call, "pg_callee", None))
            if update is None or update.name in KEEPS:
                continue
            operands = [update.tensor, *call.args, *(k.value for k in call.keywords)]
            carried = list(dict.fromkeys(a.id for a in operands if isinstance(a, gast.Name)
                                         and a.id in self.act.varied))
            if getattr(s, "pg_nograd", False):  # only the updated value's own gradient matters
                carried = [n for n in carried if n == getattr(update.tensor, "id", None)]
            if carried:
                y, op = getattr(update.tensor, "id", "x"), update.name.removesuffix("_")
                if getattr(call.pg_callee, "kind", None) == "inplace":
                    advice = f"write the out-of-place form: {y} = {y}.{op}(...)"
                elif update.name.endswith("_"):
                    advice = f"write the out-of-place form: {y} = {op}({y}, ...)"
                else:
                    advice = f"leave out inplace=True: {y} = {op}({y}, ...)"
                how = ("which carries gradient" if carried == [y]
                       else f"with gradient flowing through {', '.join(carried)}")
                self.fail(s, f"the in-place update {update.name}() of {y}, {how}", advice)

    # ------------------------------------------------------------------ names
    def dname(self, n: str) -> str:
        if n not in self.dnames:
            self.dnames[n] = self.ctx.fresh(self.dprefix + n)
        return self.dnames[n]


    def torch_ref(self) -> gast.Name:
        return ir.name(self.ctx.bind("value", None, "torch", torch, "torch"))

    def fail(self, stmt: gast.AST, what: str, advice: str) -> None:
        raise UnsupportedSyntaxError(getattr(stmt, "pg_loc", None), what, advice)

    def comment(self, stmt: gast.AST, prefix: str) -> list:
        loc = getattr(stmt, "pg_loc", None)
        if loc is None or getattr(stmt, "pg_bookkeeping", False):
            return []
        key = (prefix, loc.filename, loc.lineno)
        if key == self.last_comment:
            return []
        self.last_comment = key
        return [Comment(f"{prefix}{loc.short}  {loc.text.strip()}")]

    # -------------------------------------------------------- gradient state
    def read(self, n: str, state: dict) -> str | None:
        st = state.get(self.dname(n))
        if st == MAYBE:
            self.maybe_vars.add(self.dname(n))
        return st

    def accumulate(self, n: str, expr: gast.AST, state: dict, maybe_none: bool = False) -> list:
        d = self.dname(n)
        st = state.get(d)
        if st is None:
            state[d] = MAYBE if maybe_none else DEF
            return [ir.assign(d, expr)]
        # A fresh term is a tensor nothing else holds: ``acc_into`` adds into its memory, as
        # autograd's engine does, instead of allocating a third tensor for the sum.
        fresh = self.is_fresh(expr)
        if not fresh and st == DEF and not maybe_none and n in self.act.tensor:
            return [ir.assign(d, gast.BinOp(left=ir.name(d), op=gast.Add(), right=expr))]
        if st == MAYBE:
            self.maybe_vars.add(d)
        state[d] = DEF if (st == DEF or not maybe_none) else MAYBE
        helper = "acc_into" if fresh else "acc"
        return [ir.assign(d, _call(self.rt(helper), ir.name(d), expr))]

    def is_fresh(self, expr: gast.AST) -> bool:
        """Whether ``expr`` surely evaluates to a new object that no name refers to.

        Arithmetic makes new tensors (or numbers, which ``acc_into`` checks for);
        ``unbroadcast`` and ``like`` return their argument or a new tensor made from it.
        """
        if isinstance(expr, gast.BinOp) or (
            isinstance(expr, gast.UnaryOp) and isinstance(expr.op, gast.USub)
        ):
            return True
        if isinstance(expr, gast.Call) and isinstance(expr.func, gast.Name) and expr.args:
            binding = self.ctx.namespace.get(expr.func.id)
            value = getattr(binding, "value", None)
            if value in _MAKE_FRESH:
                return True
            return value in _PASS_FRESH and self.is_fresh(expr.args[0])
        return False

    def state_of(self, n: str, state: dict) -> bool:
        """Whether ``n`` surely has a gradient here (not None)."""
        return n in self.act.active and state.get(self.dname(n)) == DEF

    def reset(self, n: str, state: dict) -> list:
        d = self.dname(n)
        if state.get(d) is None:
            return []
        del state[d]
        return [ir.assign(d, ir.const(None))]

    def node_chain(self, stmt_id: int) -> list[tuple[list, int]]:
        """(block, index) from the statement's own block out through enclosing ``if``
        statements, stopping at a loop body or the function body."""
        def find(block: list) -> list | None:
            for i, st in enumerate(block):
                if id(st) == stmt_id:
                    return [(block, i)]
                for attr in ("body", "orelse"):
                    inner = getattr(st, attr, None)
                    if isinstance(inner, list):
                        hit = find(inner)
                        if hit is not None:
                            if isinstance(st, gast.If):
                                return hit + [(block, i)]
                            return hit
            return None

        chain = find(self.body)
        if chain is None:
            raise AssertionError("a node's statements are not in the function body")
        return chain

    def node_block(self, stmt_id: int) -> tuple[list, int]:
        """The block holding the statement with ``id(stmt) == stmt_id``, and its index."""
        def find(block: list) -> tuple[list, int] | None:
            for i, st in enumerate(block):
                if id(st) == stmt_id:
                    return block, i
                for attr in ("body", "orelse"):
                    inner = getattr(st, attr, None)
                    if isinstance(inner, list):
                        hit = find(inner)
                        if hit is not None:
                            return hit
            return None

        if stmt_id not in self.node_blocks:
            hit = find(self.body)
            if hit is None:
                raise AssertionError("a node's statements are not in the function body")
            self.node_blocks[stmt_id] = hit
        return self.node_blocks[stmt_id]

    # --------------------------------------------------------------- reverse
    def rev_block(self, stmts: list, state: dict) -> list:
        code: list = []
        for s in reversed(stmts):
            code.extend(self.rev_stmt(s, state))
        return code

    def rev_stmt(self, s: gast.AST, state: dict) -> list:
        if isinstance(s, gast.Assign):
            if isinstance(s.targets[0], gast.Subscript):
                return self.rev_store(s, state)
            # values a TotalProp contribution reads from before this statement (splice.py)
            extra = [Pop(alias) for alias, _ in reversed(getattr(s, "pg_save_before", []))]
            return self.rev_assign(s, state) + extra
        if isinstance(s, gast.Expr):
            return self.rev_expr(s, state)
        if isinstance(s, gast.If):
            s_body, s_else = dict(state), dict(state)
            self.last_comment = None
            body = self.rev_block(s.body, s_body)
            self.last_comment = None
            orelse = self.rev_block(s.orelse, s_else)
            state.clear()
            state.update(_join(s_body, s_else))
            if not body and not orelse:
                return []
            return [gast.If(test=ir.clone(s.test), body=body or [gast.Pass()], orelse=orelse)]
        if isinstance(s, (gast.For, gast.While)):
            return self.rev_loop(s, state)
        if isinstance(s, gast.With) and getattr(s, "pg_grad_of", False):
            return self.rev_grad_of(s, state)
        if isinstance(s, gast.With) and getattr(s, "pg_node", None) is not None:
            from propgen.splice import rev_node

            return rev_node(self, s, state)
        return []

    def rev_loop(self, s: gast.AST, state: dict) -> list:
        entry = dict(state)
        for _ in range(4):  # the gradient state at the loop head is a fixpoint
            trial = dict(entry)
            saved_comment = self.last_comment
            self.rev_block(s.body, trial)
            self.last_comment = saved_comment
            new_entry = _join(entry, trial) if trial != entry else entry
            if new_entry == entry:
                break
            entry = new_entry
        self.last_comment = None
        body_state = dict(entry)
        body = self.rev_block(s.body, body_state)
        state.clear()
        state.update(_join(dict(entry), body_state) if body else entry)
        if isinstance(s, gast.For):
            loop_pop = Pop(s.target.id, self.rebinds.get(id(s), True))
        if not body:
            return [loop_pop] if isinstance(s, gast.For) else []
        if isinstance(s, gast.For):
            pre, body = self._skip_entry_gradients(s, body)
            rev_iter = _call(ir.name(self.ctx.bind("builtin", None, "reversed", reversed,
                                                   "reversed")), ir.clone(s.iter))
            loop = gast.For(target=ir.name(s.target.id, True), iter=rev_iter, body=body,
                            orelse=[], type_comment=None)
            return pre + [loop, loop_pop]
        count = self.temp(("count", id(s)), "loop_iterations")
        self.counts[id(s)] = count
        if id(s) in self.nested_whiles:
            self.act.multi.add(count)
        self.primal.add(count)
        under = "_" if "_" not in self.ctx.used else self.temp(("under", id(s)), "step")
        rng = _call(ir.name(self.ctx.bind("builtin", None, "range", range, "range")),
                    ir.name(count))
        loop = gast.For(target=ir.name(under, True), iter=rng, body=body, orelse=[],
                        type_comment=None)
        return [loop, Pop(count, id(s) in self.nested_whiles)]

    def _skip_entry_gradients(self, s: gast.For, body: list) -> tuple[list, list]:
        """Skip, in the last backward iteration, gradients of a loop-carried name's value at
        loop entry when that value carries no gradient (``x`` in ``for t: x = f(x)`` with ``x``
        an argument not differentiated): autograd never computes them either."""
        if s not in self.body:  # the entry value of a nested loop varies with the outer one
            return [], body
        before = self.body[:self.body.index(s)]
        assigned_before = {n for st, _ in walk_statements(before) for n in assigned_names(st)}
        entry_dead = {
            n for n in self.params
            if n not in self.wrt and n not in self.leaves and n not in assigned_before
        }
        targets: set = set()
        last_pop = {st.name: i for i, st in enumerate(body) if isinstance(st, Pop)}
        for n, i in last_pop.items():
            d = self.dnames.get(n)
            if n not in entry_dead or d is None:
                continue
            # what follows the last restore of n reads n's value from the iteration start
            for j in range(i + 1, len(body)):
                b = body[j]
                if (isinstance(b, gast.Assign) and isinstance(b.targets[0], gast.Name)
                        and b.targets[0].id == d and not isinstance(b.value, gast.Constant)):
                    targets.add(j)
        if not targets:
            return [], body
        left = self.temp(("left", id(s)), "iterations_left")
        size = _call(ir.name(self.ctx.bind("builtin", None, "len", len, "len")), ir.clone(s.iter))
        dec = ir.assign(left, gast.BinOp(left=ir.name(left), op=gast.Sub(), right=ir.const(1)))
        new_body = [dec]
        for j, b in enumerate(body):
            new_body.append(gast.If(test=ir.name(left), body=[b], orelse=[]) if j in targets
                            else b)
        return [ir.assign(left, size)], new_body

    def rev_grad_of(self, s: gast.With, state: dict) -> list:
        var = s.items[0].context_expr.id
        g = s.items[0].optional_vars.id
        if var not in self.act.active:
            return []
        st = self.read(var, state)
        if st is None:
            return []
        d = self.dname(var)
        body = [ir.assign(g, ir.name(d))] + ir.clone(s.body) + [ir.assign(d, ir.name(g))]
        out = self.comment(s, "Grad of: ")
        if st == MAYBE:
            test = gast.Compare(left=ir.name(d), ops=[gast.IsNot()], comparators=[ir.const(None)])
            return out + [gast.If(test=test, body=body, orelse=[])]
        return out + body

    def rev_expr(self, s: gast.Expr, state: dict) -> list:
        call = s.value
        callee: Callee | None = getattr(call, "pg_callee", None)
        if callee is None or callee.kind != "container":
            return []
        recv = call.func.value
        if not isinstance(recv, gast.Name):
            return []
        items = recv.id
        if callee.label not in ("append", "extend"):
            if items in self.act.varied:
                self.fail(s, f"the list method {callee.label}() on a list holding gradients",
                          "build a new list instead (append/extend are supported)")
            return []
        if len(call.args) != 1 or call.keywords:
            self.fail(s, f"{callee.label}() without exactly one argument",
                      f"pass one value: {items}.{callee.label}(value)")
        count = None
        if callee.label == "extend":
            count = _call(ir.name(self.ctx.bind("builtin", None, "len", len, "len")),
                          ir.clone(call.args[0]))
        code: list = []
        if items in self.act.active and self.read(items, state) is not None:
            value = call.args[0]
            d = self.dname(items)
            part = self.temp(("part", id(s)), f"{items}_last_grad")
            args = [ir.name(d)] + ([count] if count is not None else [])
            unpack = gast.Tuple(elts=[ir.name(d, True), ir.name(part, True)], ctx=gast.Store())
            code.append(ir.assign(unpack, _call(self.rt("pop_adjoint"), *args)))
            if self.act.is_active(value):
                code += self.accumulate(value.id, ir.name(part), state, maybe_none=True)
        code.append(PopAppend(items, count))
        return self.comment(s, "Grad of: ") + code if len(code) > 1 else code

    def rev_store(self, s: gast.Assign, state: dict) -> list:
        tgt = s.targets[0]
        buf = tgt.value.id
        index = _index_value(tgt.slice)
        value = s.value
        code: list = []
        if buf in self.act.active and self.read(buf, state) is not None:
            d = self.dname(buf)
            if self.act.is_active(value):
                g = _call(self.rt("store_grad_value"), ir.name(d), ir.clone(index),
                          ir.clone(value))
                code += self.accumulate(value.id, g, state, maybe_none=True)
            code.append(ir.assign(d, _call(self.rt("store_grad_buffer"), ir.name(d),
                                           ir.clone(index))))
        marker = PopSlot(buf, index)
        return (self.comment(s, "Grad of: ") + code if code else []) + [marker]

    def rev_assign(self, s: gast.Assign, state: dict) -> list:
        t = s.targets[0].id
        value = s.value
        pop = Pop(t, self.rebinds.get(id(s), True))
        callee: Callee | None = getattr(value, "pg_callee", None)
        if (callee is not None and callee.kind == "container" and callee.label == "pop"
                and not value.args and isinstance(value.func.value, gast.Name)):
            return self.rev_pop(s, t, value.func.value.id, state, pop)
        if t not in self.act.active or getattr(s, "pg_nograd", False):
            return [pop] + self._reset_multi(t, state)
        if getattr(s, "pg_node_output", False):  # the node's backward templates route it
            return [pop] + self._reset_multi(t, state)
        st = self.read(t, state)
        if st is None:
            return [pop]
        d_t = self.dname(t)
        if isinstance(value, gast.Name):
            accs = [(value, ir.name(d_t), False)] if self.act.is_active(value) else []
            return self._finish(s, t, [], accs, [], st, state, pop)
        if isinstance(value, (gast.List, gast.Tuple, gast.Dict)):
            elts = value.values if isinstance(value, gast.Dict) else value.elts
            keys = value.keys if isinstance(value, gast.Dict) else [ir.const(i) for i in
                                                                   range(len(elts))]
            accs = [
                (e, _call(self.rt("unpack_adjoint"), ir.name(d_t), ir.clone(k)), True)
                for e, k in zip(elts, keys)
                if self.act.is_active(e)
            ]
            return self._finish(s, t, [], accs, [], st, state, pop)
        if callee is None:  # a value without a derivative (a constant): the old t's gradient
            return [pop] + self.reset(t, state)  # does not flow through it
        if callee.kind == "template":
            return self.rev_template(s, t, callee, st, state, pop)
        if callee.kind == "opaque":
            return self.rev_opaque(s, t, st, state, pop)
        if callee.kind == "container":
            self.fail(s, f"the method {callee.label}() on a container holding gradients",
                      "index the container instead")
        return [pop] + self.reset(t, state)

    def rev_pop(self, s: gast.Assign, t: str, items: str, state: dict, pop: Pop) -> list:
        """``t = items.pop()``: t's gradient goes back onto the end of the list's gradient, and
        the value goes back onto the list (so earlier pops see what they saw)."""
        code: list = []
        has_t = t in self.act.active and self.read(t, state) is not None
        has_items = items in self.act.active and self.read(items, state) is not None
        if items in self.act.active and (has_t or has_items):
            # the list's adjoint stays aligned with the list: a value without gradient adds
            # a None at its place
            d_items = self.dname(items)
            before = ir.name(d_items) if has_items else ir.const(None)
            d_t = ir.name(self.dname(t)) if has_t else ir.const(None)
            code.append(ir.assign(d_items, _call(self.rt("unpop_adjoint"), before,
                                                 ir.name(items), d_t)))
            state[d_items] = state.get(d_items) or DEF
            if has_t:
                state[d_items] = DEF
        if has_t or t in self.act.multi:
            code += self.reset(t, state)
        header = self.comment(s, "Grad of: ") if code else []
        return header + code + [UndoPop(items, t), pop]

    def _reset_multi(self, t: str, state: dict) -> list:
        return self.reset(t, state) if t in self.act.multi else []

    def _finish(self, s: gast.AST, t: str, pre: list, accs: list, plain: list, st: str,
                state: dict, pop: Pop | list, self_ref_pop: bool = False) -> list:
        """Assemble one statement's adjoint.

        accs: (arg node, gradient expression, may be None) triples, in template order;
        plain: template statements computing locals the expressions use.
        """
        d_t = self.dname(t)
        own = [a for a in accs if isinstance(a[0], gast.Name) and a[0].id == t]
        others = [a for a in accs if not (isinstance(a[0], gast.Name) and a[0].id == t)]
        body: list = list(plain)
        if len(own) > 1:
            # t = f(t, t): the gradient of the new t is needed by several terms; keep a copy
            out_d = self.temp(("dout", id(s)), f"{d_t}_out")
            own = [(a, _replace_name(e, d_t, out_d), m) for a, e, m in own]
            others = [(a, _replace_name(e, d_t, out_d), m) for a, e, m in others]
            body = [ir.assign(out_d, ir.name(d_t))] + [_replace_name(b, d_t, out_d) for b in body]
        inner = dict(state)
        for arg, expr, maybe in others:
            body += self.accumulate(arg.id, expr, inner, maybe)
        if own:
            del inner[d_t]
            for arg, expr, maybe in own:
                body += self.accumulate(arg.id, expr, inner, maybe)
        elif t in self.act.multi:
            body += self.reset(t, inner)
        if st == MAYBE:
            test = gast.Compare(left=ir.name(d_t), ops=[gast.IsNot()], comparators=[ir.const(None)])
            code = [gast.If(test=test, body=body, orelse=[])] if body else []
            joined = _join(state, inner)
            if not own and t in self.act.multi:
                joined.pop(d_t, None)
                code.append(ir.assign(d_t, ir.const(None)))
            state.clear()
            state.update(joined)
        else:
            code = body
            state.clear()
            state.update(inner)
        pops = pop if isinstance(pop, list) else [pop]
        if not code:
            return pops
        header = self.comment(s, "Grad of: ")
        if self_ref_pop:
            return header + pre + pops + code
        return header + pre + code + pops

    def bind_template(self, s: gast.AST, tmpl: Template, args: list, keywords: list) -> dict:
        return bind_template(self, s, tmpl, args, keywords)

    def rev_template(self, s: gast.Assign, t: str, callee: Callee, st: str, state: dict,
                     pop: Pop) -> list:
        value = s.value
        tmpl: Template = callee.template
        args, keywords = _call_operands(value)
        mapping = self.bind_template(s, tmpl, args, keywords)
        d_t = self.dname(t)
        arg_names = {n.id for n in ir.walk(gast.Tuple(elts=list(mapping.values()),
                                                         ctx=gast.Load()))
                     if isinstance(n, gast.Name)}
        self_ref = t in arg_names
        result_name = t
        pre: list = []
        plain, accs, uses_result = self.instantiate(s, tmpl, mapping, t, d_t)
        if self_ref:
            if uses_result:
                result_name = self.temp(("out", id(s)), f"{t}_out")
                pre.append(ir.assign(result_name, ir.name(t)))
            accs = [(a, _replace_result(e, result_name), m) for a, e, m in accs]
            plain = [_replace_result(p, result_name) for p in plain]
        else:
            accs = [(a, _replace_result(e, t), m) for a, e, m in accs]
            plain = [_replace_result(p, t) for p in plain]
        return self._finish(s, t, pre, accs, plain, st, state, pop, self_ref_pop=self_ref)

    def instantiate(self, s: gast.AST, tmpl: Template, mapping: dict, t: str,
                    d_t: str) -> tuple[list, list, bool]:
        """Splice a template body: returns (plain statements, accumulations, uses result)."""
        result_param = tmpl.params[0]
        body = ir.clone(tmpl.body)
        local_names = set()
        for stmt in body:
            for n in ir.walk(stmt):
                if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Store):
                    local_names.add(n.id)
        renames = {n: self.temp(("tmpl", id(s), n), f"{t}_{n}") for n in sorted(local_names)}
        uses_result = False
        plain: list = []
        accs: list = []
        for stmt in body:
            is_acc = (
                isinstance(stmt, gast.Assign)
                and isinstance(stmt.targets[0], gast.Subscript)
                and isinstance(stmt.targets[0].value, gast.Name)
                and stmt.targets[0].value.id == "d"
            )
            sub = _Substitute(self, tmpl, mapping, result_param, renames, d_t)
            if is_acc:
                key = stmt.targets[0].slice
                if not isinstance(key, gast.Name) or key.id not in mapping:
                    raise TypeError(f"template {tmpl.name}: d[...] must name a parameter")
                expr = _simplify(sub.visit(stmt.value))
                uses_result |= sub.used_result
                target = mapping[key.id]
                accs.extend(self._acc_targets(target, expr))
            else:
                new = sub.visit(stmt)
                uses_result |= sub.used_result
                plain.append(new)
        # keep only the template locals the kept accumulations need
        needed = set()
        for _, e, _ in accs:
            needed.update(ir.names_in(e))
        kept: list = []
        for stmt in reversed(plain):
            stores = set(ir.names_in(stmt, gast.Store))
            if stores & needed or not stores:
                kept.insert(0, stmt)
                needed.update(ir.names_in(stmt))
        if not accs:
            kept = []
        return kept, accs, uses_result

    def _acc_targets(self, target: gast.AST, expr: gast.AST) -> list:
        if isinstance(target, gast.Name):
            return [(target, expr, False)] if self.act.is_active(target) else []
        if isinstance(target, gast.Tuple):
            out = []
            for i, e in enumerate(target.elts):
                if self.act.is_active(e):
                    item = gast.Subscript(value=ir.clone(expr), slice=ir.const(i),
                                          ctx=gast.Load())
                    out.append((e, item, True))
            return out
        return []

    def rev_opaque(self, s: gast.Assign, t: str, st: str, state: dict, pop: Pop) -> list:
        args, keywords = _call_operands(s.value)
        leaves = []
        for a in args + [k.value for k in keywords]:
            if self.act.is_active(a) and a.id not in [x.id for x in leaves]:
                leaves.append(a)
        tracked = [self.temp(("in", id(s), a.id), f"{a.id}_in") for a in leaves]
        for a, name in zip(leaves, tracked):
            self.tracked[(id(s), a.id)] = name
            self.primal.add(name)
        call = _call(self.rt("opaque_vjp"), ir.name(t), ir.name(self.dname(t)),
                     *[ir.name(n) for n in tracked])
        if not leaves:
            self.tracked[(id(s), None)] = ""
            # a parameter read through an argument (model.weight) is a leaf whose gradient the
            # end of the backward adds to .grad: autograd must not add it a second time
            code = [] if t in self.leaves else [gast.Expr(value=call)]
            return self._finish(s, t, [], [], code, st, state, pop)
        grads = [self.temp(("g", id(s), a.id), f"{a.id}_grad") for a in leaves]
        target = gast.Tuple(elts=[ir.name(g, True) for g in grads], ctx=gast.Store())
        plain = [ir.assign(target, call)]
        accs = [(a, ir.name(g), False) for a, g in zip(leaves, grads)]
        if t in self.act.multi:  # the tracked inputs are reassigned with t: restore them too
            self.act.multi.update(tracked)
        pops = [Pop(n) for n in reversed(tracked)] + [pop]  # the forward pushed t first
        return self._finish(s, t, [], accs, plain, st, state, pops)


def bind_template(self: Any, s: gast.AST, tmpl: Template, args: list, keywords: list) -> dict:
    """Template parameter -> the call site's atom (or a bound constant); ``self`` is the
    transform (reverse or forward), for its context and its errors."""
    kwargs = {k.arg: k.value for k in keywords}
    try:
        ba = tmpl.signature.bind(_RESULT, *args, **kwargs)
    except TypeError as exc:
        self.fail(s, f"this call's arguments for the adjoint template {tmpl.name} ({exc})",
                  "call the op with the parameters its template declares "
                  f"{tuple(tmpl.params[1:])}, or register your own with @propgen.adjoint")
    ba.apply_defaults()
    mapping: dict[str, gast.AST] = {}
    for pname, v in ba.arguments.items():
        kind = tmpl.signature.parameters[pname].kind
        if v is _RESULT:
            continue
        if kind == inspect.Parameter.VAR_POSITIONAL:
            mapping[pname] = gast.Tuple(elts=[_index_value(e) for e in v], ctx=gast.Load())
        elif kind == inspect.Parameter.VAR_KEYWORD:
            mapping[pname] = gast.Dict(keys=[ir.const(k) for k in v],
                                       values=[_index_value(e) for e in v.values()])
        elif isinstance(v, gast.AST):
            mapping[pname] = _index_value(v)
        elif _literal(v):
            mapping[pname] = ir.const(v)
        else:
            ns = self.ctx.bind("value", tmpl, pname, v, f"{tmpl.name}_{pname}")
            mapping[pname] = ir.name(ns)
    return mapping


def _simplify(node: gast.AST) -> gast.AST:
    """Drop multiplications and divisions by the constant 1 that templates spell out."""
    for n in ir.walk(node):
        for field_name in ("left", "right", "operand", "value", "func"):
            child = getattr(n, field_name, None)
            if isinstance(child, gast.AST):
                setattr(n, field_name, _simplify_one(child))
        for field_name in ("args", "elts"):
            items = getattr(n, field_name, None)
            if isinstance(items, list):
                setattr(n, field_name, [_simplify_one(c) for c in items])
    return _simplify_one(node)


def _simplify_one(n: gast.AST) -> gast.AST:
    def is_one(c: gast.AST) -> bool:
        return isinstance(c, gast.Constant) and type(c.value) in (int, float) and c.value == 1

    if isinstance(n, gast.BinOp) and isinstance(n.op, (gast.Mult, gast.Div)) and is_one(n.right):
        return n.left
    if isinstance(n, gast.BinOp) and isinstance(n.op, gast.Mult) and is_one(n.left):
        return n.right
    return n


def _bound_pass(stmts: list, maybe: set, out: dict) -> None:
    """Record, per assignment, whether its target may already hold a value (else no push)."""
    for s in stmts:
        if isinstance(s, gast.Assign) and isinstance(s.targets[0], gast.Name):
            t = s.targets[0].id
            out[id(s)] = out.get(id(s), False) or t in maybe
            maybe.add(t)
        elif isinstance(s, gast.If):
            m1, m2 = set(maybe), set(maybe)
            _bound_pass(s.body, m1, out)
            _bound_pass(s.orelse, m2, out)
            maybe |= m1 | m2
        elif isinstance(s, (gast.For, gast.While)):
            if isinstance(s, gast.For):
                out[id(s)] = out.get(id(s), False) or s.target.id in maybe
                maybe.add(s.target.id)
            for _ in range(2):  # a second iteration sees what the first assigned
                _bound_pass(s.body, maybe, out)


def _literal(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, tuple) and all(_literal(e) for e in v)


def _call_operands(value: gast.AST) -> tuple[list, list]:
    """The atoms a template binds, in the op's positional order, and keyword arguments."""
    if isinstance(value, gast.BinOp):
        return [value.left, value.right], []
    if isinstance(value, gast.UnaryOp):
        return [value.operand], []
    if isinstance(value, gast.Subscript):
        return [value.value, value.slice], []
    if isinstance(value, gast.Attribute):
        return [value.value], []
    if isinstance(value, gast.Call):
        args = list(value.args)
        if isinstance(value.func, gast.Attribute) and not getattr(value.func, "pg_static", False):
            args = [value.func.value] + args
        return args, list(value.keywords)
    return [], []


class _Substitute(gast.NodeTransformer):
    """Replaces a template's parameters, locals, globals and ``d[...]`` reads."""

    def __init__(self, rev: Reverse, tmpl: Template, mapping: dict, result_param: str,
                 renames: dict, d_t: str) -> None:
        self.rev = rev
        self.tmpl = tmpl
        self.mapping = mapping
        self.result_param = result_param
        self.renames = renames
        self.d_t = d_t
        self.used_result = False

    def visit_Subscript(self, node: gast.Subscript) -> gast.AST:
        if isinstance(node.value, gast.Name) and node.value.id == "d":
            key = node.slice
            if isinstance(key, gast.Name) and key.id == self.result_param:
                return ir.name(self.d_t)
            raise TypeError(
                f"template {self.tmpl.name}: only d[{self.result_param}] can be read"
            )
        self.generic_visit(node)
        return node

    def visit_Name(self, node: gast.Name) -> gast.AST:
        if node.id == self.result_param:
            self.used_result = True
            out = ir.name("__pg_result__")
            return out
        if node.id in self.mapping:
            return ir.clone(self.mapping[node.id])
        if node.id in self.renames:
            return ir.name(self.renames[node.id], isinstance(node.ctx, gast.Store))
        if isinstance(node.ctx, gast.Load):
            g = self.tmpl.globals
            if node.id in g:
                ns = self.rev.ctx.bind("global", g, node.id, g[node.id], node.id)
            else:
                import builtins

                if not hasattr(builtins, node.id):
                    raise TypeError(f"template {self.tmpl.name}: unknown name {node.id!r}")
                ns = self.rev.ctx.bind("builtin", None, node.id, getattr(builtins, node.id),
                                       node.id)
            return ir.name(ns)
        return node


def _replace_result(node: gast.AST, name: str) -> gast.AST:
    node = ir.clone(node)
    for n in ir.walk(node):
        if isinstance(n, gast.Name) and n.id == "__pg_result__":
            n.id = name
    return node


def _replace_name(node: gast.AST, old: str, new: str) -> gast.AST:
    node = ir.clone(node)
    for n in ir.walk(node):
        if isinstance(n, gast.Name) and n.id == old and isinstance(n.ctx, gast.Load):
            n.id = new
    return node
