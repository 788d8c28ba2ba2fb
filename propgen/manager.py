"""Automatic propagation: ``@propgen.propagate`` and :class:`PropagationManager`.

The program code calls ``manager.forward(x, ...)`` where something special should happen;
the configuration code chooses the propagators.  Calling a decorated function runs code
generated for the manager's configuration (each call site's propagator inlined) and records
what it saved on the manager's tape; ``manager.backward(loss)`` appends the loss node and
runs the generated backward passes, newest first, passing gradients and messages between
them.  Gradients land in ``.grad`` of the leaf tensors used, as with ``loss.backward()``.
"""

from __future__ import annotations

import inspect
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from propgen.api import _cached, _leaf_signature, _Loaded, compile_reverse
from propgen.distributed import World, leaves_of, reduce_leaf_grads, resolve_world
from propgen.propagators import BackPropagator, LossProp, Propagator
from propgen.template import Registry
from propgen.templates.estimators import mean_gradient

__all__ = ["PropagationManager", "propagate", "PropagatedFunction"]


class PropagationManager:
    """The configuration of a propagation algorithm and the tape of the current forward pass.

    ``default_propagator`` serves every call site that names no other; ``add_propagator(name,
    p)`` registers one that a call site selects with ``local_propagator=name``;
    ``loss_propagator`` is the loss node ``backward`` appends (by default the one the default
    propagator asks for: LR needs no loss gradient, RP and TP do); ``terminal_propagator``
    handles what remains after the last node (``None`` drops gradients a node with
    ``backprop=False`` leaves unsent).  ``check_nan=True`` compiles checks that raise, naming
    the node's call site, when a node's output, the gradient it sends or its messages hold a
    NaN or inf (off by default: it costs a device synchronization per node).

    ``process_group`` spans the propagation over processes (see :mod:`propgen.distributed`):
    ``"auto"`` (the default) is torch.distributed's default group once one is initialized,
    ``None`` keeps each process on its own, or pass a group.  Over N processes the batch
    statistics (baselines, TotalProp's variances, Gaussian shaping's fits, the batch size of
    the mean) are all-reduced and ``backward`` sums the leaf gradients, so N processes with
    B/N samples each compute the estimate of one process with B samples; a scalar loss counts
    1/N in each process, as DDP averages.  ``shard_noise=True`` draws every node's noise for
    the whole batch in every process (seeded alike) and keeps the process's rows: the same
    estimate, to rounding, whatever the number of processes.
    """

    def __init__(self, default_propagator: Propagator | None = None,
                 loss_propagator: LossProp | None = None,
                 terminal_propagator: Propagator | None | str = "backprop",
                 check_nan: bool = False, process_group: Any = "auto",
                 shard_noise: bool = False) -> None:
        if terminal_propagator == "backprop":
            terminal_propagator = BackPropagator()
        if default_propagator is None:
            default_propagator = BackPropagator()
        for what, p in (("default_propagator", default_propagator),
                        ("terminal_propagator", terminal_propagator)):
            if p is not None and not isinstance(p, Propagator):
                raise TypeError(f"{what} must be a propgen propagator, not {p!r}")
        if loss_propagator is not None and not isinstance(loss_propagator, LossProp):
            raise TypeError(f"loss_propagator must be a propgen.LossProp, not {loss_propagator!r}")
        self.default_propagator = default_propagator
        self.loss_propagator = loss_propagator
        self.terminal_propagator = terminal_propagator
        self.check_nan = bool(check_nan)
        self.process_group = process_group
        self.shard_noise = bool(shard_noise)
        self.propagators: dict[str, Propagator] = {}
        self._tape: list[_Record] = []
        self._recorder: int | None = None  # the thread whose forward passes fill the tape

    def add_propagator(self, name: str, propagator: Propagator) -> None:
        """Register ``propagator`` under ``name`` for ``manager.forward(x,
        local_propagator=name)``."""
        if not isinstance(propagator, Propagator):
            raise TypeError(f"add_propagator({name!r}, ...) needs a propgen propagator, not "
                            f"{propagator!r}")
        self.propagators[name] = propagator

    def structure(self) -> tuple:
        """What generated code depends on (propagator classes and options, not values)."""
        return (self.default_propagator.structure(),
                tuple((k, p.structure()) for k, p in sorted(self.propagators.items())),
                self.terminal_propagator is None, self.check_nan,
                self.loss_propagator.structure() if self.loss_propagator else None)

    def world(self) -> World:
        """The processes this manager's propagation spans now (``process_group`` resolved)."""
        return resolve_world(self.process_group, self.shard_noise)

    def forward(self, x: Any, **kwargs: Any) -> Any:
        """Only meaningful inside a function decorated with ``@propgen.propagate``."""
        frame = sys._getframe(1)
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        raise RuntimeError(
            f"{where}: manager.forward(...) was called outside a function decorated with "
            "@propgen.propagate; propgen compiles the call sites of such functions (decorate "
            "the function that calls manager.forward)")

    def clear(self) -> None:
        """Drop what the forward passes since the last backward recorded (and their memory)."""
        self._tape = []

    def _record(self, record: _Record) -> None:
        # a tape holds one forward pass; two threads appending to it would interleave their
        # nodes into one backward, so that is refused rather than silently mixed
        me = threading.get_ident()
        if self._tape and self._recorder != me:
            raise RuntimeError(
                "this PropagationManager is recording a forward pass in another thread: a "
                "manager's tape holds one forward pass at a time; give each thread its own "
                "PropagationManager (managers are independent of one another)")
        self._recorder = me
        self._tape.append(record)

    @property
    def nodes(self) -> int:
        """How many decorated-function calls are recorded since the last backward."""
        return len(self._tape)

    def backward(self, loss: Any = None) -> dict:
        """Append the loss node and run the recorded backward passes, newest first.

        A per-sample ``loss`` of shape (B,) or (B, 1) is differentiated as its mean, a scalar
        as itself; it is also sent to the nodes as the ``local_loss`` message.  Returns the
        messages left after the first node.  The tape is freed, also when this raises.
        """
        tape, self._tape = self._tape, []
        if not tape:
            raise RuntimeError(
                "manager.backward() with nothing recorded: call the @propgen.propagate "
                "function first (each forward can be backpropagated once)")
        try:
            return self._propagate(tape, loss)
        finally:
            # an exception's traceback keeps this frame's locals alive (post-mortem debugging
            # keeps the failing node's frame); the other records are let go now
            tape.clear()

    def _propagate(self, tape: list, loss: Any) -> dict:
        lossprop = self.loss_propagator or self.default_propagator.loss_propagator()
        world = self.world()
        if world.size == 1:
            return self._backward(tape, loss, lossprop, world)
        # over several processes: sum what this backward adds to each leaf's .grad
        leaves = leaves_of(_reachable(tape, self))
        before = [leaf.grad for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        try:
            messages = self._backward(tape, loss, lossprop, world)
        except BaseException:
            for leaf, old in zip(leaves, before):
                leaf.grad = old
            raise
        reduce_leaf_grads(world, leaves, before)
        return messages

    def _backward(self, tape: list, loss: Any, lossprop: LossProp, world: World) -> dict:
        messages: dict = {}
        seeds: dict[int, Any] = {}
        if loss is not None:
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"manager.backward(loss) needs a tensor, not {type(loss)}")
            per_sample = _per_sample(loss)
            messages["local_loss"] = per_sample
            baselined = (lossprop.apply_baseline(per_sample, world) if per_sample is not None
                         else None)
            if baselined is not None:
                messages["baselined_loss"] = baselined
            if lossprop.lossgrad:
                seeds = _seeds(tape, loss, world)
        try:
            for rec in reversed(tape):
                seed = seeds.pop(id(rec), None)  # a seed is used once: free it with its node
                if seed is None:
                    seed = _zeros_like(rec.result)
                rec.loaded.namespace.update(rec.configs)  # the values its forward ran with
                with torch.no_grad():
                    *grads, messages = rec.loaded.backward(rec.saved, seed, messages)
                for i, g in zip(rec.wrt, grads):
                    _route(tape, seeds, rec.values[i], g)
        except BaseException:
            seeds.clear()
            raise
        return messages


