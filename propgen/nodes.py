"""Stage 2b, node expansion: a ``manager.forward(x, ...)`` call site becomes inlined code.

The normalizer calls :func:`expand_node` for each call site it meets (in loops, branches and
inlined user functions alike).  The configured propagator's forward templates are spliced
in as forward-only statements, the node output is assigned by a statement whose gradient
the compiler does not derive itself, and a :class:`NodeSite` marker statement carries the
backward templates to the transform, which splices them where the backward pass reaches
the node.
"""

from __future__ import annotations

import builtins
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gast

from propgen import ir
from propgen.errors import ConfigurationError
from propgen.template import Template, is_template_object

if TYPE_CHECKING:
    from propgen.normalize import Normalizer

__all__ = ["NodeSite", "expand_node", "manager_of"]

_UNSUPPORTED_KEYWORDS = {
    "get_node": "propgen nodes are code, not objects; read values in the function instead",
}


@dataclass
class NodeSite:
    """What the transform needs to splice one node's backward templates."""

    label: str  # the propagator, for the provenance comment
    site: str  # file:line of the call site
    backward: list  # backward templates, in the order they run (reverse part order)
    mapping: dict  # template parameter -> atom (output, x, forward locals, keywords)
    output: str
    x: gast.AST
    send_gradient: bool = True
    first_stmt: int = 0  # id() of the node's first forward statement (segment boundary)
    hint: str = "node"
    target: gast.AST | None = None  # where its messages go (None: the previous node)
    default_target: int = -1  # the propagator's own target, for force_targets=None
    index: str | None = None  # the run-time node counter, when some node has a target


def manager_of(nz: Normalizer, func: gast.AST) -> Any:
    """The PropagationManager ``func``'s receiver is, when it is one (``manager.forward``)."""
    from propgen.manager import PropagationManager

    if not isinstance(func, gast.Attribute):
        return None
    recv = func.value
    value = nz.sample_value(recv)
    if not isinstance(value, PropagationManager):
        try:
            value = nz.static_value(recv)
        except Exception:  # an unresolvable name is reported where it is used
            return None
    return value if isinstance(value, PropagationManager) else None


def _template(fn: Any, cache: dict) -> Template:
    if fn not in cache:
        cache[fn] = Template(fn, ())
    return cache[fn]


def expand_node(nz: Normalizer, e: gast.Call, hint: str, manager: Any) -> gast.AST:
    """Inline the call site's propagator; returns the atom holding the node output."""
    ctx = nz.ctx
    label = f"{ir.attr_chain(e.func) and '.'.join(ir.attr_chain(e.func))}"
    if e.func.attr == "append_loss" and ctx.propagation is not None:
        e = _append_loss_call(nz, e, manager)
    elif e.func.attr != "forward":
        nz.fail(e, f"the manager method {label}() inside a propagated function",
                "call manager.forward(x, ...) here, and manager.backward(loss) after the "
                "function returns")
    if ctx.propagation is None:
        nz.fail(e, "manager.forward(...) outside a @propgen.propagate function",
                "decorate the function with @propgen.propagate instead")
    if len(e.args) != 1 or any(k.arg is None for k in e.keywords):
        nz.fail(e, "manager.forward with other than one positional argument",
                "write manager.forward(x, keyword=value, ...)")
    prop = manager.default_propagator
    keywords: dict[str, gast.AST] = {}
    force = None
    for k in e.keywords:
        if k.arg in _UNSUPPORTED_KEYWORDS:
            nz.fail(k.value, f"manager.forward(..., {k.arg}=...)", _UNSUPPORTED_KEYWORDS[k.arg])
        if k.arg == "local_propagator":
            prop = _local_propagator(nz, k.value, manager)
        elif k.arg == "force_targets":
            force = k.value
        else:
            keywords[k.arg] = k.value
    if prop is None:
        _error(nz, e, "manager.forward without a propagator (the manager has no default)",
               "pass local_propagator=... or give the manager a default_propagator")
    # a keyword another propagator uses is ignored here, so that switching the configuration
    # never needs the program changed; one that no propagator knows is a mistake
    known = _known_keywords(manager)
    unknown = sorted(set(keywords) - known)
    if unknown:
        _error(nz, e, f"manager.forward got the keyword(s) {unknown}, which no propagator "
               f"accepts (the one here is {prop.label})",
               f"{type(prop).__name__} accepts {list(prop.keywords) or 'no keywords'}; "
               f"propgen's propagators know {sorted(known)}")
    from propgen.propagators import ChainProp

    members = prop.members if isinstance(prop, ChainProp) else (prop,)
    layer = keywords.pop("layer", None)
    if layer is not None and not any("layer" in p.keywords for p in members):
        # ``layer=module`` under a propagator that does not handle layers itself: the node
        # computes ``module(x)`` as ordinary program code, then the propagator's own step
        x = nz.atom(ir.copy_anno(gast.Call(func=layer, args=[e.args[0]], keywords=[]), e),
                    hint)
    else:
        x = nz.atom(e.args[0], hint)
        if layer is not None:
            keywords["layer"] = layer
    loc = nz.loc(e)
    target = nz.atom(force, f"{hint}_targets") if force is not None else None
    atoms = {k: nz.atom(v, f"{hint}_{k}") for k, v in keywords.items()}
    for i, member in enumerate(members):  # a chain is several nodes at one call site
        last = i == len(members) - 1
        x = _expand(nz, manager, member, x, atoms, hint, loc,
                    target if last else None)
    return x


