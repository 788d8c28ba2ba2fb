"""Stage 5, transform (forward mode): the normalized function -> one JVP function.

Each statement is followed by its tangent statement, spliced from the op's tangent template
(``templates/tangents.py``) with the call's atoms, so the generated function computes the
primal values and their tangents side by side: no tape, no stack.  Loops and branches keep
their structure.  Calls with no tangent template go through ``torch.func.jvp``
(``runtime.opaque_jvp``), the forward-mode twin of reverse mode's ``opaque_vjp``.  An
in-place update (``y.exp_()``, ``torch.relu_(y)``, ``F.relu(y, inplace=True)``) gives y the
tangent of the op's out-of-place form, read from a copy of y's old value where it needs one;
``propgen/aliases.py`` refuses beforehand the in-place methods another live name would see.

Tangent variables are tracked like reverse mode's gradients: one that surely holds a value is
read as is, one that may be None (a branch assigned it on one side only, or it came out of a
container) is read through ``tangent_or_zeros``, and one that is surely absent is a zero the
template's arithmetic drops (``_fold``).  Only names that are both varied and useful (active)
get a tangent: code that cannot reach the result computes none.
"""

from __future__ import annotations

from typing import Any

import gast

from propgen import ir, runtime_forward
from propgen.aliases import KEEPS, Update, in_place_update
from propgen.analyse import Activity
from propgen.errors import UnsupportedSyntaxError
from propgen.normalize import Callee, Context
from propgen.template import NONDIFF, Template, is_template_object
from propgen.transform import (
    Comment,
    Names,
    _call_operands,
    _index_value,
    _literal,
    _simplify,
    bind_template,
)

__all__ = ["Forward"]

DEF, MAYBE = "def", "maybe"
_RESULT = object()
# List methods whose effect on a list of tangents is the same call on the tangent list.
_MIRRORED = {"append", "extend", "pop", "insert", "clear", "reverse"}
# Dict methods that read: their tangent reads the tangent dict (runtime.view_tangent).
_DICT_READS = {"values", "items", "get", "keys"}
# In-place tensor methods that overwrite the tensor with values that do not vary.


class _Zero(gast.expr):
    """A tangent known to be zero while a template is spliced (never emitted)."""

    _fields = ()

    def __init__(self, like: gast.AST) -> None:
        super().__init__()
        self.like = like  # the primal atom whose zero tangent this is


def _join(a: dict, b: dict) -> dict:
    return {k: DEF if a.get(k) == DEF and b.get(k) == DEF else MAYBE for k in set(a) | set(b)}


def _call(func: gast.AST, *args: gast.AST, keywords: list | None = None) -> gast.Call:
    return gast.Call(func=func, args=list(args), keywords=keywords or [])