def _per_sample(loss: torch.Tensor) -> torch.Tensor | None:
    if loss.dim() == 0:
        return None
    if loss.dim() == 1 or (loss.dim() == 2 and loss.shape[1] == 1):
        return loss.detach().reshape(loss.shape[0])
    raise ValueError(
        f"manager.backward(loss): a loss of shape {tuple(loss.shape)}; pass a scalar or a "
        "per-sample loss of shape (B,) or (B, 1)")


def _reachable(tape: list, manager: PropagationManager) -> list:
    """What the recorded calls read where gradients may land: their arguments, the globals
    and closure cells their code reads, and the propagators' tensor defaults."""
    out: list = []
    for rec in tape:
        out.extend(rec.values)
        ns = rec.loaded.namespace
        out.extend(ns[name] for name, _ in rec.loaded.live if name in ns)
    for prop in (manager.default_propagator, *manager.propagators.values()):
        out.extend(prop.defaults.values())
    return out


def _seeds(tape: list, loss: torch.Tensor, world: World) -> dict:
    """The gradient of the (mean) loss at each record's result."""
    weight = mean_gradient(loss.detach(), world)
    for rec in tape:
        if rec.result is loss:
            return {id(rec): weight}
    outs = [(rec, t) for rec in tape for t in _tensors(rec.result) if t.requires_grad]
    if not loss.requires_grad or not outs:
        raise ValueError(
            "manager.backward(loss): the loss does not depend on what the propagated "
            "function returned; return the loss (or what it is computed from) from it")
    grads = torch.autograd.grad(loss, [t for _, t in outs], weight, allow_unused=True)
    seeds: dict = {}
    by_rec: dict = {}
    for (rec, t), g in zip(outs, grads):
        by_rec.setdefault(id(rec), (rec, []))[1].append((t, g))
    for key, (rec, pairs) in by_rec.items():
        got = {id(t): g for t, g in pairs}
        seeds[key] = _rebuild_seed(rec.result, got)
    return seeds


