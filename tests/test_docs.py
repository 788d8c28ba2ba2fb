"""The documentation: its code runs, its links resolve, its recipes work, public names have
docstrings.

Rules for the pages in ``docs/``:

* Every block fenced as ```python in a page of ``RUNNABLE`` runs.
  The blocks of one page are saved, in order and separated by one blank line, as
  ``<page>.py`` in a temporary directory (propgen reads source files, so the code must live in
  a real file), and that file runs as one script with ``runpy``.  Blocks fenced as ``text``,
  ``pycon``, ``bash``... are not run.
* A ``text`` block right after a ``<!-- output -->`` line must appear, as is, in what the
  page's script prints.
* A ``python`` block right after a ``<!-- quote: PATH -->`` line quotes PATH (relative to the
  repository root): each function it defines must be defined the same way there (same
  syntax tree, comments aside).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import io
import os
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import propgen

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE = ["tutorial.md", "templates.md", "debugging.md"]

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)")
_MARK = re.compile(r"^<!--\s*(output|quote:\s*(\S+))\s*-->\s*$")


class Block:
    """One fenced block of a page: its language, first line (1-based), text and marker."""

    def __init__(self, lang: str, line: int, text: str, mark: str | None) -> None:
        self.lang, self.line, self.text, self.mark = lang, line, text, mark


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, with the marker comment just before each."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    prev = ""  # the last non-blank line before a fence
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            if lines[i].strip():
                prev = lines[i].strip()
            i += 1
            continue
        indent, fence, lang = match.groups()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        mark = _MARK.match(prev)
        out.append(Block(lang.lower(), i + 2, "\n".join(body) + "\n",
                         mark.group(1) if mark else None))
        prev = ""
        i = j + 1
    return out


def page_script(page: str) -> tuple[str, list[tuple[int, int]]]:
    """The page's python blocks as one script, and (script line, page line) of each block."""
    parts: list[str] = []
    starts: list[tuple[int, int]] = []
    line = 1
    for b in blocks((DOCS / page).read_text(encoding="utf-8")):
        if b.lang != "python":
            continue
        starts.append((line, b.line))
        parts.append(b.text.rstrip("\n"))
        line += b.text.rstrip("\n").count("\n") + 2  # the block and one blank line
    return "\n\n".join(parts) + "\n", starts


def page_line(starts: list[tuple[int, int]], script_line: int) -> int:
    """The line of the page holding line ``script_line`` of its script."""
    best = starts[0]
    for s in starts:
        if s[0] <= script_line:
            best = s
    return best[1] + script_line - best[0]


def _where(exc: BaseException, script: Path, starts: list) -> str:
    for frame in reversed(list(_frames(exc.__traceback__))):
        if frame[0] == str(script):
            return f"docs/{script.stem}.md:{page_line(starts, frame[1])}"
    return "(not in the page's code)"


def _frames(tb):
    while tb is not None:
        yield tb.tb_frame.f_code.co_filename, tb.tb_lineno
        tb = tb.tb_next


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_code_runs(page, tmp_path):
    code, starts = page_script(page)
    if not starts:
        pytest.skip(f"docs/{page} has no python blocks")
    script = tmp_path / f"{Path(page).stem}.py"
    script.write_text(code, encoding="utf-8")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(script), run_name=f"docs_{script.stem}")
    except Exception as exc:  # name the page line, not only the script line
        raise AssertionError(f"docs/{page}: the code fails at {_where(exc, script, starts)}: "
                             f"{type(exc).__name__}: {exc}") from exc
    printed = out.getvalue()
    for b in blocks((DOCS / page).read_text(encoding="utf-8")):
        if b.mark == "output":
            assert b.text.strip() in printed, (
                f"docs/{page}:{b.line}: this output block is not what the code prints; it "
                f"printed:\n{printed}")


