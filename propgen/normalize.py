"""Stage 2, normalize: A-normal form, desugaring, static call resolution and inlining.

Every intermediate value gets a name derived from the user's (``h = tanh(x @ W + b)`` gives
``h_matmul``, ``h_add``, ``h``), every statement keeps the user's line as ``pg_loc``, and
what the transform should not see is rewritten away: augmented assignment, conditional
expressions, ``and``/``or``, chained comparisons, tuple unpacking, comprehensions, ``for``
over anything but a ``range``, early return, break and continue.  Calls of user functions
with source are inlined (their locals renamed), so one generated function holds the whole
computation and closures over the caller's locals read the caller's variables.
"""

from __future__ import annotations

import builtins
import copy
import inspect
import operator
import types
from dataclasses import dataclass, field
from typing import Any

import gast
import torch

from propgen import ir
from propgen.desugar import lower_jumps
from propgen.errors import Location, UnsupportedSyntaxError
from propgen.fence import check
from propgen.nodes import expand_node, manager_of
from propgen.parse import MISSING, ParsedFunction, Scope, parse_function
from propgen.template import NONDIFF, Registry, Template
from propgen.templates.helpers import update_under_no_grad

__all__ = ["Callee", "Context", "Normalizer", "normalize"]

BINOPS = {
    gast.Add: (operator.add, "add"),
    gast.Sub: (operator.sub, "sub"),
    gast.Mult: (operator.mul, "mul"),
    gast.Div: (operator.truediv, "div"),
    gast.FloorDiv: (operator.floordiv, "floordiv"),
    gast.Mod: (operator.mod, "mod"),
    gast.Pow: (operator.pow, "pow"),
    gast.MatMult: (operator.matmul, "matmul"),
    gast.BitAnd: (operator.and_, "and"),
    gast.BitOr: (operator.or_, "or"),
    gast.BitXor: (operator.xor, "xor"),
    gast.LShift: (operator.lshift, "lshift"),
    gast.RShift: (operator.rshift, "rshift"),
}
UNARYOPS = {
    gast.USub: (operator.neg, "neg"),
    gast.UAdd: (operator.pos, "pos"),
    gast.Invert: (operator.invert, "invert"),
    gast.Not: (operator.not_, "not"),
}
CMPOPS = {
    gast.Lt: operator.lt,
    gast.LtE: operator.le,
    gast.Gt: operator.gt,
    gast.GtE: operator.ge,
    gast.Eq: operator.eq,
    gast.NotEq: operator.ne,
    gast.Is: operator.is_,
    gast.IsNot: operator.is_not,
    gast.In: operator.contains,
    gast.NotIn: operator.contains,
}
LIST_METHODS = {"append", "extend", "insert", "pop", "remove", "clear", "reverse", "sort"}
DICT_METHODS = {"items", "keys", "values", "get", "update", "setdefault"}
_NO_INLINE_MODULES = ("torch", "numpy", "propgen", "functools", "builtins", "math")


@dataclass
class Callee:
    """How the transform handles one call.

    kind: 'template' (an adjoint template), 'nondiff', 'opaque' (VJP through autograd),
    'method' (a method of a local value, resolved by name), 'insert_grad_of'.
    """

    kind: str
    obj: Any = None
    template: Template | None = None
    label: str = ""
    has_params: bool = False


@dataclass
class Binding:
    """A free name of the generated code and where its value comes from at call time."""

    kind: str  # 'cell' | 'global' | 'builtin' | 'value'
    source: Any
    key: str
    value: Any


@dataclass
class Context:
    """State of one compilation: names, namespace, registry, inlining stack."""

    registry: Registry
    used: set = field(default_factory=set)
    namespace: dict = field(default_factory=dict)  # ns name -> Binding
    inline_stack: list = field(default_factory=list)
    parsed: dict = field(default_factory=dict)
    callees: list = field(default_factory=list)  # (function, source text) of inlined functions
    leaves: list = field(default_factory=list)  # (name, compile-time value) of implicit leaves
    free: set = field(default_factory=set)  # names the user's code reads as globals/builtins
    samples: dict = field(default_factory=dict)  # generated name -> a value seen at call time
    propagation: Any = None  # the manager's compile-time view, for @propgen.propagate

    def fresh(self, base: str) -> str:
        base = base.strip("_") or "t"
        if not base[0].isalpha():
            base = "t_" + base
        cand, i = base, 1
        while cand in self.used:
            cand = f"{base}_{i}"
            i += 1
        self.used.add(cand)
        return cand

    def internal(self, base: str) -> str:
        """A fresh name for propgen's own bookkeeping (``_stack``), kept apart from the user's."""
        cand, i = f"_{base}", 1
        while cand in self.used:
            cand = f"_{base}_{i}"
            i += 1
        self.used.add(cand)
        return cand

    def bind(self, kind: str, source: Any, key: str, value: Any, prefer: str) -> str:
        """Name a free value in the generated module's namespace (reusing equal bindings)."""
        for ns_name, b in self.namespace.items():
            if b.kind == kind and b.source is source and b.key == key:
                return ns_name
            if ns_name == prefer and b.value is value:
                return ns_name
        ns_name = prefer
        if ns_name in self.namespace or (ns_name in self.used and ns_name not in self.free):
            ns_name = self.fresh(prefer)
        self.used.add(ns_name)
        self.namespace[ns_name] = Binding(kind, source, key, value)
        return ns_name

    def parse(self, fn: Any) -> ParsedFunction:
        key = fn.__code__
        if key not in self.parsed:
            pf = parse_function(fn)
            check(pf)
            self.parsed[key] = pf
            self.callees.append(fn)
        return self.parsed[key]


# Attributes that never carry gradient, whatever object they are read from.
NONDIFF_ATTRS = frozenset({
    "shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_sparse", "is_leaf",
    "requires_grad", "grad_fn", "names", "data", "grad", "is_quantized", "is_meta", "itemsize",
    "nbytes",
})


def _local_names(fdef: gast.FunctionDef) -> list[str]:
    names: list[str] = [a.id for a in fdef.args.args + fdef.args.kwonlyargs]
    names += [a.id for a in fdef.args.posonlyargs]
    for node in gast.walk(fdef):
        if node is fdef:
            continue
        if isinstance(node, gast.Name) and isinstance(node.ctx, gast.Store):
            if node.id not in names:
                names.append(node.id)
        if isinstance(node, gast.FunctionDef) and node.name not in names:
            names.append(node.name)
    return names


def _is_literal(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, complex)):
        return True
    if isinstance(v, tuple):
        return all(_is_literal(e) for e in v)
    return False