class Forward(Names):
    """Builds the JVP FunctionDef of one normalized function."""

    runtime_module = runtime_forward  # the helpers forward-mode code calls

    def __init__(self, ctx: Context, name: str, params: list[str], body: list, wrt: list[str],
                 act: Activity) -> None:
        self.ctx = ctx
        self.name = name
        self.params = params
        self.body = body
        self.wrt = wrt
        self.act = act
        self.tnames: dict[str, str] = {}
        self.temps: dict[tuple, str] = {}
        self.maybe_vars: set[str] = set()
        self.last_comment: Any = None
        self.tangent_params = [self.tname(w) for w in wrt]

    # ------------------------------------------------------------------ names
    def tname(self, n: str) -> str:
        if n not in self.tnames:
            self.tnames[n] = self.ctx.fresh("t_" + n)
        return self.tnames[n]


    def fail(self, stmt: gast.AST, what: str, advice: str) -> None:
        raise UnsupportedSyntaxError(getattr(stmt, "pg_loc", None), what, advice)

    def comment(self, stmt: gast.AST) -> list:
        loc = getattr(stmt, "pg_loc", None)
        if loc is None or getattr(stmt, "pg_bookkeeping", False):
            return []
        key = (loc.filename, loc.lineno)
        if key == self.last_comment:
            return []
        self.last_comment = key
        return [Comment(f"{loc.short}  {loc.text.strip()}")]

    # ------------------------------------------------------------ tangent state
    def active(self, node: gast.AST) -> bool:
        return self.act.is_active(node)

    def read(self, node: gast.AST, state: dict, fill: bool = True) -> gast.AST:
        """The tangent of an atom as an expression: a name, a name whose None is filled with
        zeros (unless ``fill`` is False: the template handles None), or a zero."""
        if not self.active(node):
            return _Zero(node)
        st = state.get(node.id)
        if st is None:
            return _Zero(node)
        name = ir.name(self.tname(node.id))
        if st == MAYBE and not fill:
            self.maybe_vars.add(node.id)
        elif st == MAYBE:
            self.maybe_vars.add(node.id)
            name = _call(self.rt("tangent_or_zeros"), name, ir.name(node.id))
        name.pg_tangent = True
        return name

    def raw(self, node: gast.AST, state: dict) -> gast.AST:
        """The tangent of an atom as stored in containers: None stands for zero."""
        if not self.active(node) or state.get(node.id) is None:
            return ir.const(None)
        if state[node.id] == MAYBE:
            self.maybe_vars.add(node.id)
        return ir.name(self.tname(node.id))

    def set(self, t: str, expr: gast.AST, state: dict, maybe: bool = False) -> list:
        state[t] = MAYBE if maybe else DEF
        return [ir.assign(self.tname(t), expr)]

    def clear(self, t: str, state: dict) -> list:
        if state.get(t) is None:
            return []
        del state[t]
        return [ir.assign(self.tname(t), ir.const(None))]

    # -------------------------------------------------------------- statements
    def block(self, stmts: list, state: dict) -> list:
        out: list = []
        for s in stmts:
            out += self.stmt(s, state)
        return out

    def stmt(self, s: gast.AST, state: dict) -> list:
        if getattr(s, "pg_node", None) is not None or getattr(s, "pg_node_output", False):
            self.fail(s, "a propagation node (manager.forward) in forward mode",
                      "forward mode differentiates plain code: call propgen.autodiff on a "
                      "function without manager.forward nodes")
        head = self.comment(s)
        if isinstance(s, gast.Assign):
            if isinstance(s.targets[0], gast.Subscript):
                return head + [ir.clone(s)] + self.store(s, state)
            return head + self.assign(s, state)
        if isinstance(s, gast.Expr):
            return head + self.effect(s, state)
        if isinstance(s, gast.If):
            s_body, s_else = dict(state), dict(state)
            body = self.block(s.body, s_body)
            self.last_comment = None
            orelse = self.block(s.orelse, s_else)
            self.last_comment = None
            state.clear()
            state.update(_join(s_body, s_else))
            return head + [gast.If(test=ir.clone(s.test), body=body or [gast.Pass()],
                                   orelse=orelse)]
        if isinstance(s, (gast.For, gast.While)):
            return head + self.loop(s, state)
        if isinstance(s, gast.With):
            return []  # insert_grad_of: code for the backward pass, which forward mode lacks
        if isinstance(s, gast.Return):
            return head + [self.ret(s, state)]
        if isinstance(s, (gast.Assert, gast.Raise)):
            return head + [ir.clone(s)]
        return []

    def loop(self, s: gast.AST, state: dict) -> list:
        entry = dict(state)
        saved_comment = self.last_comment
        for _ in range(6):  # the tangent state at the loop head is a fixpoint
            trial = dict(entry)
            self.block(s.body, trial)
            new_entry = _join(entry, trial)
            if new_entry == entry:
                break
            entry = new_entry
        self.last_comment = saved_comment
        body_state = dict(entry)
        body = self.block(s.body, body_state)
        self.last_comment = None
        state.clear()
        state.update(entry)
        if isinstance(s, gast.For):
            return [gast.For(target=ir.clone(s.target), iter=ir.clone(s.iter),
                             body=body or [gast.Pass()], orelse=[], type_comment=None)]
        return [gast.While(test=ir.clone(s.test), body=body or [gast.Pass()], orelse=[])]

    def ret(self, s: gast.Return, state: dict) -> gast.Return:
        value = s.value
        if self.active(value) and state.get(value.id) == DEF and value.id in self.act.tensor:
            out: gast.AST = ir.name(self.tname(value.id))
        else:
            out = _call(self.rt("tangent_or_zeros"), self.raw(value, state), ir.clone(value))
        return gast.Return(value=gast.Tuple(elts=[ir.clone(value), out], ctx=gast.Load()))

    def assign(self, s: gast.Assign, state: dict) -> list:
        t = s.targets[0].id
        value = s.value
        primal = [ir.clone(s)]
        callee: Callee | None = getattr(value, "pg_callee", None)
        if callee is not None and callee.kind == "container":
            # x = items.pop() changes the list: its tangent list changes alike, even when x
            # itself needs no tangent, or the two lists would go out of step
            return self.container(s, callee, state, t)
        self.check_out(s)
        update = in_place_update(value, callee)
        if update is not None:
            return self.in_place(s, update, state, t)
        if t not in self.act.active or getattr(s, "pg_nograd", False):
            return primal + self.clear(t, state)
        if isinstance(value, gast.Name):
            tan = self.read(value, state)
            if isinstance(tan, _Zero):
                return primal + self.clear(t, state)
            return primal + self.set(t, self.raw(value, state), state, state[value.id] == MAYBE)
        if isinstance(value, (gast.List, gast.Tuple, gast.Dict)):
            elts = value.values if isinstance(value, gast.Dict) else value.elts
            parts = [self.raw(e, state) for e in elts]
            if isinstance(value, gast.Dict):
                mirror: gast.AST = gast.Dict(keys=[ir.clone(k) for k in value.keys], values=parts)
            else:
                mirror = type(value)(elts=parts, ctx=gast.Load())
            return primal + self.set(t, mirror, state)
        if callee is None or callee.kind == "nondiff":
            return primal + self.clear(t, state)
        if (isinstance(value, gast.Call) and isinstance(value.func, gast.Attribute)
                and value.func.attr in _DICT_READS and isinstance(value.func.value, gast.Name)
                and not getattr(value.func, "pg_static", False) and not value.keywords):
            recv = value.func.value
            call = _call(self.rt("view_tangent"), self.raw(recv, state), ir.clone(recv),
                         ir.const(value.func.attr),
                         gast.Tuple(elts=[ir.clone(a) for a in value.args], ctx=gast.Load()),
                         gast.Tuple(elts=[self.raw(a, state) for a in value.args],
                                    ctx=gast.Load()))
            return primal + self.set(t, call, state, maybe=True)
        args, keywords = _call_operands(value)
        tmpl = self.ctx.registry.lookup_tangent(callee.obj) if callee.obj is not None else None
        if tmpl is not None:
            return self.template(s, t, tmpl, args, keywords, state)
        if callee.kind in ("template", "opaque", "method"):
            return self.opaque(s, t, args, keywords, state)
        return primal + self.clear(t, state)

    def store(self, s: gast.Assign, state: dict) -> list:
        """``buf[i] = v``: the same store into the tangent of ``buf``."""
        tgt = s.targets[0]
        buf = tgt.value
        if not self.active(buf):
            return []
        tan = self.raw(s.value, state)
        if state.get(buf.id) is None and isinstance(tan, gast.Constant):
            return []
        call = _call(self.rt("store_tangent"), self.raw(buf, state), ir.clone(buf),
                     _index_value(tgt.slice), tan)
        return self.set(buf.id, call, state)

    def effect(self, s: gast.Expr, state: dict) -> list:
        """A call for its effect: the call, and the same change to the tangents it affects."""
        callee: Callee | None = getattr(s.value, "pg_callee", None)
        if callee is not None and callee.kind == "container":
            return self.container(s, callee, state, None)
        self.check_out(s)
        update = in_place_update(s.value, callee)
        if update is not None:
            return self.in_place(s, update, state, None)
        return [ir.clone(s)]

    def check_out(self, s: gast.AST) -> None:
        """``torch.op(..., out=y)`` with a value that carries a tangent: refused, as
        torch.autograd refuses to differentiate out= calls."""
        call = s.value
        if getattr(s, "pg_nograd", False) or not isinstance(call, gast.Call):
            return
        if not any(k.arg == "out" for k in call.keywords):
            return
        args, keywords = _call_operands(call)
        if any(isinstance(a, gast.Name) and a.id in self.act.varied
               for a in args + [k.value for k in keywords]):
            self.fail(s, "forward mode through a call that writes its result into out=",
                      "assign the result instead: y = torch.add(a, b) for "
                      "torch.add(a, b, out=y)")

    def in_place(self, s: gast.AST, update: Update, state: dict, t: str | None) -> list:
        """``y.op_(...)``, ``torch.op_(y, ...)`` or ``F.op(y, ..., inplace=True)`` (or
        ``z = `` one of them): the call, then y's tangent becomes the tangent of the op's
        out-of-place form, and z shares it.  Under no_grad the update is not differentiated:
        y keeps its tangent."""
        recv = update.tensor
        args, keywords = _call_operands(s.value)
        if getattr(s, "pg_nograd", False) or not isinstance(recv, gast.Name):
            return [ir.clone(s)] + (self.clear(t, state) if t else [])
        others = [a for a in args[1:] + [k.value for k in keywords] if isinstance(a, gast.Name)]
        varied = [a for a in others if a.id in self.act.varied]
        if varied and (recv.id not in self.act.varied
                       or (self.active(recv) and not all(self.active(a) for a in varied))):
            # the analysis follows values through assignments only: a tangent that reaches
            # the result through an in-place update alone was not computed
            self.fail(s, f"forward mode through the in-place {update.name}() with an argument "
                      "that carries a tangent",
                      "write the out-of-place form (x = x.add(y) for x.add_(y), x = y.clone() "
                      "for x.copy_(y)), which propgen follows")
        if self.active(recv) and any(state.get(a.id) is not None
                                     for a in [recv] + others if self.active(a)):
            out = self.in_place_tangent(s, update, args, keywords, state)
        else:
            out = [ir.clone(s)]  # no tangent moves: y's stays as it is
        if t is None or t == recv.id:
            return out
        if t in self.act.active and self.active(recv) and state.get(recv.id) is not None:
            return out + self.set(t, self.raw(recv, state), state, state[recv.id] == MAYBE)
        return out + self.clear(t, state)

    def in_place_tangent(self, s: gast.AST, update: Update, args: list, keywords: list,
                         state: dict) -> list:
        """The call updating y in place and y's new tangent: from the tangent template of
        the op's out-of-place form, or through torch.func.jvp (``in_place_jvp``), which also
        makes the update."""
        recv = update.tensor
        tmpl = self.ctx.registry.lookup_tangent(update.twin)
        if tmpl is not None:
            return self.template(s, recv.id, tmpl, args, keywords, state, in_place=True)
        if update.name in KEEPS:
            return [ir.clone(s)]
        if update.fills or self.ctx.registry.lookup(update.twin) == NONDIFF:
            return [ir.clone(s)] + self.clear(recv.id, state)  # floor_, sign_: no tangent
        call = self.jvp_call("in_place_jvp", self.callable(s.value), args, keywords, state)
        unpack = gast.Tuple(elts=[ir.name(recv.id, True), ir.name(self.tname(recv.id), True)],
                            ctx=gast.Store())
        stmts = [ir.assign(unpack, call, like=s)]
        if isinstance(s, gast.Assign) and s.targets[0].id != recv.id:  # z = y.op_(...): z is y
            stmts.append(ir.assign(s.targets[0].id, ir.name(recv.id)))
        state[recv.id] = MAYBE
        self.maybe_vars.add(recv.id)
        return stmts

    def container(self, s: gast.AST, callee: Callee, state: dict, t: str | None) -> list:
        """A list method on a list that holds tangents: the call, then the same call on the
        tangent list."""
        call = s.value
        recv = call.func.value
        primal = [ir.clone(s)]
        if not (isinstance(recv, gast.Name) and self.active(recv)):
            return primal + (self.clear(t, state) if t else [])
        if t is not None and callee.label not in ("pop",):  # a reading method: x = d.get(k)
            if t not in self.act.active:
                return primal + self.clear(t, state)
        if callee.label not in _MIRRORED:
            self.fail(s, f"the method {callee.label}() on a container holding tangents",
                      "index the container, or build a new one (append, extend, pop, insert "
                      "are supported)")
        pre = primal
        if state.get(recv.id) is None:  # the list holds no tangent yet: its mirror starts from
            # the items the list holds before the call
            pre = self.set(recv.id, _call(self.rt("zero_tangents"), ir.clone(recv)), state) + pre
        args = list(call.args)
        if callee.label in ("append", "insert") and args:
            args[-1] = self.raw(args[-1], state)
        elif callee.label == "extend" and args:
            args[0] = _call(self.rt("tangent_items"), self.raw(args[0], state),
                            ir.clone(args[0]))
        else:
            args = [ir.clone(a) for a in args]
        mirrored = _call(gast.Attribute(value=ir.name(self.tname(recv.id)), attr=callee.label,
                                        ctx=gast.Load()), *args)
        if t is None or t not in self.act.active:
            return pre + [gast.Expr(value=mirrored)] + (self.clear(t, state) if t else [])
        return pre + self.set(t, mirrored, state, maybe=True)

    # -------------------------------------------------------------- templates
    def template(self, s: gast.AST, t: str, tmpl: Template, args: list, keywords: list,
                 state: dict, in_place: bool = False) -> list:
        """``t = f(...)``, then t's tangent from f's tangent template.  ``in_place``: the call
        (``t.op_(...)``) updates t in place, so the old value the tangent reads is a copy."""
        mapping = bind_template(self, s, tmpl, args, keywords)
        arg_names = {n.id for v in mapping.values() for n in ir.walk(v)
                     if isinstance(n, gast.Name)}
        pre: list = []
        if t in arg_names:  # x = f(x): the tangent reads the old x, the primal overwrites it
            old = self.temp(("old", id(s)), f"{t}_in")
            pre.append(ir.assign(old, _clone_of(ir.name(t)) if in_place else ir.name(t)))
            mapping = {k: _rename(v, t, old) for k, v in mapping.items()}
            if state.get(t) is not None:
                state[old] = state[t]
                self.tnames[old] = self.tname(t)
            self.act.varied.add(old)
            self.act.useful.add(old)
        plain, expr = self.instantiate(s, tmpl, mapping, t, state)
        if expr is None:
            return [ir.clone(s)] + self.clear(t, state)
        if pre and pre[0].targets[0].id not in {n for st in plain + [expr]
                                                for n in ir.names_in(st)}:
            pre = []  # the tangent does not read the old value: no copy (no dead code)
        # a template that handles None tangents (container reads) may give None
        maybe = getattr(tmpl.fn, "__propgen_tangent_none__", False)
        return pre + [ir.clone(s)] + plain + self.set(t, expr, state, maybe)

    def instantiate(self, s: gast.AST, tmpl: Template, mapping: dict, t: str,
                    state: dict) -> tuple[list, gast.AST | None]:
        """Splice a tangent template: (plain statements, tangent expression or None if zero)."""
        result_param = tmpl.params[0]
        locals_ = sorted({n.id for st in tmpl.body for n in ir.walk(st)
                          if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Store)})
        renames = {n: self.temp(("tmpl", id(s), n), f"{t}_{n}") for n in locals_}
        zeros: dict[str, _Zero] = {}
        carrying: set = set()  # template locals whose value holds a tangent
        plain: list = []
        expr = None
        for stmt in tmpl.body:
            sub = _Substitute(self, tmpl, mapping, result_param, t, renames, state, zeros,
                              carrying)
            is_out = (isinstance(stmt, gast.Assign) and is_template_object(stmt.targets[0], "t",
                                                                            tmpl))
            if is_out:
                key = stmt.targets[0].slice
                if not (isinstance(key, gast.Name) and key.id == result_param):
                    raise TypeError(f"tangent template {tmpl.name}: only t[{result_param}] can "
                                    "be assigned")
                value = _fold(self, sub.visit(ir.clone(stmt.value)))
                expr = None if isinstance(value, _Zero) else _simplify(value)
                continue
            new = sub.visit(ir.clone(stmt))
            if isinstance(new, gast.Assign) and isinstance(new.targets[0], gast.Name):
                value = _fold(self, new.value)
                local = next(k for k, v in renames.items() if v == new.targets[0].id)
                if isinstance(value, _Zero):
                    zeros[local] = value
                    continue
                if _carries(value):
                    carrying.add(local)
                new.value = _simplify(value)
            plain.append(new)
        if expr is None:
            return [], None
        needed = set(ir.names_in(expr))
        kept: list = []
        for stmt in reversed(plain):
            stores = set(ir.names_in(stmt, gast.Store))
            if stores & needed or not stores:
                kept.insert(0, stmt)
                needed.update(ir.names_in(stmt))
        return kept, expr

    def bind(self, s: gast.AST, tmpl: Template, name: str, value: Any) -> gast.AST:
        if _literal(value):
            return ir.const(value)
        return ir.name(self.ctx.bind("value", tmpl, name, value, f"{tmpl.name}_{name}"))

    def opaque(self, s: gast.Assign, t: str, args: list, keywords: list, state: dict) -> list:
        """``y = f(a, b)`` with no tangent template: ``y, t_y = opaque_jvp(f, ...)``."""
        value = s.value
        operands = args + [k.value for k in keywords]
        if not any(self.active(a) and state.get(a.id) is not None for a in operands):
            return [ir.clone(s)] + self.clear(t, state)
        if isinstance(value, gast.Call):
            func = self.callable(value)
        else:  # an operator or attribute read without a tangent template
            func = _call(self.rt("operation_of"), ir.const(type(value).__name__),
                         ir.const(_op_name(value)))
        unpack = gast.Tuple(elts=[ir.name(t, True), ir.name(self.tname(t), True)],
                            ctx=gast.Store())
        call = self.jvp_call("opaque_jvp", func, args, keywords, state)
        state[t] = MAYBE
        self.maybe_vars.add(t)
        return [ir.assign(unpack, call, like=s)]

    def callable(self, call: gast.Call) -> gast.AST:
        """The function a call calls, with a method's receiver as its first argument."""
        func = ir.clone(call.func)
        if isinstance(func, gast.Attribute) and not getattr(func, "pg_static", False):
            return _call(self.rt("method_of"), ir.const(func.attr))
        return func

    def jvp_call(self, helper: str, func: gast.AST, args: list, keywords: list,
                 state: dict) -> gast.Call:
        """``helper(func, args, kwargs, tangents, tangent_kwargs)``: a runtime helper that
        differentiates the call through torch.func.jvp."""
        prim = gast.Tuple(elts=[ir.clone(a) for a in args], ctx=gast.Load())
        tans = gast.Tuple(elts=[self.raw(a, state) for a in args], ctx=gast.Load())
        kw = gast.Dict(keys=[ir.const(k.arg) for k in keywords],
                       values=[ir.clone(k.value) for k in keywords])
        tkw = gast.Dict(keys=[ir.const(k.arg) for k in keywords],
                        values=[self.raw(k.value, state) for k in keywords])
        return _call(self.rt(helper), func, prim, kw, tans, tkw)

    # --------------------------------------------------------------- function
    def build(self, fname: str) -> gast.FunctionDef:
        from propgen.primal import _fdef

        state = {w: DEF for w in self.wrt if w in self.act.active}
        body = self.block(self.body, state)
        # a snapshot of a parameter (x_in_1 = x before x is rebound) shares its tangent name:
        # compare tangent names, or the tangent argument would be overwritten with None
        given = {self.tname(w) for w in self.wrt}
        inits = [ir.assign(t, ir.const(None))
                 for t in sorted({self.tname(n) for n in self.maybe_vars} - given)]
        return _fdef(fname, self.params + self.tangent_params, inits + body, self.ctx)


