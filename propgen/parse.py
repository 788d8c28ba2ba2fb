"""Stage 1, parse: a Python function object -> its gast tree, source locations and scopes.

Every name is later resolved through the function's own closure cells, globals and builtins
(never through assumed aliases such as ``np`` or ``F``): :class:`Scope` does that.
"""

from __future__ import annotations

import builtins
import inspect
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gast

from propgen.errors import Location, UnresolvedNameError, UnsupportedSyntaxError

__all__ = ["ParsedFunction", "Scope", "parse_function", "MISSING"]

MISSING = object()


class Scope:
    """Resolves the free names of one function: closure cells, then globals, then builtins."""

    def __init__(self, fn: Callable) -> None:
        self.globals: dict = getattr(fn, "__globals__", {})
        code = fn.__code__
        cells = fn.__closure__ or ()
        self.cells: dict[str, types.CellType] = dict(zip(code.co_freevars, cells))

    def lookup(self, name: str) -> Any:
        """The current value of a free name, or MISSING."""
        cell = self.cells.get(name)
        if cell is not None:
            try:
                return cell.cell_contents
            except ValueError:  # an empty cell: the closure variable is not assigned yet
                return MISSING
        if name in self.globals:
            return self.globals[name]
        return getattr(builtins, name, MISSING)

    def resolve(self, name: str, loc: Location | None) -> Any:
        value = self.lookup(name)
        if value is MISSING:
            raise UnresolvedNameError(name, loc)
        return value

    def source_of(self, name: str) -> tuple[str, Any]:
        """Where a free name lives: ('cell', cell), ('global', globals) or ('builtin', None)."""
        if name in self.cells:
            return "cell", self.cells[name]
        if name in self.globals:
            return "global", self.globals
        return "builtin", None


@dataclass
class ParsedFunction:
    """A parsed user function: its gast FunctionDef (line numbers are the real file's)."""

    fn: Callable
    node: gast.FunctionDef
    filename: str
    lines: list[str]  # the whole file's lines, for Location texts
    scope: Scope

    @property
    def name(self) -> str:
        return self.node.name

    def loc(self, node: Any) -> Location:
        lineno = getattr(node, "lineno", None) or self.node.lineno
        text = self.lines[lineno - 1].rstrip("\n") if 0 < lineno <= len(self.lines) else ""
        return Location(self.filename, lineno, text)


def _shift_lines(tree: Any, offset: int) -> None:
    for node in gast.walk(tree):
        for attr in ("lineno", "end_lineno"):
            v = getattr(node, attr, None)
            if isinstance(v, int):
                setattr(node, attr, v + offset)


def parse_function(fn: Callable) -> ParsedFunction:
    """Parse ``fn``'s source.  Raises UnsupportedSyntaxError when there is no source to read."""
    fn = inspect.unwrap(fn)
    if not isinstance(fn, types.FunctionType):
        raise TypeError(
            f"propgen can only transform Python functions, not {type(fn).__name__}; "
            "wrap the call in a def"
        )
    try:
        lines, start = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or fn.__code__.co_filename
    except (OSError, TypeError) as exc:
        raise UnsupportedSyntaxError(
            None,
            f"transforming {fn.__qualname__} (its source code cannot be read: {exc})",
            "define the function in a .py file, or register an adjoint for it with "
            "@propgen.adjoint; propgen treats source-less callees inside a function as opaque",
        ) from None
    try:
        import linecache

        all_lines = linecache.getlines(filename) or lines
    except Exception:  # pragma: no cover - linecache is best effort
        all_lines = lines
    src = textwrap.dedent("".join(lines))
    if fn.__name__ == "<lambda>":
        node = _lambda_node(src, fn, filename, start)
    else:
        try:
            module = gast.parse(src)
        except SyntaxError as exc:  # pragma: no cover - inspect gave a fragment
            raise UnsupportedSyntaxError(
                Location(filename, start, lines[0]),
                f"parsing {fn.__qualname__} ({exc.msg})",
                "define the function with a plain def statement",
            ) from None
        node = module.body[0]
        if not isinstance(node, gast.FunctionDef):
            raise UnsupportedSyntaxError(
                Location(filename, start, lines[0]),
                f"transforming {type(node).__name__} {fn.__qualname__}",
                "propgen transforms plain (non-async) def functions",
            )
        _shift_lines(node, start - 1)
    node.decorator_list = []
    return ParsedFunction(fn, node, filename, all_lines, Scope(fn))


def _lambda_node(src: str, fn: Callable, filename: str, start: int) -> gast.FunctionDef:
    """Find the one lambda in ``src`` that is ``fn`` and turn it into a def."""
    loc = Location(filename, fn.__code__.co_firstlineno, src.splitlines()[0] if src else "")
    try:
        tree = gast.parse(src.strip())
    except SyntaxError:
        tree = None
    found = []
    if tree is not None:
        params = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
        for n in gast.walk(tree):
            if isinstance(n, gast.Lambda) and [a.id for a in n.args.args] == params:
                found.append(n)
    if len(found) != 1:
        raise UnsupportedSyntaxError(
            loc,
            "differentiating a lambda that cannot be singled out in its source line",
            "write the function with def (or put the lambda on a line of its own)",
        )
    lam = found[0]
    _shift_lines(lam, start - 1)
    ret = gast.Return(value=lam.body)
    ret.lineno = lam.lineno
    fdef = gast.FunctionDef(
        name="lambda_fn",
        args=lam.args,
        body=[ret],
        decorator_list=[],
        returns=None,
        type_comment=None,
        type_params=[],
    )
    fdef.lineno = lam.lineno
    return fdef
