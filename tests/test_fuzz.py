"""Fuzzing the compiler with random and mutated source (issue item "Fuzzed source").

Whatever function a user hands to propgen, ``propgen.grad`` and forward-mode
``propgen.autodiff`` must either produce correct code or raise one of propgen's documented
errors naming the user's file and line; they must never leak an internal exception
(IndexError, KeyError, AttributeError, ... raised by the compiler) and never hang.

The programs come from ``tests/_fuzz.py``: random functions from a typed grammar (with a
share of constructs propgen refuses, and plain mistakes), and seed functions that propgen
handles, mutated at the AST level.  Each is written to a real ``.py`` file, imported, run
eagerly as the reference, and then compiled and run by propgen, each step under a time limit.
Allowed outcomes:

1. success, with the result, the gradient (reverse mode) and the tangent (forward mode) equal
   to torch's on the same function run eagerly, where eager Python runs and torch can
   differentiate it;
2. a ``propgen.PropgenError`` whose message names the program's file and a line of it (or the
   documented ``ValueError`` of ``propgen.grad`` for a non-scalar output);
3. the exception eager Python raises too, of the same type, raised outside the compiler; or,
   where Python fails with an error other than a NameError, another error raised by the
   user's code (propgen drops statements whose values are never used, so it may meet a later
   error first).  An exception raised inside the compiler is never accepted.

Hypothesis draws the programs through ``st.randoms()``, so a failure shrinks to a short program
(in the thorough profile) and CI runs are deterministic.  Profiles, under names of this file's
own: ``fuzz-ci`` by default (derandomized, no shrinking, under a minute on two cores) and
``fuzz-thorough`` with ``PROPGEN_HYPOTHESIS=thorough`` (random, many more examples, shrinking).
The tests at the end check the harness itself: each check can fail.
"""

from __future__ import annotations

import ast
import os
import random
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("hypothesis", reason="the fuzz tests draw their programs with Hypothesis")

import _fuzz  # noqa: E402
from _fuzz import Arg, Checker, FuzzFailure, ImportFailed, Program  # noqa: E402
from hypothesis import HealthCheck, Phase, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import propgen  # noqa: E402

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
             HealthCheck.function_scoped_fixture]
settings.register_profile(
    "fuzz-ci", max_examples=60, derandomize=True, deadline=None, database=None,
    phases=[Phase.explicit, Phase.generate], suppress_health_check=_SUPPRESS,
    print_blob=False,
)
settings.register_profile(
    "fuzz-thorough", max_examples=1500, derandomize=False, deadline=None, database=None,
    suppress_health_check=_SUPPRESS, print_blob=True,
)
PROFILE = "fuzz-thorough" if os.environ.get("PROPGEN_HYPOTHESIS") == "thorough" else "fuzz-ci"


def fuzz_settings(ci_examples: int) -> settings:
    """The profile's settings, with ``ci_examples`` examples under the CI profile (the
    thorough profile keeps its own count)."""
    base = settings.get_profile(PROFILE)
    if PROFILE == "fuzz-ci":
        return settings(base, max_examples=ci_examples)
    return settings(base)


@pytest.fixture(scope="module")
def checker(tmp_path_factory) -> Checker:
    """One checker for the module: programs are written to a temporary directory."""
    return Checker(tmp_path_factory.mktemp("fuzz-programs"))


def check(checker: Checker, program: Program | None) -> _fuzz.Verdict:
    """Run the checker; a program Python itself cannot import is not propgen's concern."""
    assume(program is not None)
    note(program.describe())
    try:
        return checker.check(program)
    except ImportFailed:
        assume(False)
        raise  # unreachable: assume(False) rejects the example


# --------------------------------------------------------------------------------------------
# The fuzz tests
# --------------------------------------------------------------------------------------------


@fuzz_settings(ci_examples=160)
@given(rng=st.randoms(use_true_random=False))
def test_random_supported_functions_match_autograd(checker, rng):
    """Random functions without constructs propgen refuses: mostly compiled and compared
    with autograd, so this is where wrong gradients show."""
    check(checker, _fuzz.random_program(rng, wild=0.0))


@fuzz_settings(ci_examples=160)
@given(rng=st.randoms(use_true_random=False))
def test_random_functions_compile_or_raise_documented_errors(checker, rng):
    """Random functions with a random share of unsupported constructs and plain mistakes."""
    check(checker, _fuzz.random_program(rng))


@fuzz_settings(ci_examples=250)
@given(rng=st.randoms(use_true_random=False))
def test_mutated_functions_compile_or_raise_documented_errors(checker, rng):
    """Working functions (adapted from test_language.py) with one to three AST mutations."""
    check(checker, _fuzz.mutated_program(rng))


