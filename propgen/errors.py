"""Errors propgen raises for a user's program, each naming the user's file and line."""

from __future__ import annotations

__all__ = [
    "Location", "UnsupportedSyntaxError", "UnresolvedNameError", "PropgenError",
    "ConfigurationError", "one_line",
]


class Location:
    """A place in the user's source: file, line and the text of that line."""

    __slots__ = ("filename", "lineno", "text")

    def __init__(self, filename: str, lineno: int, text: str) -> None:
        self.filename = filename
        self.lineno = lineno
        self.text = text

    @property
    def short(self) -> str:
        import os

        return f"{os.path.basename(self.filename)}:{self.lineno}"

    def __repr__(self) -> str:
        return f"Location({self.short!r}, {self.text!r})"


class PropgenError(Exception):
    """Base class of the errors about a user's program."""


class UnsupportedSyntaxError(SyntaxError, PropgenError):
    """A construct propgen cannot transform.  The message says what to write instead."""

    def __init__(self, loc: Location | None, construct: str, advice: str) -> None:
        where = f"{loc.short}: " if loc else ""
        code = f"\n    {loc.text.strip()}" if loc and loc.text else ""
        msg = f"{where}{construct} is not supported by propgen{code}\n  {advice}"
        super().__init__(msg)
        if loc is not None:
            self.filename = loc.filename
            self.lineno = loc.lineno
            self.text = loc.text
        self.construct = construct
        self.advice = advice

    def __str__(self) -> str:
        return self.msg


class UnresolvedNameError(NameError, PropgenError):
    """A name in the user's function that is neither local, global, a closure cell nor builtin."""

    def __init__(self, name: str, loc: Location | None) -> None:
        where = f"{loc.short}: " if loc else ""
        super().__init__(
            f"{where}name {name!r} is not defined (not a local, global, closure variable or "
            f"builtin of the function); define it before calling propgen.grad"
        )
        self.name = name


class ConfigurationError(ValueError, PropgenError):
    """A call site and the manager's configuration do not fit (an unknown keyword, an
    unregistered propagator name, a target that reaches no node)."""

    def __init__(self, loc: Location | None, problem: str, advice: str) -> None:
        where = f"{loc.short}: " if loc else ""
        code = f"\n    {loc.text.strip()}" if loc and loc.text else ""
        super().__init__(f"{where}{problem}{code}\n  {advice}")
        self.location = loc


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
