"""Random and mutated Python functions for the compiler fuzz tests (``tests/test_fuzz.py``).

The issue asks that whatever function a user hands to propgen either compiles to correct code
or is refused with one of propgen's documented errors, naming the user's file and line, and
that the compiler never hangs.  This module has the three pieces the fuzz tests need:

* :class:`FunctionGenerator` writes a random function over a wide grammar: tensor, scalar,
  int, float and bool expressions built from a typed grammar (so that most programs run and
  their gradients can be compared with torch.autograd), and, at a rate the caller picks,
  constructs propgen does not support (try/except, yield, global, walrus, starred targets,
  async def, ...) or that are simply wrong (unknown names, non-tensor returns).
* :class:`Mutator` applies small AST mutations (delete, swap or duplicate a statement, swap
  an operator or a call target, rename a variable, return early, wrap statements in a branch
  or loop, change constants) to seed functions that propgen handles (``SEEDS``, adapted from
  ``tests/test_language.py``).
* :class:`Checker` writes a program to a real ``.py`` file, imports it, runs the function
  eagerly (plain, under torch.autograd, and under forward-mode AD), then runs
  ``propgen.grad`` and ``propgen.autodiff(mode='forward')`` on it, each under a time limit, and
  raises :class:`FuzzFailure` unless the outcome is one the issue allows (see
  :meth:`Checker.judge_error` for the exceptions it accepts).

Both generators take a ``random.Random``: the tests pass Hypothesis's ``st.randoms()`` (so
failures shrink and CI runs are deterministic), and a bug hunt can pass any seeded Random.
Nothing here is copied from another project.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import linecache
import math
import os
import random
import re
import signal
import sys
import threading
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.autograd import forward_ad

import propgen

F64 = torch.float64

# --------------------------------------------------------------------------------------------
# Programs and the module text around them
# --------------------------------------------------------------------------------------------

#: Module-level names every fuzz program can read: a global tensor, a Python constant, a
#: namespace object (for attribute assignment), and helpers propgen has to inline.
PRELUDE = '''\
"""A function written by tests/_fuzz.py for the compiler fuzz tests."""

import math
import types

import torch

import propgen

G = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
SCALE = 0.75
box = types.SimpleNamespace(v=1.0)


def helper(t):
    return torch.sin(t) * SCALE + t


def helper_branch(t, flag):
    if flag:
        return t.tanh()
    return t * 0.5


def split_pair(t):
    return torch.sin(t), torch.cos(t) * t


def scale_add(a, b, alpha=2.0):
    return a * alpha + b


def rnn_step(h, x, w):
    return torch.tanh(h @ w + x)

'''


@dataclasses.dataclass
class Arg:
    """One argument of the call: how to make its value and how to pass it.

    ``kind``: 'randn' or 'pos' (a float64 tensor of ``value``'s shape, positive for 'pos'),
    'long' (an int64 tensor of the list ``value``) or 'py' (the Python value ``value``).
    ``keyword``: the parameter name when the argument is passed by keyword, else None.
    """

    kind: str
    value: Any
    keyword: str | None = None


@dataclasses.dataclass
class Program:
    """A function to hand to propgen: the function's source, its name, the arguments of the
    call, and the positions to differentiate with respect to (``wrt``)."""

    function: str
    name: str
    args: list[Arg]
    wrt: tuple[int, ...]
    origin: str = ""  # how the program was made (generator, seed and mutations)

    @property
    def module(self) -> str:
        return PRELUDE + "\n" + self.function.rstrip() + "\n"

    def describe(self) -> str:
        call = ", ".join(
            (f"{a.keyword}=" if a.keyword else "") + _arg_text(a) for a in self.args
        )
        return f"{self.origin}\ncall: {self.name}({call}), wrt={self.wrt}\n{self.function}"


def _arg_text(a: Arg) -> str:
    if a.kind == "randn":
        return f"randn{a.value}"
    if a.kind == "pos":
        return f"pos{a.value}"
    if a.kind == "long":
        return f"tensor({a.value})"
    return repr(a.value)


# --------------------------------------------------------------------------------------------
# The random-function generator
# --------------------------------------------------------------------------------------------

VEC, MAT, SCAL, INT, FLOAT, BOOL, LIST, DICT, FN, STR = (
    "vec", "mat", "scal", "int", "float", "bool", "list", "dict", "fn", "str",
)
N = 4  # every vector has N elements, every matrix is N x N

UNARY = ["sin", "cos", "tanh", "sigmoid", "relu", "abs", "exp", "neg"]
SCALAR_REDUCTIONS = ["sum", "mean", "amax", "amin", "norm", "prod", "logsumexp0", "std", "max"]


class _Scope:
    """The names a block of generated code may read, with their types.

    ``own`` are the names this function (the generated one or a nested def) may assign;
    outer names read inside a nested def are closure variables and are recorded in the
    shared ``frozen`` set, so that the enclosing function never changes their type (a call
    after the change would see a value of another type, and the program would be ill-typed).
    """

    def __init__(self, env: dict, own: set, frozen: set, nested: bool, prefix: str,
                 loop_depth: int = 0, fn_name: str = "f", params: tuple = ()) -> None:
        self.env = dict(env)
        self.own = set(own)
        self.frozen = frozen
        self.nested = nested
        self.prefix = prefix
        self.loop_depth = loop_depth
        self.fn_name = fn_name
        self.params = params

    def copy(self, loop_depth: int | None = None) -> _Scope:
        return _Scope(self.env, self.own, self.frozen, self.nested, self.prefix,
                      self.loop_depth if loop_depth is None else loop_depth, self.fn_name,
                      self.params)


class FunctionGenerator:
    """Writes one random function; ``wild`` is the chance that a statement or expression is
    drawn from the constructs propgen refuses or that are plain mistakes.

    The grammar is typed: each variable has one of the types above, expressions are built for
    a wanted type, and block structure keeps the set of surely-bound names (a name assigned in
    one branch only, or in a loop body, is not read after it).  So a program without wild
    constructs nearly always runs eagerly, and its gradient is compared with autograd.
    """

    def __init__(self, rng: random.Random, wild: float | None = None) -> None:
        self.r = rng
        self.wild = wild if wild is not None else rng.choice([0.0, 0.0, 0.05, 0.15, 0.3])
        self.lines: list[str] = []
        self.counter = 0
        self.budget = 0

    # ---- small helpers ------------------------------------------------------------------

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def fresh(self, sc: _Scope, base: str | None = None) -> str:
        self.counter += 1
        return f"{base or sc.prefix}{self.counter}"

    def emit(self, indent: int, text: str) -> None:
        for line in text.split("\n"):
            self.lines.append("    " * indent + line)

    def names(self, sc: _Scope, ty: str) -> list[str]:
        return sorted(n for n, t in sc.env.items() if t == ty)

    def var(self, sc: _Scope, ty: str) -> str | None:
        found = self.names(sc, ty)
        if not found:
            return None
        name = self.r.choice(found)
        if sc.nested and name not in sc.own:
            sc.frozen.add(name)
        return name

    def const_float(self) -> str:
        return self.r.choice(["0.5", "2.0", "-1.5", "1.0", "0.1", "3.0", "-0.25", "1e-3"])

    def const_int(self) -> str:
        return self.r.choice(["1", "2", "0", "3", "-1"])

    # ---- expressions ----------------------------------------------------------------------

    def expr(self, sc: _Scope, ty: str, d: int) -> str:
        make = {VEC: self.vec, MAT: self.mat, SCAL: self.scal, INT: self.int_, FLOAT: self.flt,
                BOOL: self.bool_}[ty]
        return make(sc, d)

    def vec(self, sc: _Scope, d: int) -> str:
        v = self.var(sc, VEC)
        if d <= 0 or self.chance(0.2):
            if v is not None and self.chance(0.85):
                return v
            return self.r.choice(["G", "torch.linspace(-2.0, 2.0, 4, dtype=torch.float64)",
                                  "torch.ones(4, dtype=torch.float64)"])
        if self.chance(self.wild * 0.5):
            return self.wild_vec(sc, d)
        e = lambda ty=VEC: self.expr(sc, ty, d - 1)  # noqa: E731
        k = self.r.randrange(32)
        if k < 5:
            op = self.r.choice(["+", "-", "*", "*", "+"])
            other = self.r.choice([VEC, VEC, SCAL, FLOAT])
            a, b = e(), e(other)
            return f"({a} {op} {b})" if self.chance(0.8) else f"({b} {op} {a})"
        if k < 7:
            return f"({e()} / ({e()} * {e()} + 1.0))"
        if k < 10:
            return f"torch.{self.r.choice(UNARY)}({e()})"
        if k < 12:
            return f"{e()}.{self.r.choice(UNARY)}()"
        if k == 12:
            return self.r.choice([f"{e()}.clamp(min=-0.5, max=0.5)",
                                  f"torch.clamp({e()}, -1.0, 1.0)",
                                  f"{e()}.clamp(min=0.0)"])
        if k == 13:
            return self.r.choice([f"({e()} ** 2)", f"{e()}.pow(3)", f"torch.square({e()})"])
        if k == 14:
            return self.r.choice([f"{e()}.flip(0)", f"{e()}.roll(1)", f"{e()}.cumsum(0)",
                                  f"torch.softmax({e()}, 0)", f"{e()}.log_softmax(dim=0)",
                                  f"torch.cat([{e()}[1:], {e()}[:1]])"])
        if k == 15:
            return f"torch.where({e()} > {e()}, {e()}, {e()})"
        if k == 16:
            return self.r.choice([f"({e(MAT)} @ {e()})", f"({e()} @ {e(MAT)})",
                                  f"torch.mv({e(MAT)}, {e()})"])
        if k == 17:
            i = self.expr(sc, INT, 0)
            return self.r.choice([f"{e(MAT)}[{i} % 4]", f"{e(MAT)}[:, {i} % 4]",
                                  f"{e(MAT)}.sum(0)", f"{e(MAT)}.mean(dim=1)"])
        if k == 18:
            return f"({e()} if {self.bool_(sc, d - 1)} else {e()})"
        if k == 19:
            fn = self.var(sc, FN)
            if fn is not None:
                return f"{fn}({e()})"
            return self.r.choice([f"helper({e()})", f"helper_branch({e()}, {self.bool_(sc, 0)})",
                                  f"scale_add({e()}, {e()})",
                                  f"scale_add({e()}, {e()}, alpha=0.5)"])
        if k == 20:
            lst = self.var(sc, LIST)
            if lst is not None:
                return self.r.choice([f"{lst}[-1]", f"{lst}[0]", f"torch.stack({lst}).sum(0)",
                                      f"sum({lst})"])
            return f"torch.stack([{e()}, {e()}]).sum(0)"
        if k == 21:
            dd = self.var(sc, DICT)
            if dd is not None:
                return f'{dd}["a"]'
            return f'{{"a": {e()}, "b": {e()}}}["{self.r.choice("ab")}"]'
        if k == 22:
            return self.r.choice([f"{e()}.detach()", f"{e()}.clone()", f"{e()}.view(-1)",
                                  f"{e()}.reshape(2, 2).sum(0).repeat(2)",
                                  f"{e()}.unsqueeze(0).squeeze(0)",
                                  f"{e()}[None].expand(2, 4).sum(0)",
                                  f"torch.sort({e()}).values", f"{e()}.sort()[0]"])
        if k == 23:
            return self.r.choice([f"torch.maximum({e()}, {e()})", f"torch.minimum({e()}, {e()})",
                                  f"torch.max({e()}, {e()})"])
        if k == 24:
            s, c = self.fresh(sc, "t"), self.fresh(sc, "c")
            return self.r.choice([
                f"torch.stack([{s} * 2.0 for {s} in {e()}])",
                f"torch.stack([{e()}[{s} % 4] for {s} in range(4)])",
                f"sum([{e()} * {s} for {s} in range(3)])",
                f"torch.stack([{s} * {c} for {s}, {c} in zip({e()}, {e()})])",
            ])
        if k == 25:
            s = self.fresh(sc, "t")
            return f"(lambda {s}: {s} * 2.0 + torch.sin({s}))({e()})"
        if k == 26:
            return self.r.choice([f"(-{e()})", f"(+{e()})", f"abs({e()})"])
        if k == 27:
            return self.r.choice([f"torch.exp(torch.tanh({e()}))",
                                  f"torch.log({e()} * {e()} + 1.0)",
                                  f"torch.sqrt({e()} * {e()} + 1.0)", f"({e()}.exp() + 1.0).log()"])
        if k == 28:
            return f"({e()} * {e(SCAL)})"
        if k == 29:
            return self.r.choice([f"{e()}.mul({e()})", f"{e()}.add({e()}, alpha=2.0)",
                                  f"torch.mul({e()}, {self.const_float()})",
                                  f"{e()}.sub({e(SCAL)})"])
        if k == 30:
            return f"split_pair({e()})[{self.r.choice('01')}]"
        return f"{e()}[[3, 2, 1, 0]]"

    def wild_vec(self, sc: _Scope, d: int) -> str:
        e = lambda ty=VEC: self.expr(sc, ty, d - 1)  # noqa: E731
        lst = self.var(sc, LIST)
        return self.r.choice([
            f"undefined_helper({e()})",
            f"torch.not_a_function({e()})",
            f"{e()}.not_a_method()",
            f"helper(*[{e()}])",
            f"torch.clamp({e()}, **{{'min': -1.0}})",
            f"torch.stack([*{lst or '[' + e() + ']'}, {e()}]).sum(0)",
            f"{e()}[10]",
            f"({e()} @ {e()})",
            f"{e()}.reshape(3, 3)",
            f"torch.Tensor.sin({e()})",
            f"getattr({e()}, 'cos')()",
            f"{e()}[::-1]",
            f"({e()} / 0.0)",
            f"{e()}.sum(dim=3)",
            f"(lambda *a: a[0])({e()})",
            f"{self.r.choice(['f', sc.fn_name])}({e()})",
            f"torch.stack([({self.fresh(sc, 'w')} := {e()}), {e()}]).sum(0)",
            f"{e()}.exp_()",
            f"{e()}.int().double()",
            f"torch.tensor([1.0, 2.0, 3.0, 4.0]).double() * {e()}",
            f"{e()}.to(torch.float32)",
        ])

    def scal(self, sc: _Scope, d: int) -> str:
        v = self.var(sc, SCAL)
        if d <= 0 or self.chance(0.2):
            if v is not None and self.chance(0.8):
                return v
            return f"{self.vec(sc, 0)}.sum()"
        e = lambda ty=VEC: self.expr(sc, ty, d - 1)  # noqa: E731
        k = self.r.randrange(12)
        if k < 4:
            red = self.r.choice(SCALAR_REDUCTIONS)
            if red == "logsumexp0":
                return f"torch.logsumexp({e()}, 0)"
            return self.r.choice([f"{e()}.{red}()", f"torch.{red}({e()})"])
        if k == 4:
            return self.r.choice([f"({e()} @ {e()})", f"torch.dot({e()}, {e()})",
                                  f"({e()} * {e()}).sum()"])
        if k == 5:
            return f"{e()}[{self.int_(sc, 0)} % 4]"
        if k == 6:
            op = self.r.choice(["+", "-", "*"])
            return f"({e(SCAL)} {op} {self.r.choice([e(SCAL), e(FLOAT)])})"
        if k == 7:
            return f"torch.{self.r.choice(UNARY)}({e(SCAL)})"
        if k == 8:
            return self.r.choice([f"{e(MAT)}.trace()", f"{e(MAT)}.sum()", f"{e(MAT)}.mean()",
                                  f"{e(MAT)}[0, 1]"])
        if k == 9:
            s = self.fresh(sc, "t")
            return self.r.choice([f"sum({s} * {s} for {s} in {e()})",
                                  f"sum([{s}.sin() for {s} in {e()}])",
                                  f"torch.stack([{s}.sum() for {s} in {e(MAT)}]).sum()"])
        if k == 10:
            return f"({e(SCAL)} if {self.bool_(sc, d - 1)} else {e(SCAL)})"
        return self.r.choice([f"torch.max({e()}, 0)[0]", f"{e()}.max(dim=0).values",
                              f"{e()}.min(0)[0]"])

    def mat(self, sc: _Scope, d: int) -> str:
        v = self.var(sc, MAT)
        if d <= 0 or self.chance(0.25):
            if v is not None and self.chance(0.8):
                return v
            return self.r.choice(["torch.eye(4, dtype=torch.float64)",
                                  f"torch.outer({self.vec(sc, 0)}, {self.vec(sc, 0)})"])
        e = lambda ty=MAT: self.expr(sc, ty, d - 1)  # noqa: E731
        k = self.r.randrange(8)
        if k == 0:
            return self.r.choice([f"{e()}.T", f"{e()}.t()", f"{e()}.transpose(0, 1)"])
        if k == 1:
            return f"({e()} @ {e()})"
        if k == 2:
            op = self.r.choice(["+", "*", "-"])
            return f"({e()} {op} {self.r.choice([e(), e(VEC), e(SCAL), e(FLOAT)])})"
        if k == 3:
            return f"torch.{self.r.choice(['tanh', 'sin', 'sigmoid'])}({e()})"
        if k == 4:
            return f"torch.stack([{e(VEC)}, {e(VEC)}, {e(VEC)}, {e(VEC)}])"
        if k == 5:
            return f"({e(VEC)}.unsqueeze(1) * {e(VEC)})"
        if k == 6:
            return f"torch.softmax({e()}, dim=1)"
        return f"{e()}.reshape(2, 8).reshape(4, 4)"

    def int_(self, sc: _Scope, d: int) -> str:
        v = self.var(sc, INT)
        if d <= 0 or self.chance(0.3):
            if v is not None and self.chance(0.7):
                return v
            return self.const_int()
        e = lambda ty=INT: self.expr(sc, ty, d - 1)  # noqa: E731
        k = self.r.randrange(7)
        if k == 0:
            return f"({e()} {self.r.choice(['+', '-', '*'])} {e()})"
        if k == 1:
            return f"({e()} {self.r.choice(['//', '%'])} {self.r.choice(['2', '3', '4'])})"
        if k == 2:
            return self.r.choice([f"len({e(VEC)})", f"{e(VEC)}.shape[0]", f"{e(MAT)}.size(1)",
                                  f"{e(VEC)}.numel()", f"{e(VEC)}.dim()"])
        if k == 3:
            return self.r.choice([f"min({e()}, {e()})", f"max({e()}, 2)", f"abs({e()})"])
        if k == 4:
            lst = self.var(sc, LIST)
            return f"len({lst})" if lst else f"int({self.flt(sc, 0)})"
        if k == 5:
            return f"({e()} if {self.bool_(sc, d - 1)} else {e()})"
        return f"int({e(SCAL)} > 0)"

    def flt(self, sc: _Scope, d: int) -> str:
        v = self.var(sc, FLOAT)
        if d <= 0 or self.chance(0.4):
            if v is not None and self.chance(0.6):
                return v
            return self.r.choice([self.const_float(), self.const_float(), "SCALE", "math.pi"])
        e = lambda ty=FLOAT: self.expr(sc, ty, d - 1)  # noqa: E731
        k = self.r.randrange(5)
        if k == 0:
            return f"({e()} {self.r.choice(['+', '-', '*'])} {e()})"
        if k == 1:
            return f"float({e(INT)})"
        if k == 2:
            return self.r.choice([f"{e(SCAL)}.item()", f"float({e(SCAL)})"])
        if k == 3:
            return f"math.{self.r.choice(['sin', 'cos', 'tanh'])}({e()})"
        return f"({e()} / 2.0)"

    def bool_(self, sc: _Scope, d: int) -> str:
        v = self.var(sc, BOOL)
        if d <= 0 or self.chance(0.3):
            if v is not None and self.chance(0.5):
                return v
            return self.r.choice([f"{self.vec(sc, 0)}.sum() > 0", f"{self.int_(sc, 0)} > 1",
                                  "True", "False"])
        e = lambda ty=BOOL: self.expr(sc, ty, d - 1)  # noqa: E731
        k = self.r.randrange(9)
        if k == 0:
            return f"{e(INT)} {self.r.choice(['<', '<=', '==', '!=', '>'])} {e(INT)}"
        if k == 1:
            return f"0 < {e(INT)} < {self.r.choice(['2', '3'])}"
        if k == 2:
            return f"{e(SCAL)} {self.r.choice(['>', '<', '>='])} {e(FLOAT)}"
        if k == 3:
            return f"not {e()}"
        if k == 4:
            return f"({e()} {self.r.choice(['and', 'or'])} {e()})"
        if k == 5:
            return f"{e(INT)} % 2 == 0"
        if k == 6:
            return f"{e(VEC)}.mean() < {e(VEC)}.mean()"
        if k == 7:
            return self.r.choice([f"isinstance({e(VEC)}, torch.Tensor)", f"{e(VEC)}.dim() == 1",
                                  f"{e(INT)} in (1, 2)", f"bool({e(SCAL)} > 0)",
                                  f"({e(VEC)} > 0).any()", f"{e(VEC)}.dtype == torch.float64"])
        return f"{e(SCAL)} > 0 and {e(INT)} > 0"

    # ---- statements -----------------------------------------------------------------------

    def assign_new(self, sc: _Scope, ty: str, text: str) -> str:
        name = self.fresh(sc)
        sc.env[name] = ty
        sc.own.add(name)
        return f"{name} = {text}"

    def assignable(self, sc: _Scope, ty: str) -> list[str]:
        return [n for n in self.names(sc, ty) if n in sc.own]

    def set_type(self, sc: _Scope, name: str, ty: str) -> bool:
        """Record that ``name`` now holds a ``ty``; refused for a closure variable that would
        change type."""
        if name in sc.frozen and sc.env.get(name) != ty:
            return False
        sc.env[name] = ty
        sc.own.add(name)
        return True

    def block(self, sc: _Scope, indent: int, n: int, depth: int) -> bool:
        """Emit ``n`` statements (at least ``pass``); True when the block surely left (return,
        break, continue) at its end."""
        start = len(self.lines)
        left = False
        for _ in range(n):
            if self.budget <= 0:
                break
            left = self.stmt(sc, indent, depth)
            if left and not self.chance(self.wild * 0.5):
                break  # code after a return is dead; write it only sometimes
        if len(self.lines) == start:
            self.emit(indent, "pass")
        return left

    def stmt(self, sc: _Scope, indent: int, depth: int) -> bool:
        self.budget -= 1
        if self.chance(self.wild):
            return self.wild_stmt(sc, indent, depth)
        k = self.r.randrange(30)
        d = self.r.choice([1, 2, 2, 3])
        if k < 6:  # a new variable
            ty = self.r.choice([VEC, VEC, VEC, SCAL, SCAL, MAT, INT, FLOAT, BOOL])
            self.emit(indent, self.assign_new(sc, ty, self.expr(sc, ty, d)))
            return False
        if k < 10:  # reassign an existing variable (sometimes with another type)
            ty = self.r.choice([VEC, VEC, SCAL, MAT, INT, FLOAT])
            names = self.assignable(sc, ty)
            if not names:
                self.emit(indent, self.assign_new(sc, ty, self.expr(sc, ty, d)))
                return False
            name = self.r.choice(names)
            new_ty = self.r.choice([ty, ty, ty, VEC, SCAL]) if name not in sc.frozen else ty
            value = self.expr(sc, new_ty, d)
            self.set_type(sc, name, new_ty)
            self.emit(indent, f"{name} = {value}")
            return False
        if k < 12:  # augmented assignment to a name
            ty = self.r.choice([VEC, SCAL, INT, FLOAT])
            names = self.assignable(sc, ty)
            if not names:
                self.emit(indent, self.assign_new(sc, ty, self.expr(sc, ty, d)))
                return False
            name = self.r.choice(names)
            op = self.r.choice(["+=", "-=", "*="] if ty != INT else ["+=", "-=", "*=", "//="])
            rhs_ty = ty if ty in (INT, FLOAT) else self.r.choice([ty, SCAL, FLOAT])
            if ty == SCAL and rhs_ty == VEC:
                rhs_ty = SCAL
            rhs = self.expr(sc, rhs_ty, d)
            if op == "//=":
                rhs = "2"
            self.emit(indent, f"{name} {op} {rhs}")
            return False
        if k < 14 and depth > 0:
            return self.if_stmt(sc, indent, depth)
        if k < 16 and depth > 0:
            return self.for_stmt(sc, indent, depth)
        if k == 16 and depth > 0:
            return self.while_stmt(sc, indent, depth)
        if k == 17:
            return self.buffer_stmt(sc, indent, d)
        if k == 18:
            return self.list_stmt(sc, indent, d)
        if k == 19:
            return self.dict_stmt(sc, indent, d)
        if k == 20 and not sc.nested and depth > 0:
            return self.def_stmt(sc, indent)
        if k == 21:  # tuple assignment forms
            a, b = self.fresh(sc), self.fresh(sc)
            form = self.r.randrange(4)
            if form == 0:
                self.emit(indent, f"{a}, {b} = {self.vec(sc, d)}, {self.scal(sc, d)}")
                sc.env[a], sc.env[b] = VEC, SCAL
            elif form == 1:
                self.emit(indent, f"{a}, {b} = split_pair({self.vec(sc, d)})")
                sc.env[a], sc.env[b] = VEC, VEC
            elif form == 2:
                self.emit(indent, f"{a}, {b} = torch.max({self.mat(sc, d)}, 1)")
                sc.env[a] = VEC
            else:
                self.emit(indent, f"{a} = {b} = {self.vec(sc, d)}")
                sc.env[a], sc.env[b] = VEC, VEC
            sc.own.update((a, b))
            return False
        if k == 22:  # swap two names of one type
            names = self.assignable(sc, VEC)
            if len(names) >= 2:
                a, b = self.r.sample(names, 2)
                self.emit(indent, f"{a}, {b} = {b}, {a}")
                return False
            self.emit(indent, self.assign_new(sc, VEC, self.vec(sc, d)))
            return False
        if k == 23 and sc.loop_depth > 0:
            self.emit(indent, f"if {self.bool_(sc, 1)}:")
            self.emit(indent + 1, self.r.choice(["break", "continue"]))
            return False
        if k == 24 and (sc.loop_depth > 0 or depth > 0):  # an early return under a test
            self.emit(indent, f"if {self.bool_(sc, 1)}:")
            self.emit(indent + 1, f"return {self.scal(sc, d)}")
            return False
        if k == 25:
            self.emit(indent, self.r.choice([
                f"assert {self.bool_(sc, 1)}",
                "pass",
                f"{self.vec(sc, 1)}",
                '"""A docstring-like string in the middle of the body."""',
            ]))
            return False
        if k == 26 and depth > 0:
            self.emit(indent, self.r.choice(["with torch.no_grad():", "with torch.enable_grad():"]))
            inner = sc.copy()
            self.block(inner, indent + 1, self.r.randint(1, 2), depth - 1)
            self.merge(sc, [inner])
            return False
        if k == 27:
            s, c = self.fresh(sc, "s"), self.fresh(sc, "c")
            self.emit(indent, self.assign_new(sc, LIST, self.r.choice([
                f"[{self.vec(sc, d)} * {s} for {s} in range({self.r.randint(1, 3)})]",
                f"[{s}.tanh() for {s} in {self.mat(sc, d)}]",
                f"[{s} for {s} in ({self.vec(sc, d)}, {self.vec(sc, d)}) if {s}.sum() > -9]",
                f"[{s} * {c} for {s}, {c} in zip({self.mat(sc, d)}, {self.mat(sc, d)})]",
            ])))
            return False
        if k == 28:
            name = self.fresh(sc, "h")
            t = self.fresh(sc, "t")
            inner = _Scope({**sc.env, t: VEC}, {t}, sc.frozen, True, "u", 0, sc.fn_name)
            body = self.vec(inner, 2)
            self.emit(indent, f"{name} = lambda {t}: {body}")
            sc.env[name] = FN
            sc.own.add(name)
            return False
        if k == 29 and not sc.nested:
            names = self.assignable(sc, VEC)
            if names:
                name = self.r.choice(names)
                self.emit(indent, f"with propgen.insert_grad_of({name}) as g{self.counter}:")
                self.emit(indent + 1, "pass")
                return False
        self.emit(indent, self.assign_new(sc, SCAL, self.scal(sc, d)))
        return False

    def merge(self, sc: _Scope, branches: list[_Scope]) -> None:
        """After a branch or loop: keep only names bound with one type in every branch."""
        if not branches:
            return
        keep = {}
        for name, ty in branches[0].env.items():
            if all(b.env.get(name) == ty for b in branches[1:]):
                keep[name] = ty
        sc.env = keep
        for b in branches:
            sc.own |= {n for n in b.own if n in keep}

    def if_stmt(self, sc: _Scope, indent: int, depth: int) -> bool:
        self.emit(indent, f"if {self.bool_(sc, 2)}:")
        branches, flows = [], []
        body = sc.copy()
        left = self.block(body, indent + 1, self.r.randint(1, 3), depth - 1)
        branches.append(body)
        flows.append(not left)
        if self.chance(0.3):
            self.emit(indent, f"elif {self.bool_(sc, 1)}:")
            b2 = sc.copy()
            left = self.block(b2, indent + 1, self.r.randint(1, 2), depth - 1)
            branches.append(b2)
            flows.append(not left)
        if self.chance(0.6):
            self.emit(indent, "else:")
            b3 = sc.copy()
            left = self.block(b3, indent + 1, self.r.randint(1, 3), depth - 1)
            branches.append(b3)
            flows.append(not left)
        else:
            branches.append(sc.copy())
            flows.append(True)
        live = [b for b, f in zip(branches, flows) if f]
        if not live:
            return True
        self.merge(sc, live)
        return False

    def loop_exit(self, sc: _Scope, body: _Scope) -> None:
        """After a loop that may run zero times: the names bound before keep their type unless
        the body changed it; names first bound in the body are not read after."""
        sc.env = {n: t for n, t in sc.env.items() if body.env.get(n) == t}

    def for_stmt(self, sc: _Scope, indent: int, depth: int) -> bool:
        i = self.fresh(sc, "i")
        body = sc.copy(loop_depth=sc.loop_depth + 1)
        form = self.r.randrange(8)
        if form == 0:
            self.emit(indent, f"for {i} in range({self.r.choice(['3', '1, 4', '4, 0, -1', 'n'])}):")
            body.env[i] = INT
            if "n" not in sc.env or sc.env["n"] != INT:
                self.lines[-1] = self.lines[-1].replace("range(n)", "range(2)")
        elif form == 1:
            self.emit(indent, f"for {i} in range({self.int_(sc, 1)} % 4):")
            body.env[i] = INT
        elif form == 2:
            self.emit(indent, f"for {i} in {self.mat(sc, 1)}:")
            body.env[i] = VEC
        elif form == 3:
            self.emit(indent, f"for {i} in {self.vec(sc, 1)}:")
            body.env[i] = SCAL
        elif form == 4:
            j = self.fresh(sc, "j")
            self.emit(indent, f"for {i}, {j} in zip({self.vec(sc, 1)}, {self.vec(sc, 1)}):")
            body.env[i] = body.env[j] = SCAL
            body.own.add(j)
        elif form == 5:
            j = self.fresh(sc, "j")
            self.emit(indent, f"for {i}, {j} in enumerate({self.mat(sc, 1)}):")
            body.env[i], body.env[j] = INT, VEC
            body.own.add(j)
        elif form == 6:
            lst = self.var(sc, LIST)
            self.emit(indent, f"for {i} in {lst or '[' + self.vec(sc, 1) + ']'}:")
            body.env[i] = VEC
        else:
            self.emit(indent, f"for {i} in [{self.vec(sc, 1)}, {self.vec(sc, 1)}]:")
            body.env[i] = VEC
        body.own.add(i)
        self.block(body, indent + 1, self.r.randint(1, 3), depth - 1)
        self.loop_exit(sc, body)
        return False

    def while_stmt(self, sc: _Scope, indent: int, depth: int) -> bool:
        c = self.fresh(sc, "c")
        form = self.r.randrange(3)
        body = sc.copy(loop_depth=sc.loop_depth + 1)
        self.emit(indent, f"{c} = 0")
        if form == 0:
            self.emit(indent, f"while {c} < {self.r.choice(['2', '3'])}:")
            self.emit(indent + 1, f"{c} += 1")
            self.block(body, indent + 1, self.r.randint(1, 3), depth - 1)
        elif form == 1:
            self.emit(indent, "while True:")
            self.emit(indent + 1, f"{c} += 1")
            self.block(body, indent + 1, self.r.randint(1, 2), depth - 1)
            self.emit(indent + 1, f"if {c} >= 3:")
            self.emit(indent + 2, "break")
        else:
            names = self.assignable(sc, VEC)
            v = self.r.choice(names) if names else None
            if v is None:
                v = self.fresh(sc)
                self.emit(indent, f"{v} = {self.vec(sc, 1)}")
                sc.env[v] = VEC
                sc.own.add(v)
                body.env[v] = VEC
                body.own.add(v)
            self.emit(indent, f"while {v}.norm() > 1.0 and {c} < 50:")
            self.emit(indent + 1, f"{c} += 1")
            self.emit(indent + 1, f"{v} = {v} * 0.5")
            self.block(body, indent + 1, self.r.randint(0, 1), depth - 1)
        sc.env[c] = INT
        sc.own.add(c)
        body.env[c] = INT
        self.loop_exit(sc, body)
        return False

    def buffer_stmt(self, sc: _Scope, indent: int, d: int) -> bool:
        bufs = [n for n in self.assignable(sc, VEC) if n.startswith("b")]
        mats = [n for n in self.assignable(sc, MAT) if n.startswith("b")]
        if not bufs and not mats or self.chance(0.3):
            name = self.fresh(sc, "b")
            if self.chance(0.7):
                init = self.r.choice(["torch.zeros(4, dtype=torch.float64)",
                                      f"{self.vec(sc, 1)}.clone()", "torch.zeros_like(G)"])
                sc.env[name] = VEC
            else:
                init = self.r.choice(["torch.zeros(4, 4, dtype=torch.float64)",
                                      f"{self.mat(sc, 1)}.clone()"])
                sc.env[name] = MAT
            sc.own.add(name)
            self.emit(indent, f"{name} = {init}")
            return False
        if mats and (not bufs or self.chance(0.4)):
            m = self.r.choice(mats)
            i = self.int_(sc, 1)
            self.emit(indent, self.r.choice([f"{m}[{i} % 4] = {self.vec(sc, d)}",
                                             f"{m}[{i} % 4] += {self.vec(sc, d)}",
                                             f"{m}[:, 0] = {self.vec(sc, d)}",
                                             f"{m}[1, 2] = {self.scal(sc, d)}"]))
            return False
        b = self.r.choice(bufs)
        i = self.int_(sc, 1)
        self.emit(indent, self.r.choice([f"{b}[{i} % 4] = {self.scal(sc, d)}",
                                         f"{b}[{i} % 4] += {self.scal(sc, d)}",
                                         f"{b}[{i} % 4] *= {self.flt(sc, 1)}",
                                         f"{b}[1:3] = {self.vec(sc, d)}[:2]",
                                         f"{b}[{b} > 0.5] = 0.0"]))
        return False

    def list_stmt(self, sc: _Scope, indent: int, d: int) -> bool:
        lists = self.assignable(sc, LIST)
        if not lists or self.chance(0.25):
            self.emit(indent, self.assign_new(sc, LIST, self.r.choice(
                ["[]", f"[{self.vec(sc, d)}]", f"[{self.vec(sc, d)}, {self.vec(sc, d)}]"])))
            return False
        lst = self.r.choice(lists)
        self.emit(indent, self.r.choice([
            f"{lst}.append({self.vec(sc, d)})",
            f"{lst}.append({self.vec(sc, d)})",
            f"{lst}.extend([{self.vec(sc, d)}])",
            f"{lst}.insert(0, {self.vec(sc, d)})",
            f"{lst}[0] = {self.vec(sc, d)}",
            f"{lst}[-1] += {self.vec(sc, d)}",
            f"{lst}.pop()",
            f"{lst}.reverse()",
            f"{lst} = {lst} + [{self.vec(sc, d)}]",
        ]))
        return False

    def dict_stmt(self, sc: _Scope, indent: int, d: int) -> bool:
        dicts = self.assignable(sc, DICT)
        if not dicts or self.chance(0.3):
            self.emit(indent, self.assign_new(sc, DICT, f'{{"a": {self.vec(sc, d)}}}'))
            return False
        dd = self.r.choice(dicts)
        self.emit(indent, self.r.choice([f'{dd}["a"] = {self.vec(sc, d)}',
                                         f'{dd}["a"] += {self.vec(sc, d)}',
                                         f'{dd}["b"] = {dd}["a"] * 2.0',
                                         f'{dd}.update({{"a": {self.vec(sc, d)}}})']))
        return False

    def def_stmt(self, sc: _Scope, indent: int) -> bool:
        name = self.fresh(sc, "h")
        t = self.fresh(sc, "t")
        default = self.chance(0.3)
        inner = _Scope({**sc.env, t: VEC}, {t}, sc.frozen, True, "u", 0, sc.fn_name)
        if default:
            inner.env["s"] = FLOAT
            inner.own.add("s")
        self.emit(indent, f"def {name}({t}{', s=0.5' if default else ''}):")
        self.block(inner, indent + 1, self.r.randint(0, 2), 1)
        self.emit(indent + 1, f"return {self.vec(inner, 2)}")
        sc.env[name] = FN
        sc.own.add(name)
        return False

    def wild_stmt(self, sc: _Scope, indent: int, depth: int) -> bool:
        """A construct propgen refuses, or a plain mistake; eager Python may reject it too."""
        v = self.vec(sc, 1)
        name = self.var(sc, VEC) or "x"
        k = self.r.randrange(26)
        if k == 0:
            self.emit(indent, "try:")
            self.block(sc.copy(), indent + 1, 1, 0)
            self.emit(indent, self.r.choice(["except (RuntimeError, ValueError):", "finally:",
                                             "except Exception as err:"]))
            self.emit(indent + 1, "pass")
        elif k == 1 and name != "x" and name not in sc.frozen:
            self.emit(indent, f"del {name}")
            sc.env.pop(name, None)
        elif k == 2:
            self.emit(indent, "global SCALE\nSCALE = SCALE * 1.0")
        elif k == 3:
            self.emit(indent, f"yield {v}.sum()")
        elif k == 4:
            w = self.fresh(sc, "w")
            self.emit(indent, f"if ({w} := {v}.sum()) > 0:")
            self.emit(indent + 1, f"{name} = {name} * {w}" if name in sc.own else "pass")
        elif k == 5:
            a = self.fresh(sc)
            self.emit(indent, f"{a}, *rest{self.counter} = {v}")
            sc.env[a] = SCAL
            sc.own.add(a)
        elif k == 6:
            self.emit(indent, "import math as mth\n" + self.assign_new(sc, FLOAT, "mth.pi"))
        elif k == 7:
            self.emit(indent, "class Box:\n    pass")
        elif k == 8:
            self.emit(indent, f"match {self.int_(sc, 1)}:\n    case 1:\n        pass\n"
                      f"    case _:\n        pass")
        elif k == 9:
            self.emit(indent, "async def inner():\n    return 1")
        elif k == 10:
            self.emit(indent, self.assign_new(sc, STR, f'f"{{{self.int_(sc, 1)}}}-{{x.shape}}"'))
        elif k == 11:
            self.emit(indent, f"box.v = {self.flt(sc, 1)}")
        elif k == 12:
            self.emit(indent, f"box.v += {self.flt(sc, 1)}")
        elif k == 13:
            self.emit(indent, f"{name}.mul_(2.0)")
        elif k == 14:
            params = ", ".join(sc.params[:1] or ("x",))
            self.emit(indent, f"if {self.int_(sc, 1)} > 5:\n    return {sc.fn_name}({params})")
        elif k == 15 and sc.loop_depth == 0 and depth > 0:
            c = self.fresh(sc, "c")
            self.emit(indent, f"{c} = 0\nfor {c} in range(2):\n    pass\nelse:\n    {c} = 3")
        elif k == 16:
            self.emit(indent, f"{name}.requires_grad_(True)" if self.chance(0.5)
                      else f"{v}.backward()")
        elif k == 17 and not sc.nested:
            a = self.fresh(sc, "acc")
            h = self.fresh(sc, "h")
            self.emit(indent, f"{a} = {v}\ndef {h}(t):\n    nonlocal {a}\n    {a} = {a} + t\n"
                      f"    return t\n{name} = {h}({name})" if name in sc.own else f"{a} = {v}")
            sc.env[a] = VEC
            sc.own.add(a)
        elif k == 18:
            self.emit(indent, f"repr({self.scal(sc, 1)})" if self.chance(0.3)
                      else f"s{self.counter} = str({self.int_(sc, 1)}) + 'x'")
        elif k == 19:
            self.emit(indent, f"{self.fresh(sc)} = {{int({self.int_(sc, 1)}) for _ in range(2)}}")
        elif k == 20:
            self.emit(indent, f"{name}.extra = 1")
        elif k == 21:
            self.emit(indent, self.assign_new(sc, VEC, f"x if {self.int_(sc, 1)} > 0 else None"))
        elif k == 22:
            self.emit(indent, f"x = {self.r.choice(['None', '0', repr('text'), '[x]'])}")
            sc.env.pop("x", None)
        elif k == 23:
            self.emit(indent, self.assign_new(sc, VEC, self.wild_vec(sc, 1)))
        elif k == 24:
            self.emit(indent, f"with torch.no_grad(), torch.enable_grad():\n    {name} = {v}"
                      if name in sc.own else "with open(__file__) as fh:\n    pass")
        else:
            self.emit(indent, self.r.choice(["await something()", "return",
                                             f"return {v}", "return None", "return 1",
                                             f"return {v}.sum(), {v}", "return 'text'"]))
            return True
        return False

    # ---- the whole function ---------------------------------------------------------------

    def signature(self) -> tuple[list[str], dict, list[Arg], tuple]:
        """Parameters (text), their types, the call's arguments and wrt."""
        params = ["x"]
        env = {"x": VEC}
        args = [Arg("randn", (N,))]
        if self.chance(0.5):
            params.append("y")
            env["y"] = VEC
            args.append(Arg("randn", (N,)))
        if self.chance(0.4):
            params.append("m")
            env["m"] = MAT
            args.append(Arg("randn", (N, N)))
        tensor_positions = list(range(len(params)))
        if self.chance(0.1):
            params.insert(1, "/")
        optional = [("n", INT, "3", 2), ("k", FLOAT, "0.5", -1.5), ("flag", BOOL, "True", False)]
        kw_only = self.chance(0.25)
        var = self.r.choice(["*args", "**kwargs"]) if self.chance(self.wild * 2) else None
        if var == "*args":
            params.append(var)
            kw_only = True  # what follows *args is keyword-only
        chosen = [o for o in optional if self.chance(0.6)]
        if kw_only and var is None and chosen:
            params.append("*")
        for pname, ty, default, other in chosen:
            annotated = {INT: ": int", FLOAT: ": float", BOOL: ": bool"}[ty]
            params.append(f"{pname}{annotated if self.chance(0.2) else ''}={default}")
            env[pname] = ty
            how = self.r.randrange(3)
            if how == 1:
                args.append(Arg("py", other, keyword=pname))
            elif how == 2 and not kw_only and all(a.keyword is None for a in args):
                args.append(Arg("py", other))
        if var == "**kwargs":
            params.append(var)
        wrt: tuple = (0,)
        if len(tensor_positions) > 1 and self.chance(0.5):
            wrt = tuple(tensor_positions)
        return params, env, args, wrt

    def generate(self, name: str = "f") -> Program:
        params, env, args, wrt = self.signature()
        self.budget = self.r.randint(2, 12)
        is_async = self.chance(self.wild * 0.1)
        ret_ann = " -> torch.Tensor" if self.chance(0.1) else ""
        self.emit(0, f"{'async ' if is_async else ''}def {name}({', '.join(params)}){ret_ann}:")
        if self.chance(0.2):
            self.emit(1, '"""Random function."""')
        sc = _Scope(env, set(env), set(), False, "v", 0, name, tuple(p for p in env))
        left = self.block(sc, 1, self.budget, 2)
        if not left or self.chance(self.wild):
            if self.chance(self.wild):
                self.emit(1, self.r.choice([f"return {self.vec(sc, 1)}", "return 1.0",
                                            "return None", f"return {self.int_(sc, 1)}",
                                            f"return {self.scal(sc, 1)}, 0"]))
            else:
                self.emit(1, f"return {self.scal(sc, 3)}")
        return Program("\n".join(self.lines) + "\n", name, args, wrt,
                       origin=f"random function (wild={self.wild})")


def random_program(rng: random.Random, wild: float | None = None) -> Program:
    """A random function with its call: see :class:`FunctionGenerator`."""
    return FunctionGenerator(rng, wild).generate()


# --------------------------------------------------------------------------------------------
# Seed functions (adapted from tests/test_language.py) and their AST mutations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Seed:
    """A function propgen differentiates correctly, with the arguments of its call."""

    name: str
    source: str
    args: list[Arg]
    wrt: tuple[int, ...] = (0,)

    def program(self) -> Program:
        return Program(self.source, self.name, copy.deepcopy(self.args), self.wrt,
                       origin=f"seed {self.name}")


def _r(*shape: int) -> Arg:
    return Arg("randn", shape)


SEEDS: list[Seed] = [
    Seed("arith_broadcast", '''
def arith_broadcast(x, y, z):
    a = x + y
    b = x * z - y / (z * z + 1.0)
    c = 2.0 - a + 3.0 * b / 4.0
    e = (x - 1.5) ** 2 + 2.0 ** (y * 0.1) - (-x)
    return (a * c + e).sum()
''', [_r(3, 4), _r(4), _r(3, 1)], (0, 1, 2)),
    Seed("comparisons", '''
def comparisons(x, y):
    mask = (x > y).to(x.dtype)
    m2 = (x <= 0.3) & (y >= -0.2)
    w = torch.where(x < y, x * y, x - y)
    return (mask * x + m2.to(x.dtype) * y + w).sum()
''', [_r(3, 4), _r(3, 4)], (0, 1)),
    Seed("matmul_forms", '''
def matmul_forms(a, b, v):
    m = a @ b
    mv = a @ v
    vm = v @ b
    vv = v @ v
    return (m * m).sum() + mv.sum() + (vm * 2.0).sum() + vv
''', [_r(3, 4), _r(4, 5), _r(4)], (0, 1, 2)),
    Seed("unary_math", '''
def unary_math(x, p):
    s = torch.exp(x) + torch.log(p) + torch.sin(x) + torch.cos(x) + torch.tanh(x)
    s = s + torch.sigmoid(x) + torch.relu(x) + torch.sqrt(p) + torch.abs(x) + (-x)
    s = s + torch.reciprocal(p) + p.rsqrt() + x.exp().log1p() + torch.expm1(x * 0.1)
    s = s + x.sin().cos() + torch.square(x) + p.pow(1.5)
    return s.sum()
''', [_r(3, 4), Arg("pos", (3, 4))], (0, 1)),
    Seed("reductions", '''
def reductions(x):
    a = x.sum(dim=1)
    b = torch.sum(x, dim=2, keepdim=True)
    c = x.mean(0)
    d2 = torch.mean(x, dim=(0, 2), keepdim=True)
    e = x.amax(dim=-1)
    f = torch.logsumexp(x, dim=1)
    g = x.prod(dim=2)
    n = x.norm(dim=0)
    s = (a * a).sum() + (b * x).sum() + c.sum() + (d2 * x).sum()
    return s + e.sum() + f.sum() + g.sum() + n.sum()
''', [_r(3, 4, 5)]),
    Seed("with_defaults", '''
def with_defaults(x, scale=2.0, shift=None):
    y = x * scale
    if shift is not None:
        y = y + shift
    return torch.sum(y.exp(), dim=0, keepdim=False).sum()
''', [_r(3, 4)]),
    Seed("attribute_reads", '''
def attribute_reads(x):
    n, m = x.shape
    z = torch.ones(n, dtype=x.dtype, device=x.device)
    k = x.size(1)
    s = x.T @ z
    scale = 1.0 / (m * k)
    if x.dtype == torch.float64 and x.ndim == 2:
        scale = scale * 2.0
    return (s * s).sum() * scale + x.numel() * x.mean()
''', [_r(3, 4)]),
    Seed("for_range_forms", '''
def for_range_forms(x):
    acc = x[0] * 0.0
    for i in range(3):
        acc = acc + x[i] * (i + 1)
    for i in range(1, 5):
        acc = acc * 0.9 + x[i].sin()
    for i in range(5, 0, -2):
        acc = acc - x[i] * x[i - 1]
    for i in range(len(x) - 1, -1, -3):
        acc = acc + x[i].exp() * 0.1
    return acc.sum()
''', [_r(7, 3)]),
    Seed("for_rows_zip", '''
def for_rows_zip(x, w):
    acc = torch.zeros(x.shape[1], dtype=x.dtype)
    for row in x:
        acc = torch.tanh(acc * w + row)
    total = 0.0
    for i, (a, b) in enumerate(zip(x, x * 2.0)):
        total = total + (a - b).pow(2).sum() * (i + 1)
    return acc.sum() + total
''', [_r(5, 3), _r(3)], (0, 1)),
    Seed("while_loops", '''
def while_loops(x):
    while x.norm() > 1:
        x = x / 2
    i = 0
    y = x
    while i < 4:
        y = y * 0.5 + torch.sin(y)
        i += 1
    return (x * x).sum() + y.sum()
''', [Arg("randn", (5,))]),
    Seed("if_tensor_cond", '''
def if_tensor_cond(x):
    if x.sum() > 1.0:
        y = x.exp()
    elif x.mean() < -0.5:
        y = x * x * 3.0
    else:
        y = torch.sin(x)
    return y.sum()
''', [_r(5)]),
    Seed("nested_loops_branches", '''
def nested_loops_branches(x, w):
    acc = torch.zeros((), dtype=x.dtype)
    for i in range(3):
        for j in range(i, 4):
            if (i + j) % 2 == 0:
                acc = acc + (x[j] * w[i]).sin()
            elif x[j] > 0:
                acc = acc + x[j] * w[i]
            else:
                acc = acc - w[i] ** 2
        if acc > 0:
            acc = acc * 0.5
    return acc
''', [_r(4), _r(3)], (0, 1)),
    Seed("early_return_in_loop", '''
def early_return_in_loop(x):
    acc = x.sum() * 0.0
    for i in range(10):
        acc = acc + (x * (i + 1)).sin().sum()
        if acc > 1.0:
            return acc * 2.0
    return acc
''', [_r(4)]),
    Seed("break_continue", '''
def break_continue(x):
    acc = x[0] * 0.0
    for i in range(len(x)):
        if i == 1:
            continue
        if x[i].sum() > 0.2:
            break
        acc = acc + x[i] * x[i]
    i = 0
    while True:
        i += 1
        if i % 2 == 0:
            continue
        acc = acc + (x[0] * i).tanh()
        if i > 6:
            break
    return acc.sum()
''', [_r(6, 3)]),
    Seed("conditional_expressions", '''
def conditional_expressions(x, flag):
    a = x.sin() if x.sum() > 0 else x.cos()
    b = x * 2.0 if flag else x * 3.0
    c = a if a.mean() > b.mean() else b
    return (a * b + c).sum()
''', [_r(4), Arg("py", True)]),
    Seed("tuple_unpacking", '''
def tuple_unpacking(x, y):
    a, b = x, y
    a, b = b * 2.0, a + b
    v, i = torch.max(x, 1)
    vals, idx = x.sort(dim=1)
    q, r = split_pair(y)
    return (a * b).sum() + (v ** 2).sum() + (vals[:, 0] * 3.0).sum() + (q * r).sum()
''', [_r(3, 4), _r(3, 4)], (0, 1)),
    Seed("aug_assign", '''
def aug_assign(x):
    y = x.sin()
    y += x ** 2
    y *= x
    y -= 1.0
    y /= 2.0
    buf = torch.zeros(3, x.shape[1], dtype=x.dtype)
    for i in range(x.shape[0]):
        buf[i % 3] += x[i] * (i + 1)
    buf[0] *= 2.0
    acc = 0.0
    acc += y.sum()
    acc *= 3.0
    return acc + (buf ** 2).sum()
''', [_r(5, 3)]),
    Seed("buffer_store", '''
def buffer_store(x, w):
    T, n = x.shape
    out = torch.zeros(T, n, dtype=x.dtype, device=x.device)
    h = torch.zeros(n, dtype=x.dtype, device=x.device)
    for t in range(T):
        h = torch.tanh(h * w + x[t])
        out[t] = h
    out[0] = out[0] * 3.0
    steps = torch.arange(T, dtype=x.dtype, device=x.device).unsqueeze(1)
    return (out * steps).sum() + (out ** 2).sum()
''', [_r(6, 3), _r(3)], (0, 1)),
    Seed("list_ops", '''
def list_ops(x):
    hs = []
    h = x[0]
    for t in range(1, x.shape[0]):
        h = torch.sin(h + x[t])
        hs.append(h)
    first = hs[0]
    last = hs[-1]
    stacked = torch.stack(hs)
    pair = [first * 2.0, last]
    return (stacked ** 2).sum() + (first * last).sum() + pair[0].sum() + pair[1].mean()
''', [_r(5, 3)]),
    Seed("dict_ops", '''
def dict_ops(x, y):
    cache = {"a": x * 2.0, "b": y.exp()}
    cache["c"] = cache["a"] * cache["b"]
    cache["a"] = cache["a"] + 1.0
    for i in range(2):
        cache["a"] = cache["a"] * cache["b"]
    return cache["a"].sum() + cache["c"].sum() + (cache["b"] ** 2).sum()
''', [_r(3), _r(3)], (0, 1)),
    Seed("comprehensions_lambdas", '''
def comprehensions_lambdas(x, y):
    sq = [x[i] * x[i] for i in range(x.shape[0])]
    ev = [x[i].sin() * i for i in range(x.shape[0]) if i % 2 == 0]
    rows = [row.exp() for row in x]
    mix = lambda a, b=2.0: a * b + torch.sin(a)
    return torch.stack(sq).sum() + torch.stack(ev).sum() + torch.stack(rows).mean() + mix(y).sum()
''', [_r(5, 3), _r(3)], (0, 1)),
    Seed("nested_defs", '''
def nested_defs(x, w):
    s = w.sum()

    def inner(t):
        return torch.sin(t) * s

    def outer(t):
        return inner(t) + inner(t * 2.0) * w

    return outer(x).sum()
''', [_r(3), _r(3)], (0, 1)),
    Seed("closure_appends", '''
def closure_appends(x):
    out = []

    def push(t):
        out.append(t.tanh())

    for row in x:
        push(row * 2.0)
    push(x.sum(0))
    return torch.stack(out).pow(2).sum()
''', [_r(4, 3)]),
    Seed("helpers_and_rnn", '''
def helpers_and_rnn(xs, w):
    h = torch.zeros(xs.shape[1], dtype=xs.dtype)
    for t in range(xs.shape[0]):
        h = rnn_step(h, xs[t], w)
    a = scale_add(h, h * h, alpha=SCALE)
    return (a * helper_branch(h, True)).sum() + helper(h).sum()
''', [_r(6, 3), Arg("randn", (3, 3))], (0, 1)),
    Seed("subscripts", '''
def subscripts(x, idx):
    a = x[1]
    b = x[:, 2]
    c = x[1:3, ::2]
    e = x[-1, 1:-1]
    f = x[idx]
    g = x[x > 0.5]
    h = x[None, ..., 0]
    return (a[:-1] * b).sum() + c.exp().sum() + (e ** 2).sum() + f.sum() * 2.0 + g.sum() + h.sum()
''', [_r(4, 5), Arg("long", [2, 0, 2])]),
    Seed("shape_ops", '''
def shape_ops(x):
    a = x.reshape(6, 4)
    b = x.view(2, 12).t()
    c = x.permute(2, 0, 1).contiguous()
    e = x.unsqueeze(0).expand(3, 2, 3, 4)
    f = torch.cat([x, x * 2.0], dim=1)
    g = x.flatten(1).squeeze()
    h = x.transpose(0, 2)
    s = (a @ a.T).sum() + (b * b).sum() + c[0].sum() + e.mean()
    return s + f.pow(2).sum() + g.sin().sum() + h[1].sum()
''', [_r(2, 3, 4)]),
    Seed("list_in_tensor_loop", '''
def list_in_tensor_loop(x):
    kept = []
    for row in x:
        if row.sum() > 0:
            kept.append(row * 2.0)
        else:
            kept.append(row.exp())
    hs = [x[0] * 1.0, x[1] * 2.0, x[2].sin()]
    for i in range(3):
        hs[i] += x[i] * x[(i + 1) % 3]
    return torch.stack(kept).prod(dim=1).sum() + torch.stack(hs).sum()
''', [_r(5, 3)]),
    Seed("branch_rebinds_its_test", '''
def branch_rebinds_its_test(x):
    acc = x * 1.0
    for i in range(5):
        big = i > 1
        if big:
            big = i > 3
            acc = acc * x
        if big:
            acc = acc + x.sin()
        if 0 < i < 3:
            acc = acc + x[i % 3]
    return acc.sum()
''', [_r(3)]),
    Seed("return_in_nested_loop", '''
def return_in_nested_loop(x):
    acc = x.sum() * 0.0
    for i in range(4):
        for j in range(4):
            acc = acc + (x[i] * x[j]).tanh()
            if acc > 1.5:
                return acc
    n = 0
    while n < 10:
        x = torch.sin(x) * 1.3
        if x.sum() > 1.0:
            return x.sum() * 2.0
        n += 1
    return acc * 2.0
''', [_r(4)]),
    Seed("stop_gradient_builtins", '''
def stop_gradient_builtins(x):
    c = float(x.sum())
    d1 = x.detach() * 3.0
    k = x.max().item()
    parts = [x[i] * (i + 1) for i in range(3)]
    total = sum(parts)
    m = max(1, min(3, x.shape[0]))
    a = b = x * 2.0
    a = a + 1.0
    return (x * c + d1 * x + x * k).sum() + (total * m).sum() + abs(x).sum() + (a * b).sum()
''', [_r(4)]),
    Seed("store_overwrite_gather", '''
def store_overwrite_gather(x):
    out = x.clone()
    out[0] = 0.0
    out[:, 1] = x[:, 0] * 5.0
    v, i = torch.max(x, 1)
    picked = x[torch.arange(x.shape[0]), i]
    return (out * out).sum() + (v * picked).sum() + x.gather(1, i.unsqueeze(1)).sum()
''', [_r(3, 4)]),
    Seed("mlp_loss", '''
def mlp_loss(x, w1, b1, w2, steps):
    h = torch.tanh(x @ w1 + b1)
    out = h @ w2
    for _ in range(steps):
        out = out + 0.5 * torch.tanh(out)
    err = out - 1.0
    if steps > 2:
        err = err / steps
    return torch.sum(err * err) / x.shape[0] + torch.nn.functional.softplus(out).mean()
''', [_r(5, 3), _r(3, 4), _r(4), _r(4, 2), Arg("py", 3)], (1, 2, 3)),
]

#: Names a call target may be swapped for: tensor methods (torch.X and x.X), and builtins.
ATTR_TARGETS = [
    "sin", "cos", "exp", "tanh", "sigmoid", "relu", "abs", "sum", "mean", "max", "min",
    "sqrt", "log", "neg", "t", "flatten", "clone", "detach", "square", "softmax", "cumsum",
    "prod", "norm", "item", "numel", "exp_", "mul", "add", "stack", "cat", "where", "amax",
    "logsumexp", "reshape", "sort", "flip", "unsqueeze", "squeeze", "matmul", "pow",
]
NAME_TARGETS = ["len", "sum", "max", "min", "abs", "float", "int", "range", "list", "tuple",
                "helper", "split_pair", "enumerate", "zip", "sorted", "reversed", "bool"]
BIN_OPS = [ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.MatMult, ast.FloorDiv, ast.Mod]
CMP_OPS = [ast.Lt, ast.Gt, ast.LtE, ast.GtE, ast.Eq, ast.NotEq, ast.Is, ast.IsNot]
NEW_CONSTANTS = [0, 0.0, -1, -2.5, None, "text", True, False, 2, 1e-12, 10]


class Mutator:
    """Applies random AST mutations to a function's source.

    Each mutation edits the ``ast`` tree in place and returns a short description (for the
    failure report), or None when the tree has nothing it applies to.
    """

    def __init__(self, rng: random.Random) -> None:
        self.r = rng
        self.kinds: list[Callable[[ast.FunctionDef], str | None]] = [
            self.delete_stmt, self.swap_stmts, self.duplicate_stmt, self.replace_operator,
            self.replace_call_target, self.rename_variable, self.early_return, self.wrap,
            self.change_constant, self.change_arguments, self.negate_condition,
            self.replace_expression, self.insert_statement,
        ]

    # ---- locating things ------------------------------------------------------------------

    @staticmethod
    def bodies(fdef: ast.FunctionDef) -> list[list]:
        out = []
        for node in ast.walk(fdef):
            for field in ("body", "orelse", "finalbody"):
                stmts = getattr(node, field, None)
                if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                    out.append(stmts)
        return out

    @staticmethod
    def nodes(fdef: ast.FunctionDef, kind: type | tuple) -> list:
        return [n for n in ast.walk(fdef) if isinstance(n, kind) and n is not fdef]

    def local_names(self, fdef: ast.FunctionDef) -> list[str]:
        names = {a.arg for a in fdef.args.args + fdef.args.kwonlyargs}
        names |= {n.id for n in self.nodes(fdef, ast.Name)}
        return sorted(names)

    def expr_text(self, fdef: ast.FunctionDef) -> str:
        names = [n for n in self.local_names(fdef) if n not in ("torch", "range", "len")]
        name = self.r.choice(names) if names else "x"
        return self.r.choice([name, f"{name}.sum()", f"torch.sin({name})", f"{name} * 2.0",
                              "0.0", f"{name}[0]"])

    # ---- mutations --------------------------------------------------------------------------

    def delete_stmt(self, fdef: ast.FunctionDef) -> str | None:
        body = self.r.choice(self.bodies(fdef))
        i = self.r.randrange(len(body))
        gone = body.pop(i)
        if not body:
            body.append(ast.Pass())
        return f"delete line {getattr(gone, 'lineno', '?')}"

    def swap_stmts(self, fdef: ast.FunctionDef) -> str | None:
        bodies = [b for b in self.bodies(fdef) if len(b) >= 2]
        if not bodies:
            return None
        body = self.r.choice(bodies)
        i, j = self.r.sample(range(len(body)), 2)
        body[i], body[j] = body[j], body[i]
        return f"swap statements {i} and {j} of a block"

    def duplicate_stmt(self, fdef: ast.FunctionDef) -> str | None:
        body = self.r.choice(self.bodies(fdef))
        i = self.r.randrange(len(body))
        body.insert(i + 1, copy.deepcopy(body[i]))
        return f"duplicate line {getattr(body[i], 'lineno', '?')}"

    def replace_operator(self, fdef: ast.FunctionDef) -> str | None:
        cands = self.nodes(fdef, (ast.BinOp, ast.AugAssign, ast.Compare, ast.BoolOp, ast.UnaryOp))
        if not cands:
            return None
        node = self.r.choice(cands)
        if isinstance(node, (ast.BinOp, ast.AugAssign)):
            new = node.op = self.r.choice(BIN_OPS)()
        elif isinstance(node, ast.Compare):
            i = self.r.randrange(len(node.ops))
            new = node.ops[i] = self.r.choice(CMP_OPS)()
        elif isinstance(node, ast.BoolOp):
            new = node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        else:
            new = node.op = self.r.choice([ast.USub, ast.UAdd, ast.Not, ast.Invert])()
        return f"operator at line {getattr(node, 'lineno', '?')} -> {type(new).__name__}"

    def replace_call_target(self, fdef: ast.FunctionDef) -> str | None:
        calls = self.nodes(fdef, ast.Call)
        if not calls:
            return None
        call = self.r.choice(calls)
        if isinstance(call.func, ast.Attribute):
            call.func.attr = self.r.choice(ATTR_TARGETS)
            new = call.func.attr
        elif isinstance(call.func, ast.Name):
            call.func.id = self.r.choice(NAME_TARGETS + ["undefined_fn"])
            new = call.func.id
        else:
            return None
        return f"call at line {call.lineno} -> {new}"

    def rename_variable(self, fdef: ast.FunctionDef) -> str | None:
        loads = [n for n in self.nodes(fdef, ast.Name) if isinstance(n.ctx, ast.Load)]
        if not loads:
            return None
        node = self.r.choice(loads)
        names = self.local_names(fdef)
        node.id = self.r.choice(["undefined_zz", "undefined_zz"] + names)
        return f"name at line {node.lineno} -> {node.id}"

    def early_return(self, fdef: ast.FunctionDef) -> str | None:
        body = self.r.choice(self.bodies(fdef))
        i = self.r.randrange(len(body) + 1)
        body.insert(i, ast.parse(f"return {self.expr_text(fdef)}").body[0])
        return "insert an early return"

    def wrap(self, fdef: ast.FunctionDef) -> str | None:
        body = self.r.choice(self.bodies(fdef))
        i = self.r.randrange(len(body))
        j = self.r.randint(i + 1, min(len(body), i + 3))
        first = fdef.args.args[0].arg if fdef.args.args else "x"
        head = self.r.choice([
            f"if {first}.sum() > 0:", "if True:", "if False:", "for _w in range(2):",
            "for _w in range(0):", "with torch.no_grad():", "while _c < 2:",
            "try:", f"if {first}.dim() > 1:",
        ])
        extra = ""
        if head.startswith("while"):
            extra = "    _c += 1\n"
        if head == "try:":
            text = f"{head}\n    pass\nexcept RuntimeError:\n    pass\n"
        else:
            text = f"{head}\n{extra}    pass\n"
        wrapper = ast.parse(text).body[0]
        wrapper.body = ([wrapper.body[0]] if extra else []) + body[i:j]
        body[i:j] = [wrapper]
        if head.startswith("while"):
            body.insert(i, ast.parse("_c = 0").body[0])
        return f"wrap {j - i} statement(s) in {head!r}"

    def change_constant(self, fdef: ast.FunctionDef) -> str | None:
        consts = [n for n in self.nodes(fdef, ast.Constant) if not isinstance(n.value, str)]
        if not consts:
            return None
        node = self.r.choice(consts)
        old = node.value
        if isinstance(old, (int, float)) and not isinstance(old, bool) and self.r.random() < 0.3:
            node.value = -old
        else:
            node.value = self.r.choice(NEW_CONSTANTS)
        return f"constant at line {node.lineno}: {old!r} -> {node.value!r}"

    def change_arguments(self, fdef: ast.FunctionDef) -> str | None:
        calls = [c for c in self.nodes(fdef, ast.Call) if c.args or c.keywords]
        if not calls:
            return None
        call = self.r.choice(calls)
        k = self.r.randrange(4)
        if k == 0 and call.args:
            call.args.pop(self.r.randrange(len(call.args)))
            return f"drop an argument at line {call.lineno}"
        if k == 1 and len(call.args) >= 2:
            call.args.reverse()
            return f"reverse the arguments at line {call.lineno}"
        if k == 2 and call.keywords:
            call.keywords.pop(self.r.randrange(len(call.keywords)))
            return f"drop a keyword at line {call.lineno}"
        kw = self.r.choice(["dim", "keepdim", "alpha", "out", "bogus"])
        value = self.r.choice(["0", "True", "2.0", "None"])
        call.keywords.append(ast.keyword(arg=kw, value=ast.parse(value).body[0].value))
        return f"add {kw}={value} at line {call.lineno}"

    def negate_condition(self, fdef: ast.FunctionDef) -> str | None:
        tests = self.nodes(fdef, (ast.If, ast.While, ast.IfExp))
        if not tests:
            return None
        node = self.r.choice(tests)
        node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)
        return f"negate the test at line {node.lineno}"

    def replace_expression(self, fdef: ast.FunctionDef) -> str | None:
        exprs = [n for n in self.nodes(fdef, (ast.BinOp, ast.Call, ast.Subscript))
                 if isinstance(getattr(n, "ctx", ast.Load()), ast.Load)]
        if not exprs:
            return None
        target = self.r.choice(exprs)
        new = ast.parse(self.expr_text(fdef), mode="eval").body
        for parent in ast.walk(fdef):
            for field, value in ast.iter_fields(parent):
                if value is target:
                    setattr(parent, field, new)
                    return f"replace an expression at line {target.lineno}"
                if isinstance(value, list) and target in value:
                    value[value.index(target)] = new
                    return f"replace an expression at line {target.lineno}"
        return None

    def insert_statement(self, fdef: ast.FunctionDef) -> str | None:
        body = self.r.choice(self.bodies(fdef))
        names = [n for n in self.local_names(fdef) if n not in ("torch", "range", "len")]
        name = self.r.choice(names) if names else "x"
        text = self.r.choice([
            f"{name} = {name} * 1.0", f"del {name}", "global SCALE", "assert True",
            f"{name} += {name}", f"{name}, = [{name}]", f"repr({name})",
            f"{name}.add_(1.0)", "pass", f"lambda: {name}", "yield 1",
            f"{name} = [{name}][0]", "continue", "break", f"{name} = None",
            f"with torch.no_grad():\n    {name} = {name}.detach()",
        ])
        stmts = ast.parse(text).body
        i = self.r.randrange(len(body) + 1)
        body[i:i] = stmts
        return f"insert {text.splitlines()[0]!r}"

    # ---- driving ----------------------------------------------------------------------------

    def mutate(self, source: str, count: int) -> tuple[str, list[str]] | None:
        """``source`` with ``count`` mutations applied and their descriptions; None when no
        mutation applied."""
        tree = ast.parse(source)
        fdef = tree.body[0]
        done = []
        for _ in range(count * 3):
            if len(done) == count:
                break
            kind = self.r.choice(self.kinds)
            what = kind(fdef)
            if what:
                done.append(f"{kind.__name__}: {what}")
        if not done:
            return None
        ast.fix_missing_locations(tree)
        return ast.unparse(tree) + "\n", done