def _clone_of(node: gast.AST) -> gast.Call:
    return _call(gast.Attribute(value=ir.clone(node), attr="clone", ctx=gast.Load()))


def _op_name(value: gast.AST) -> str:
    if isinstance(value, (gast.BinOp, gast.UnaryOp)):
        return type(value.op).__name__
    if isinstance(value, gast.Attribute):
        return value.attr
    return ""


def _rename(node: gast.AST, old: str, new: str) -> gast.AST:
    node = ir.clone(node)
    for n in ir.walk(node):
        if isinstance(n, gast.Name) and n.id == old:
            n.id = new
    return node


class _Substitute(gast.NodeTransformer):
    """Replaces a tangent template's parameters, locals, globals and ``t[...]`` reads."""

    def __init__(self, fwd: Forward, tmpl: Template, mapping: dict, result_param: str,
                 t: str, renames: dict, state: dict, zeros: dict, carrying: set) -> None:
        self.fwd = fwd
        self.tmpl = tmpl
        self.mapping = mapping
        self.result_param = result_param
        self.t = t
        self.renames = renames
        self.state = state
        self.zeros = zeros
        self.carrying = carrying

    def visit_Subscript(self, node: gast.Subscript) -> gast.AST:
        if is_template_object(node, "t", self.tmpl):
            key = node.slice
            if not isinstance(key, gast.Name) or key.id not in self.mapping:
                raise TypeError(f"tangent template {self.tmpl.name}: t[...] must name one of "
                                f"the op's parameters {tuple(self.tmpl.params[1:])}")
            target = self.mapping[key.id]
            fill = not getattr(self.tmpl.fn, "__propgen_tangent_none__", False)
            if isinstance(target, gast.Tuple):  # *args: a tuple of tangents
                parts = [self.fwd.read(e, self.state, fill) for e in target.elts]
                return gast.Tuple(elts=parts, ctx=gast.Load())
            return self.fwd.read(target, self.state, fill)
        self.generic_visit(node)
        return node

    def visit_Name(self, node: gast.Name) -> gast.AST:
        if node.id == self.result_param:
            return ir.name(self.t)
        if node.id in self.zeros:
            return self.zeros[node.id]
        if node.id in self.mapping:
            return ir.clone(self.mapping[node.id])
        if node.id in self.renames:
            out = ir.name(self.renames[node.id], isinstance(node.ctx, gast.Store))
            out.pg_tangent = node.id in self.carrying
            return out
        if isinstance(node.ctx, gast.Load):
            g = self.tmpl.globals
            if node.id in g:
                ns = self.fwd.ctx.bind("global", g, node.id, g[node.id], node.id)
            else:
                import builtins

                if not hasattr(builtins, node.id):
                    raise TypeError(f"tangent template {self.tmpl.name}: unknown name "
                                    f"{node.id!r}")
                ns = self.fwd.ctx.bind("builtin", None, node.id, getattr(builtins, node.id),
                                       node.id)
            return ir.name(ns)
        return node


