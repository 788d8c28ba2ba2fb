"""Cost of spanning a propagation over processes (torch.distributed, gloo on CPU).

    python benchmarks/distributed.py [--procs 2] [--batch 1000] [--horizon 30] [--repeats 9]

The chaotic sigmoid RNN of the Proppo paper with TotalProp at every step (leave-one-out
baseline), forward + backward, median of ``--repeats`` runs.  Three figures:

* one process, the whole batch (the reference);
* one process, its share of the batch (B / N) with ``process_group=None``: the compute of a
  share, no collectives;
* N gloo processes on this machine, a share each, statistics all-reduced: the share's compute
  plus the collectives (about nine small ones per TotalProp node).

The difference between the last two is the collectives' cost per run; on one machine with
few cores the processes also compete for the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributions import Normal

import propgen as pg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from propagation import rollout  # noqa: E402  (the same RNN as the propagation benchmark)


def timed_runs(batch: int, horizon: int, repeats: int, process_group: object) -> list[float]:
    """Seconds per forward+backward run (after one warm-up run that compiles)."""
    manager = pg.PropagationManager(
        pg.TotalProp(dist_class=Normal, dist_params={"loc": 0.0, "scale": 1e-3}),
        process_group=process_group)
    W = torch.tensor([[-5.0, -25.0], [5.0, 25.0]], dtype=torch.float64)
    s0 = torch.tensor([0.35, 0.55], dtype=torch.float64).expand(batch, 2)
    beta = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    out = []
    for i in range(repeats + 1):
        if process_group is not None:
            dist.barrier()
        start = time.perf_counter()
        manager.backward(rollout(manager, s0, W, beta, horizon))
        if i:
            out.append(time.perf_counter() - start)
    return out


def _worker(rank: int, procs: int, store: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=procs)
    try:
        runs = timed_runs(args.batch // procs, args.horizon, args.repeats, "auto")
        if rank == 0:
            queue.put(runs)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--horizon", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if not (dist.is_available() and dist.is_gloo_available()):
        sys.exit("torch.distributed with gloo is not available")
    torch.set_num_threads(1)
    whole = statistics.median(timed_runs(args.batch, args.horizon, args.repeats, None))
    share = statistics.median(timed_runs(args.batch // args.procs, args.horizon, args.repeats,
                                         None))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, args.procs, store, args, queue))
                 for r in range(args.procs)]
        for p in procs:
            p.start()
        spanned = statistics.median(queue.get(timeout=600))
        for p in procs:
            p.join()
    nodes = args.horizon
    print(f"TotalProp chaotic RNN, batch {args.batch}, horizon {nodes} ({nodes} nodes), "
          f"float64, 1 thread per process, median of {args.repeats}")
    print(f"  one process, whole batch            {1e3 * whole:8.2f} ms")
    print(f"  one process, a 1/{args.procs} share, no group     {1e3 * share:8.2f} ms")
    print(f"  {args.procs} gloo processes, a share each      {1e3 * spanned:8.2f} ms  "
          f"({1e3 * (spanned - share) / nodes:.3f} ms per node for the collectives)")
    return {"whole": whole, "share": share, "spanned": spanned}


if __name__ == "__main__":
    main()