class Normalizer:
    """Normalizes one function body (the top-level function or an inlined callee)."""

    def __init__(
        self,
        ctx: Context,
        pf: ParsedFunction,
        rename: dict[str, str],
        outer: Normalizer | None = None,
    ) -> None:
        self.ctx = ctx
        self.pf = pf
        self.scope: Scope = pf.scope
        self.rename = rename  # local name -> generated name
        self.outer = outer  # for nested defs: the enclosing function's normalizer
        self.local_funcs: dict[str, gast.FunctionDef] = {}
        self.lists: set[str] = set()  # locals a list display, comprehension or concat bound
        self.out: list = []
        self.cur: gast.AST | None = None  # the user statement being normalized
        self.nograd = False

    # ---------------------------------------------------------------- helpers
    def loc(self, node: gast.AST | None = None) -> Location:
        return self.pf.loc(node if node is not None else self.cur)

    def fail(self, node: gast.AST | None, what: str, advice: str) -> None:
        raise UnsupportedSyntaxError(self.loc(node), what, advice)

    def emit(self, stmt: gast.AST) -> gast.AST:
        src = self.cur if self.cur is not None else stmt
        stmt.pg_loc = self.loc(src)
        stmt.lineno = stmt.pg_loc.lineno
        if self.nograd and not _binds_as_is(stmt):
            stmt.pg_nograd = True
        if isinstance(stmt, gast.Assign) and isinstance(stmt.targets[0], gast.Name):
            if _makes_list(stmt.value) or self.is_list(stmt.value):
                self.lists.add(stmt.targets[0].id)
            else:
                self.lists.discard(stmt.targets[0].id)
        if getattr(src, "pg_bookkeeping", False):
            stmt.pg_bookkeeping = True
        if (self.ctx.propagation is not None and isinstance(stmt, gast.Assign)
                and isinstance(stmt.value, gast.Name)
                and stmt.value.id in self.ctx.propagation.outputs):
            stmt.pg_bookkeeping = True  # x = <node output>: the node's comment covers it
        self.out.append(stmt)
        return stmt

    def block(self, stmts: list) -> list:
        saved, self.out = self.out, []
        for s in stmts:
            self.stmt(s)
        result, self.out = self.out, saved
        return result

    def is_list(self, atom: gast.AST) -> bool:
        """Whether a normalized atom is known to hold a list (by the statement that last bound
        it, or by the argument's value in the call being specialized)."""
        if not isinstance(atom, gast.Name):
            return False
        return atom.id in self.lists or isinstance(self.ctx.samples.get(atom.id), list)

    def is_local(self, name: str) -> bool:
        return name in self.rename

    def local(self, name: str, store: bool = False) -> gast.Name:
        return ir.name(self.rename[name], store)

    # ------------------------------------------------------------- free names
    def free_name(self, name: str, node: gast.AST) -> gast.Name:
        """A Name node for a free (global, closure or builtin) name of this function."""
        outer = self.outer if name not in self.rename else None
        while outer is not None:  # a nested function reads its enclosing function's locals
            if outer.is_local(name):
                return outer.local(name)
            outer = outer.outer
        value = self.scope.resolve(name, self.loc(node))
        kind, source = self.scope.source_of(name)
        ns = self.ctx.bind(kind, source, name, value, name)
        self.ctx.samples.setdefault(ns, value)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            if all(leaf != ns for leaf, _ in self.ctx.leaves):
                self.ctx.leaves.append((ns, value))
        return ir.name(ns)

    def static_value(self, node: gast.AST) -> Any:
        """Compile-time value of a dotted name rooted at a free name, or MISSING."""
        chain = ir.attr_chain(node)
        if chain is None or self.is_local(chain[0]):
            return MISSING
        outer = self.outer
        while outer is not None:
            if outer.is_local(chain[0]):
                return MISSING
            outer = outer.outer
        if chain[0] in self.local_funcs:
            return MISSING
        value = self.scope.resolve(chain[0], self.loc(node))
        for part in chain[1:]:
            if isinstance(value, torch.Tensor):  # x.T of a global tensor is computed, not static
                return MISSING
            try:
                value = getattr(value, part)
            except AttributeError:
                self.fail(
                    node,
                    f"the attribute {'.'.join(chain)} (it does not exist)",
                    "check the spelling; propgen resolves dotted names when compiling",
                )
        return value

    def sample_value(self, node: gast.AST) -> Any:
        """The value a dotted name rooted at a local had in the call being specialized."""
        chain = ir.attr_chain(node)
        if chain is None:
            return MISSING
        owner: Normalizer | None = self
        while owner is not None and not owner.is_local(chain[0]):
            owner = owner.outer  # a nested function reads its enclosing function's locals
        if owner is None:
            return MISSING
        value = self.ctx.samples.get(owner.rename[chain[0]], MISSING)
        for part in chain[1:]:
            if value is MISSING or isinstance(value, torch.Tensor):
                return MISSING
            value = getattr(value, part, MISSING)
        return value

    def static_ref(self, node: gast.AST) -> gast.AST:
        """Rebuild a dotted name with its root bound in the namespace."""
        chain = ir.attr_chain(node)
        out: gast.AST = self.free_name(chain[0], node)
        for part in chain[1:]:
            out = gast.Attribute(value=out, attr=part, ctx=gast.Load())
        out.pg_static = True
        return out

    # ------------------------------------------------------------ expressions
    def atom(self, e: gast.AST, hint: str) -> gast.AST:
        """Normalize ``e`` to an atom, emitting statements for what it computes."""
        if isinstance(e, gast.Constant):
            return ir.const(e.value)
        if getattr(e, "pg_norm", False) or getattr(e, "pg_static", False):
            return e
        if isinstance(e, gast.Name):
            return self.name_load(e)
        if isinstance(e, gast.Attribute):
            value = self.static_value(e)
            if value is not MISSING:
                if isinstance(value, torch.Tensor) and value.requires_grad and value.is_leaf:
                    # a leaf such as model.weight: give it a name so its gradient has one
                    ref = self.static_ref(e)
                    t = self.ctx.fresh("_".join(ir.attr_chain(e)))
                    self.emit(ir.assign(t, ref))
                    self.ctx.leaves.append((t, value))
                    return ir.name(t)
                return self.static_ref(e)
            sample = self.sample_value(e)
            if isinstance(sample, torch.Tensor) and sample.requires_grad and sample.is_leaf:
                # a parameter reached through an argument (model.fc.weight): a leaf whose
                # gradient goes to .grad, as loss.backward() would do
                t = self.ctx.fresh("_".join(self.rename.get(p, p) for p in ir.attr_chain(e)))
                self.emit(ir.assign(t, self.expr(e, t)))
                self.ctx.leaves.append((t, sample))
                return ir.name(t)
        value = self.expr(e, hint)
        if ir.is_atom(value):
            return value
        t = self.ctx.fresh(f"{hint}_{_label(e)}")
        self.emit(ir.assign(t, value))
        return ir.name(t)

    def name_load(self, e: gast.Name) -> gast.AST:
        if self._local_func_owner(e.id) is not None:  # (of this function or an enclosing one)
            self.fail(
                e,
                f"using the nested function {e.id!r} as a value",
                "call nested functions and lambdas directly; pass data, not functions",
            )
        if self.is_local(e.id):
            return self.local(e.id)
        return self.free_name(e.id, e)

    def expr(self, e: gast.AST, hint: str) -> gast.AST:
        """Normalize ``e`` to a simple expression whose operands are atoms."""
        if isinstance(e, (gast.Constant, gast.Name)) or getattr(e, "pg_static", False):
            return self.atom(e, hint)
        if isinstance(e, gast.Attribute):
            if self.static_value(e) is not MISSING:
                return self.atom(e, hint)
            base = self.atom(e.value, hint)
            node = gast.Attribute(value=base, attr=e.attr, ctx=gast.Load())
            node.pg_callee = self.classify("." + e.attr, e.attr)
            if node.pg_callee.kind == "opaque":
                if e.attr in NONDIFF_ATTRS:
                    node.pg_callee = Callee("nondiff", None, None, e.attr)
                else:
                    # any other attribute (dist.mean, outputs.logits) may carry gradient:
                    # read it with getattr, an opaque call whose vector-Jacobian product
                    # torch.autograd records
                    fname = self.ctx.bind("value", None, "getattr", getattr, "getattr")
                    call = gast.Call(func=ir.name(fname),
                                     args=[base, ir.const(e.attr)], keywords=[])
                    call.pg_callee = Callee("opaque", getattr, None, e.attr)
                    return call
            return node
        if isinstance(e, gast.BinOp):
            fn, label = BINOPS[type(e.op)]
            left = self.atom(e.left, hint)
            right = self.atom(e.right, hint)
            if isinstance(left, gast.Constant) and isinstance(right, gast.Constant):
                folded = _fold(fn, left.value, right.value)
                if folded is not MISSING:
                    return ir.const(folded)
            node = gast.BinOp(left=left, op=e.op, right=right)
            if self.is_list(left) or self.is_list(right):
                if isinstance(e.op, gast.Add):  # list + list: a concatenation, not an add
                    fn, label = operator.concat, "concat"
                elif not isinstance(e.op, gast.Mod):
                    self.fail(e, f"the operator {label} on a list",
                              "build the list with a loop or a comprehension, or join lists "
                              "with +")
            node.pg_callee = self.classify(fn, label)
            return node
        if isinstance(e, gast.UnaryOp):
            fn, label = UNARYOPS[type(e.op)]
            operand = self.atom(e.operand, hint)
            if isinstance(operand, gast.Constant):
                folded = _fold(fn, operand.value)
                if folded is not MISSING:
                    return ir.const(folded)
            node = gast.UnaryOp(op=e.op, operand=operand)
            node.pg_callee = self.classify(fn, label)
            return node
        if isinstance(e, gast.Compare):
            if len(e.ops) > 1:  # a < b < c  ->  a < b and b < c, each operand once
                return self.chained_compare(e, hint)
            left = self.atom(e.left, hint)
            right = self.atom(e.comparators[0], hint)
            node = gast.Compare(left=left, ops=e.ops, comparators=[right])
            node.pg_callee = Callee("nondiff", label="compare")
            return node
        if isinstance(e, gast.BoolOp):
            return self.boolop(e, hint)
        if isinstance(e, gast.IfExp):
            return self.ifexp(e, hint)
        if isinstance(e, gast.Call):
            return self.call(e, hint)
        if isinstance(e, gast.Subscript):
            base = self.atom(e.value, hint)
            index = self.index(e.slice, hint)
            node = gast.Subscript(value=base, slice=index, ctx=gast.Load())
            node.pg_callee = self.classify(operator.getitem, "getitem")
            return node
        if isinstance(e, (gast.List, gast.Tuple)):
            elts = [self.atom(x, hint) for i, x in enumerate(e.elts)]
            cls = gast.List if isinstance(e, gast.List) else gast.Tuple
            return cls(elts=elts, ctx=gast.Load())
        if isinstance(e, gast.Dict):
            if any(k is None for k in e.keys):
                self.fail(e, "dict unpacking {**d}", "build the dict with explicit keys")
            keys = [self.atom(k, hint) for k in e.keys]
            values = [self.atom(v, hint) for v in e.values]
            return gast.Dict(keys=keys, values=values)
        if isinstance(e, (gast.ListComp, gast.GeneratorExp, gast.DictComp)):
            return self.comprehension(e, hint)
        if isinstance(e, gast.Lambda):
            self.fail(
                e,
                "a lambda that is not assigned to a name",
                "assign it first (f = lambda x: ...) and call f directly",
            )
        if isinstance(e, (gast.JoinedStr, gast.Set)):
            return self.passive(e)
        if isinstance(e, gast.Slice):
            return self.index(e, hint)
        self.fail(e, f"the expression {type(e).__name__}", "rewrite it with plain operations")
        return e  # unreachable

    def passive(self, e: gast.AST) -> gast.AST:
        """An expression kept as written (f-strings, sets): names renamed, never differentiated."""
        e = ir.clone(e)
        for n in gast.walk(e):
            if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Store) and self.is_local(n.id):
                n.id = self.rename[n.id]
            elif isinstance(n, gast.Name) and isinstance(n.ctx, gast.Load):
                repl = self.name_load(n)
                n.id = repl.id if isinstance(repl, gast.Name) else n.id
        return e

    def index(self, s: gast.AST, hint: str) -> gast.AST:
        if isinstance(s, gast.Slice):
            parts = [
                None if p is None else self.atom(p, hint) for p in (s.lower, s.upper, s.step)
            ]
            return gast.Slice(lower=parts[0], upper=parts[1], step=parts[2])
        if isinstance(s, gast.Tuple):
            return gast.Tuple(elts=[self.index(x, hint) for x in s.elts], ctx=gast.Load())
        return self.atom(s, hint)

    def chained_compare(self, e: gast.Compare, hint: str) -> gast.AST:
        operands = [self.atom(e.left, hint)]
        operands += [self.atom(c, hint) for c in e.comparators]
        pairs = [
            gast.Compare(left=operands[i], ops=[op], comparators=[operands[i + 1]])
            for i, op in enumerate(e.ops)
        ]
        return self.boolop(gast.BoolOp(op=gast.And(), values=pairs), hint)

    def boolop(self, e: gast.BoolOp, hint: str) -> gast.AST:
        """``a and b`` -> ``t = a; if t: t = b`` (short-circuit kept)."""
        t = self.ctx.fresh(f"{hint}_{'and' if isinstance(e.op, gast.And) else 'or'}")
        self.emit(ir.assign(t, self.expr(e.values[0], t)))
        for v in e.values[1:]:
            body = self.block_expr(lambda v=v: self.emit(ir.assign(t, self.expr(v, t))))
            test: gast.AST = ir.name(t)
            if isinstance(e.op, gast.Or):
                c = self.ctx.fresh(f"{t}_not")
                node = gast.UnaryOp(op=gast.Not(), operand=ir.name(t))
                node.pg_callee = Callee("nondiff", label="not")
                self.emit(ir.assign(c, node))
                test = ir.name(c)
            self.emit_if(test, body, [])
        return ir.name(t)

    def emit_if(self, test: gast.AST, body: list, orelse: list) -> None:
        """Emit ``if test: body else: orelse``, copying the test if a branch rebinds it.

        The backward pass re-tests the branch after the branch's own assignments were undone
        inside it, so it sees the value the name had when the branch ends; a branch that
        rebinds its own test (``t = a; if t: t = b`` from ``a and b``) needs the test kept.
        """
        if isinstance(test, gast.Name):
            stored = {
                n.id for s in body + orelse for n in gast.walk(s)
                if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Store)
            }
            if test.id in stored:
                kept = self.ctx.fresh(f"{test.id}_test")
                self.emit(ir.assign(kept, ir.name(test.id)))
                test = ir.name(kept)
        self.emit(gast.If(test=test, body=body, orelse=orelse))

    def block_expr(self, fn: Any) -> list:
        saved, self.out = self.out, []
        fn()
        result, self.out = self.out, saved
        return result

    def ifexp(self, e: gast.IfExp, hint: str) -> gast.AST:
        test = self.atom(e.test, hint)
        t = self.ctx.fresh(hint)
        body = self.block_expr(lambda: self.emit(ir.assign(t, self.expr(e.body, t))))
        orelse = self.block_expr(lambda: self.emit(ir.assign(t, self.expr(e.orelse, t))))
        self.emit_if(test, body, orelse)
        return ir.name(t)

    def comprehension(self, e: gast.AST, hint: str) -> gast.AST:
        """``[f(x) for x in xs if c]`` -> a loop appending to a fresh list (or dict)."""
        t = self.ctx.fresh(f"{hint}_comp" if not hint.endswith("comp") else hint)
        is_dict = isinstance(e, gast.DictComp)
        self.emit(ir.assign(t, gast.Dict(keys=[], values=[]) if is_dict else ir.const(None)))
        if not is_dict:
            self.out[-1].value = gast.List(elts=[], ctx=gast.Load())
            self.lists.add(t)
        e = ir.clone(e)
        # the comprehension's variables live in their own scope: give them fresh names
        renames: dict[str, str] = {}
        for gen in e.generators:
            for n in gast.walk(gen.target):
                if isinstance(n, gast.Name):
                    renames.setdefault(n.id, self.ctx.fresh(n.id))
        for n in gast.walk(e):
            if isinstance(n, gast.Name) and n.id in renames:
                n.id = "__pgcomp__" + renames[n.id]
        for v in renames.values():
            self.rename["__pgcomp__" + v] = v
        if is_dict:
            store = gast.Subscript(value=ir.name(t), slice=e.key, ctx=gast.Store())
            inner: gast.AST = gast.Assign(targets=[store], value=e.value, type_comment=None)
        else:
            call = gast.Call(
                func=gast.Attribute(value=ir.name(t), attr="append", ctx=gast.Load()),
                args=[e.elt],
                keywords=[],
            )
            inner = gast.Expr(value=call)
        self.rename[t] = t
        for gen in reversed(e.generators):
            for cond in reversed(gen.ifs):
                inner = gast.If(test=cond, body=[inner], orelse=[])
            inner = gast.For(target=gen.target, iter=gen.iter, body=[inner], orelse=[],
                             type_comment=None)
        saved_cur = self.cur
        self.stmt(inner, keep_cur=True)
        self.cur = saved_cur
        return ir.name(t)

    # ------------------------------------------------------------------ calls
    def classify(self, fn: Any, label: str) -> Callee:
        """How to handle a call of the compile-time object ``fn``."""
        found = self.ctx.registry.lookup(fn)
        if isinstance(found, Template):
            return Callee("template", fn, found, label)
        if found == NONDIFF:
            return Callee("nondiff", fn, None, label)
        has_params = isinstance(fn, torch.nn.Module) and any(
            p.requires_grad for p in fn.parameters()
        )
        if isinstance(getattr(fn, "__self__", None), torch.nn.Module):
            has_params = any(p.requires_grad for p in fn.__self__.parameters())
        return Callee("opaque", fn, None, label, has_params)

    def constant_getattr(self, e: gast.AST) -> gast.Attribute | None:
        """``getattr(x, 'cos')`` with a constant name, as the attribute ``x.cos`` it reads."""
        if not (isinstance(e, gast.Call) and isinstance(e.func, gast.Name) and len(e.args) == 2
                and not e.keywords and isinstance(e.args[1], gast.Constant)
                and isinstance(e.args[1].value, str) and e.args[1].value.isidentifier()):
            return None
        if self.is_local(e.func.id) or self._local_func_owner(e.func.id) is not None:
            return None
        if self.static_value(e.func) is not builtins.getattr:
            return None
        return gast.copy_location(
            gast.Attribute(value=e.args[0], attr=e.args[1].value, ctx=gast.Load()), e)

    def call(self, e: gast.Call, hint: str) -> gast.AST:
        attribute = self.constant_getattr(e)
        if attribute is not None:
            return self.expr(attribute, hint)
        if self.constant_getattr(e.func) is not None:
            e = gast.copy_location(gast.Call(func=self.constant_getattr(e.func), args=e.args,
                                             keywords=e.keywords), e)
        func = e.func
        label = func.attr if isinstance(func, gast.Attribute) else getattr(func, "id", "call")
        # a nested def or lambda of this function (or of an enclosing one): inline it
        if isinstance(func, gast.Name):
            owner = self._local_func_owner(func.id)
            if owner is not None:
                return self.inline_local(owner, func.id, e, hint)
        manager = manager_of(self, func)
        if manager is not None:
            return expand_node(self, e, hint, manager)
        value = self.static_value(func) if isinstance(func, (gast.Name, gast.Attribute)) else None
        if value is None or value is MISSING:
            if isinstance(func, gast.Attribute):  # a method of a local value
                receiver = self.atom(func.value, hint)
                args, keywords = self.call_args(e, hint)
                node = gast.Call(
                    func=gast.Attribute(value=receiver, attr=func.attr, ctx=gast.Load()),
                    args=args,
                    keywords=keywords,
                )
                node.pg_callee = self.method_callee(func.attr)
                return node
            fnode = self.atom(func, hint)
            args, keywords = self.call_args(e, hint)
            node = gast.Call(func=fnode, args=args, keywords=keywords)
            node.pg_callee = Callee("opaque", None, None, label, True)
            return node
        if _is_insert_grad_of(value):
            self.fail(
                e,
                "propgen.insert_grad_of outside a with statement",
                "write: with propgen.insert_grad_of(x) as dx: ...",
            )
        if getattr(value, "__propgen_undo__", False):
            self.fail(e, "differentiating generated code that undoes in-place changes of lists "
                      f"or buffers ({getattr(value, '__name__', 'undo')})",
                      "in the original function, build new lists or tensors (torch.stack, "
                      "torch.cat, list displays) instead of append/pop/extend or buf[i] = v")
        as_function = getattr(value, "__propgen_function__", None)
        if as_function is not None and not isinstance(value, type):
            if getattr(value, "bound", ()):
                self.fail(e, "calling a derivative of a method from a differentiated function",
                          "take the derivative of a plain function of the module and inputs")
            value = as_function()  # a function made by propgen: inline its generated code
        if self._inlinable(value):
            return self.inline(value, e, hint)
        fnode = self.static_ref(func)
        args, keywords = self.call_args(e, hint)
        node = gast.Call(func=fnode, args=args, keywords=keywords)
        node.pg_callee = self.classify(value, label)
        return node

    def method_callee(self, attr: str) -> Callee:
        method = getattr(torch.Tensor, attr, None)
        if method is not None:
            found = self.ctx.registry.lookup(method)
            if isinstance(found, Template):
                return Callee("template", method, found, attr)
            if found == NONDIFF:
                return Callee("nondiff", method, None, attr)
            if attr.endswith("_") and not attr.startswith("_"):
                return Callee("inplace", method, None, attr)
            return Callee("opaque", method, None, attr)
        if attr in LIST_METHODS or attr in DICT_METHODS:
            return Callee("container", None, None, attr)
        return Callee("opaque", None, None, attr, True)

    def call_args(self, e: gast.Call, hint: str) -> tuple[list, list]:
        args = [self.atom(a, hint) for a in e.args]
        keywords = [
            gast.keyword(arg=k.arg, value=self.atom(k.value, hint))
            for k in e.keywords
        ]
        return args, keywords

    def _inlinable(self, fn: Any) -> bool:
        if not isinstance(fn, types.FunctionType):
            return False
        if self.ctx.registry.lookup(fn) is not None:
            return False
        module = getattr(fn, "__module__", "") or ""
        if module.split(".")[0] in _NO_INLINE_MODULES:
            return False
        try:
            inspect.getsourcefile(fn)
            inspect.getsourcelines(fn)
        except (OSError, TypeError):
            return False
        return True

    def _local_func_owner(self, fname: str) -> Normalizer | None:
        n: Normalizer | None = self
        while n is not None:
            if fname in n.local_funcs:
                return n
            if n.is_local(fname) and fname not in n.local_funcs:
                return None
            n = n.outer
        return None

    def bind_call(self, sig_params: list, defaults: dict, e: gast.Call, fname: str,
                  hint: str) -> list[tuple[str, gast.AST]]:
        """Match a call's arguments to parameters; returns (param, atom) pairs."""
        args, keywords = self.call_args(e, hint)
        bound: dict[str, gast.AST] = {}
        if len(args) > len(sig_params):
            self.fail(e, f"calling {fname} with {len(args)} positional arguments",
                      f"{fname} takes {len(sig_params)}")
        for p, a in zip(sig_params, args):
            bound[p] = a
        for k in keywords:
            if k.arg not in sig_params:
                self.fail(e, f"the keyword argument {k.arg!r} of {fname}",
                          f"{fname} has no parameter {k.arg!r}")
            bound[k.arg] = k.value
        for p in sig_params:
            if p not in bound:
                if p not in defaults:
                    self.fail(e, f"calling {fname} without its argument {p!r}",
                              "pass every parameter that has no default")
                bound[p] = defaults[p]
        return [(p, bound[p]) for p in sig_params]

    def default_atom(self, value: Any, fname: str, pname: str) -> gast.AST:
        if _is_literal(value):
            return ir.const(value)
        ns = self.ctx.bind("value", None, f"{fname}.{pname}", value, f"{fname}_{pname}")
        return ir.name(ns)

    def inline(self, fn: Any, e: gast.Call, hint: str) -> gast.AST:
        """Inline a module-level user function: its statements join the caller's."""
        if fn.__code__ in self.ctx.inline_stack:
            self.fail(
                e,
                f"the recursive call of {fn.__name__}",
                "propgen inlines user functions: write the recursion as a loop, or register "
                "an adjoint for the function with @propgen.adjoint",
            )
        pf = self.ctx.parse(fn)
        sig = inspect.signature(fn)
        params = list(sig.parameters)
        defaults = {
            p: self.default_atom(v.default, fn.__name__, p)
            for p, v in sig.parameters.items()
            if v.default is not inspect.Parameter.empty
        }
        binding = self.bind_call(params, defaults, e, fn.__name__, hint)
        return self._inline_body(pf, None, binding, fn.__code__, hint)

    def inline_local(self, owner: Normalizer, fname: str, e: gast.Call, hint: str) -> gast.AST:
        fdef = owner.local_funcs[fname]
        key = ("local", id(fdef))
        if key in self.ctx.inline_stack:
            self.fail(e, f"the recursive call of {fname}", "write the recursion as a loop")
        params = [a.id for a in fdef.args.args]
        defaults = {}
        for p, dnode in zip(params[len(params) - len(fdef.args.defaults):], fdef.args.defaults):
            if not isinstance(dnode, gast.Constant):
                self.fail(dnode, "a non-constant default in a nested function",
                          "pass the value explicitly")
            defaults[p] = ir.const(dnode.value)
        binding = self.bind_call(params, defaults, e, fname, hint)
        pf = ParsedFunction(owner.pf.fn, fdef, owner.pf.filename, owner.pf.lines, owner.scope)
        return self._inline_body(pf, owner, binding, key, hint)

    def _inline_body(self, pf: ParsedFunction, outer: Normalizer | None,
                     binding: list, key: Any, hint: str) -> gast.AST:
        fdef = ir.clone(pf.node)
        pf = ParsedFunction(pf.fn, fdef, pf.filename, pf.lines, pf.scope)
        rename: dict[str, str] = {}
        prefix = fdef.name if fdef.name != "lambda_fn" else "lambda"
        for n in _local_names(fdef):
            rename[n] = self.ctx.fresh(n if n not in self.ctx.used else f"{prefix}_{n}")
        child = Normalizer(self.ctx, pf, rename, outer)
        child.nograd = self.nograd
        call_cur = self.cur
        for p, a in binding:  # parameter bindings belong to the caller's line
            self.emit(ir.assign(rename[p], a))
            if isinstance(a, gast.Name) and a.id in self.ctx.samples:
                self.ctx.samples[rename[p]] = self.ctx.samples[a.id]
        self.ctx.inline_stack.append(key)
        body = lower_jumps(fdef.body, self.ctx.fresh, fdef)
        _add_stored(body, rename)
        result = self.ctx.fresh(hint)
        for s in body:
            if s is body[-1] and isinstance(s, gast.Return):
                child.cur = s
                value = s.value if s.value is not None else gast.Constant(value=None, kind=None)
                child.emit(ir.assign(result, child.expr(value, result)))
            else:
                child.stmt(s)
        if not body or not isinstance(body[-1], gast.Return):
            self.cur = call_cur
            child.out.append(self.emit(ir.assign(result, ir.const(None))))
            self.out.pop()
        self.ctx.inline_stack.pop()
        self.out.extend(child.out)
        self.cur = call_cur
        return ir.name(result)

    # ------------------------------------------------------------- statements
    def stmt(self, s: gast.AST, keep_cur: bool = False) -> None:
        if not keep_cur or self.cur is None:
            self.cur = s
        if isinstance(s, gast.Assign):
            if len(s.targets) == 1:
                self.assign_to(s.targets[0], s.value)
            else:
                value = self.atom(s.value, _hint_of(s.targets[0]))
                for t in s.targets:
                    self.assign_to(t, value)
        elif isinstance(s, gast.AugAssign):
            self.augassign(s)
        elif isinstance(s, gast.AnnAssign):
            if s.value is not None:
                self.assign_to(s.target, s.value)
        elif isinstance(s, gast.Expr):
            if isinstance(s.value, gast.Constant):
                return  # docstrings and bare constants
            value = self.expr(s.value, "value")
            if isinstance(value, gast.Call):
                node = gast.Expr(value=value)
                self.emit(node)
        elif isinstance(s, gast.If):
            test = self.atom(s.test, "cond")
            body = self.block(s.body)
            orelse = self.block(s.orelse)
            self.cur = s
            self.emit_if(test, body, orelse)
        elif isinstance(s, gast.For):
            self.for_loop(s)
        elif isinstance(s, gast.While):
            self.while_loop(s)
        elif isinstance(s, gast.With):
            self.with_stmt(s)
        elif isinstance(s, gast.Return):
            value = s.value if s.value is not None else gast.Constant(value=None, kind=None)
            node = gast.Return(value=self.atom(value, "result"))
            self.emit(node)
        elif isinstance(s, gast.FunctionDef):
            self.local_funcs[s.name] = s
        elif isinstance(s, (gast.Pass,)):
            return
        elif isinstance(s, (gast.Assert, gast.Raise)):
            self.emit(self.passive(s))
        elif isinstance(s, (gast.Break, gast.Continue)):
            self.fail(s, "break/continue here", "use a flag")
        else:
            self.fail(s, f"the statement {type(s).__name__}", "rewrite it with plain statements")

    def assign_to(self, target: gast.AST, value: gast.AST) -> None:
        if isinstance(target, gast.Name):
            if isinstance(value, gast.Lambda):
                fdef = _lambda_to_def(target.id, value)
                self.local_funcs[target.id] = fdef
                return
            rhs = self.expr(value, self.rename[target.id])
            self.emit(ir.assign(self.local(target.id, store=True), rhs))
        elif isinstance(target, (gast.Tuple, gast.List)):
            if isinstance(value, (gast.Tuple, gast.List)) and len(value.elts) == len(target.elts):
                # a, b = b, a: evaluate every right-hand side before assigning any
                atoms = [
                    self.atom(v, _hint_of(t)) for t, v in zip(target.elts, value.elts)
                ]
                stored = {n for t in target.elts for n in ir.names_in(t, gast.Store)}
                stored = {self.rename.get(n, n) for n in stored}
                for i, a in enumerate(atoms):
                    if isinstance(a, gast.Name) and a.id in stored:
                        t = self.ctx.fresh(a.id + "_old")
                        self.emit(ir.assign(t, a))
                        atoms[i] = ir.name(t)
                for t, a in zip(target.elts, atoms):
                    self.assign_to(t, a)
                return
            seq = self.atom(value, "_".join(_hint_of(t) for t in target.elts))
            for i, t in enumerate(target.elts):
                item = gast.Subscript(value=seq, slice=ir.const(i), ctx=gast.Load())
                self.assign_to(t, item)
        elif isinstance(target, gast.Subscript):
            base = self.atom(target.value, "buffer")
            index = self.index(target.slice, f"{_hint_of(target)}_index")
            rhs = self.atom(value, f"{_hint_of(target)}_value")
            store = gast.Subscript(value=base, slice=index, ctx=gast.Store())
            self.emit(ir.assign(store, rhs))
        else:
            self.fail(target, f"assignment to {type(target).__name__}", "assign to a name")

    def augassign(self, s: gast.AugAssign) -> None:
        t = s.target
        if (isinstance(t, gast.Name) and isinstance(s.op, gast.Add) and self.is_local(t.id)
                and self.is_list(self.local(t.id))):
            # parts += more extends the list in place (every alias of it sees the new items)
            load = gast.Name(id=t.id, ctx=gast.Load(), annotation=None, type_comment=None)
            more = s.value
            if isinstance(more, gast.Name) and more.id == t.id:  # parts += parts: a copy, so
                more = gast.Call(func=gast.Name(id="list", ctx=gast.Load(), annotation=None,
                                                type_comment=None),  # the undo knows its length
                                 args=[more], keywords=[])
            extend = gast.Call(func=gast.Attribute(value=load, attr="extend", ctx=gast.Load()),
                               args=[more], keywords=[])
            self.stmt(gast.copy_location(gast.Expr(value=gast.copy_location(extend, s)), s),
                      keep_cur=True)
            return
        if isinstance(t, gast.Name) and self.nograd and self.is_local(t.id):
            # under no_grad the update changes the value but not the gradient's path
            load = gast.copy_location(gast.Name(id=t.id, ctx=gast.Load(), annotation=None,
                                                type_comment=None), t)
            rhs = self.expr(gast.BinOp(left=load, op=s.op, right=s.value), self.rename[t.id])
            new = self.ctx.fresh(f"{self.rename[t.id]}_{BINOPS[type(s.op)][1]}")
            self.emit(ir.assign(new, rhs))
            fn = update_under_no_grad
            call = gast.Call(func=ir.name(self.ctx.bind("value", None, fn.__name__, fn,
                                                       fn.__name__)),
                             args=[self.local(t.id), ir.name(new)], keywords=[])
            call.pg_callee = self.classify(fn, fn.__name__)
            self.nograd = False
            self.emit(ir.assign(self.local(t.id, store=True), call))
            self.nograd = True
            self.out[-1].pg_inplace = True  # for the alias check (propgen/aliases.py)
            return
        if isinstance(t, gast.Name):
            load = gast.Name(id=t.id, ctx=gast.Load(), annotation=None, type_comment=None)
            gast.copy_location(load, t)
            self.assign_to(t, gast.BinOp(left=load, op=s.op, right=s.value))
            if self.out and isinstance(self.out[-1], gast.Assign):
                self.out[-1].pg_inplace = True  # for the alias check (propgen/aliases.py)
        elif isinstance(t, gast.Subscript):
            base = self.atom(t.value, "buffer")
            index = self.index(t.slice, f"{_hint_of(t)}_index")
            old = self.ctx.fresh(f"{_hint_of(t)}_item")
            item = gast.Subscript(value=base, slice=index, ctx=gast.Load())
            item.pg_callee = self.classify(operator.getitem, "getitem")
            self.emit(ir.assign(old, item))
            fn, label = BINOPS[type(s.op)]
            rhs = self.atom(s.value, f"{old}_{label}")
            new = self.ctx.fresh(f"{_hint_of(t)}_{label}")
            op = gast.BinOp(left=ir.name(old), op=s.op, right=rhs)
            op.pg_callee = self.classify(fn, label)
            self.emit(ir.assign(new, op))
            store = gast.Subscript(value=base, slice=ir.clone(index), ctx=gast.Store())
            self.emit(ir.assign(store, ir.name(new)))
        else:
            self.fail(s, "augmented assignment to this target", "assign to a name")

    def for_loop(self, s: gast.For) -> None:
        it = s.iter
        target = s.target
        body_prefix: list = []  # (target, value) assignments at the top of each iteration
        fn = self.static_value(it.func) if isinstance(it, gast.Call) else MISSING
        hint = _hint_of(target)
        if fn is range:
            args = [self.atom(a, hint) for a in it.args]
            rng_call = gast.Call(func=self.free_name("range", it), args=args, keywords=[])
            rng_call.pg_callee = Callee("nondiff", range, None, "range")
            if isinstance(target, gast.Name):
                loop_var = self.rename[target.id]
            else:
                loop_var = self.ctx.fresh(f"{hint}_i")
                body_prefix.append((target, ir.name(loop_var)))
        else:
            loop_var = self.ctx.fresh(f"{hint}_index")
            it = self.iterated_once(it, s.body)
            lens, item, pre = self.loop_source(it, hint, loop_var)
            if len(lens) > 1:
                min_call = gast.Call(func=ir.name("min"), args=lens, keywords=[])
                lens = [self.atom(min_call, f"{hint}_len")]
            rng_call = gast.Call(func=self.free_name("range", it), args=lens, keywords=[])
            rng_call.pg_callee = Callee("nondiff", range, None, "range")
            body_prefix.append((target, _Seq(pre, item)))
        rng = self.ctx.fresh(f"{hint}_range")
        self.cur = s
        self.emit(ir.assign(rng, rng_call))
        saved, self.out = self.out, []
        self.cur = s
        for tgt, value in body_prefix:
            if isinstance(value, _Seq):
                for kname, kval in value.pre:
                    self.emit(ir.assign(kname, self.expr(kval, kname)))
                value = value.value
            self.assign_to(tgt, value)
        for b in s.body:
            self.stmt(b)
        body, self.out = self.out, saved
        node = gast.For(target=ir.name(loop_var, store=True), iter=ir.name(rng), body=body,
                        orelse=[], type_comment=None)
        self.cur = s
        self.emit(node)

    def iterated_once(self, it: gast.AST, body: list) -> gast.AST:
        """``it`` with each name the loop body rebinds read once, before the loop: Python
        iterates over the object the name held when the loop started."""
        stored = {n.id for b in body for n in gast.walk(b)
                  if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Store)}
        if not stored:
            return it

        class Snapshot(gast.NodeTransformer):
            def visit_Name(visitor, n: gast.Name) -> gast.AST:  # self: the normalizer
                if not isinstance(n.ctx, gast.Load) or n.id not in stored:
                    return n
                t = self.ctx.fresh(f"{n.id}_iterated")
                self.emit(ir.assign(t, self.name_load(n)))
                out = ir.name(t)
                out.pg_norm = True
                return out

        return Snapshot().visit(copy.deepcopy(it))

    def loop_source(self, it: gast.AST, hint: str, k: str) -> tuple[list, gast.AST, list]:
        """For ``for tgt in it``: the lengths bounding the loop, the item at index k (a tuple
        expression for zip/enumerate, nested as written), and assignments to make first."""
        fn = self.static_value(it.func) if isinstance(it, gast.Call) else MISSING

        def length(seq: gast.AST) -> gast.AST:
            return self.atom(gast.Call(func=ir.name("len"), args=[seq], keywords=[]),
                             f"{hint}_len")

        if fn is zip or fn is enumerate:
            if it.keywords or (fn is enumerate and len(it.args) > 2):
                self.fail(it, f"{fn.__name__}() with these arguments", "pass sequences only")
            parts = [self.loop_source(a, hint, k) for a in it.args[: 1 if fn is enumerate
                                                                    else None]]
            lens = [n for p in parts for n in p[0]]
            pre = [a for p in parts for a in p[2]]
            items = [p[1] for p in parts]
            if fn is enumerate:
                idx: gast.AST = ir.name(k)
                if len(it.args) > 1:
                    idx = gast.BinOp(left=ir.name(k), op=gast.Add(),
                                     right=self.atom(it.args[1], hint))
                items = [idx] + items
            return lens, gast.Tuple(elts=items, ctx=gast.Load()), pre
        if fn is reversed:
            seq = self.atom(it.args[0], f"{hint}_seq")
            n = length(seq)
            rev = gast.BinOp(
                left=gast.BinOp(left=n, op=gast.Sub(), right=ir.const(1)),
                op=gast.Sub(),
                right=ir.name(k),
            )
            return [n], gast.Subscript(value=seq, slice=rev, ctx=gast.Load()), []
        if (
            isinstance(it, gast.Call)
            and isinstance(it.func, gast.Attribute)
            and it.func.attr in ("items", "keys", "values")
            and not it.args
        ):
            dct = self.atom(it.func.value, f"{hint}_dict")
            keys = self.atom(gast.Call(func=ir.name("list"), args=[dct], keywords=[]),
                             f"{hint}_keys")
            n = length(keys)
            key_item = gast.Subscript(value=keys, slice=ir.name(k), ctx=gast.Load())
            if it.func.attr == "keys":
                return [n], key_item, []
            kname = self.ctx.fresh(f"{hint}_key")
            self.rename.setdefault(kname, kname)
            value = gast.Subscript(value=dct, slice=ir.name(kname), ctx=gast.Load())
            if it.func.attr == "values":
                return [n], value, [(kname, key_item)]
            return [n], gast.Tuple(elts=[ir.name(kname), value], ctx=gast.Load()), [
                (kname, key_item)
            ]
        seq = self.atom(it, f"{hint}_seq")
        return [length(seq)], gast.Subscript(value=seq, slice=ir.name(k), ctx=gast.Load()), []

    def while_loop(self, s: gast.While) -> None:
        cond = self.ctx.fresh("loop_cond")
        self.rename.setdefault(cond, cond)
        self.emit(ir.assign(cond, self.expr(s.test, cond)))
        saved, self.out = self.out, []
        for b in s.body:
            self.stmt(b)
        self.cur = s
        self.emit(ir.assign(cond, self.expr(s.test, cond)))
        body, self.out = self.out, saved
        self.cur = s
        self.emit(gast.While(test=ir.name(cond), body=body, orelse=[]))

    def with_stmt(self, s: gast.With) -> None:
        item = s.items[0]
        ctx_expr = item.context_expr
        fn = MISSING
        if isinstance(ctx_expr, gast.Call):
            fn = self.static_value(ctx_expr.func)
        if fn is not MISSING and _is_insert_grad_of(fn):
            if len(ctx_expr.args) != 1 or not isinstance(ctx_expr.args[0], gast.Name):
                self.fail(s, "insert_grad_of of an expression",
                          "pass one variable: with propgen.insert_grad_of(x) as dx:")
            if not isinstance(item.optional_vars, gast.Name):
                self.fail(s, "insert_grad_of without 'as name'",
                          "write: with propgen.insert_grad_of(x) as dx:")
            var = self.name_load(ctx_expr.args[0])
            gname = self.rename[item.optional_vars.id]
            body = [self.passive(b) for b in s.body]
            node = gast.With(
                items=[gast.withitem(context_expr=var, optional_vars=ir.name(gname, True))],
                body=body,
                type_comment=None,
            )
            node.pg_grad_of = True
            self.emit(node)
            return
        if fn is torch.no_grad or (isinstance(fn, type) and issubclass(fn, torch.no_grad)):
            saved = self.nograd
            self.nograd = True
            for b in s.body:
                self.stmt(b)
            self.nograd = saved
            return
        if fn is torch.enable_grad:  # reverse-mode code of a call without an adjoint template
            self.fail(
                s,
                "differentiating code generated for a call without an adjoint template "
                "(torch.autograd computes its backward)",
                "register an adjoint template (@propgen.adjoint) and a tangent template "
                "(@propgen.tangent) for that call, so that its derivative is code propgen reads",
            )
        self.fail(
            s,
            "this with statement",
            "propgen understands `with propgen.insert_grad_of(x) as dx:` and "
            "`with torch.no_grad():`; move other context managers outside the function",
        )