def _carries(node: gast.AST) -> bool:
    return any(getattr(n, "pg_tangent", False) for n in ir.walk(node))


def _materialize(fwd: Forward, node: gast.AST) -> gast.AST:
    if isinstance(node, _Zero):
        return _call(fwd.rt("zeros_tangent"), ir.clone(node.like))
    return node


def _fold(fwd: Forward, node: gast.AST) -> gast.AST:
    """Simplify an expression linear in its tangents with some tangents zero.

    A product, quotient, index or method call of a zero is zero; a sum drops its zero terms;
    a call with zero and non-zero tangent arguments gets explicit zeros for the former; a call
    whose tangent arguments are all zero is zero (templates are linear in their tangents).
    """
    if isinstance(node, _Zero) or not isinstance(node, gast.AST):
        return node
    if isinstance(node, gast.BinOp):
        left, right = _fold(fwd, node.left), _fold(fwd, node.right)
        lz, rz = isinstance(left, _Zero), isinstance(right, _Zero)
        if isinstance(node.op, (gast.Add, gast.Sub)):
            if lz and rz:
                return left
            if rz:
                return left
            if lz:
                return right if isinstance(node.op, gast.Add) else gast.UnaryOp(
                    op=gast.USub(), operand=right)
        elif lz or (rz and not isinstance(node.op, (gast.Div, gast.FloorDiv, gast.Mod))):
            return left if lz else right
        node.left, node.right = _materialize(fwd, left), _materialize(fwd, right)
        return node
    if isinstance(node, gast.UnaryOp):
        operand = _fold(fwd, node.operand)
        if isinstance(operand, _Zero):
            return operand
        node.operand = operand
        return node
    if isinstance(node, (gast.Subscript, gast.Attribute)):
        inner = _fold(fwd, node.value)
        if isinstance(inner, _Zero):
            return inner
        node.value = inner
        if isinstance(node, gast.Subscript):
            node.slice = _materialize(fwd, _fold(fwd, node.slice))
        return node
    if isinstance(node, gast.Call):
        func = _fold(fwd, node.func)
        if isinstance(func, _Zero):
            return func
        args = [_fold(fwd, a) for a in node.args]
        kws = [(k, _fold(fwd, k.value)) for k in node.keywords]
        parts = args + [v for _, v in kws]
        zero = [p for p in parts if isinstance(p, _Zero)]
        if zero and not any(_carries(p) for p in parts if not isinstance(p, _Zero)):
            return zero[0]
        node.func = func
        node.args = [_materialize(fwd, a) for a in args]
        for k, v in kws:
            k.value = _materialize(fwd, v)
        return node
    if isinstance(node, (gast.Tuple, gast.List)):
        elts = [_fold(fwd, e) for e in node.elts]
        if elts and all(isinstance(e, _Zero) for e in elts):
            return _Zero(gast.Tuple(elts=[ir.clone(e.like) for e in elts], ctx=gast.Load()))
        node.elts = [_materialize(fwd, e) for e in elts]
        return node
    if isinstance(node, gast.IfExp):
        known = ir.constant_test(node.test)
        if known is not None:
            return _fold(fwd, node.body if known else node.orelse)
        body, orelse = _fold(fwd, node.body), _fold(fwd, node.orelse)
        if isinstance(body, _Zero) and isinstance(orelse, _Zero):
            return body
        node.body, node.orelse = _materialize(fwd, body), _materialize(fwd, orelse)
        return node
    for field_name in node._fields:
        v = getattr(node, field_name, None)
        if isinstance(v, list):
            setattr(node, field_name, [_materialize(fwd, _fold(fwd, x)) for x in v])
        elif isinstance(v, gast.AST):
            setattr(node, field_name, _materialize(fwd, _fold(fwd, v)))
    return node
