"""Propagation over several processes (torch.distributed, gloo on CPU): N processes with a
share of the batch each give the gradient estimate of one process with the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from propgen.templates import estimators as est

import propgen as pg
from propgen.distributed import World, leaves_of, resolve_world

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _dist_program as prog  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _run_workers(tmp_path: Path, split: str, world_size: int = 2) -> list[dict]:
    store = tmp_path / "store"
    results = [tmp_path / f"rank{r}.pt" for r in range(world_size)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE / "_dist_program.py"), str(r),
                               str(world_size), str(store), str(results[r]), split],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env)
             for r in range(world_size)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:  # a hang in a collective must not outlive the test
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return [torch.load(r) for r in results]


@pytest.fixture(scope="module")
def single_process() -> dict:
    return prog.estimates(slice(0, prog.BATCH), None)


@pytest.mark.parametrize("split", sorted(prog.SPLITS))
def test_two_gloo_processes_match_one_process(tmp_path, single_process, split):
    ranks = _run_workers(tmp_path, split)
    for name, expected in single_process.items():
        if split == "unequal" and "scalar" in name:
            continue  # a scalar loss per process is averaged: equal shares only (as DDP)
        for rank, got in enumerate(ranks):
            for what, g, e in zip(("beta", "W", "head.weight", "head.bias"), got[name],
                                  expected):
                torch.testing.assert_close(
                    g, e, rtol=1e-9, atol=1e-12,
                    msg=lambda m, n=name, w=what, r=rank: f"{n}, d/d {w}, rank {r}: {m}")


def test_the_estimates_differ_between_estimators(single_process):
    # the comparison above is not vacuous: the configurations give different gradients, and a
    # process alone (its own statistics) gives a different one than the whole batch
    betas = {name: float(g[0]) for name, g in single_process.items()}
    assert len({round(v, 12) for v in betas.values()}) >= len(betas) - 1  # RP twice
    half = prog.estimates(slice(0, 6), None)
    assert float(half["TP"][0]) != pytest.approx(betas["TP"], rel=1e-6)


def test_one_process_world_calls_no_collective(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a collective was called in a single process")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    monkeypatch.setattr(dist, "all_gather", refuse)
    world = resolve_world("auto")
    assert world.size == 1 and world.rank == 0
    c = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(est.batch_sum(c, world), c.sum(0, keepdim=True))
    assert est.batch_size(c, world) == 5
    assert resolve_world(None).size == 1


def test_statistics_match_their_closed_forms_in_one_process():
    # the world-aware helpers against direct formulas (independent of the helpers' code)
    world = World()
    loss = torch.randn(7, dtype=torch.float64)
    loo = torch.stack([torch.cat([loss[:i], loss[i + 1:]]).mean() for i in range(7)])
    torch.testing.assert_close(est.leave_one_out(loss, world), loo)
    torch.testing.assert_close(est.batch_mean(loss, world), loss.mean().expand(7))
    c = torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(est.pooled_batch_variance(c, 7, world), c.var(0).sum())
    left, right = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    full = torch.einsum("bi,bj->bij", left, right)
    torch.testing.assert_close(est.pooled_batch_variance(est.Factored([(left, right)]), 7,
                                                         world), full.var(0).sum())
    x = torch.randn(9, 3, dtype=torch.float64)
    chol = est.batch_cholesky(x, x.mean(0, keepdim=True), world)
    torch.testing.assert_close(chol @ chol.T, torch.cov(x.T), rtol=1e-8, atol=1e-9)


def test_manager_process_group_option():
    m = pg.PropagationManager(pg.LRProp(), process_group=None)
    assert m.world().size == 1
    assert pg.PropagationManager().process_group == "auto"


def test_leaves_of_finds_parameters_and_graph_leaves():
    a = torch.randn(2, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    lin = torch.nn.Linear(2, 2)
    derived = a * 2 + b  # a non-leaf: autograd would carry gradients to a and b

    class Holder:
        def __init__(self):
            self.weight = torch.randn(3, requires_grad=True)

    holder = Holder()
    got = leaves_of([derived, lin, [a], {"k": holder}, torch.randn(2), 3])
    ids = [id(t) for t in got]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(a), id(b), id(lin.weight), id(lin.bias), id(holder.weight)}
