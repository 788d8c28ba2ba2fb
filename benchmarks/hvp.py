"""Time Hessian-vector products: propgen.hvp (forward over reverse, both generated as source)
against torch.func's forward over reverse (``jvp(grad(f))``) and autograd's double backward.

    python benchmarks/hvp.py [--device cpu|cuda] [--dtype float32|float64] [--repeats N]

The function is a small MLP's mean squared error, differentiated with respect to its first
weight matrix.  Each repetition times ``number`` calls of every contender on the same inputs,
in an order that rotates between repetitions; the table gives the median time per call and
the ratio to torch.func.  The three results are compared before timing.  Prints figures; it
is not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import propgen


def mlp_loss(w1, x, b1, w2, b2, y):
    """A two-layer tanh network's mean squared error."""
    h = torch.tanh(x @ w1 + b1)
    out = h @ w2 + b2
    return ((out - y) ** 2).mean()


def _contenders(args: tuple) -> dict:
    rest = args[1:]

    def loss_of_w1(w1):
        return mlp_loss(w1, *rest)

    hvp = propgen.hvp(mlp_loss, wrt=0)
    func_hvp = torch.func.jvp(torch.func.grad(loss_of_w1), (args[0],), (args[0],))  # warm-up
    del func_hvp

    def run_propgen(v):
        return hvp(*args, tangents=v)

    def run_func(v):
        return torch.func.jvp(torch.func.grad(loss_of_w1), (args[0],), (v,))[1]

    def run_double_backward(v):
        w1 = args[0].detach().requires_grad_()
        (g,) = torch.autograd.grad(loss_of_w1(w1), w1, create_graph=True)
        (hv,) = torch.autograd.grad(g, w1, v)
        return hv

    return {"propgen.hvp": run_propgen, "torch.func jvp(grad)": run_func,
            "autograd double backward": run_double_backward}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(batch: int, width: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    args = (rand(width, width) / width**0.5, rand(batch, width), rand(width),
            rand(width, 10) / width**0.5, rand(10), rand(batch, 10))
    v = rand(width, width)
    runs = _contenders(args)
    results = {name: fn(v) for name, fn in runs.items()}
    ref = results["torch.func jvp(grad)"]
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for name, got in results.items():
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
    number = max(1, int(2e6 // (batch * width * width) + 1))
    times: dict = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(number):
                runs[name](v)
            _sync(device)
            times[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=15)
    a = parser.parse_args()
    dtype = getattr(torch, a.dtype)
    print(f"HVP of an MLP's MSE wrt its first weight ({a.device}, {a.dtype}, median of "
          f"{a.repeats}); ratio = time / torch.func's")
    print(f"{'batch x width':>14} | {'contender':<26} | {'ms':>9} | {'ratio':>6}")
    for batch, width in ((32, 16), (256, 128), (512, 512)):
        res = measure(batch, width, a.device, dtype, a.repeats)
        base = res["torch.func jvp(grad)"]
        for name, t in res.items():
            print(f"{f'{batch} x {width}':>14} | {name:<26} | {t * 1e3:9.3f} | "
                  f"{t / base:6.2f}")


if __name__ == "__main__":
    main()
