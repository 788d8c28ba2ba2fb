"""Memory of a training loop with a manager: resident memory and live tensors over iterations
of a long chain of nodes, next to the same loop under torch.autograd, and the time per
iteration of each.  The figures back the memory claim in docs/guarantees.md.

    python benchmarks/memory.py                        # 10^4 nodes, 100 iterations
    python benchmarks/memory.py --steps 1000 --iterations 20 --device cuda

Prints the footprint after the first iteration and after the last (RSS on Linux; the CUDA
allocator's bytes on a GPU), the growth, and the median iteration time of propgen and of
autograd with their ratio.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

import propgen as pg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests._memory_program import chain, chain_reference  # noqa: E402  (the tested program)


def footprint(device: torch.device) -> dict:
    gc.collect()
    out = {"tensors": sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))}
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm", encoding="ascii") as fh:
            out["rss_mb"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_mb"] = torch.cuda.memory_allocated(device) / 2**20
    return out


def loop(step, args: argparse.Namespace, device: torch.device) -> tuple[dict, dict, list]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.width, generator=g, dtype=torch.float64).to(device)
    w = 0.3 * torch.randn(args.width, args.width, generator=g, dtype=torch.float64)
    w = w.to(device).requires_grad_()
    opt = torch.optim.SGD([w], lr=1e-3)
    times, first = [], {}
    for i in range(args.iterations):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step(x, w)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
        if i == 0:
            first = footprint(device)
    return first, footprint(device), times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10_000, help="nodes per forward pass")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    manager = pg.PropagationManager()

    def propgen_step(x, w):
        manager.backward(chain(manager, x, w, args.steps))

    def autograd_step(x, w):
        chain_reference(x, w, args.steps).mean().backward()

    print(f"{args.steps} nodes, {args.iterations} iterations, batch {args.batch}, width "
          f"{args.width}, {device}, torch {torch.__version__}")
    medians = {}
    for name, step in [("propgen", propgen_step), ("autograd", autograd_step)]:
        first, last, times = loop(step, args, device)
        medians[name] = statistics.median(times[1:] or times)
        growth = {k: round(last[k] - first[k], 2) for k in first}
        print(f"{name:9s} after 1st {first}  after last {last}  growth {growth}  "
              f"median iteration {medians[name] * 1e3:.1f} ms")
    print(f"propgen / autograd time per iteration: {medians['propgen'] / medians['autograd']:.2f}")


if __name__ == "__main__":
    main()
