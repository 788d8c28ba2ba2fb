"""Time propgen's generated gradients against torch.autograd, and time code generation.

    python benchmarks/grad_vs_autograd.py [--device cpu|cuda] [--repeats N] [--quick]

For each case, one measurement times ``number`` calls of the generated gradient function and
``number`` calls of autograd's forward + backward (``torch.autograd.grad``) on the same inputs;
the two contenders alternate within every repetition (and swap which goes first), so drift in
the machine's speed hits both alike.  The table gives the median time per call of each and
the ratio propgen / autograd (below 1: propgen is faster).  Code generation is timed on a
30-line function written to a fresh file, with a new name, for every repetition, so that no
cache can answer.  This script prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import propgen

# --------------------------------------------------------------------------------------------
# The functions under test.  Each returns a scalar; the benchmark differentiates it with respect
# to the arguments listed in the case's ``wrt``.


def elementwise_chain(x):
    """A chain of elementwise ops, memory-bound at large sizes."""
    a = torch.tanh(x)
    b = torch.sigmoid(x) * a
    c = torch.exp(-(x * x)) + b
    d = a * c - 0.5 * b
    return torch.sum(d * d)


def mlp(x, w1, b1, w2, b2):
    """A two-layer tanh network's squared output, matmul-bound at large sizes."""
    h = torch.tanh(x @ w1 + b1)
    out = torch.tanh(h @ w2 + b2)
    return torch.sum(out * out)


def tanh_loop(x, w, b):
    """Fifty steps of an elementwise recurrence: many small ops and saved intermediates."""
    for _ in range(50):
        x = torch.tanh(x * w + b)
    return torch.sum(x)


@dataclass
class Case:
    name: str
    fn: Callable
    wrt: tuple[int, ...]
    make_args: Callable[[], tuple]


@dataclass
class Row:
    case: str
    propgen_ms: float
    autograd_ms: float
    ratio: float
    max_abs_diff: float
    calls_per_measurement: int


def build_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
        return t.to(device=device, dtype=dtype)

    on_cpu = device.type == "cpu"
    if quick:
        chain_sizes, mlp_sizes, loop_sizes = [10, 100], [10, 64], [10]
    else:
        chain_sizes = [10, 1000, 4000]
        # A 4000x4000 MLP costs ~0.8 TFLOP per forward + backward: minutes on a 2-core CPU.
        mlp_sizes = [10, 1000] if on_cpu else [10, 1000, 4000]
        loop_sizes = [10, 1000]

    cases = []
    for n in chain_sizes:
        cases.append(
            Case(f"elementwise chain {n}x{n}", elementwise_chain, (0,), lambda n=n: (rand(n, n),))
        )
    for n in mlp_sizes:

        def mlp_args(n=n):
            s = n**-0.5
            return (rand(n, n), rand(n, n, scale=s), rand(n), rand(n, n, scale=s), rand(n))

        cases.append(Case(f"mlp {n}x{n}", mlp, (1, 2, 3, 4), mlp_args))
    for n in loop_sizes:
        cases.append(
            Case(
                f"50 tanh steps {n}x{n}",
                tanh_loop,
                (0, 1, 2),
                lambda n=n: (rand(n, n), rand(n, n, scale=0.5), rand(n, n)),
            )
        )
    return cases


# --------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def as_tuple(grads) -> tuple:
    return grads if isinstance(grads, tuple) else (grads,)