class _Seq(gast.AST):
    """Assignments to make before an item of a dict loop (key first, then the value)."""

    _fields = ()

    def __init__(self, pre: list, value: gast.AST) -> None:
        super().__init__()
        self.pre = pre
        self.value = value


def _add_stored(body: list, rename: dict[str, str]) -> None:
    """Names the jump lowering introduced are locals that keep their (fresh) names."""
    for s in body:
        for n in gast.walk(s):
            if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Store):
                rename.setdefault(n.id, n.id)


def _makes_list(value: gast.AST) -> bool:
    callee = getattr(value, "pg_callee", None)
    return isinstance(value, gast.List) or (
        callee is not None and (callee.obj is operator.concat or callee.obj is list))


def _binds_as_is(stmt: gast.AST) -> bool:
    """``y = x`` (or ``y = [x, z]``) runs no torch op: under no_grad y is still x, with x's
    gradient, so the statement keeps its data flow."""
    return isinstance(stmt, gast.Assign) and isinstance(
        stmt.value, (gast.Name, gast.List, gast.Tuple, gast.Dict))


def _lambda_to_def(fname: str, lam: gast.Lambda) -> gast.FunctionDef:
    ret = gast.Return(value=lam.body)
    gast.copy_location(ret, lam)
    fdef = gast.FunctionDef(name=fname, args=lam.args, body=[ret], decorator_list=[],
                            returns=None, type_comment=None, type_params=[])
    gast.copy_location(fdef, lam)
    return fdef


