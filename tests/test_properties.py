"""Property tests: random programs, differentiated by propgen, against torch.autograd.

The programs come from ``tests/_progen.py`` (straight-line code over a spread of ops, loops,
branches, helper functions, augmented assignment, lists and buffers; see its docstring).  Each
one is written to a real file and imported, since propgen reads functions with
``inspect.getsource``, then checked three ways, in float64, against torch.autograd run
eagerly on the same source:

* reverse mode: ``propgen.grad(f, wrt)`` gives autograd's gradient for every ``wrt``
  argument, and ``f``'s value;
* forward mode: ``propgen.autodiff(f, mode='forward')`` along random tangents gives the
  directional derivative, sum_i <autograd's gradient i, tangent i>;
* propagation: the program with some values wrapped in ``manager.forward(...)``, under
  ``@propgen.propagate`` and a default ``PropagationManager`` (plain backprop) or one of the
  identity propagators, puts autograd's gradients in the leaves' ``.grad``;
* second order: ``propgen.hvp`` (forward mode over propgen's generated backward) equals
  autograd's double backward, on programs without list appends and tensor stores (which
  second derivatives refuse by design).

Two hypothesis profiles, registered here rather than in conftest.py so that no other test
module is affected:

* ``ci`` (the default): derandomized, so every run checks the same programs; sized for the
  whole file to run in well under a minute on two cores;
* ``thorough``: many more examples, drawn anew on every run, for hunting bugs::

      PROPGEN_HYPOTHESIS=thorough python -m pytest tests/test_properties.py -p no:cacheprovider

When an example fails, hypothesis shrinks it and reports the minimal program's source (the
falsifying example's repr and a note with the rendering that failed).  Each real bug found
this way is kept as a plain test in ``test_property_regressions.py``.
"""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")

import _progen  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import propgen  # noqa: E402

# Checks and drawing dominate an example's time (tens of milliseconds), so hypothesis's
# timing health checks only add noise; the conftest's autouse fixture (cache directory and
# seed) is function scoped, which is harmless here: each example sets its own values.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
          HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=100,
                          database=None, suppress_health_check=_QUIET, print_blob=False)
settings.register_profile("thorough", derandomize=False, deadline=None, max_examples=2000,
                          database=None, suppress_health_check=_QUIET, print_blob=True)
PROFILE = settings.get_profile(os.environ.get("PROPGEN_HYPOTHESIS", "ci"))

# float(t) / t.item() on a value carrying gradients is part of what programs do (a stop-gradient)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning")

RTOL = 1e-7  # float64 throughout: only the order of floating-point sums may differ
HUGE = 1e6  # a reference value or gradient beyond this: the example is discarded


@pytest.fixture(scope="session")
def program_dir(tmp_path_factory):
    """Where the generated programs are written (one file per rendering and example)."""
    return tmp_path_factory.mktemp("progen")


def _close(got, want, scale: float, what: str) -> None:
    """``got`` equals ``want`` up to float64 summation order: relative RTOL, and an absolute
    slack proportional to the size of the reference's values (``scale``)."""
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-9 * scale, check_dtype=True,
                               msg=lambda m: f"{what}: {m}")


def _run_reference(program: _progen.Program, directory) -> tuple:
    """f's value by eager torch on the ``ref`` rendering, and the wrt arguments as leaves."""
    f = getattr(_progen.load_module(program.source("ref"), directory, "ref"), program.entry)
    args = program.arguments()
    leaves = []
    for i in program.wrt:
        args[i] = args[i].requires_grad_(True)
        leaves.append(args[i])
    return f(*args), leaves


def _reference(program: _progen.Program, directory) -> tuple:
    """f's value and its gradients for every wrt argument, by torch.autograd on the ``ref``
    rendering; discards (``assume``) an example whose numbers are not finite or huge."""
    note(f"reference rendering:\n{program.source('ref')}")
    out, leaves = _run_reference(program, directory)
    assert isinstance(out, torch.Tensor) and out.shape == (), "programs return a scalar"
    if out.requires_grad:
        grads = torch.autograd.grad(out, leaves, allow_unused=True)
    else:
        grads = (None,) * len(leaves)
    grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))
    values = [out.detach().abs().reshape(1)] + [g.abs().reshape(-1) for g in grads]
    sizes = torch.cat(values)
    assume(bool(torch.isfinite(sizes).all()) and float(sizes.max()) < HUGE)
    return out.detach(), grads, max(1.0, float(sizes.max()))


def _plain(program: _progen.Program, directory):
    note(f"program:\n{program.source('plain')}")
    return getattr(_progen.load_module(program.source("plain"), directory), program.entry)


@PROFILE
@given(program=_progen.programs())
def test_reverse_mode_matches_autograd(program, program_dir):
    """propgen.grad: f's value and the gradient of every wrt argument equal autograd's, and
    propgen leaves the argument tensors unchanged."""
    want, grads, scale = _reference(program, program_dir)
    f = _plain(program, program_dir)
    args = program.arguments()
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    got, value = propgen.grad(f, wrt=program.wrt, preserve_result=True)(*args)
    got = (got,) if len(program.wrt) == 1 else got
    assert len(got) == len(program.wrt)
    _close(value, want, scale, "f's value")
    for i, g, w in zip(program.wrt, got, grads):
        _close(g, w, scale, f"gradient of {program.params[i].name}")
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), "propgen changed an argument in place"