def _expand(nz: Normalizer, manager: Any, prop: Any, x: gast.AST, atoms: dict, hint: str,
            loc: Any, target: gast.AST | None) -> gast.AST:
    """Splice one propagator's forward templates; emit the marker for its backward ones."""
    ctx = nz.ctx
    own = getattr(prop, "target", None)
    if target is None and own is not None:
        target = ir.const(own)
    mapping: dict[str, gast.AST] = {"x": x, "site": ir.const(f"{loc.short}")}
    for k in prop.keywords:
        if k in atoms:
            mapping[k] = ir.clone(atoms[k])
        elif k in prop.defaults:
            _check_config_value(nz, loc, prop, k, prop.defaults[k])
            mapping[k] = _program_name(ctx, prop.defaults[k]) or ir.name(
                ctx.propagation.config_binding(prop, k))
        else:
            mapping[k] = ir.const(None)
    for opt in prop.options:  # structural options the templates read (k_interval, ...)
        v = getattr(prop, opt)
        if isinstance(v, (bool, int, float, str)) or v is None:
            mapping[opt] = ir.const(v)
    cache = ctx.propagation.templates
    parts = prop.parts()
    wanted = {p for part in parts for t in (part.forward, part.backward) if t is not None
              for p in inspect.signature(t).parameters}
    for fact in ("grad_enabled", "world"):  # facts of the call, bound at run time
        if fact in wanted:
            mapping[fact] = ir.name(ctx.propagation.call_binding(fact))
    for k in prop.internal:  # objects the propagator keeps across calls (run-time values)
        mapping[k] = ir.name(ctx.propagation.config_binding(prop, k))
    if getattr(prop, "baseline_func", None) is not None:
        mapping["baseline_func"] = ir.name(ctx.propagation.config_binding(prop, "baseline"))
    out = ctx.fresh(f"{hint}_node")
    start = len(nz.out)
    for part in parts:
        if part.forward is not None:
            _splice_forward(nz, _template(part.forward, cache), mapping, hint, out, x)
    if not any(p.forward for p in parts):
        nz.emit(_output_assign(out, ir.clone(x), x))
    first = nz.out[start] if len(nz.out) > start else None
    backward = [_template(p.backward, cache) for p in reversed(parts) if p.backward is not None]
    # a node whose backward never reads d[output] (LR) cuts the path: nothing downstream needs
    # a gradient for it, while its input still gets one from the node
    # what the node sends gradients to: its input, and the noise parameters when the program
    # computed them (d[dist_params] in the templates)
    sent = [mapping[p].id for p in _sent_params(backward)
            if isinstance(mapping.get(p), gast.Name) and mapping[p].id not in ctx.namespace]
    sent = [x.id] + [n for n in sent if n != getattr(x, "id", None)] if isinstance(
        x, gast.Name) else sent
    if not any(_reads_output_grad(t) for t in backward):
        nz.out[-1].value.pg_callee.sources = []
    else:  # (GS) the gradient at the output is wanted even if nothing upstream varies
        nz.out[-1].value.pg_callee.sources = sent
        nz.out[-1].pg_node_reads_grad = True
    nz.out[-1].pg_node_input = sent
    mapping["output"] = ir.name(out)
    send = getattr(prop, "backprop", True) or manager.terminal_propagator is not None
    site = NodeSite(prop.label, loc.short, backward, mapping, out, x, send, id(first), hint, target,
                    own if own is not None else -1)
    ctx.propagation.outputs.add(out)
    if manager.check_nan:
        check = gast.Call(func=ir.name(ctx.bind("value", None, "check_finite", _check(),
                                                "check_finite")),
                          args=[ir.const(f"{loc.short} [{prop.label}]"), ir.const("the output"),
                                ir.name(out)], keywords=[])
        nz.emit(gast.Expr(value=check))
    marker = gast.With(items=[], body=[gast.Pass()], type_comment=None)
    marker.pg_node = site
    nz.emit(marker)
    ctx.propagation.sites.append(site)
    return ir.name(out)