@pytest.mark.parametrize("seed", _fuzz.SEEDS, ids=[s.name for s in _fuzz.SEEDS])
def test_seed_functions_are_compared(checker, seed):
    """Every seed runs, is differentiated by propgen and matches torch in both modes: the
    mutations start from working code, and the comparison path of the checker is taken."""
    verdict = checker.check(seed.program())
    assert verdict.reverse == "compared", verdict
    assert verdict.forward == "compared", verdict


# --------------------------------------------------------------------------------------------
# The generators cover what the issue lists
# --------------------------------------------------------------------------------------------


def _constructs(source: str) -> set[str]:
    """Names of the syntax features a function uses (for the coverage test)."""
    tree = ast.parse(source)
    found = {type(n).__name__ for n in ast.walk(tree)}
    fdef = tree.body[0]
    args = fdef.args
    if args.kwonlyargs:
        found.add("keyword-only args")
    if args.defaults or args.kw_defaults:
        found.add("default args")
    if args.posonlyargs:
        found.add("positional-only args")
    if args.vararg or args.kwarg:
        found.add("*args/**kwargs")
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and len(node.ops) > 1:
            found.add("chained comparison")
        if isinstance(node, ast.AugAssign):
            found.add(f"augassign to {type(node.target).__name__}")
        if isinstance(node, (ast.For, ast.While)):
            if any(isinstance(n, ast.Return) for n in ast.walk(node)):
                found.add("return in loop")
        if isinstance(node, ast.FunctionDef) and node is not fdef:
            found.add("nested def")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id.startswith("undefined"):
                found.add("unknown name")
    if isinstance(fdef.body[-1], ast.Return) and isinstance(fdef.body[-1].value, ast.Constant):
        found.add("non-tensor return")
    returns = [n for n in ast.walk(fdef) if isinstance(n, ast.Return)]
    if len(returns) > 1:
        found.add("early return")
    return found


REQUIRED = {
    "While", "Try", "With", "Lambda", "ListComp", "GeneratorExp", "Yield", "Global",
    "Nonlocal", "nested def", "Delete", "Starred", "NamedExpr", "JoinedStr", "Assert", "Break",
    "Continue", "return in loop", "early return", "chained comparison", "augassign to Subscript",
    "augassign to Attribute", "augassign to Name", "unknown name", "non-tensor return",
    "keyword-only args", "default args", "positional-only args", "*args/**kwargs",
    "AsyncFunctionDef", "IfExp", "SetComp", "Match", "ClassDef", "Import", "Dict", "Await",
}


def test_random_generator_covers_the_grammar():
    """Over a few hundred programs the generator writes every construct of the issue's list
    (so the fuzz tests above do exercise them)."""
    seen: set[str] = set()
    for i in range(600):
        try:
            seen |= _constructs(_fuzz.random_program(random.Random(i)).function)
        except SyntaxError:  # a wild construct where Python forbids it (await outside async)
            continue
    assert REQUIRED <= seen, f"never generated: {sorted(REQUIRED - seen)}"


def test_mutator_applies_every_mutation():
    """Each mutation kind applies to some seed and yields parseable Python."""
    applied = set()
    rng = random.Random(0)
    for seed in _fuzz.SEEDS:
        for kind in _fuzz.Mutator(rng).kinds:
            fdef = ast.parse(seed.source).body[0]
            if kind(fdef):
                applied.add(kind.__name__)
                ast.unparse(ast.fix_missing_locations(fdef))
    assert applied == {k.__name__ for k in _fuzz.Mutator(rng).kinds}


def test_most_supported_programs_are_compared(checker):
    """The typed grammar is worth its complexity only if most programs without unsupported
    constructs really run and get their gradients compared with autograd."""
    verdicts = []
    for i in range(40):
        try:
            verdicts.append(checker.check(_fuzz.random_program(random.Random(i), wild=0.0)))
        except FuzzFailure:  # a propgen bug: counted as run, reported by the tests above
            verdicts.append(_fuzz.Verdict("compared", "compared"))
    compared = sum(v.reverse == "compared" for v in verdicts)
    assert compared >= 0.6 * len(verdicts), verdicts


# --------------------------------------------------------------------------------------------
# The checks can fail
# --------------------------------------------------------------------------------------------

WORKING = Program(
    textwrap.dedent("""\
        def f(x, w):
            h = torch.tanh(x * w)
            return (h * h).sum()
        """),
    "f", [Arg("randn", (4,)), Arg("randn", (4,))], (0, 1), origin="harness test",
)


def _broken_grad(mutate):
    """A stand-in for propgen.grad whose gradients pass through ``mutate``."""
    def grad(fn, wrt, preserve_result):
        df = propgen.grad(fn, wrt=wrt, preserve_result=True)

        def call(*args, **kwargs):
            grads, result = df(*args, **kwargs)
            return mutate(grads), result

        return call

    return grad


