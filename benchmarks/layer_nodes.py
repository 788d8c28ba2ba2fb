"""Cost of layer nodes: ProxProp's modes and signal propagation against plain PyTorch.

    python benchmarks/layer_nodes.py [--device cpu|cuda] [--repeats 9] [--quick]

(a) One training step (forward, backward, SGD step) of an MLP 784-1000-1000-10 at batch 500
    (the shape of the ProxProp paper's experiments, scaled down), with the hidden layers as
    ProxProp nodes in 'gradient', 'cg3', 'cg10' and 'exact' modes, against plain PyTorch
    (autograd) and propgen's BackPropagator on the same program.  ProxProp's exact mode
    solves the smaller of the parameter-side (785 x 785, 1001 x 1001) and the batch-side
    (500 x 500) systems.
(b) One step of signal propagation on the sigprop digits MLP shape (64-256-256-256-10, batch
    128): SigpropManager against a plain-PyTorch backprop step of the same network.
Figures are medians of ``--repeats`` runs; ratios are against plain PyTorch measured in the
same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import propgen as pg


@pg.propagate
def mlp(x, hidden, out, manager):
    for layer in hidden:
        x = torch.relu(manager.forward(x, layer=layer))
    return out(x)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def proxprop_steps(device: str, dtype: torch.dtype, repeats: int, quick: bool) -> None:
    sizes = (784, 300, 300, 10) if quick else (784, 1000, 1000, 10)
    batch = 200 if quick else 500
    torch.manual_seed(0)
    layers = [nn.Linear(a, b).to(device, dtype) for a, b in zip(sizes, sizes[1:])]
    params = [p for m in layers for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)
    x = torch.randn(batch, sizes[0], device=device, dtype=dtype)
    y = torch.randint(0, sizes[-1], (batch,), device=device)

    def plain():
        h = x
        for m in layers[:-1]:
            h = torch.relu(m(h))
        loss = F.cross_entropy(layers[-1](h), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def with_manager(manager):
        def step():
            loss = F.cross_entropy(mlp(x, tuple(layers[:-1]), layers[-1], manager), y)
            opt.zero_grad()
            manager.backward(loss)
            opt.step()
        return step

    cases = [("plain PyTorch (autograd)", plain),
             ("BackPropagator", with_manager(pg.PropagationManager(pg.BackPropagator())))]
    for mode in ("gradient", "cg3", "cg10", "exact"):
        cases.append((f"ProxProp {mode}",
                      with_manager(pg.PropagationManager(pg.ProxProp(tau=0.05, mode=mode)))))
    times = {name: _median(fn, repeats, device) for name, fn in cases}
    ref = times["plain PyTorch (autograd)"]
    print(f"(a) MLP {'-'.join(map(str, sizes))}, batch {batch}: one training step")
    for name, t in times.items():
        print(f"    {name:28s} {t * 1e3:9.2f} ms   {t / ref:6.2f}x")


def sigprop_step(device: str, dtype: torch.dtype, repeats: int) -> None:
    torch.manual_seed(0)

    def block(a, b):
        return nn.Sequential(nn.Linear(a, b), nn.LayerNorm(b), nn.ReLU())

    seq = nn.Sequential(block(64, 256), block(256, 256), block(256, 256),
                        nn.Linear(256, 10)).to(device, dtype)
    x = torch.randn(128, 64, device=device, dtype=dtype)
    y = torch.randint(0, 10, (128,), device=device)
    opt = torch.optim.Adam(seq.parameters(), lr=5e-4)
    manager = pg.SigpropManager(optimizer=lambda p: torch.optim.Adam(p, lr=5e-4),
                                context_layer=block(10, 256).to(device, dtype),
                                num_classes=10)
    net = manager.wrap(seq)

    def plain():
        loss = F.cross_entropy(seq(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sigprop():
        loss = F.cross_entropy(net(x, y), y)
        opt.zero_grad()
        manager.backward(loss)
        opt.step()

    t_plain = _median(plain, repeats, device)
    t_sp = _median(sigprop, repeats, device)
    print("(b) sigprop MLP 64-256-256-256-10, batch 128: one training step")
    print(f"    {'plain PyTorch backprop':28s} {t_plain * 1e3:9.2f} ms   {1.0:6.2f}x")
    print(f"    {'SigpropManager (sigprop)':28s} {t_sp * 1e3:9.2f} ms   {t_sp / t_plain:6.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    proxprop_steps(args.device, dtype, args.repeats, args.quick)
    sigprop_step(args.device, dtype, args.repeats)


if __name__ == "__main__":
    main()
