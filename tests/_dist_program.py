"""A propagated program and its estimators, run by tests/test_distributed.py in one process
and, through ``python tests/_dist_program.py RANK WORLD_SIZE STORE OUT``, in several gloo
processes that each take a share of the batch."""

from __future__ import annotations

import sys

import torch
from torch.distributions import Normal

import propgen as pg

BATCH = 12
SPLITS = {"equal": (6, 6), "unequal": (7, 5)}


@pg.propagate
def paths(manager, s0, W, beta, head, horizon):
    """Two chaotic sigmoid paths per sample, a Gaussian-shaping node on the first path's last
    state (or whatever the "shape" propagator is), and a linear head read opaquely."""
    b = beta.expand(s0.shape[0], 1)
    x = s0
    for _ in range(horizon):
        x = torch.sigmoid(b.unsqueeze(-1) * (x.unsqueeze(-1) * W).sum(-2))
        x = manager.forward(x, ivw_target=b)
    first = manager.forward(x[:, 0], local_propagator="shape")
    out = head(first).squeeze(-1)
    return 0.5 * ((1.0 - first) ** 2).sum(1) + 0.5 * ((1.0 - x[:, 1]) ** 2).sum(1) + out * out


@pg.propagate
def linear_paths(manager, s0, W, beta, head, horizon):
    """The first path through a shared weight ``W`` read by a matrix product: TotalProp's
    contributions to it are kept factored, their variance pooled over processes."""
    x = s0[:, 0]
    for _ in range(horizon):
        x = torch.sigmoid(beta * (x @ W))
        x = manager.forward(x, ivw_target=W)
    return 0.5 * ((1.0 - x) ** 2).sum(1) + head(x).squeeze(-1) ** 2


def configurations() -> dict:
    """Estimator name -> (default propagator, "shape" propagator, loss propagator, scalar loss)."""
    noise = dict(dist_class=Normal, dist_params={"loc": 0.0, "scale": 0.05})
    return {
        "RP": (pg.RPProp(**noise), pg.Propagator(), None, False),
        "RP scalar loss": (pg.RPProp(**noise), pg.Propagator(), None, True),
        "LR loo": (pg.LRProp(**noise), pg.Propagator(), None, False),
        "LR mean baseline": (pg.LRProp(baseline="mean", **noise), pg.Propagator(),
                             pg.LossProp(lossgrad=False, baseline="mean"), False),
        "TP": (pg.TotalProp(**noise), pg.Propagator(), None, False),
        "LR+GSLoss": (pg.LRProp(**noise), pg.GSLoss(), pg.LossProp(lossgrad=True), False),
        "TP+GSProp": (pg.TotalProp(**noise), pg.GSProp(), None, False),
        "TP shared W": (pg.TotalProp(**noise), pg.Propagator(), None, False),
    }


def data(dtype: torch.dtype = torch.float64) -> tuple:
    """The whole batch's inputs and the parameters (the same in every process)."""
    gen = torch.Generator().manual_seed(7)
    s0 = torch.rand(BATCH, 2, 2, generator=gen, dtype=dtype)
    W = torch.tensor([[-5.0, -25.0], [5.0, 25.0]], dtype=dtype)
    head = torch.nn.Linear(2, 1, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.3, -0.2]], dtype=dtype))
        head.bias.fill_(0.1)
    return s0, W, head


def estimates(rows: slice, process_group: object, repeats: int = 2) -> dict:
    """Each configuration's gradients (beta, W, head) over ``repeats`` backward passes, for the
    batch rows ``rows``: accumulated in .grad across repeats, as a training step might."""
    s0_all, W0, head = data()
    out = {}
    for name, (default, shape, lossprop, scalar) in configurations().items():
        manager = pg.PropagationManager(default, loss_propagator=lossprop,
                                        process_group=process_group, shard_noise=True)
        manager.add_propagator("shape", shape)
        beta = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
        W = W0.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        torch.manual_seed(11)  # the same random stream in every process (shard_noise)
        for _ in range(repeats):
            program = linear_paths if "shared" in name else paths
            loss = program(manager, s0_all[rows], W, beta, head, 3)
            manager.backward(loss.mean() if scalar else loss)
        out[name] = [beta.grad.clone(), W.grad.clone(), head.weight.grad.clone(),
                     head.bias.grad.clone()]
    return out


def worker(rank: int, world_size: int, store: str, result: str, split: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    try:
        sizes = SPLITS[split]
        start = sum(sizes[:rank])
        torch.save(estimates(slice(start, start + sizes[rank]), "auto"), result)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