def test_harness_accepts_working_program(tmp_path):
    verdict = Checker(tmp_path).check(WORKING)
    assert verdict == _fuzz.Verdict("compared", "compared")


def test_harness_catches_wrong_gradient(tmp_path):
    broken = _broken_grad(lambda g: (g[0] * 1.001, g[1]))
    with pytest.raises(FuzzFailure, match="wrong gradient of argument 0"):
        Checker(tmp_path, grad=broken).check(WORKING)


def test_harness_catches_wrong_tangent(tmp_path):
    def autodiff(fn, mode, wrt, preserve_result):
        jf = propgen.autodiff(fn, mode=mode, wrt=wrt, preserve_result=True)
        return lambda *a, tangents, **k: (lambda t, r: (t + 1e-3, r))(*jf(*a, tangents=tangents,
                                                                         **k))

    with pytest.raises(FuzzFailure, match="wrong tangent"):
        Checker(tmp_path, autodiff=autodiff).check(WORKING)


def test_harness_catches_wrong_result(tmp_path):
    broken = _broken_grad(lambda g: g)

    def grad(fn, wrt, preserve_result):
        call = broken(fn, wrt, preserve_result)
        return lambda *a, **k: (lambda g, r: (g, r + 1.0))(*call(*a, **k))

    with pytest.raises(FuzzFailure, match="wrong result"):
        Checker(tmp_path, grad=grad).check(WORKING)


def test_harness_catches_internal_error(tmp_path):
    def grad(fn, wrt, preserve_result):
        return {}["missing"]

    with pytest.raises(FuzzFailure, match="KeyError"):
        Checker(tmp_path, grad=grad).check(WORKING)


def test_harness_catches_compiler_error_even_when_eager_raises_alike(tmp_path):
    # an IndexError raised in a compiler module is a bug even if the eager function happens
    # to raise an IndexError too: the compiler should never get that far
    program = Program("def f(x):\n    return x[10].sum()\n", "f", [Arg("randn", (4,))], (0,))
    fake_compiler = Path(propgen.__file__).parent / "normalize.py"
    namespace: dict = {}
    exec(compile("def grad(fn, wrt, preserve_result):\n    return [][0]\n", str(fake_compiler),
                 "exec"), namespace)
    with pytest.raises(FuzzFailure, match="internal IndexError from the compiler"):
        Checker(tmp_path, grad=namespace["grad"]).check(program)


def test_harness_accepts_the_error_eager_raises(tmp_path):
    program = Program("def f(x):\n    return x[10].sum()\n", "f", [Arg("randn", (4,))], (0,))
    verdict = Checker(tmp_path).check(program)
    assert verdict.reverse == "same-error" and verdict.forward == "same-error"


def test_harness_catches_documented_error_without_location(tmp_path):
    def grad(fn, wrt, preserve_result):
        raise propgen.UnsupportedSyntaxError(None, "something", "do something else")

    with pytest.raises(FuzzFailure, match="does not name"):
        Checker(tmp_path, grad=grad).check(WORKING)


def test_harness_accepts_documented_error_with_location(tmp_path):
    program = Program("def f(x):\n    del x\n    return 1.0\n", "f", [Arg("randn", (4,))], (0,))
    verdict = Checker(tmp_path).check(program)
    assert verdict.reverse == "refused" and verdict.forward == "refused"


def test_harness_catches_hang(tmp_path):
    def grad(fn, wrt, preserve_result):
        while True:
            pass

    with pytest.raises(FuzzFailure, match="hang"):
        Checker(tmp_path, compile_limit=0.5, grad=grad).check(WORKING)


def test_harness_catches_hang_off_the_main_thread():
    # off the main thread there is no SIGALRM: the call runs in a thread that is abandoned
    import threading

    stop = threading.Event()
    outcome = {}

    def spin():
        while not stop.is_set():
            pass

    def run():
        try:
            _fuzz.call_with_time_limit(spin, 0.3, "spin")
        except _fuzz.Hang as exc:
            outcome["hang"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(5.0)
    stop.set()  # let the abandoned spinner end
    assert "hang" in outcome


def test_harness_skips_eager_hang(tmp_path):
    program = Program("def f(x):\n    while True:\n        x = x * 1.0\n    return x.sum()\n",
                      "f", [Arg("randn", (4,))], (0,))
    verdict = Checker(tmp_path, eager_limit=0.3).check(program)
    assert verdict.reverse in ("eager-hung", "refused")


def test_harness_reports_import_failure(tmp_path):
    program = Program("def f(x):\n    return x +\n", "f", [Arg("randn", (4,))], (0,))
    with pytest.raises(ImportFailed):
        Checker(tmp_path).check(program)