def _is_insert_grad_of(fn: Any) -> bool:
    return getattr(fn, "__propgen_insert_grad_of__", False)


def _label(e: gast.AST) -> str:
    """A short name for what an expression computes: its op, function or attribute."""
    if isinstance(e, gast.BinOp):
        return BINOPS[type(e.op)][1]
    if isinstance(e, gast.UnaryOp):
        return UNARYOPS[type(e.op)][1]
    if isinstance(e, gast.Call):
        f = e.func
        return f.attr if isinstance(f, gast.Attribute) else getattr(f, "id", "call")
    if isinstance(e, gast.Subscript):
        return "item"
    if isinstance(e, gast.Attribute):
        return e.attr
    if isinstance(e, gast.Compare):
        return "cmp"
    if isinstance(e, (gast.List, gast.Tuple, gast.Dict)):
        return type(e).__name__.lower()
    return "value"


def _hint_of(target: gast.AST) -> str:
    if isinstance(target, gast.Name):
        return target.id
    if isinstance(target, gast.Subscript):
        return _hint_of(target.value)
    if isinstance(target, gast.Attribute):
        return target.attr
    if isinstance(target, (gast.Tuple, gast.List)):
        return "_".join(_hint_of(t) for t in target.elts) or "items"
    return "value"


def _fold(fn: Any, *values: Any) -> Any:
    """Fold an operation on Python numbers; never on tensors (they are never constants)."""
    if not all(isinstance(v, (int, float, complex, bool)) for v in values):
        return MISSING
    try:
        out = fn(*values)
    except Exception:  # leave it to run time (and raise there, where the user expects)
        return MISSING
    return out if isinstance(out, (int, float, complex, bool)) else MISSING


