"""A small tape-based evaluator of adjoint templates, independent of propgen's compiler.

It runs a function under a ``TorchFunctionMode`` that records every torch call (operators
arrive as ``Tensor.__mul__`` etc. and are mapped back to ``operator.mul``), then walks the tape
backwards and executes each op's template body with ``d`` bound to a gradient table keyed by
object identity.  Like the compiler, it skips ``d[arg] = ...`` statements whose argument
carries no gradient.  It is a second opinion on the templates: Python-level operations the
mode cannot see (indexing a list, the builtin ``sum``) act as the identity here.
"""

from __future__ import annotations

import ast
import inspect
import operator
from typing import Any

import gast
import torch
from torch.overrides import TorchFunctionMode

from propgen.template import NONDIFF, Registry

_DUNDER = {
    "__add__": (operator.add, False),
    "__radd__": (operator.add, True),
    "__sub__": (operator.sub, False),
    "__rsub__": (operator.sub, True),
    "__mul__": (operator.mul, False),
    "__rmul__": (operator.mul, True),
    "__truediv__": (operator.truediv, False),
    "__rtruediv__": (operator.truediv, True),
    "__div__": (operator.truediv, False),
    "__rdiv__": (operator.truediv, True),
    "__pow__": (operator.pow, False),
    "__rpow__": (operator.pow, True),
    "__matmul__": (operator.matmul, False),
    "__rmatmul__": (operator.matmul, True),
    "__mod__": (operator.mod, False),
    "__rmod__": (operator.mod, True),
    "__neg__": (operator.neg, False),
    "__pos__": (operator.pos, False),
    "__abs__": (operator.abs, False),
    "__getitem__": (operator.getitem, False),
}


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.tape: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tape.append((func, args, kwargs, out))
        return out


def _key(func: Any, args: tuple) -> tuple[Any, tuple]:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property read such as x.T
        return "." + func.__self__.__name__, args
    if name in _DUNDER:
        key, swap = _DUNDER[name]
        if swap:
            args = (args[1], args[0])
        return key, args
    return func, args


def _flat(x: Any) -> list:
    if isinstance(x, (list, tuple)):
        return [e for item in x for e in _flat(item)]
    if isinstance(x, dict):
        return _flat(list(x.values()))
    return [x]


class _Grads:
    """The ``d`` of a template run: reads the result's gradient, accumulates by identity."""

    def __init__(self, table: dict, active: set, result: Any, g: Any) -> None:
        self.table, self.active, self.result, self.g = table, active, result, g

    def __getitem__(self, key: Any) -> Any:
        assert key is self.result, "templates may only read d[result]"
        return self.g

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, (list, tuple)):
            assert isinstance(value, (list, tuple)) and len(value) == len(key), value
            for k, v in zip(key, value):
                if v is not None:
                    self[k] = v
            return
        if not (isinstance(key, torch.Tensor) and id(key) in self.active):
            return
        assert isinstance(value, torch.Tensor), f"gradient of a tensor is {type(value)}"
        assert value.shape == key.shape, f"gradient shape {value.shape} != {key.shape}"
        assert value.dtype == key.dtype, f"gradient dtype {value.dtype} != {key.dtype}"
        old = self.table.get(id(key))
        self.table[id(key)] = value if old is None else old + value


def _is_active(value: Any, active: set) -> bool:
    return any(isinstance(e, torch.Tensor) and id(e) in active for e in _flat(value))


_CODE_CACHE: dict = {}


def _run_template(tmpl, bound: dict, grads: _Grads, active: set) -> None:
    keep = []
    for stmt in tmpl.body:
        target = stmt.targets[0] if isinstance(stmt, gast.Assign) else None
        if (
            isinstance(target, gast.Subscript)
            and isinstance(target.value, gast.Name)
            and target.value.id == "d"
            and isinstance(target.slice, gast.Name)
            and not _is_active(bound.get(target.slice.id), active)
        ):
            continue
        keep.append(stmt)
    ck = (tmpl.fn, tuple(id(s) for s in keep))
    code = _CODE_CACHE.get(ck)
    if code is None:
        module = gast.gast_to_ast(gast.Module(body=keep, type_ignores=[]))
        filename = inspect.getsourcefile(tmpl.fn) or "<template>"
        code = compile(ast.fix_missing_locations(module), filename, "exec")
        _CODE_CACHE[ck] = code
    namespace = dict(tmpl.globals)
    namespace.update(bound)
    namespace["d"] = grads
    exec(code, namespace)


def template_grad(f, args: tuple, wrt: tuple, registry: Registry | None = None) -> tuple:
    """Gradients of the scalar ``f(*args)`` w.r.t. ``args[i]`` for i in wrt, via the templates."""
    registry = registry or Registry.default()
    active = {id(args[i]) for i in wrt}
    rec = _Recorder()
    with rec:
        out = f(*args)
    keep_alive = [rec.tape]  # ids stay unique while the tape holds every value
    for _, fargs, fkwargs, res in rec.tape:
        ins = _flat(list(fargs) + list(fkwargs.values()))
        if _is_active(ins, active):
            for o in _flat(res):
                if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex()):
                    active.add(id(o))
    table: dict = {id(out): torch.ones_like(out)}
    for func, fargs, fkwargs, res in reversed(rec.tape):
        outs = _flat(res)
        if any(isinstance(o, torch.Tensor) and o is a for o in outs for a in _flat(fargs)):
            continue  # the op returned its input (x.contiguous()): the gradient is already there
        if isinstance(res, torch.Tensor):
            g = table.get(id(res))
        elif not isinstance(res, (list, tuple)):
            continue  # a Python value (x.item(), x.dtype): no gradient
        else:
            g = [table.get(id(o)) if isinstance(o, torch.Tensor) else None for o in res]
            if all(e is None for e in g):
                g = None
        if g is None:
            continue
        key, fargs = _key(func, fargs)
        tmpl = registry.lookup(key)
        if tmpl == NONDIFF:
            continue
        if tmpl is None:
            raise KeyError(f"no template for {key!r}")
        ba = tmpl.signature.bind(res, *fargs, **fkwargs)
        ba.apply_defaults()
        bound = dict(ba.arguments)
        for name, p in tmpl.signature.parameters.items():
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                bound[name] = tuple(bound.get(name, ()))
        _run_template(tmpl, bound, _Grads(table, active, res, g), active)
    del keep_alive
    result = []
    for i in wrt:
        g = table.get(id(args[i]))
        result.append(torch.zeros_like(args[i]) if g is None else g)
    return tuple(result)


def tape_keys(f, args: tuple) -> set:
    """The registry keys of the torch calls ``f(*args)`` makes (operators as ``operator.*``)."""
    rec = _Recorder()
    with rec:
        f(*args)
    keys = set()
    for func, fargs, _, _ in rec.tape:
        key, _ = _key(func, fargs)
        try:
            keys.add(key)
        except TypeError:
            pass
    return keys
