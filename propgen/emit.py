"""Stage 7, emit: gast FunctionDefs -> Python source text, with provenance comments.

astor prints ASTs without comments, so a comment travels as a string-literal statement with
a marker prefix and is turned into a ``#`` line after printing.
"""

from __future__ import annotations

import ast

import astor
import gast

from propgen.transform import Comment

__all__ = ["emit_module"]

_MARK = "__propgen_comment__ "


def _lower_comments(node: gast.AST) -> gast.AST:
    for parent in gast.walk(node):
        for attr in ("body", "orelse"):
            block = getattr(parent, attr, None)
            if not isinstance(block, list):
                continue
            if block and all(isinstance(s, Comment) for s in block):
                # what the comments announced was optimized away: an ``else`` goes, another
                # block keeps its comments over a ``pass``
                block = [] if attr == "orelse" else block + [gast.Pass()]
            setattr(parent, attr, [
                gast.Expr(value=gast.Constant(value=_MARK + s.text, kind=None))
                if isinstance(s, Comment) else s
                for s in block
            ])
    return node


def _restore_comments(src: str) -> str:
    out = []
    for line in src.splitlines():
        stripped = line.strip()
        if stripped[:1] in "'\"" and _MARK in stripped:
            try:
                text = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                out.append(line)
                continue
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# {text[len(_MARK):]}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def emit_module(functions: list[gast.FunctionDef], header: list[str]) -> str:
    """Print the generated functions as one module's source (deterministic text)."""
    module = gast.Module(body=[_lower_comments(f) for f in functions], type_ignores=[])
    tree = gast.gast_to_ast(module)
    ast.fix_missing_locations(tree)
    body = astor.to_source(tree, indent_with="    ")
    lines = [f"# {h}" if h else "#" for h in header]
    return "\n".join(lines) + "\n\n" + _restore_comments(body).replace("\n\n\ndef", "\n\n\ndef")