def mutated_program(rng: random.Random, seeds: list[Seed] | None = None) -> Program | None:
    """A seed function with one to three random mutations, or None when none applied."""
    seed = rng.choice(seeds or SEEDS)
    out = Mutator(rng).mutate(seed.source, rng.randint(1, 3))
    if out is None:
        return None
    text, done = out
    program = seed.program()
    program.function = text
    program.origin = f"seed {seed.name} mutated: " + "; ".join(done)
    return program


# --------------------------------------------------------------------------------------------
# Running a program: time limits, eager references, propgen, and the verdict
# --------------------------------------------------------------------------------------------


class Hang(BaseException):  # noqa: N818 - not an error of the program: a time limit
    """Raised by :func:`time_limit` when the code under it runs too long.  A BaseException,
    so that a broad ``except Exception`` in the code under test cannot swallow it."""


class FuzzFailure(AssertionError):
    """An outcome the issue forbids: an internal exception, a documented error without the
    user's file and line, a wrong value or gradient, or a hang."""


class ImportFailed(Exception):  # noqa: N818 - a reason to skip, not an error
    """Importing the program failed: the source is not valid Python (Python's problem)."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds`` (SIGALRM).  Where there is no
    SIGALRM or this is not the main thread, :func:`call_with_time_limit` is the fallback."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"{what} ran for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def call_with_time_limit(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """``fn()``, raising :class:`Hang` if it takes longer than ``seconds``.

    On the main thread of a POSIX process this interrupts ``fn`` with SIGALRM; elsewhere ``fn``
    runs in a daemon thread that is abandoned (still running) when the time is up.
    """
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        with time_limit(seconds, what):
            return fn()
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise Hang(f"{what} ran for more than {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def import_program(program: Program, workdir: Path) -> tuple[Callable, Path]:
    """Write the program's module to a real file in ``workdir`` and import it."""
    text = program.module
    # named after its content: the same program always gets the same file (and propgen the
    # same generated code), so a failure replays identically when Hypothesis shrinks it
    stem = f"fz_{hashlib.sha1(text.encode()).hexdigest()[:16]}"
    path = workdir / f"{stem}.py"
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call_with_time_limit(lambda: spec.loader.exec_module(module), 10.0, "import")
    except Exception as exc:  # SyntaxError, NameError...: not valid Python
        sys.modules.pop(stem, None)
        raise ImportFailed(f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, program.name, None)
    if not callable(fn):
        sys.modules.pop(stem, None)
        raise ImportFailed(f"{program.name} is not defined")
    return fn, path


