"""Cost of propagation nodes: per-node overhead, and RP/LR/TP against plain PyTorch.

    python benchmarks/propagation.py [--device cpu|cuda] [--repeats 7] [--quick]

(a) A chain of N identity nodes (``propgen.Propagator()``), N = 1e3 .. 1e6: microseconds per
    node for the forward and the backward pass (Proppo's interpreted manager: ~9-14 us).
(b) The sigmoid RNN of the Proppo paper (x = sigmoid(b * x @ W) + noise at every step, per-
    sample loss 0.5 ||1 - x_H||^2): propgen's RPProp, LRProp and TotalProp against plain
    PyTorch RP (autograd through the noise), interleaved in one run, at the paper's B.3 size
    (dimension 500, batch 1000, horizon 10) and the chaotic size (dimension 2, batch 1000,
    horizon 100).  Figures are medians of ``--repeats`` forward+backward runs; ratios are
    against plain PyTorch measured in the same run.
(c) TotalProp's statistic for a shared weight: the pooled batch variance of per-sample
    gradient contributions to a 500x500 linear layer's weight, batch 1000, from propgen's
    factored rule against torch.func.vmap(grad) materializing them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.distributions import Normal

import propgen as pg


@pg.propagate
def chain(manager, x, n):
    for _ in range(n):
        x = manager.forward(x)
    return x


@pg.propagate
def rollout(manager, x, W, beta, horizon):
    b = beta.expand(x.shape[0], 1)
    for _ in range(horizon):
        x = torch.sigmoid(b * (x @ W))
        x = manager.forward(x, ivw_target=b)
    return 0.5 * ((1.0 - x) ** 2).sum(dim=1)


def plain_rp(x, W, beta, horizon, scale):
    b = beta.expand(x.shape[0], 1)
    noise = Normal(torch.zeros((), dtype=x.dtype, device=x.device),
                   torch.full((), scale, dtype=x.dtype, device=x.device))
    for _ in range(horizon):
        x = torch.sigmoid(b * (x @ W))
        x = x + noise.rsample(x.shape)
    return 0.5 * ((1.0 - x) ** 2).sum(dim=1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def node_chain(device: str, sizes: list[int], repeats: int) -> None:
    print("(a) identity-node chain: microseconds per node (median of runs)")
    print(f"{'N':>9} {'forward':>9} {'backward':>9}")
    manager = pg.PropagationManager(pg.Propagator())
    x = torch.ones(1, device=device, requires_grad=True)
    manager.backward(chain(manager, x, 10))  # compile once
    for n in sizes:
        fw, bw = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            y = chain(manager, x, n)
            t1 = time.perf_counter()
            manager.backward(y)
            t2 = time.perf_counter()
            fw.append((t1 - t0) / n * 1e6)
            bw.append((t2 - t1) / n * 1e6)
        print(f"{n:>9} {statistics.median(fw):>9.3f} {statistics.median(bw):>9.3f}")


def rnn(device: str, dim: int, batch: int, horizon: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(dim, dim, generator=g) / dim ** 0.5).to(device)
    beta = torch.tensor([1.0], device=device, requires_grad=True)
    x0 = torch.rand(batch, dim, generator=g).to(device)
    scale = 1e-3
    kw = dict(dist_class=Normal, dist_params={"loc": 0.0, "scale": scale})
    managers = {
        "RP": pg.PropagationManager(pg.RPProp(**kw)),
        "LR": pg.PropagationManager(pg.LRProp(**kw)),
        "TP": pg.PropagationManager(pg.TotalProp(**kw)),
    }

    def run_plain():
        beta.grad = None
        plain_rp(x0, W, beta, horizon, scale).mean().backward()

    def runner(m):
        def run():
            beta.grad = None
            m.backward(rollout(m, x0, W, beta, horizon))
        return run

    runs = {"torch RP": run_plain, **{k: runner(m) for k, m in managers.items()}}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():  # warm up and compile
        f()
    for _ in range(repeats):  # interleaved, so drifts of the machine hit all alike
        for k, f in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["torch RP"])
    print(f"(b) RNN dim {dim}, batch {batch}, horizon {horizon} on {device}: "
          "median ms (ratio to plain PyTorch RP)")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"    {k:>9}: {med * 1e3:8.2f} ms  ({med / base:.2f}x)")


def factored_vs_vmap(device: str, repeats: int) -> None:
    from propgen.templates.estimators import Factored
    from torch.func import grad, vmap

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 500, generator=g).to(device)
    w = (torch.randn(500, 500, generator=g) / 500 ** 0.5).to(device)
    up = torch.randn(1000, 500, generator=g).to(device)  # the gradient at the layer output

    def per_sample(wt, xi, ui):
        return (torch.tanh(xi @ wt) * ui).sum()

    def run_vmap():
        c = vmap(grad(per_sample), in_dims=(None, 0, 0))(w, x, up)
        return c.var(0).sum()

    def run_factored():
        h = torch.tanh(x @ w)
        gout = up * (1 - h * h)
        return Factored([(x, gout)]).pooled_variance()

    a, b = float(run_vmap()), float(run_factored())
    assert abs(a - b) <= 1e-3 * abs(a), (a, b)
    times = {"vmap(grad)": [], "factored": []}
    for _ in range(repeats):
        for k, f in (("vmap(grad)", run_vmap), ("factored", run_factored)):
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    v, fa = statistics.median(times["vmap(grad)"]), statistics.median(times["factored"])
    print(f"(c) per-sample variance, 500x500 linear weight, batch 1000 on {device}: "
          f"vmap(grad) {v * 1e3:.1f} ms, factored {fa * 1e3:.1f} ms ({v / fa:.0f}x faster)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    sizes = [1000, 10000] if args.quick else [1000, 10000, 100000, 1000000]
    node_chain(args.device, sizes, args.repeats)
    rnn(args.device, 500 if not args.quick else 100, 1000, 10, args.repeats)
    rnn(args.device, 2, 1000, 100, args.repeats)
    factored_vs_vmap(args.device, max(3, args.repeats // 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