def _functions(source: str) -> dict:
    tree = ast.parse(source)
    return {n.name: ast.dump(n) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_quoted_code_matches_its_source():
    checked = 0
    for page in sorted(DOCS.glob("*.md")):
        for b in blocks(page.read_text(encoding="utf-8")):
            if not (b.mark or "").startswith("quote:"):
                continue
            path = ROOT / b.mark.split(":", 1)[1].strip()
            assert path.is_file(), f"{page.name}:{b.line}: quotes {path}, which does not exist"
            theirs = _functions(path.read_text(encoding="utf-8"))
            for name, dump in _functions(b.text).items():
                assert theirs.get(name) == dump, (
                    f"docs/{page.name}:{b.line}: {name} differs from its definition in "
                    f"{path.relative_to(ROOT)}; quote the current code")
                checked += 1
    assert checked, "no quoted code found: the quote markers were lost"


# ------------------------------------------------------------------------------ links

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _anchors(md: Path) -> set[str]:
    """GitHub's anchors for the headings of a page."""
    out = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            out.add(title.replace(" ", "-"))
    return out


def test_relative_links_resolve():
    pages = sorted(DOCS.glob("*.md")) + [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    bad = []
    for page in pages:
        if not page.exists():
            continue
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # links in code are not links
        for target in _LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # URLs and anchors of the same page
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve()
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "broken relative links:\n  " + "\n  ".join(bad)


def test_every_test_the_guarantees_name_exists():
    """docs/guarantees.md backs each claim with tests: each ``tests/FILE.py::NAME`` it names
    must be a test function (or parametrized test) defined in that file."""
    text = (DOCS / "guarantees.md").read_text(encoding="utf-8")
    named = re.findall(r"`(tests/\w+\.py)::(\w+)`", text)
    assert len(named) >= 20
    def defined(path: str, name: str) -> bool:
        file = ROOT / path
        return file.exists() and re.search(rf"^def {name}\(", file.read_text(encoding="utf-8"),
                                           re.M) is not None

    missing = [f"{path}::{name}" for path, name in named if not defined(path, name)]
    assert not missing, "docs/guarantees.md names tests that do not exist:\n  " + "\n  ".join(
        missing)


def test_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not list {page.name}"


# --------------------------------------------------------------------- debugging recipes

DEBUG_SCRIPT = textwrap.dedent("""\
    import torch
    import propgen


    def loss(x, w, b):
        h = torch.tanh(x @ w + b)
        return ((h - 0.5) ** 2).mean()


    x, w, b = torch.randn(16, 8), torch.randn(8, 4), torch.zeros(4)
    dloss = propgen.grad(loss, wrt=(1, 2))
    dw, db = dloss(x, w, b)
    print("done")
    """)


def _debug_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONBREAKPOINT", None)  # breakpoint() must start pdb
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(args: list[str], commands: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, *args], input="\n".join(commands) + "\n",
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=_debug_env())
    return proc.stdout + proc.stderr


def test_pdb_breakpoint_in_generated_file(tmp_path):
    """docs/debugging.md: ``python -m pdb script.py``, then ``b <generated file>:<line>``."""
    script = tmp_path / "script.py"
    script.write_text(DEBUG_SCRIPT, encoding="utf-8")
    # the generated file's path is a hash of its text: compiling the same script here gives
    # the file the debugged process will run
    ns = runpy.run_path(str(script), run_name="not_main")
    path = Path(ns["dloss"].path)
    lines = path.read_text(encoding="utf-8").splitlines()
    line = next(i for i, t in enumerate(lines, 1) if t.strip().startswith("d_w = "))
    out = _run(["-m", "pdb", str(script)],
               [f"b {path}:{line}", "c", "p d_h_matmul.shape", "q"], tmp_path)
    assert f"{path}({line})loss_backward()" in out, out
    assert "torch.Size([16, 4])" in out, out


STOP_SCRIPT = textwrap.dedent("""\
    import torch
    import propgen


    def loss(x, w):
        h = torch.tanh(x @ w)
        with propgen.insert_grad_of(h) as dh:
            breakpoint()
        return (h ** 2).sum()


    x, w = torch.randn(16, 8), torch.randn(8, 4)
    dloss = propgen.grad(loss, wrt=1)
    breakpoint()
    dw = dloss(x, w)
    print("done")
    """)


def test_breakpoint_then_break_on_generated_function(tmp_path):
    """docs/debugging.md: ``breakpoint()`` before the call, then ``b dloss.backward``; and
    ``breakpoint()`` inside ``with propgen.insert_grad_of(h) as dh:`` stops in the backward."""
    script = tmp_path / "script.py"
    script.write_text(STOP_SCRIPT, encoding="utf-8")
    out = _run([str(script)], ["b dloss.backward", "c", "p 'seed', d_result_sum", "c",
                               "p 'grad of h', dh.shape", "c"], tmp_path)
    assert "loss_backward()" in out, out
    assert "('seed', tensor(1.))" in out, out
    assert "('grad of h', torch.Size([16, 4]))" in out, out
    assert "done" in out, out


# ------------------------------------------------------------------------------ CLI

def _has_cli() -> bool:
    return importlib.util.find_spec("propgen.cli") is not None


@pytest.mark.skipif(not _has_cli(), reason="propgen.cli is not there yet")
def test_show_prints_generated_code(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(DEBUG_SCRIPT, encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "propgen", "show", f"{script}:loss"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "def loss_backward(" in out.stdout, out.stdout


# ------------------------------------------------------------------------ docstrings

def _public_members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties that ``cls`` or a propgen base class defines."""
    out = []
    seen = set()
    for klass in cls.__mro__:
        if not (klass.__module__ or "").startswith("propgen"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property) or inspect.isfunction(value):
                seen.add(name)
                out.append((name, klass))
    return out


def _documented(cls: type, name: str) -> bool:
    """Whether ``name`` has a docstring where ``cls`` or one of its propgen bases defines it
    (an override may rely on the docstring of the method it overrides)."""
    for klass in cls.__mro__:
        if not (klass.__module__ or "").startswith("propgen") or name not in vars(klass):
            continue
        value = vars(klass)[name]
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        if (getattr(value, "__doc__", None) or "").strip():
            return True
    return False


def _returned_classes() -> list[type]:
    """Classes of objects the public functions hand out (a gradient function, ...)."""
    from propgen.api import GradFunction
    from propgen.manager import PropagatedFunction

    return [GradFunction, PropagatedFunction]


def test_public_names_have_docstrings():
    missing = []
    classes = []
    for name in propgen.__all__:
        obj = getattr(propgen, name)
        kind = obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj)
        if not (kind.__doc__ or "").strip():
            missing.append(f"propgen.{name}")
        if inspect.isclass(obj):
            classes.append(obj)
    for cls in classes + _returned_classes():
        for attr, owner in _public_members(cls):
            if not _documented(cls, attr):
                missing.append(f"{owner.__module__}.{owner.__qualname__}.{attr}")
    missing = sorted(set(missing))
    assert not missing, "public names without a docstring:\n  " + "\n  ".join(missing)