def make_args(program: Program, seed: int) -> tuple[list, dict, list]:
    """Fresh argument values (deterministic in ``seed``) and one tangent per wrt position."""
    gen = torch.Generator().manual_seed(seed)
    args, kwargs = [], {}
    for a in program.args:
        if a.kind == "randn":
            v: Any = torch.randn(a.value, generator=gen, dtype=F64)
        elif a.kind == "pos":
            v = torch.rand(a.value, generator=gen, dtype=F64) + 0.5
        elif a.kind == "long":
            v = torch.tensor(a.value)
        else:
            v = copy.deepcopy(a.value)
        if a.keyword:
            kwargs[a.keyword] = v
        else:
            args.append(v)
    tangents = []
    for i in program.wrt:
        a = args[i] if i < len(args) else None
        shape = a.shape if isinstance(a, torch.Tensor) else ()
        tangents.append(torch.randn(shape, generator=gen, dtype=F64))
    return args, kwargs, tangents


def _clone(values: Any) -> Any:
    if isinstance(values, torch.Tensor):
        return values.clone()
    if isinstance(values, list):
        return [_clone(v) for v in values]
    if isinstance(values, dict):
        return {k: _clone(v) for k, v in values.items()}
    return copy.deepcopy(values)


@dataclasses.dataclass
class Eager:
    """What the function does when run as plain Python: its result or exception, and the
    autograd gradients and forward-mode tangent where torch can compute them."""

    hung: bool = False
    result: Any = None
    error: BaseException | None = None
    grads: tuple | None = None  # d result / d args[wrt], when the result is a scalar tensor
    tangent: Any = None  # the forward-mode tangent of the result
    has_tangent: bool = False