def _rebuild_seed(result: Any, got: dict) -> Any:
    if isinstance(result, torch.Tensor):
        g = got.get(id(result))
        return g if g is not None else torch.zeros_like(result)
    if isinstance(result, (tuple, list)):
        return type(result)(_rebuild_seed(r, got) for r in result)
    return None


def _tensors(obj: Any) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _zeros_like(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        return torch.zeros_like(result)
    if isinstance(result, (tuple, list)):
        return type(result)(_zeros_like(r) for r in result)
    return 0.0


def _route(tape: list, seeds: dict, arg: Any, g: Any) -> None:
    """Send an argument's gradient on: to the call that produced it, to its ``.grad`` if it is
    a leaf, or into the autograd graph that made it."""
    if g is None or not isinstance(arg, torch.Tensor):
        return
    for rec in tape:
        for t in _tensors(rec.result):
            if t is arg:
                seeds[id(rec)] = _add_seed(seeds.get(id(rec)), rec.result, t, g)
                return
    if arg.is_leaf:
        arg.grad = g.clone() if arg.grad is None else arg.grad + g
    else:
        torch.autograd.backward(arg, g)


def _add_seed(seed: Any, result: Any, t: torch.Tensor, g: torch.Tensor) -> Any:
    if isinstance(result, torch.Tensor):
        return g if seed is None else seed + g
    seed = list(seed) if seed is not None else [torch.zeros_like(r) for r in result]
    for i, r in enumerate(result):
        if r is t:
            seed[i] = seed[i] + g
    return type(result)(seed)


@dataclass
class _Record:
    loaded: _Loaded
    saved: Any
    result: Any
    values: list
    wrt: tuple
    configs: dict  # the configuration and call facts the forward read (generated names)


@dataclass
class _View:
    """The manager as the compiler sees it: the configuration, not the tensors."""

    manager: PropagationManager
    ctx: Any = None  # the compilation's Context, set by compile_reverse
    sites: list = field(default_factory=list)
    outputs: set = field(default_factory=set)  # node output names (their copies need no line)
    templates: dict = field(default_factory=dict)
    configs: dict = field(default_factory=dict)  # namespace name -> (path, key)
    forward_channels: dict = field(default_factory=dict)  # forward message -> variable

    def path(self, prop: Propagator) -> tuple:
        if prop is self.manager.default_propagator:
            return ("default",)
        for name, p in self.manager.propagators.items():
            if p is prop:
                return ("named", name)
        return ("fixed", prop)

    def config_binding(self, prop: Propagator, key: str) -> str:
        """A name in the generated module holding a propagator's default keyword, refreshed
        from the manager at every call (values may change without recompiling)."""
        from propgen.normalize import Binding

        ctx_ns = self.ctx.namespace
        path = self.path(prop)
        for ns_name, b in ctx_ns.items():
            if b.kind == "config" and b.source == path and b.key == key:
                return ns_name
        ns_name = self.ctx.fresh(f"{type(prop).__name__.lower()}_{key}")
        ctx_ns[ns_name] = Binding("config", path, key, _config_value(prop, key))
        return ns_name

    def call_binding(self, key: str) -> str:
        """A name in the generated module holding a fact of the current call (``grad_enabled``:
        whether the caller records gradients, for propagators that learn in the forward)."""
        from propgen.normalize import Binding

        for ns_name, b in self.ctx.namespace.items():
            if b.kind == "config" and b.source == _CALL and b.key == key:
                return ns_name
        ns_name = self.ctx.fresh(key)
        self.ctx.namespace[ns_name] = Binding("config", _CALL, key, True)
        return ns_name

    def describe(self) -> str:
        return repr(self.manager.default_propagator) + (
            f" and {sorted(self.manager.propagators)}" if self.manager.propagators else "")


_CALL = ("call",)  # the source of call bindings (see _View.call_binding)


def _config_value(prop: Propagator, key: str) -> Any:
    # keyword defaults, else the propagator's own objects (a baseline function, the state a
    # learning propagator keeps: its layers' optimizers)
    return prop.defaults[key] if key in prop.defaults else getattr(prop, key)


def _resolve_path(manager: PropagationManager, path: tuple) -> Propagator:
    if path[0] == "default":
        return manager.default_propagator
    if path[0] == "named":
        return manager.propagators[path[1]]
    return path[1]


class PropagatedFunction:
    """A function decorated with :func:`propagate`; call it like the original."""

    def __init__(self, fn: Callable, registry: Registry | None = None) -> None:
        self.fn = inspect.unwrap(fn)
        self.registry = registry or Registry.default()
        self.signature = inspect.signature(self.fn)
        self.params = list(self.signature.parameters)
        # one namespace per manager and compilation: the generated code reads the manager's
        # configuration from its namespace, so managers (and threads using different ones)
        # never see each other's values
        self.instances: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.last: _Loaded | None = None
        self.__name__ = self.fn.__name__
        self.__qualname__ = self.fn.__qualname__
        self.__doc__ = self.fn.__doc__
        self.__wrapped__ = self.fn

    def _manager(self, values: list) -> PropagationManager:
        for v in values:
            if isinstance(v, PropagationManager):
                return v
        code = self.fn.__code__
        for cell in self.fn.__closure__ or ():
            try:
                v = cell.cell_contents
            except ValueError:
                continue
            if isinstance(v, PropagationManager):
                return v
        for name in code.co_names:
            v = self.fn.__globals__.get(name)
            if isinstance(v, PropagationManager):
                return v
        raise TypeError(
            f"{self.fn.__qualname__} is decorated with @propgen.propagate but reads no "
            "PropagationManager: pass one as an argument (or close over one)")

    def _loaded(self, values: list, manager: PropagationManager) -> tuple[_Loaded, tuple]:
        wrt = tuple(i for i, v in enumerate(values)
                    if isinstance(v, torch.Tensor) and v.requires_grad)
        spec = tuple(_flags(v) for v in values)
        key = ("propagate", self.fn.__code__, self.fn.__code__.co_filename,
               manager.structure(), spec, self.registry.version, _leaf_signature(self.fn),
               self._shared_tensors(manager, values))
        loaded = (self.instances.get(manager) or {}).get(key)
        if loaded is None:
            compiled = _cached(self.registry, key)
            if compiled is None:
                view = _View(manager)
                samples = dict(zip(self.params, values))
                compiled = compile_reverse(self.fn, wrt, self.registry, samples,
                                           propagation=view)
                compiled.configs = {n: b for n, b in compiled.bindings.items()
                                    if b.kind == "config"}
                with self.registry.lock:
                    self.registry.compiled[key] = compiled
            loaded = _Loaded(self.fn, compiled)
            self.instances.setdefault(manager, {})[key] = loaded
        return loaded, wrt

    def _shared_tensors(self, manager: PropagationManager, values: list) -> tuple:
        """Which propagator defaults are tensors the program also reads (an argument, a
        closure cell or a global): the generated code reads them there."""
        code = self.fn.__code__
        free = {n: c.cell_contents for n, c in zip(code.co_freevars, self.fn.__closure__ or ())
                if _filled(c)}
        out = []
        for name, prop in [("", manager.default_propagator), *manager.propagators.items()]:
            for k, v in prop.defaults.items():
                if not isinstance(v, torch.Tensor):
                    continue
                where = next((i for i, a in enumerate(values) if a is v), None)
                if where is None:
                    where = next((n for n, a in free.items() if a is v), None)
                if where is None:
                    where = next((n for n in code.co_names
                                  if self.fn.__globals__.get(n) is v), None)
                if where is not None:
                    out.append((name, k, where))
        return tuple(out)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = [bound.arguments[p] for p in self.params]
        manager = self._manager(values)
        loaded, wrt = self._loaded(values, manager)
        self.last = loaded
        loaded.refresh()
        ns = loaded.namespace
        recording = torch.is_grad_enabled()  # under torch.no_grad(): evaluation, no tape
        facts = {"grad_enabled": recording, "world": None}
        configs = {}
        for name, b in loaded.compiled.configs.items():
            if b.source != _CALL:
                configs[name] = _config_value(_resolve_path(manager, b.source), b.key)
            elif b.key == "world":
                configs[name] = facts["world"] = facts["world"] or manager.world()
            else:
                configs[name] = facts[b.key]
        ns.update(configs)
        with torch.no_grad():
            result, saved = loaded.forward(*values)
        if not recording:
            return result
        result = _expose(result)
        manager._record(_Record(loaded, saved, result, values, wrt, configs))
        return result

    @property
    def source(self) -> str:
        """The generated code last run."""
        if self.last is None:
            raise RuntimeError(f"{self.fn.__qualname__} has not run yet: call it once, or use "
                               "propgen.source(fn, manager)")
        return self.last.compiled.source

    def source_for(self, manager: PropagationManager) -> str:
        """The generated code for ``manager``'s configuration (the latest variant run)."""
        want = manager.structure()
        own = self.instances.get(manager) or {}
        others = [v for m, v in list(self.instances.items()) if m is not manager]
        for variants in (own, *others):
            for key, loaded in reversed(list(variants.items())):
                if key[3] == want:
                    return loaded.compiled.source
        raise RuntimeError(
            f"{self.fn.__qualname__} has not run with this configuration yet: call it once "
            "with the manager, then ask for its source")

    def __repr__(self) -> str:
        return f"<propgen propagated function {self.fn.__qualname__}>"


def _filled(cell: Any) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:
        return False
    return True


def _flags(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("t", v.requires_grad)
    if isinstance(v, torch.nn.Module):
        return (type(v), tuple(p.requires_grad for p in v.parameters()))
    if isinstance(v, PropagationManager):
        return "manager"
    return None


def _expose(result: Any) -> Any:
    """Results leave as tensors that require grad, so a loss computed from them outside the
    function can be differentiated back to them."""
    if isinstance(result, torch.Tensor):
        if result.is_floating_point() or result.is_complex():
            return result.detach().requires_grad_()
        return result
    if isinstance(result, tuple):
        return tuple(_expose(r) for r in result)
    if isinstance(result, list):
        return [_expose(r) for r in result]
    return result


def propagate(fn: Callable | None = None, *, registry: Registry | None = None) -> Any:
    """Decorate a function whose body calls ``manager.forward(x, ...)``.

    Each call runs code generated for the manager's configuration and records it (under
    ``torch.no_grad()`` it only runs: nothing is recorded, as autograd records nothing);
    ``manager.backward(loss)`` then runs the generated backward.  ``propgen.source(fn,
    manager)`` returns the generated code.
    """
    if fn is None:
        return lambda f: PropagatedFunction(f, registry)
    return PropagatedFunction(fn, registry)