def time_calls(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Seconds per call over ``number`` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / number


def run_case(
    case: Case, device: torch.device, repeats: int, warmup: int, min_measure_s: float
) -> Row:
    args = case.make_args()
    dfn = propgen.grad(case.fn, wrt=case.wrt)

    leaves = [a.detach().clone().requires_grad_(i in case.wrt) for i, a in enumerate(args)]
    wrt_leaves = [leaves[i] for i in case.wrt]

    def run_propgen():
        return dfn(*args)

    def run_autograd():
        return torch.autograd.grad(case.fn(*leaves), wrt_leaves)

    # Both must agree before their speed means anything.
    ours, ref = as_tuple(run_propgen()), run_autograd()
    diff = max((g - r).abs().max().item() for g, r in zip(ours, ref))

    for _ in range(warmup):
        run_propgen()
        run_autograd()

    # Enough calls per measurement that the timer's resolution and call overhead do not matter.
    one = max(time_calls(run_propgen, 1, device), time_calls(run_autograd, 1, device), 1e-7)
    number = max(1, int(min_measure_s / one))

    ours_s, ref_s = [], []
    for rep in range(repeats):
        contenders = [(run_propgen, ours_s), (run_autograd, ref_s)]
        if rep % 2:
            contenders.reverse()
        for fn, out in contenders:
            out.append(time_calls(fn, number, device))

    p, a = statistics.median(ours_s), statistics.median(ref_s)
    return Row(case.name, p * 1e3, a * 1e3, p / a, diff, number)


# --------------------------------------------------------------------------------------------
# Code generation time


def codegen_source(name: str) -> str:
    """A 30-line function (def line included) with a loop and a branch."""
    return textwrap.dedent(f"""\
        import torch


        def {name}(x, w, b, v, scale):
            h = x @ w + b
            a = torch.tanh(h)
            s = torch.sigmoid(h)
            g = a * s
            e = torch.exp(-(g * g))
            m = g * e + a
            m = m - 0.5 * torch.tanh(g)
            for _ in range(3):
                m = torch.tanh(m * scale + b)
                m = m + 0.1 * g
            if scale > 1.0:
                m = m / scale
            else:
                m = m * scale
            r = m @ v
            q = torch.sigmoid(r)
            z = q * r - torch.tanh(q)
            z = z + torch.exp(-z * z)
            u = torch.sin(z) * torch.cos(r)
            t = u * u + z
            t = t - 0.5 * q
            t = torch.sigmoid(t) * t
            k = torch.tanh(t) * s.mean()
            n = k * k + u
            p = n.sum(dim=1)
            y = torch.sigmoid(p)
            l1 = torch.sum(y * y)
            l2 = torch.sum(w * w) + torch.sum(v * v)
            return l1 + 0.01 * l2
        """)


def load_fresh_function(directory: Path, name: str) -> Callable:
    """Write the source to its own file and import it, so inspect.getsource finds it."""
    path = directory / f"{name}.py"
    path.write_text(codegen_source(name))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return getattr(module, name)


def time_codegen(repeats: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Median seconds of propgen.grad + propgen.source on never-seen functions, then a call."""
    gen_s, first_call_s = [], []
    n = 8
    args = (torch.randn(n, n), torch.randn(n, n), torch.randn(n), torch.randn(n, n), 1.5)
    args = tuple(a.to(device, dtype) if isinstance(a, torch.Tensor) else a for a in args)
    saved_cache = os.environ.get("PROPGEN_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="propgen-bench-") as tmp:
        tmp_path = Path(tmp)
        stamp = time.time_ns()
        for rep in range(repeats + 1):
            fn = load_fresh_function(tmp_path, f"bench_fn_{stamp}_{rep}")
            # An empty on-disk cache too, so that the code is really generated.
            cache = tmp_path / f"cache_{rep}"
            cache.mkdir()
            os.environ["PROPGEN_CACHE_DIR"] = str(cache)
            start = time.perf_counter()
            dfn = propgen.grad(fn, wrt=(1, 2, 3))
            propgen.source(dfn)
            mid = time.perf_counter()
            dfn(*args)
            synchronize(device)
            end = time.perf_counter()
            if rep:  # the first one also pays for propgen's own imports and template loading
                gen_s.append(mid - start)
                first_call_s.append(end - mid)
    if saved_cache is None:
        os.environ.pop("PROPGEN_CACHE_DIR", None)
    else:
        os.environ["PROPGEN_CACHE_DIR"] = saved_cache
    lines = len(codegen_source("f").splitlines()) - 3  # less the import and blank lines
    return {
        "function_lines": lines,
        "generate_ms": statistics.median(gen_s) * 1e3,
        "generate_ms_min": min(gen_s) * 1e3,
        "first_call_ms": statistics.median(first_call_s) * 1e3,
    }


# --------------------------------------------------------------------------------------------


def fmt_ms(ms: float) -> str:
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"default: {default_device}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="measurements per contender and case (default 15; 3 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few repeats: a smoke test, not figures to quote",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = 2 if args.quick else 5
    min_measure_s = 0.005 if args.quick else 0.05

    header = (
        f"propgen {getattr(propgen, '__version__', '?')} | torch {torch.__version__} | "
        f"device {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)"
        )
        + f" | {args.dtype} | median of {repeats}"
    )
    print(header)
    print()
    print("| case | propgen ms | autograd ms | propgen/autograd | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = []
    for case in build_cases(device, dtype, args.quick):
        row = run_case(case, device, repeats, warmup, min_measure_s)
        rows.append(row)
        print(
            f"| {row.case} | {fmt_ms(row.propgen_ms)} | {fmt_ms(row.autograd_ms)} | "
            f"{row.ratio:.3f} | {row.max_abs_diff:.2g} |",
            flush=True,
        )

    cg = time_codegen(3 if args.quick else repeats, device, dtype)
    print()
    print(
        f"code generation, {cg['function_lines']}-line function (propgen.grad + "
        f"propgen.source, fresh function each time): median {cg['generate_ms']:.1f} ms, "
        f"min {cg['generate_ms_min']:.1f} ms; first call after it {cg['first_call_ms']:.1f} ms"
    )

    if args.json:
        args.json.write_text(
            json.dumps(
                {"header": header, "rows": [asdict(r) for r in rows], "codegen": cg}, indent=2
            )
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
