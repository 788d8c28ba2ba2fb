"""Stage 3, fence: reject what propgen cannot transform, naming the user's file and line.

Runs on the parsed tree before normalization, so the message quotes the construct as the user
wrote it.  Each entry says what to write instead.
"""

from __future__ import annotations

import gast

from propgen.errors import UnsupportedSyntaxError
from propgen.parse import ParsedFunction

__all__ = ["check"]

_STATEMENTS = {
    gast.AsyncFunctionDef: ("an async function", "use a plain def"),
    gast.ClassDef: (
        "a class definition inside a differentiated function",
        "define the class at module level and call it from the function",
    ),
    gast.Global: ("the global statement", "pass the value in and return the new value"),
    gast.Nonlocal: ("the nonlocal statement", "pass the value in and return the new value"),
    gast.Delete: ("del", "let the name go out of scope, or rebind it"),
    gast.Import: ("import inside a differentiated function", "import at module level"),
    gast.ImportFrom: ("import inside a differentiated function", "import at module level"),
    gast.Try: (
        "try/except",
        "move the try/except outside the differentiated function, or check the condition "
        "with an if",
    ),
    gast.AsyncFor: ("async for", "use a plain for loop"),
    gast.AsyncWith: ("async with", "use plain code"),
    gast.Match: ("the match statement", "use if/elif"),
}

_EXPRESSIONS = {
    gast.Yield: ("a generator (yield)", "return a list or a tensor instead of yielding"),
    gast.YieldFrom: ("a generator (yield from)", "return a list or a tensor instead"),
    gast.Await: ("await", "use plain synchronous code"),
    gast.NamedExpr: ("the walrus operator :=", "assign the value in a statement of its own"),
    gast.SetComp: ("a set comprehension", "use a list comprehension"),
}

if hasattr(gast, "TryStar"):
    _STATEMENTS[gast.TryStar] = _STATEMENTS[gast.Try]


def check(pf: ParsedFunction) -> None:
    """Raise UnsupportedSyntaxError at the first construct propgen cannot transform."""
    fdef = pf.node
    args = fdef.args
    if args.vararg is not None or args.kwarg is not None:
        _fail(
            pf,
            fdef,
            "*args/**kwargs in the signature of a differentiated function",
            "list the parameters explicitly",
        )
    for node in gast.walk(fdef):
        if node is fdef:
            continue
        kind = type(node)
        if kind in _STATEMENTS:
            what, advice = _STATEMENTS[kind]
            _fail(pf, node, what, advice)
        if kind in _EXPRESSIONS:
            what, advice = _EXPRESSIONS[kind]
            _fail(pf, node, what, advice)
        if isinstance(node, (gast.For, gast.While)) and node.orelse:
            _fail(
                pf,
                node,
                f"{'for' if isinstance(node, gast.For) else 'while'}/else",
                "set a flag before break and test it after the loop",
            )
        if isinstance(node, gast.Assign):
            for target in node.targets:
                _check_target(pf, node, target)
        if isinstance(node, (gast.AugAssign, gast.AnnAssign)):
            _check_target(pf, node, node.target)
        if isinstance(node, gast.For):
            _check_target(pf, node, node.target)
        if isinstance(node, gast.Call):
            for a in node.args:
                if isinstance(a, gast.Starred):
                    _fail(pf, node, "a starred argument f(*args)", "pass the arguments one by one")
            for k in node.keywords:
                if k.arg is None:
                    _fail(pf, node, "f(**kwargs)", "pass the keyword arguments one by one")
        if isinstance(node, gast.Lambda) and (node.args.vararg or node.args.kwarg):
            _fail(pf, node, "*args/**kwargs in a lambda", "list the parameters explicitly")
        if isinstance(node, gast.FunctionDef) and (node.args.vararg or node.args.kwarg):
            _fail(pf, node, "*args/**kwargs in a nested def", "list the parameters explicitly")
        if isinstance(node, gast.With):
            if len(node.items) != 1:
                _fail(pf, node, "a with statement with several items", "nest the with blocks")


def _check_target(pf: ParsedFunction, stmt: gast.AST, target: gast.AST) -> None:
    if isinstance(target, (gast.Tuple, gast.List)):
        for elt in target.elts:
            if isinstance(elt, gast.Starred):
                _fail(
                    pf,
                    stmt,
                    "starred assignment (a, *rest = ...)",
                    "index the sequence explicitly: a = seq[0]; rest = seq[1:]",
                )
            _check_target(pf, stmt, elt)
    elif isinstance(target, gast.Attribute):
        _fail(
            pf,
            stmt,
            "assignment to an attribute (obj.attr = ...)",
            "keep the value in a local variable and return it",
        )
    elif isinstance(target, gast.Starred):
        _fail(pf, stmt, "starred assignment", "index the sequence explicitly")


def _fail(pf: ParsedFunction, node: gast.AST, what: str, advice: str) -> None:
    raise UnsupportedSyntaxError(pf.loc(node), what, advice)
