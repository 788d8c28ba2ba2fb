"""Propagation across processes with torch.distributed.

When a process group is initialized (gloo on CPU, nccl on GPU), a
:class:`~propgen.PropagationManager` spans it: each process runs the program on its share of
the batch, and the statistics that span the batch are computed over all processes' samples:

* baselines (leave-one-out, batch mean) and the batch size that weights likelihood-ratio
  gradients and the loss gradient,
* TotalProp's variance estimates (pooled over the whole batch),
* Gaussian shaping's fitted mean and covariance, and the gradient sums it sends back;

and ``manager.backward`` sums the leaf gradients over processes at the end.  So N processes
with B/N samples each compute the gradient estimate one process computes with B samples
(the same one, to rounding, given the same noise: ``shard_noise=True``).

Templates receive this as ``world``, a :class:`World`; the estimators' helpers take it as an
argument (``batch_mean(cost, world)``) and read as the single-process math, which they are
when ``world.size == 1``: no collective is then called.  A process group is torch's global
state; propgen keeps no state of its own here: the manager resolves its ``process_group``
to a :class:`World` at every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["World", "resolve_world", "reduce_leaf_grads", "leaves_of"]


class World:
    """The processes a propagation spans, as the templates see them.

    ``group`` is a torch.distributed process group (None: this process alone).  With
    ``shard_noise`` every process draws the noise of the whole batch from the same random
    stream and keeps its own rows, so the estimate does not depend on how the batch is split
    (it costs each process the random numbers of the whole batch).
    """

    def __init__(self, group: Any = None, shard_noise: bool = False) -> None:
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.shard_noise = bool(shard_noise)

    def __repr__(self) -> str:
        return f"World(rank {self.rank} of {self.size})"

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (``t`` itself in one process)."""
        if self.size == 1:
            return t
        out = t.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t``, stacked in rank order (``t[None]`` in one process)."""
        if self.size == 1:
            return t.unsqueeze(0)
        t = t.contiguous()
        every = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(every, t, group=self.group)
        return torch.stack(every)

    def split(self, n: int, device: torch.device | str = "cpu") -> tuple[int, int]:
        """``(offset, total)``: where this process's ``n`` samples start in the batch of all
        processes (ordered by rank), and that batch's size."""
        if self.size == 1:
            return 0, n
        mine = torch.tensor([n], dtype=torch.int64, device=device)
        every = [torch.zeros_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine, group=self.group)
        counts = [int(c) for c in every]
        return sum(counts[: self.rank]), sum(counts)

    def count(self, n: int, device: torch.device | str = "cpu") -> int:
        """The batch size over all processes of a batch of ``n`` samples here."""
        return self.split(n, device)[1] if self.size > 1 else n

    def draw(self, sample: Callable[[tuple], torch.Tensor], shape: Sequence[int],
             device: torch.device | str = "cpu") -> torch.Tensor:
        """``sample(shape)``, a draw with the batch first; with ``shard_noise`` this
        process's rows of the draw for the whole batch."""
        shape = tuple(shape)
        if self.size == 1 or not self.shard_noise or not shape:
            return sample(shape)
        offset, total = self.split(shape[0], device)
        return sample((total, *shape[1:]))[offset: offset + shape[0]]


def resolve_world(process_group: Any, shard_noise: bool = False) -> World:
    """The :class:`World` of a manager's ``process_group`` option: ``"auto"`` is the default
    group when torch.distributed is initialized (else this process alone), ``None`` this
    process alone, anything else a process group."""
    if process_group == "auto":
        if not (dist.is_available() and dist.is_initialized()):
            return World(None, shard_noise)
        process_group = dist.group.WORLD
    if process_group is None:
        return World(None, shard_noise)
    return World(process_group, shard_noise)


def leaves_of(objects: Iterable[Any]) -> list[torch.Tensor]:
    """The autograd leaves that require grad among ``objects`` (tensors, modules, containers
    and objects holding them one attribute deep), and those autograd reaches from non-leaf
    tensors among them: where a backward pass can write ``.grad``.  The order depends only on
    the objects' order, so processes running the same program list the same leaves."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []

    def add(t: torch.Tensor) -> None:
        if id(t) in seen or not t.requires_grad:
            return
        seen.add(id(t))
        if t.is_leaf:
            out.append(t)
            return
        stack, visited = [t.grad_fn], set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in visited:
                continue
            visited.add(fn)
            var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
            if isinstance(var, torch.Tensor):
                add(var)
            stack.extend(next_fn for next_fn, _ in reversed(fn.next_functions))

    def visit(obj: Any, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            add(obj)
        elif isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                add(p)
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o, depth)
        elif isinstance(obj, dict):
            for o in obj.values():
                visit(o, depth)
        elif depth > 0 and hasattr(obj, "__dict__") and not isinstance(obj, type):
            for o in vars(obj).values():
                visit(o, depth - 1)

    for obj in objects:
        visit(obj, 1)
    return out


def reduce_leaf_grads(world: World, leaves: list[torch.Tensor], before: list) -> None:
    """Sum over processes what this backward added to each leaf's ``.grad`` (``before`` holds
    the ``.grad`` each had before it, set aside), then add back what was there.

    One collective per dtype and device: the gradients are packed into one flat buffer, with
    a flag per leaf so a leaf that got a gradient in any process gets the sum everywhere.
    """
    buckets: dict = {}
    for i, leaf in enumerate(leaves):
        buckets.setdefault((str(leaf.dtype), str(leaf.device)), []).append(i)
    for key in sorted(buckets):
        idx = buckets[key]
        first = leaves[idx[0]]
        parts = [leaves[i].grad.reshape(-1) if leaves[i].grad is not None
                 else torch.zeros(leaves[i].numel(), dtype=first.dtype, device=first.device)
                 for i in idx]
        flags = torch.tensor([leaves[i].grad is not None for i in idx], dtype=first.dtype,
                             device=first.device)
        flat = world.sum(torch.cat(parts + [flags]))
        got = (flat[len(flat) - len(idx):] != 0).tolist()
        start = 0
        for j, i in enumerate(idx):
            leaf = leaves[i]
            n = leaf.numel()
            if got[j]:
                leaf.grad = flat[start: start + n].view_as(leaf).clone()
            start += n
    for leaf, old in zip(leaves, before):
        if old is not None:
            leaf.grad = old if leaf.grad is None else old + leaf.grad