@PROFILE
@given(program=_progen.programs())
def test_forward_mode_matches_autograd(program, program_dir):
    """propgen.autodiff(mode='forward'): f's tangent along random tangents of the wrt
    arguments equals the directional derivative from autograd's gradient.  f returns a
    scalar, so one number checks every tangent propgen computed on the way, up to a random
    projection."""
    want, grads, scale = _reference(program, program_dir)
    f = _plain(program, program_dir)
    args = program.arguments()
    g = torch.Generator().manual_seed(program.seed + 1)
    tangents = tuple(torch.randn(args[i].shape, generator=g, dtype=torch.float64)
                     for i in program.wrt)
    jvp_want = sum(((gr * t).sum() for gr, t in zip(grads, tangents)),
                   torch.zeros((), dtype=torch.float64))
    jf = propgen.autodiff(f, mode="forward", wrt=program.wrt, preserve_result=True)
    jvp, value = jf(*args, tangents=tangents[0] if len(tangents) == 1 else tangents)
    _close(value, want, scale, "f's value")
    t_scale = scale * max(1.0, sum(float(t.abs().sum()) for t in tangents))
    _close(torch.as_tensor(jvp, dtype=torch.float64), jvp_want, t_scale, "the tangent of f")


# The identity propagators: the default manager's (BackPropagator) and the two explicit ones.
IDENTITIES = {"default": None, "Propagator": propgen.Propagator,
              "BackPropagator": propgen.BackPropagator}


@PROFILE
@given(program=_progen.programs(), identity=st.sampled_from(sorted(IDENTITIES)))
def test_identity_propagation_matches_autograd(program, identity, program_dir):
    """@propgen.propagate with nodes that send the gradient on unchanged: the leaves' .grad
    after ``manager.backward(loss)`` (a scalar loss: differentiated as itself) is autograd's
    gradient.  Nodes sit in loops, branches, helpers and the middle of expressions."""
    want, grads, scale = _reference(program, program_dir)
    note(f"propagate rendering:\n{program.source('prop')}")
    module = _progen.load_module(program.source("prop"), program_dir, "prop")
    f = getattr(module, program.entry)
    args = program.arguments()
    leaves = []
    for i in program.wrt:
        args[i] = args[i].requires_grad_(True)
        leaves.append(args[i])
    make = IDENTITIES[identity]
    manager = propgen.PropagationManager() if make is None else propgen.PropagationManager(make())
    out = f(manager, *args)
    _close(out.detach(), want, scale, "f's value")
    manager.backward(out)
    for i, leaf, w in zip(program.wrt, leaves, grads):
        got = torch.zeros_like(w) if leaf.grad is None else leaf.grad
        _close(got, w, scale, f".grad of {program.params[i].name}")


def _double_backward(program: _progen.Program, directory, tangents: tuple) -> tuple:
    """H v by autograd's double backward on the ``ref`` rendering."""
    out, leaves = _run_reference(program, directory)
    if not out.requires_grad:
        return tuple(torch.zeros_like(x) for x in leaves)
    grads = torch.autograd.grad(out, leaves, create_graph=True, allow_unused=True)
    terms = [(g * t).sum() for g, t in zip(grads, tangents) if g is not None and g.requires_grad]
    if not terms:
        return tuple(torch.zeros_like(x) for x in leaves)
    hv = torch.autograd.grad(sum(terms), leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if h is None else h for x, h in zip(leaves, hv))


# compiling twice and differentiating the generated code takes several times longer
@settings(PROFILE, max_examples=max(10, PROFILE.max_examples // 3))
@given(program=_progen.programs(mutate=False))
def test_hessian_vector_product_matches_double_backward(program, program_dir):
    """Forward over reverse (``propgen.hvp``): propgen's generated backward, differentiated
    again by its forward mode.  Programs without list appends or tensor stores, which second
    derivatives refuse by design."""
    _, grads, scale = _reference(program, program_dir)
    f = _plain(program, program_dir)
    args = program.arguments()
    g = torch.Generator().manual_seed(program.seed + 2)
    tangents = tuple(torch.randn(args[i].shape, generator=g, dtype=torch.float64)
                     for i in program.wrt)
    try:
        want = _double_backward(program, program_dir, tangents)
    except RuntimeError as e:  # e.g. hardsigmoid: torch has no second derivative to compare
        assume("is not implemented" not in str(e))
        raise
    sizes = torch.cat([w.abs().reshape(-1) for w in want])
    assume(bool(torch.isfinite(sizes).all()) and float(sizes.max()) < HUGE)
    hv_scale = max(scale, float(sizes.max())) * max(1.0, max(float(t.abs().max())
                                                             for t in tangents))
    hf = propgen.hvp(f, wrt=program.wrt, preserve_result=True)
    hv, gradient = hf(*args, tangents=tangents[0] if len(tangents) == 1 else tangents)
    hv = (hv,) if len(program.wrt) == 1 else hv
    gradient = (gradient,) if len(program.wrt) == 1 else gradient
    for i, h, w, gr, gw in zip(program.wrt, hv, want, gradient, grads):
        name = program.params[i].name
        _close(gr, gw, scale, f"gradient of {name} (hvp's preserved result)")
        _close(h, w, hv_scale, f"H v for {name}")
