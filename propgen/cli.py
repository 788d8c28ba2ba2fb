"""propgen's command line: ``python -m propgen show`` and ``python -m propgen doctor``.

``show`` prints the code propgen generates for one function of a file, without running the
file's program (its ``if __name__ == "__main__":`` block)::

    python -m propgen show examples/chaotic_rnn.py:rollout --propagator TP
    python -m propgen show examples/gaussian_shaping.py:multipath --propagator LR \\
        --local shape=GSLoss --const horizon
    python -m propgen show model.py:loss --wrt w,b          # propgen.grad(loss, wrt=...)
    python -m propgen show model.py:loss --mode forward     # propgen.autodiff(mode="forward")
    python -m propgen show model.py:Net --wrt x             # Net.forward, wrt counts its args

For a ``@propgen.propagate`` function, ``show`` builds a :class:`~propgen.PropagationManager`
from ``--propagator`` (and ``--local`` for call sites with ``local_propagator=NAME``) and
compiles the function for placeholder arguments: the manager for the manager parameter, a
parameter's default where it has one, ``torch.zeros(1)`` for ``--const`` parameters and
``torch.zeros(1, requires_grad=True)`` (a differentiable input) for the others.  For an
ordinary function it prints ``propgen.source(propgen.grad(fn, wrt=...))``.

``doctor`` prints versions, the cache directory, the devices, and runs a few end-to-end
checks (reverse and forward mode against torch, a propagated function, the generated file on
disk); it exits 0 when every check passes, 1 otherwise.

Exit status: 0 on success, 1 when a doctor check fails, 2 for a usage error or a program
propgen cannot compile (the message names the file; no traceback unless ``--traceback``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import propgen
from propgen.doctor import doctor
from propgen.errors import ConfigurationError, PropgenError
from propgen.errors import one_line as _one_line
from propgen.manager import PropagatedFunction

__all__ = [
    "main",
    "build_parser",
    "show_source",
    "doctor",
    "propagator_names",
    "make_propagator",
    "CLIError",
]

_PLACEHOLDER_NOISE = {"loc": 0.0, "scale": 1.0}

# short names of the usual propagators; every other propagator class is known by its class
# name, and by that name without the ``Prop`` suffix (case-insensitive)
_ALIASES = {
    "bp": "BackPropagator",
    "backprop": "BackPropagator",
    "rp": "RPProp",
    "lr": "LRProp",
    "tp": "TotalProp",
    "gs": "GSProp",
    "resample": "ResampleProp",
    "identity": "Propagator",
}


class CLIError(Exception):
    """A usage error: the command line or the named file does not fit.  Exit status 2."""


# --------------------------------------------------------------------------------------------
# propagators by name
# --------------------------------------------------------------------------------------------


def _propagator_classes() -> dict[str, type]:
    """Propagator classes constructible without arguments, by lower-case name and alias."""
    found: dict[str, type] = {}
    for name in dir(propgen):
        cls = getattr(propgen, name)
        if not (inspect.isclass(cls) and issubclass(cls, propgen.Propagator)):
            continue
        params = inspect.signature(cls).parameters.values()
        if any(p.kind is p.VAR_POSITIONAL or (p.default is p.empty and p.kind is not p.VAR_KEYWORD)
               for p in params):
            continue  # needs arguments (SumProp) or members (ComboProp, ChainProp)
        found[name.lower()] = cls
        short = name.lower().removesuffix("prop")
        if short and short != name.lower():
            found.setdefault(short, cls)
    for alias, target in _ALIASES.items():
        cls = getattr(propgen, target, None)
        if cls is not None:
            found[alias] = cls
    return found


def propagator_names() -> list[str]:
    """The names ``--propagator`` and ``--local`` accept: the short aliases, then the classes."""
    classes = _propagator_classes()
    short = [a.upper() if len(a) <= 2 else a for a in _ALIASES if a in classes]
    full = sorted({cls.__name__ for cls in classes.values()})
    return short + full


def make_propagator(name: str) -> propgen.Propagator:
    """The propagator ``name`` selects (case-insensitive: ``BP``/``backprop``, ``RP``, ``LR``,
    ``TP``, ``GS``, ``Resample``, ``identity``, or any propagator class name).

    Noise-adding propagators get ``dist_class=torch.distributions.Normal`` and
    ``dist_params={"loc": 0.0, "scale": 1.0}``: the generated code reads these values at run
    time, so they do not change its structure.
    """
    cls = _propagator_classes().get(name.strip().lower())
    if cls is None:
        raise CLIError(f"unknown propagator {name!r}; choose from {', '.join(propagator_names())}")
    defaults: dict[str, Any] = {}
    if "dist_class" in cls.keywords:
        defaults["dist_class"] = torch.distributions.Normal
    if "dist_params" in cls.keywords:
        defaults["dist_params"] = dict(_PLACEHOLDER_NOISE)
    return cls(**defaults)


# --------------------------------------------------------------------------------------------
# show
# --------------------------------------------------------------------------------------------


@dataclass
class _Target:
    """What ``FILE.py:NAME`` names: the object, the file, and how to differentiate it."""

    path: Path
    qualname: str
    obj: Any
    skip_self: bool = False  # an unbound method: ``self`` is not counted by --wrt

    @property
    def where(self) -> str:
        return f"{self.path}:{self.qualname}"


def _split_target(spec: str) -> tuple[Path, str]:
    path_text, sep, qualname = spec.rpartition(":")
    if not sep or not path_text:
        raise CLIError(f"{spec}: name a function as FILE.py:FUNCTION (or FILE.py:Class.method)")
    path = Path(path_text)
    if not qualname or not all(p.isidentifier() for p in qualname.split(".")):
        raise CLIError(f"{path}: {qualname!r} is not a function name; write "
                       f"{path_text}:FUNCTION or {path_text}:Class.method")
    if path.suffix != ".py":
        raise CLIError(f"{path}: not a Python file (.py); show reads a function from a .py file, "
                       "as in FILE.py:FUNCTION")
    if not path.is_file():
        raise CLIError(f"{path}: no such file; give the path of a Python file, as in "
                       "FILE.py:FUNCTION")
    return path, qualname


@contextlib.contextmanager
def _imported(path: Path) -> Iterator[Any]:
    """Import ``path`` as a module named other than ``__main__`` (its ``if __name__ ==
    "__main__"`` block does not run), its directory first on ``sys.path`` for sibling imports;
    ``sys.path`` and ``sys.modules`` are restored afterwards."""
    path = path.resolve()
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_propgen_show_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
        raise CLIError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    saved_path = list(sys.path)
    sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        try:
            spec.loader.exec_module(module)
        except PropgenError:
            raise
        except SyntaxError as e:
            line = f":{e.lineno}" if e.lineno else ""
            raise CLIError(f"{e.filename or path}{line}: syntax error in the file: {e.msg}; fix "
                           "it (python -m py_compile shows it)") from None
        except Exception as e:  # noqa: BLE001 - any error of the user's top-level code
            raise CLIError(f"{path}: importing the file raised {type(e).__name__}: "
                           f"{_one_line(e)}; show runs the file's top-level code (not its "
                           "__main__ block), so make it importable") from None
        except SystemExit as e:
            raise CLIError(f"{path}: importing the file called exit({e.code}); move the "
                           "program into an if __name__ == \"__main__\": block") from None
        yield module
    finally:
        sys.path[:] = saved_path
        sys.modules.pop(name, None)


def _defined_names(module: Any) -> list[str]:
    out = []
    for k, v in vars(module).items():
        if k.startswith("_"):
            continue
        if getattr(v, "__module__", None) == module.__name__ or (
                isinstance(v, PropagatedFunction)
                and v.fn.__module__ == module.__name__):
            out.append(k)
    return out


def _resolve(module: Any, path: Path, qualname: str) -> _Target:
    obj: Any = module
    owner: Any = None
    parts = qualname.split(".")
    for i, part in enumerate(parts):
        try:
            raw = inspect.getattr_static(obj, part)
        except AttributeError:
            where = ".".join(parts[:i]) or "the file"
            names = _defined_names(module) if obj is module else [
                k for k in vars(obj) if not k.startswith("__")]
            known = f"; it defines: {', '.join(names[:12])}" if names else ""
            raise CLIError(f"{path}: no {part!r} in {where}{known}") from None
        owner = obj
        obj = getattr(obj, part)
        if i < len(parts) - 1 and not inspect.isclass(obj):
            raise CLIError(f"{path}: {'.'.join(parts[:i + 1])} is not a class, so "
                           f"{qualname} names nothing; write FILE.py:Class.method")
    skip_self = (inspect.isclass(owner) and inspect.isfunction(obj)
                 and not isinstance(raw, staticmethod))
    return _Target(path, qualname, obj, skip_self)


def _parse_wrt(target: _Target, params: list[str], wrt: str | None) -> tuple[int, ...]:
    if wrt is None:
        return (0,)
    out = []
    for item in (s.strip() for s in wrt.split(",")):
        if re.fullmatch(r"-?\d+", item):
            i = int(item)
            if not -len(params) <= i < len(params):
                raise CLIError(f"{target.where}: --wrt index {i} is out of range: the "
                               f"parameters are {', '.join(params) or 'none'}")
            out.append(i % len(params))
        elif item in params:
            out.append(params.index(item))
        else:
            raise CLIError(f"{target.where}: --wrt {item!r} is not a parameter; the parameters "
                           f"are {', '.join(params) or 'none'} (names or 0-based indices)")
    return tuple(out)


def _manager_parameter(fn: Callable) -> str | None:
    """Which parameter of a propagated function receives the manager.

    The parameter named ``manager``; else one annotated with a PropagationManager (class or
    string annotation); else none when the function reads a PropagationManager from its
    globals; else the first parameter."""
    sig = inspect.signature(fn)
    if "manager" in sig.parameters:
        return "manager"
    for name, p in sig.parameters.items():
        ann = p.annotation
        if inspect.isclass(ann) and issubclass(ann, propgen.PropagationManager):
            return name
        if isinstance(ann, str) and "Manager" in ann:
            return name
    if _global_managers(fn):
        return None
    return next(iter(sig.parameters), None)


def _global_managers(fn: Callable) -> list[str]:
    g = fn.__globals__
    return [n for n in fn.__code__.co_names
            if isinstance(g.get(n), propgen.PropagationManager)]


def _propagated_source(target: _Target, propagator: str | None, local: Sequence[str],
                       const: Sequence[str], check_nan: bool) -> str:
    pf = target.obj
    fn = pf.fn
    manager = propgen.PropagationManager(make_propagator(propagator or "BP"),
                                         check_nan=check_nan)
    for item in local:
        name, sep, prop = item.partition("=")
        if not sep or not name.strip() or not prop.strip():
            raise CLIError(f"{target.where}: --local takes NAME=PROPAGATOR (the name a call "
                           f"site passes as local_propagator=NAME), not {item!r}")
        manager.add_propagator(name.strip(), make_propagator(prop))
    params = list(pf.params)
    unknown = [c for c in const if c not in params]
    if unknown:
        raise CLIError(f"{target.where}: --const {', '.join(unknown)}: no such parameter; the "
                       f"parameters are {', '.join(params)}")
    manager_param = _manager_parameter(fn)
    values: list[Any] = []
    for name, p in pf.signature.parameters.items():
        if name == manager_param:
            values.append(manager)
        elif name in const:
            values.append(torch.zeros(1))
        elif p.default is not p.empty:
            values.append(p.default)
        else:
            values.append(torch.zeros(1, requires_grad=True))
    swapped = {} if manager_param is not None else {n: fn.__globals__[n]
                                                     for n in _global_managers(fn)}
    try:
        fn.__globals__.update(dict.fromkeys(swapped, manager))  # compile with this manager
        loaded, _ = pf._loaded(values, manager)
    except ConfigurationError as e:
        if "local_propagator=" in str(e):
            raise ConfigurationError(None, str(e), "(python -m propgen show: register it with "
                                     "--local NAME=PROPAGATOR)") from None
        raise
    finally:
        fn.__globals__.update(swapped)
    return loaded.compiled.source


def _plain_source(target: _Target, wrt: str | None, mode: str) -> str:
    obj = target.obj
    if hasattr(obj, "__propgen_function__") and hasattr(obj, "source") and wrt is None \
            and mode == "reverse":
        return propgen.source(obj)  # made by propgen already (a propgen.grad function)
    skip_self = target.skip_self
    fn = obj
    if inspect.isclass(obj):
        if not issubclass(obj, torch.nn.Module):
            raise CLIError(f"{target.path}: {target.qualname} is a class; name one of its "
                           f"methods, as in {target.path}:{target.qualname}.method")
        fn, skip_self = obj.forward, True
    elif not callable(obj):
        raise CLIError(f"{target.path}: {target.qualname} is not a function "
                       f"({type(obj).__name__} object); name a function, a method "
                       "(Class.method) or an nn.Module subclass")
    call = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = list(inspect.signature(call).parameters)
    except (TypeError, ValueError):
        raise CLIError(f"{target.path}: {target.qualname} has no Python signature; name a "
                       "function written in Python") from None
    if skip_self:
        params = params[1:]
    idx = _parse_wrt(target, params, wrt)
    if skip_self:
        idx = tuple(i + 1 for i in idx)
    if getattr(inspect.unwrap(call), "__code__", None) is None:
        raise CLIError(f"{target.path}: {target.qualname} is not a Python function "
                       f"({type(obj).__name__} object); propgen reads a function's source")
    if mode == "forward":
        return propgen.source(propgen.autodiff(fn, mode="forward", wrt=idx))
    return propgen.source(propgen.grad(fn, wrt=idx))


def show_source(target: str, propagator: str | None = None, local: Sequence[str] = (),
                const: Sequence[str] = (), wrt: str | None = None, mode: str = "reverse",
                check_nan: bool = False) -> str:
    """The code propgen generates for ``target`` (``"FILE.py:FUNCTION"``), as ``show`` prints
    it.

    For a ``@propgen.propagate`` function: the code for a manager whose default propagator
    is ``propagator`` (default backprop), with ``local`` (``"NAME=PROPAGATOR"`` items)
    registered, compiled for placeholder arguments (``const`` names non-differentiable ones).
    For an ordinary function: ``propgen.grad(fn, wrt=...)``'s code, or with
    ``mode="forward"`` ``propgen.autodiff(fn, mode="forward", wrt=...)``'s; ``wrt`` is a
    comma-separated list of parameter names or indices (default: the first parameter).

    Raises :class:`CLIError` for what does not fit and propgen's own errors for the program.
    """
    if mode not in ("reverse", "forward"):
        raise CLIError(f"{target}: --mode must be reverse or forward, not {mode!r}")
    for name in ([propagator] if propagator else []) + [s.partition("=")[2] for s in local
                                                        if "=" in s]:
        if name.strip().lower() not in _propagator_classes():
            raise CLIError(f"{target}: unknown propagator {name!r}; choose from "
                           f"{', '.join(propagator_names())}")
    path, qualname = _split_target(target)
    with _imported(path) as module:
        t = _resolve(module, path, qualname)
        if isinstance(t.obj, PropagatedFunction):
            if wrt is not None:
                raise CLIError(f"{t.where}: --wrt applies to ordinary functions; in a "
                               "@propgen.propagate function every tensor argument that "
                               "requires grad is differentiated (use --const NAME to make "
                               "one constant)")
            if mode != "reverse":
                raise CLIError(f"{t.where}: --mode forward applies to ordinary functions, "
                               "not to @propgen.propagate functions")
            return _propagated_source(t, propagator, local, const, check_nan)
        for flag, given in (("--propagator", propagator), ("--local", local),
                            ("--const", const), ("--check-nan", check_nan)):
            if given:
                raise CLIError(f"{t.where}: {flag} applies to @propgen.propagate functions; "
                               f"{qualname} is an ordinary function (use --wrt and --mode)")
        return _plain_source(t, wrt, mode)


_SHOW_EPILOG = """\
examples:
  python -m propgen show examples/chaotic_rnn.py:rollout --propagator TP
  python -m propgen show examples/chaotic_rnn.py:rollout --propagator LR --const horizon
  python -m propgen show examples/gaussian_shaping.py:multipath --propagator LR \\
      --local shape=GSLoss
  python -m propgen show model.py:loss --wrt w,b
  python -m propgen show model.py:loss --wrt 0 --mode forward
  python -m propgen show model.py:Net --wrt x        (an nn.Module subclass: Net.forward)