def is_scalar_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point()


def run_eager(fn: Callable, program: Program, seed: int, limit: float) -> Eager:
    """Run ``fn`` plainly, under reverse-mode autograd and under forward-mode AD."""
    out = Eager()
    args, kwargs, tangents = make_args(program, seed)
    wrt = [i for i in program.wrt if i < len(args) and isinstance(args[i], torch.Tensor)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out.result = call_with_time_limit(
                lambda: fn(*_clone(args), **_clone(kwargs)), limit, "the eager function")
        except Hang:
            out.hung = True
            return out
        except Exception as exc:
            out.error = exc
            return out
        if inspect.iscoroutine(out.result):  # an async def: never awaited, so close it
            out.result.close()
        if len(wrt) != len(program.wrt):
            return out
        try:
            ad_args = _clone(args)
            inputs = []
            for i in wrt:
                ad_args[i] = ad_args[i].requires_grad_(True)
                inputs.append(ad_args[i])
            with torch.enable_grad():
                res = call_with_time_limit(lambda: fn(*ad_args, **_clone(kwargs)), limit,
                                           "the eager function under autograd")
                if is_scalar_tensor(res):
                    if res.requires_grad:
                        grads = torch.autograd.grad(res.reshape(()), inputs, allow_unused=True)
                    else:
                        grads = (None,) * len(inputs)
                    out.grads = tuple(torch.zeros_like(a) if g is None else g
                                      for a, g in zip(inputs, grads))
        except (Exception, Hang):
            out.grads = None
        if "no_grad" in program.function:
            # torch's forward-mode AD ignores torch.no_grad(), propgen's forward mode treats it
            # as it does in reverse mode (no derivative flows out of the block): compare with
            # the tangent reverse mode implies, <gradient, tangent>, where there is one
            if out.grads is not None and is_scalar_tensor(out.result):
                tan = sum((g * t).sum() for g, t in zip(out.grads, tangents))
                out.tangent = torch.as_tensor(tan, dtype=out.result.dtype).reshape(
                    out.result.shape)
                out.has_tangent = True
            return out
        try:
            with forward_ad.dual_level():
                fw_args = _clone(args)
                for i, t in zip(wrt, tangents):
                    fw_args[i] = forward_ad.make_dual(fw_args[i], t)
                res = call_with_time_limit(lambda: fn(*fw_args, **_clone(kwargs)), limit,
                                           "the eager function under forward-mode AD")
                if isinstance(res, torch.Tensor) and res.is_floating_point():
                    tan = forward_ad.unpack_dual(res).tangent
                    out.tangent = torch.zeros_like(res) if tan is None else tan.clone()
                    out.has_tangent = True
        except (Exception, Hang):
            out.has_tangent = False
    return out


_PROPGEN_DIR = Path(propgen.__file__).resolve().parent
_RUNTIME_FILES = {"runtime.py", "runtime_forward.py"}


def innermost_frame(exc: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(exc.__traceback__)
    return frames[-1] if frames else None


def in_compiler(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside propgen's compiler (not in generated code, the
    runtime helpers generated code calls, the templates, torch or the user's code)."""
    frame = innermost_frame(exc)
    if frame is None:
        return False
    path = Path(frame.filename).resolve()
    return path.parent == _PROPGEN_DIR and path.name not in _RUNTIME_FILES


_TEMPLATES_DIR = Path(importlib.import_module("propgen.templates").__file__).resolve().parent


def in_library(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in propgen's own code (the compiler, its runtime helpers or
    its templates) rather than in generated code, torch or the user's code."""
    frame = innermost_frame(exc)
    if frame is None:
        return False
    return Path(frame.filename).resolve().parent in (_PROPGEN_DIR, _TEMPLATES_DIR)


def compiler_frame(exc: BaseException) -> str:
    """The innermost frame of the traceback that lies in propgen's own package."""
    frames = traceback.extract_tb(exc.__traceback__)
    for f in reversed(frames):
        if Path(f.filename).resolve().parent == _PROPGEN_DIR:
            return f"{Path(f.filename).name}:{f.lineno} in {f.name}: {f.line}"
    return "(no propgen frame)"


_LOCATION = re.compile(r"([\w.-]+\.py):(\d+)")


def names_user_line(exc: BaseException, path: Path, nlines: int) -> bool:
    """Whether the message of a documented error names the program's file and a line of it."""
    for match in _LOCATION.finditer(str(exc)):
        if match.group(1) == path.name and 1 <= int(match.group(2)) <= nlines:
            return True
    return False


def _same_kind(a: BaseException, b: BaseException) -> bool:
    return isinstance(a, type(b)) or isinstance(b, type(a))


@dataclasses.dataclass
class Verdict:
    """How one program fared: 'compared' (a gradient or tangent was checked against torch),
    'ran' (propgen ran; nothing to compare), 'refused' (a documented error),
    'same-error' (the error eager Python raises too), 'other-error' (eager Python fails too,
    with another error), or 'eager-hung' (the eager function ran too long: only compiled)."""

    reverse: str = ""
    forward: str = ""


def close(a: Any, b: Any) -> str | None:
    """None when ``a`` (propgen's) equals ``b`` (torch's) to rounding, else the difference."""
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor):
            if b.numel() == 1 and isinstance(a, (int, float)):
                a = torch.tensor(float(a), dtype=b.dtype)
            else:
                return f"expected a tensor of shape {tuple(b.shape)}, got {type(a).__name__}"
        try:
            torch.testing.assert_close(a.reshape(b.shape) if a.numel() == b.numel() else a, b,
                                       rtol=1e-6, atol=1e-8, equal_nan=True,
                                       check_dtype=True)
        except (AssertionError, RuntimeError) as exc:
            return str(exc)
        if a.numel() == b.numel() and a.shape != b.shape and b.numel() != 1:
            return f"shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        return None
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        try:
            av = float(a)
        except (TypeError, ValueError, RuntimeError):
            return f"expected the number {b!r}, got {a!r}"
        if math.isclose(av, float(b), rel_tol=1e-6, abs_tol=1e-8) or (
                math.isnan(av) and math.isnan(float(b))):
            return None
        return f"{av!r} != {b!r}"
    return None


def _finite(values: Any) -> bool:
    if isinstance(values, torch.Tensor):
        return bool(torch.isfinite(values).all()) if values.is_floating_point() else True
    if isinstance(values, (tuple, list)):
        return all(_finite(v) for v in values)
    if isinstance(values, float):
        return math.isfinite(values)
    return True


def _zero_like(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, torch.Tensor):
        return bool((v == 0).all())
    return isinstance(v, (int, float)) and v == 0


class Checker:
    """Runs one program through eager Python and propgen, and judges the outcome.

    ``grad`` and ``autodiff`` are propgen's entry points; the harness's own tests pass broken
    stand-ins to show that each check can fail.
    """

    def __init__(self, workdir: Path, compile_limit: float = 20.0, eager_limit: float = 2.0,
                 grad: Callable = propgen.grad, autodiff: Callable = propgen.autodiff) -> None:
        self.workdir = workdir
        self.compile_limit = compile_limit
        self.eager_limit = eager_limit
        self.grad = grad
        self.autodiff = autodiff

    def fail(self, program: Program, mode: str, problem: str,
             exc: BaseException | None = None) -> FuzzFailure:
        text = f"[{mode}] {problem}\n--- program ---\n{program.describe()}"
        if exc is not None:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            text += f"\n--- innermost propgen frame: {compiler_frame(exc)}\n{tb[-4000:]}"
        return FuzzFailure(text)

    def judge_error(self, program: Program, mode: str, exc: BaseException, eager: Eager,
                    path: Path, nlines: int) -> str:
        """The verdict for an exception propgen raised, or a FuzzFailure."""
        if isinstance(exc, Hang):
            raise self.fail(program, mode, f"hang: {exc}")
        if isinstance(exc, propgen.PropgenError):
            if not names_user_line(exc, path, nlines):
                raise self.fail(program, mode, f"{type(exc).__name__} does not name "
                                f"{path.name}:<line>: {exc}", exc)
            return "refused"
        if in_compiler(exc):
            raise self.fail(program, mode, f"internal {type(exc).__name__} from the compiler: "
                            f"{exc}", exc)
        if eager.error is not None and _same_kind(exc, eager.error):
            return "same-error"
        if (mode == "reverse" and isinstance(exc, ValueError) and "scalar output" in str(exc)
                and not eager.hung and not is_scalar_tensor(eager.result)):
            return "refused"  # documented: propgen.grad needs a scalar output
        if (eager.error is not None and not isinstance(eager.error, NameError)
                and not in_library(exc)):
            # Python fails too, elsewhere: propgen drops statements whose value is never used
            # (and with them an error they would raise), so the first error it meets may be
            # another one, raised by the user's code.  Not so for an unbound local: Python
            # says UnboundLocalError, and a compiled function must not compute on in its place.
            return "other-error"
        eager_said = (f"eager raised {type(eager.error).__name__}: {eager.error}"
                      if eager.error is not None else "eager ran without error")
        raise self.fail(program, mode, f"{type(exc).__name__}: {exc} ({eager_said})", exc)

    def check(self, program: Program) -> Verdict:
        """Judge one program; raises :class:`ImportFailed` or :class:`FuzzFailure`."""
        fn, path = import_program(program, self.workdir)
        try:
            return self._check(program, fn, path)
        finally:
            forget(path)


    def _check(self, program: Program, fn: Callable, path: Path) -> Verdict:
        nlines = len(program.module.splitlines())
        seed = zlib.crc32(program.module.encode())
        eager = run_eager(fn, program, seed, self.eager_limit)
        verdict = Verdict()
        verdict.reverse = self.check_reverse(program, fn, path, nlines, seed, eager)
        verdict.forward = self.check_forward(program, fn, path, nlines, seed, eager)
        return verdict

    def check_reverse(self, program: Program, fn: Callable, path: Path, nlines: int, seed: int,
                      eager: Eager) -> str:
        args, kwargs, _ = make_args(program, seed)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                df = call_with_time_limit(
                    lambda: self.grad(fn, wrt=program.wrt, preserve_result=True),
                    self.compile_limit, "propgen.grad (compilation)")
                if eager.hung:
                    return "eager-hung"
                grads, result = call_with_time_limit(
                    lambda: df(*args, **kwargs), self.compile_limit + 4 * self.eager_limit,
                    "the function propgen.grad returned")
        except (Exception, Hang) as exc:
            return self.judge_error(program, "reverse", exc, eager, path, nlines)
        if eager.error is not None:
            return "ran"  # propgen accepted what Python rejects at run time: nothing to compare
        problem = close(result, eager.result)
        if problem is not None and _finite(eager.result):
            raise self.fail(program, "reverse", f"wrong result: {problem}")
        if eager.grads is None or not _finite(eager.grads) or not _finite(eager.result):
            return "ran"
        got = (grads,) if len(program.wrt) == 1 else grads
        if not isinstance(got, tuple) or len(got) != len(eager.grads):
            raise self.fail(program, "reverse", f"gradients {got!r} do not match wrt "
                            f"{program.wrt}")
        for i, g, e in zip(program.wrt, got, eager.grads):
            problem = close(g, e)
            if problem is not None:
                raise self.fail(program, "reverse", f"wrong gradient of argument {i} "
                                f"(propgen {g!r}, autograd {e!r}): {problem}")
        return "compared"

    def check_forward(self, program: Program, fn: Callable, path: Path, nlines: int, seed: int,
                      eager: Eager) -> str:
        args, kwargs, tangents = make_args(program, seed)
        tans = tangents[0] if len(tangents) == 1 else tuple(tangents)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                jf = call_with_time_limit(
                    lambda: self.autodiff(fn, mode="forward", wrt=program.wrt,
                                          preserve_result=True),
                    self.compile_limit, "propgen.autodiff (compilation)")
                if eager.hung:
                    return "eager-hung"
                tangent, result = call_with_time_limit(
                    lambda: jf(*args, tangents=tans, **kwargs),
                    self.compile_limit + 4 * self.eager_limit,
                    "the function propgen.autodiff returned")
        except (Exception, Hang) as exc:
            return self.judge_error(program, "forward", exc, eager, path, nlines)
        if eager.error is not None:
            return "ran"
        problem = close(result, eager.result)
        if problem is not None and _finite(eager.result):
            raise self.fail(program, "forward", f"wrong result: {problem}")
        if not eager.has_tangent or not _finite(eager.tangent) or not _finite(eager.result):
            return "ran"
        if _zero_like(eager.tangent) and _zero_like(tangent):
            return "compared"
        problem = close(tangent, eager.tangent)
        if problem is not None:
            raise self.fail(program, "forward", f"wrong tangent (propgen {tangent!r}, "
                            f"torch {eager.tangent!r}): {problem}")
        return "compared"


def forget(path: Path) -> None:
    """Drop what a checked program leaves behind in this process: its module, its lines in
    linecache, and propgen's memo of its compilations (keyed by its code objects and file),
    so that a long fuzz run does not grow without bound."""
    sys.modules.pop(path.stem, None)
    linecache.cache.pop(str(path), None)
    memo = getattr(propgen.Registry.default(), "compiled", None)
    if isinstance(memo, dict):
        name = str(path)
        for key in [k for k in memo if isinstance(k, tuple) and name in k]:
            memo.pop(key, None)


def hunt(seconds: float, seed: int = 0, workdir: str | None = None) -> list[str]:
    """Check random and mutated programs for ``seconds`` and return the failure reports (a
    bug hunt outside pytest: ``python -c 'import _fuzz; _fuzz.hunt(300)'`` from tests/)."""
    import tempfile
    import time

    rng = random.Random(seed)
    where = Path(workdir or tempfile.mkdtemp(prefix="propgen-fuzz-"))
    os.environ.setdefault("PROPGEN_CACHE_DIR", str(where / "cache"))
    checker = Checker(where)
    found: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        program = random_program(rng) if rng.random() < 0.5 else mutated_program(rng)
        if program is None:
            continue
        try:
            checker.check(program)
        except ImportFailed:
            continue
        except FuzzFailure as exc:
            found.append(str(exc))
    return found