def normalize(ctx: Context, pf: ParsedFunction) -> tuple[list[str], list]:
    """Normalize the top-level function: returns its parameter names and IR body."""
    fdef = pf.node
    params = [a.id for a in fdef.args.posonlyargs + fdef.args.args + fdef.args.kwonlyargs]
    locals_ = _local_names(fdef)
    ctx.used.update(locals_)
    for node in gast.walk(fdef):
        if isinstance(node, gast.Name):
            ctx.used.add(node.id)
            if node.id not in locals_:
                ctx.free.add(node.id)
    rename = {n: n for n in locals_}
    norm = Normalizer(ctx, pf, rename)
    body = lower_jumps(fdef.body, ctx.fresh, fdef)
    _add_stored(body, rename)
    for s in body:
        norm.stmt(s)
    out = norm.out
    channels = ctx.propagation.forward_channels if ctx.propagation is not None else {}
    for name in sorted(channels.values(), reverse=True):  # forward messages start empty
        init = ir.assign(name, ir.const(None))
        init.pg_nograd = init.pg_bookkeeping = True
        init.pg_loc = pf.loc(fdef)
        init.lineno = init.pg_loc.lineno
        out.insert(0, init)
    if not out or not isinstance(out[-1], gast.Return):
        ret = gast.Return(value=ir.const(None))
        ret.pg_loc = pf.loc(fdef.body[-1] if fdef.body else fdef)
        out.append(ret)
    return params, out