@propgen.propagate functions are compiled for placeholder arguments, without running the
file's program: the manager goes to the parameter named "manager", else to one annotated
with PropagationManager, else (when the function reads a manager from a global) to none,
else to the first parameter; a parameter with a default gets its default; one named by
--const gets torch.zeros(1); every other parameter gets torch.zeros(1, requires_grad=True),
a differentiable input (so an integer parameter such as a loop count reads best as --const).

propagators (case-insensitive): {names}
"""

_EPILOG = """\
examples:
  python -m propgen show examples/chaotic_rnn.py:rollout --propagator TP
  python -m propgen show model.py:loss --wrt w,b
  python -m propgen doctor

Run "python -m propgen show --help" for the options of show.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m propgen``."""
    parser = argparse.ArgumentParser(
        prog="python -m propgen",
        description="propgen's command line: print generated code, check the installation.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the Python traceback (for reporting a bug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    show = sub.add_parser(
        "show", help="print the code propgen generates for a function",
        description="Print the code propgen generates for FILE.py:FUNCTION, for one "
                    "configuration,\nwithout running the file's __main__ block.",
        epilog=_SHOW_EPILOG.format(names=", ".join(propagator_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("target", metavar="FILE.py:FUNCTION",
                      help="the file and the function (FILE.py:Class.method for a method)")
    show.add_argument("--propagator", "-p", metavar="PROP",
                      help="default propagator of a @propgen.propagate function "
                           "(default: BP, backprop)")
    show.add_argument("--local", "-l", action="append", default=[], metavar="NAME=PROP",
                      help="register PROP for call sites with local_propagator=NAME "
                           "(repeatable)")
    show.add_argument("--const", "-c", action="append", default=[], metavar="NAME",
                      help="make parameter NAME a non-differentiable placeholder "
                           "(repeatable; comma-separated names are split)")
    show.add_argument("--check-nan", action="store_true",
                      help="compile the NaN/inf checks of PropagationManager(check_nan=True)")
    show.add_argument("--wrt", "-w", metavar="ARGS",
                      help="ordinary functions: parameters to differentiate, names or 0-based "
                           "indices, comma-separated (default: 0)")
    show.add_argument("--mode", "-m", choices=("reverse", "forward"), default="reverse",
                      help="ordinary functions: reverse (propgen.grad, the default) or forward "
                           "(propgen.autodiff(mode='forward'))")
    show.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                      help="on an error, show the Python traceback")
    sub.add_parser(
        "doctor", help="print versions, cache directory and devices; run self-checks",
        description="Print the versions of Python, propgen, torch, gast, astor and numpy, the "
                    "cache directory\nand the devices, then run end-to-end checks. Exit status "
                    "0 when every check passes,\n1 otherwise.",
        epilog="example:\n  python -m propgen doctor",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m propgen`` with ``argv`` (default ``sys.argv[1:]``); return the exit
    status: 0 success, 1 a doctor check failed, 2 a usage error or an uncompilable program."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a malformed command line (2)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "doctor":
        return doctor()
    try:
        const = [c.strip() for item in args.const for c in item.split(",") if c.strip()]
        text = show_source(args.target, args.propagator, args.local, const, args.wrt,
                           args.mode, args.check_nan)
    except CLIError as e:
        if args.traceback:
            raise
        print(f"propgen show: error: {e}", file=sys.stderr)
        return 2
    except PropgenError as e:  # names the user's file and line already
        if args.traceback:
            raise
        print(str(e), file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line instead of the compiler's traceback
        if args.traceback:
            raise
        print(f"propgen show: error: {args.target}: propgen could not compile it: "
              f"{type(e).__name__}: {_one_line(e)} (--traceback shows where)", file=sys.stderr)
        return 2
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