def _append_loss_call(nz: Normalizer, e: gast.Call, manager: Any) -> gast.Call:
    """``manager.append_loss(x, lossfunc=f, loss_propagator=p)`` (Proppo's spelling of a loss
    node) as ``manager.forward(f(x), local_propagator=p)``; a dict ``x`` is passed as keyword
    arguments, and the manager's loss propagator serves when none is given."""
    if len(e.args) != 1:
        nz.fail(e, "manager.append_loss with other than one positional argument",
                "write manager.append_loss(x, lossfunc=f)")
    value = e.args[0]
    rest = []
    prop_node = None
    for k in e.keywords:
        if k.arg == "lossfunc":
            if isinstance(value, gast.Dict) and all(
                    isinstance(key, gast.Constant) for key in value.keys):
                kws = [gast.keyword(arg=key.value, value=v)
                       for key, v in zip(value.keys, value.values)]
                value = gast.Call(func=k.value, args=[], keywords=kws)
            else:
                value = gast.Call(func=k.value, args=[value], keywords=[])
        elif k.arg == "loss_propagator":
            prop_node = k.value
        else:
            rest.append(k)
    if prop_node is None:
        prop = manager.loss_propagator or manager.default_propagator.loss_propagator()
        ns = nz.ctx.bind("value", None, f"loss_propagator_{id(prop)}", prop, "loss_propagator")
        prop_node = ir.name(ns)
        nz.ctx.samples[ns] = prop
    call = gast.Call(func=gast.Attribute(value=e.func.value, attr="forward", ctx=gast.Load()),
                     args=[value], keywords=rest + [gast.keyword(arg="local_propagator",
                                                                  value=prop_node)])
    return ir.copy_anno(call, e)


def _local_propagator(nz: Normalizer, node: gast.AST, manager: Any) -> Any:
    from propgen.propagators import Propagator

    if isinstance(node, gast.Constant) and isinstance(node.value, str):
        prop = manager.propagators.get(node.value)
        if prop is None:
            _error(nz, node, f"local_propagator={node.value!r} is not registered with the "
                   "manager", f"register it with manager.add_propagator({node.value!r}, "
                   f"propagator); registered: {sorted(manager.propagators)}")
        return prop
    value = nz.sample_value(node)
    if not isinstance(value, Propagator) and isinstance(node, gast.Name):
        value = nz.ctx.samples.get(node.id)  # (a loss propagator bound by append_loss)
    if not isinstance(value, Propagator):
        value = nz.static_value(node) if isinstance(node, (gast.Name, gast.Attribute)) else None
    if not isinstance(value, Propagator):
        nz.fail(node, "a local_propagator that is not known when compiling",
                "pass a registered name (a string) or a propagator bound outside the function")
    return value


def _check_config_value(nz: Normalizer, loc: Any, prop: Any, key: str, value: Any) -> None:
    """A differentiated tensor inside a propagator's default dist_params would get no
    gradient (configuration is not differentiated): say so instead of dropping it."""
    import torch

    values = value.values() if isinstance(value, dict) else (
        value if isinstance(value, (tuple, list)) else ())
    if any(isinstance(v, torch.Tensor) and v.requires_grad for v in values):

        raise ConfigurationError(
            loc, f"{type(prop).__name__}'s default {key} holds a tensor that requires grad; "
            "the configuration is not differentiated, so it would get no gradient",
            f"pass {key}=... at the call site (manager.forward(x, {key}=...)), where the "
            "program's gradients reach it")


def _program_name(ctx: Any, value: Any) -> gast.Name | None:
    """The program's own name for a tensor given to a propagator (``ivw_target=expanded_beta``
    in the constructor, with ``expanded_beta`` also an argument or a global of the program):
    TotalProp must see the tensor where the program uses it."""
    import torch

    if not isinstance(value, torch.Tensor):
        return None
    for name, v in ctx.samples.items():
        if v is value:
            return ir.name(name)
    return None


def _sent_params(templates: list) -> list:
    """Template parameters the backward templates send gradients to (``d[p] = ...``)."""
    out: list = []
    for tmpl in templates:
        for st in tmpl.body:
            for n in ir.walk(st):
                if (isinstance(n, gast.Assign) and isinstance(n.targets[0], gast.Subscript)
                        and isinstance(n.targets[0].slice, gast.Name)
                        and n.targets[0].slice.id not in out):
                    out.append(n.targets[0].slice.id)
    return out


def _reads_output_grad(tmpl: Template) -> bool:
    out = list(inspect.signature(tmpl.fn).parameters)[0]
    for st in tmpl.body:
        for n in ir.walk(st):
            if (isinstance(n, gast.Subscript) and isinstance(n.slice, gast.Name)
                    and n.slice.id == out):
                return True
    return False


def _check() -> Any:
    from propgen.runtime import check_finite

    return check_finite


def _error(nz: Normalizer, node: gast.AST, problem: str, advice: str) -> None:

    raise ConfigurationError(nz.loc(node), problem, advice)


def _known_keywords(manager: Any) -> set:
    from propgen.propagators import Propagator

    known: set = set()
    todo = [Propagator]
    while todo:
        cls = todo.pop()
        known.update(cls.keywords)
        todo.extend(cls.__subclasses__())
    for p in [manager.default_propagator, *manager.propagators.values()]:
        known.update(p.keywords)
    return known


def _output_assign(out: str, value: gast.AST, x: gast.AST) -> gast.Assign:
    from propgen.normalize import Callee

    stmt = ir.assign(out, value)
    callee = Callee("node", None, None, "manager.forward")
    callee.sources = [x.id] if isinstance(x, gast.Name) else []
    stmt.value.pg_callee = callee
    stmt.pg_node_output = True
    return stmt


def _splice_forward(nz: Normalizer, tmpl: Template, mapping: dict, hint: str, out: str,
                    x: gast.AST) -> None:
    """Emit a forward template's statements with its names bound to this call site."""
    params = list(inspect.signature(tmpl.fn).parameters)
    local_names = {n.id for s in tmpl.body for n in ir.walk(s)
                   if isinstance(n, gast.Name) and isinstance(n.ctx, gast.Store)}
    for name in sorted(local_names):
        if name not in mapping:
            mapping[name] = ir.name(nz.ctx.fresh(f"{hint}_{name}"))
    for stmt in tmpl.body:
        new = _Bind(nz, tmpl, {p: mapping[p] for p in params if p in mapping},
                    {n: mapping[n] for n in local_names}, mapping).visit(ir.clone(stmt))
        if isinstance(new, gast.Return):
            nz.emit(_output_assign(out, new.value, x))
        elif isinstance(new, gast.Assign) and isinstance(new.targets[0], gast.Name):
            new.pg_nograd = True
            nz.emit(new)
        elif isinstance(new, gast.Expr) and isinstance(new.value, gast.Call):
            new.pg_nograd = True  # a side effect (a layer's own optimizer step, say)
            nz.emit(new)
        else:
            raise TypeError(f"propagator template {tmpl.name}: forward templates hold "
                            "assignments to names or m[...], calls, and one return")


class _Bind(gast.NodeTransformer):
    """Replace a template's parameters, locals and globals by the call site's names."""

    def __init__(self, nz: Normalizer, tmpl: Template, params: dict, local: dict,
                 supplied: dict) -> None:
        self.nz, self.tmpl, self.params, self.local = nz, tmpl, params, local
        self.supplied = supplied  # everything the node binds (for the error naming them)

    def visit_Subscript(self, node: gast.Subscript) -> gast.AST:
        if not is_template_object(node, "m", self.tmpl):
            self.generic_visit(node)
            return node
        key = node.slice
        if not (isinstance(key, gast.Constant) and isinstance(key.value, str)):
            raise TypeError(f"template {self.tmpl.name}: m[...] takes a message name (a string)")
        # a message flowing forward: a variable of the generated forward, None until a node
        # sets it (normalize() initialises it at the top of the function)
        channels = self.nz.ctx.propagation.forward_channels
        if key.value not in channels:
            channels[key.value] = self.nz.ctx.fresh(f"{key.value}_forward")
        return ir.name(channels[key.value], isinstance(node.ctx, gast.Store))

    def visit_Name(self, node: gast.Name) -> gast.AST:
        if node.id in self.local:
            return ir.name(self.local[node.id].id, isinstance(node.ctx, gast.Store))
        if node.id in self.params:
            return ir.clone(self.params[node.id])
        if node.id in self.tmpl.globals:
            value = self.tmpl.globals[node.id]
        elif hasattr(builtins, node.id):
            value = getattr(builtins, node.id)
        else:
            raise unknown_template_name(self.tmpl, node.id, self.supplied["site"].value,
                                        self.supplied)
        ns = self.nz.ctx.bind("value", self.tmpl, node.id, value, node.id)
        return ir.name(ns)


def unknown_template_name(tmpl: Template, name: str, site: str,
                          supplied: dict) -> ConfigurationError:
    """The error for a template that reads a name nobody supplies (a parameter the node does
    not bind, a global its module lacks): named by call site and template line."""
    code = tmpl.fn.__code__
    names = ", ".join(sorted(k for k in supplied if not k.startswith("_")))
    return ConfigurationError(
        None, f"{site}: the propagator template {tmpl.name} ({code.co_filename}:"
        f"{code.co_firstlineno}) reads {name!r}, which this node does not supply (it supplies "
        f"{names} and the forward template's locals) and which is not a global of the "
        "template's module",
        f"add {name!r} to the propagator's keywords (and pass it at the call site or to the "
        "propagator), compute it in the forward template, or import it in the template's "
        "module")
