"""Monte Carlo estimator arithmetic called by the propagator templates' generated code.

Each function is a few lines of tensor math with the batch as dimension 0.  They are plain
functions of their arguments: a reader stepping through generated code can step into them
and see the formula.

The helpers that compute a statistic of the batch (a sum, a mean, a count, a covariance)
take the node's ``world`` (:class:`propgen.distributed.World`): over several processes the
batch is every process's samples, and the statistic is all-reduced; ``None`` (or a world of
one process) is this process alone and calls no collective.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import Normal

from propgen.distributed import World

__all__ = [
    "Gaussian",
    "make_distribution",
    "sample_like",
    "location_score",
    "batch_weights",
    "leave_one_out",
    "batch_mean",
    "batch_sum",
    "batch_average",
    "batch_moments",
    "pooled_batch_variance",
    "Factored",
    "factored_outer",
    "per_sample_unbroadcast",
    "inverse_variance_weight",
    "per_sample_loss",
    "mean_gradient",
    "batch_size",
    "flat_matmul",
    "per_row_dot",
    "standard_normal_like",
    "batch_cholesky",
    "gaussian_curvature",
]


class Gaussian:
    """A Normal(loc, scale) without torch.distributions' checks: what a node's Normal noise
    needs (drawing, and the score), cheap enough to build at every node."""

    __slots__ = ("loc", "scale")

    def __init__(self, loc: Any, scale: Any) -> None:
        self.loc, self.scale = loc, scale


def make_distribution(dist_class: Any, dist_params: Any, x: torch.Tensor) -> Any:
    """The node's noise distribution: ``dist_params`` is a dict of keyword arguments, a tuple of
    positional ones, or a callable of the node input returning either."""
    if dist_class is None:
        raise TypeError("a noise node needs dist_class (e.g. torch.distributions.Normal) and "
                        "dist_params, given to the propagator or to manager.forward")
    if callable(dist_params) and not isinstance(dist_params, (dict, tuple, list)):
        dist_params = _params_of(dist_params, x)
    if dist_class is Normal:
        if isinstance(dist_params, dict) and set(dist_params) == {"loc", "scale"}:
            return Gaussian(dist_params["loc"], dist_params["scale"])
        if isinstance(dist_params, (tuple, list)) and len(dist_params) == 2:
            return Gaussian(*dist_params)
        raise TypeError(f"Normal noise needs dist_params={{'loc': ..., 'scale': ...}} (or a pair "
                        f"(loc, scale)), not {dist_params!r}")
    if isinstance(dist_params, dict):
        params = {k: _as_tensor(v, x) for k, v in dist_params.items()}
        dist = dist_class(**params)
    else:
        dist = dist_class(*[_as_tensor(v, x) for v in dist_params])
    return dist


def _params_of(fn: Any, x: torch.Tensor) -> Any:
    """``fn(x)``, refusing parameters that depend on x: the noise templates differentiate with
    the noise distribution held fixed, so such a dependence would be a silently lost term."""
    with torch.enable_grad():
        probe = x.detach().requires_grad_()
        params = fn(probe)
    values = params.values() if isinstance(params, dict) else params
    if any(isinstance(v, torch.Tensor) and v.requires_grad for v in values):
        raise NotImplementedError(
            "dist_params computed from the node input depend on the node input: gradients "
            "through the noise distribution's parameters are not supported; compute them from "
            "values that do not depend on x (e.g. x.detach())")
    return params


def _as_tensor(v: Any, x: torch.Tensor) -> Any:
    # numbers become tensors on the node's device and dtype, so the noise lands there too
    if isinstance(v, (int, float)):
        return torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v


def sample_like(dist: Any, x: torch.Tensor, reparameterized: bool,
                world: World | None = None) -> torch.Tensor:
    """One draw of noise of ``x``'s shape (the distribution's batch shape broadcast to x);
    with a ``world`` that shards noise, this process's rows of the whole batch's draw."""
    if isinstance(dist, Gaussian):  # as Normal.rsample draws it: loc + eps * scale
        loc, scale = dist.loc, dist.scale
        shape = x.shape
        for p in (loc, scale):
            if isinstance(p, torch.Tensor) and p.shape != shape:
                shape = torch.broadcast_shapes(shape, p.shape)
        eps = _draw(lambda s: torch.empty(s, dtype=x.dtype, device=x.device).normal_(), shape,
                    x, world)
        if isinstance(loc, (int, float)) and loc == 0:  # (eps is ours: scale it in place)
            return eps.mul_(scale) if isinstance(scale, (int, float)) else eps * scale
        return loc + eps * scale
    shape = torch.broadcast_shapes(x.shape, dist.batch_shape)
    extra = shape[: len(shape) - len(dist.batch_shape)] if dist.batch_shape else shape
    if extra:
        draw = _draw(dist.rsample if reparameterized else dist.sample, extra, x, world)
    else:  # the distribution holds the batch: one draw of it
        draw = dist.rsample(extra) if reparameterized else dist.sample(extra)
    return draw.expand(shape)


def _draw(sample: Any, shape: Any, x: torch.Tensor, world: World | None) -> torch.Tensor:
    if world is None:
        return sample(tuple(shape))
    return world.draw(sample, shape, x.device)


def _sum(t: torch.Tensor, world: World | None) -> torch.Tensor:
    # a sum over the batch: over every process's samples when the node spans several
    return t if world is None else world.sum(t)


def _count(n: int, world: World | None, device: Any) -> int:
    return n if world is None else world.count(n, device)


def _sum_and_count(t: torch.Tensor, n: int, world: World | None) -> tuple[torch.Tensor, int]:
    # a sum over the batch and the batch size, in one collective when there are several
    if world is None or world.size == 1:
        return t, n
    both = world.sum(torch.cat([t.reshape(-1), t.new_tensor([float(n)])]))
    return both[:-1].reshape(t.shape), int(round(float(both[-1])))


def location_score(dist: Any, noise: torch.Tensor) -> torch.Tensor:
    """d/dx log p(x + noise) for noise of density p shifted by x: minus the density's score at
    the noise.  Closed form for a Normal; autograd on ``log_prob`` for other distributions."""
    if isinstance(dist, (Normal, Gaussian)):
        return (noise - dist.loc) / (dist.scale * dist.scale)
    with torch.enable_grad():
        z = noise.detach().requires_grad_()
        (score,) = torch.autograd.grad(dist.log_prob(z).sum(), z)
    return -score


def _gaussian_params(dist_params: Any, dist: Any) -> list:
    """(key, which) pairs of a Normal's dist_params: which is 'loc' or 'scale'."""
    if not isinstance(dist, Gaussian):
        raise NotImplementedError(
            "gradients reach the noise distribution's parameters (they are computed from "
            f"differentiated values), which propgen supports for Normal only, not {dist!r}")
    if isinstance(dist_params, dict):
        return [(k, k) for k in dist_params]
    return list(zip(range(len(dist_params)), ("loc", "scale")))


def _like_params(dist_params: Any, grads: dict) -> Any:
    if isinstance(dist_params, dict):
        return {k: grads.get(k) for k in dist_params}
    return type(dist_params)(grads.get(i) for i in range(len(dist_params)))


def _reduce_to(g: torch.Tensor, p: Any) -> Any:
    if not isinstance(p, torch.Tensor):
        return None
    return g.sum_to_size(p.shape) if g.shape != p.shape else g


def pathwise_params_grad(dist_params: Any, dist: Any, noise: torch.Tensor,
                         g: torch.Tensor) -> Any:
    """Gradients of loc and scale through noise = loc + scale * eps (eps held fixed), shaped
    like ``dist_params``: d loc = g, d scale = g * eps, each summed to its parameter's shape."""
    grads = {}
    for key, which in _gaussian_params(dist_params, dist):
        value = dist_params[key]
        if which == "loc":
            grads[key] = _reduce_to(g, value)
        else:
            grads[key] = _reduce_to(g * (noise - dist.loc) / dist.scale, value)
    return _like_params(dist_params, grads)


def score_params_grad(dist_params: Any, dist: Any, noise: torch.Tensor,
                      weight: torch.Tensor) -> Any:
    """Likelihood-ratio gradients of loc and scale: weight * d log N(noise; loc, scale), with
    d/dloc = (noise - loc) / scale^2 and d/dscale = ((noise - loc)^2 - scale^2) / scale^3."""
    grads = {}
    for key, which in _gaussian_params(dist_params, dist):
        value = dist_params[key]
        z = (noise - dist.loc) / dist.scale
        local = z / dist.scale if which == "loc" else (z * z - 1.0) / dist.scale
        grads[key] = _reduce_to(weight * local, value)
    return _like_params(dist_params, grads)


def mix_params_grads(k: torch.Tensor, lr: Any, rp: Any) -> Any:
    """k * lr + (1 - k) * rp, entry by entry (None where a parameter gets no gradient)."""
    keys = lr.keys() if isinstance(lr, dict) else range(len(lr))
    out = {key: None if lr[key] is None else k * lr[key] + (1 - k) * rp[key] for key in keys}
    return out if isinstance(lr, dict) else type(lr)(out[i] for i in keys)


def per_sample_loss(loss: Any, like: torch.Tensor, site: str) -> torch.Tensor:
    """The per-sample cost arriving at a node, checked against the node's batch size."""
    if loss is None:
        raise RuntimeError(
            f"{site}: this node needs the per-sample loss, and none reached it: call "
            "manager.backward(loss) with the loss the nodes feed into")
    if loss.dim() == 0 or loss.shape[0] != like.shape[0]:
        raise ValueError(
            f"{site}: the loss has shape {tuple(loss.shape)} but this node has batch size "
            f"{like.shape[0]}: pass a per-sample loss of shape ({like.shape[0]},)")
    return loss


def batch_weights(loss: torch.Tensor, like: torch.Tensor,
                  world: World | None = None) -> torch.Tensor:
    """``loss / B`` shaped to broadcast against ``like`` (batch first): the likelihood-ratio
    gradient of the batch mean weights each sample's score by its loss over B (B counts the
    samples of every process the node spans)."""
    b = _count(loss.shape[0], world, loss.device)
    return (loss / b).reshape((loss.shape[0],) + (1,) * (like.dim() - 1))


def leave_one_out(loss: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """Each sample's baseline: the mean loss of the *other* samples (unbiased for LR)."""
    total, n = _sum_and_count(loss.sum(0, keepdim=True), loss.shape[0], world)
    if n < 2:
        raise ValueError("a leave-one-out baseline needs a batch of at least 2 samples")
    return (total - loss) / (n - 1)


def batch_mean(loss: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """The batch mean as baseline (slightly biased: each sample is in its own baseline)."""
    total, n = _sum_and_count(loss.sum(0, keepdim=True), loss.shape[0], world)
    return (total / n).expand_as(loss)


def batch_sum(x: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """The sum over the batch (dim 0, kept) of every process the node spans."""
    return _sum(x.sum(0, keepdim=True), world)


def batch_average(x: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """The mean over the batch (dim 0, kept) of every process the node spans."""
    total, n = _sum_and_count(x.sum(0, keepdim=True), x.shape[0], world)
    return total / n


class Factored:
    """Per-sample contributions to a shared weight that enters through a linear map, kept as
    factors: sample i contributes sum_a outer(left_a[i], right_a[i]).  Their batch variance is
    computed from the factors (:meth:`pooled_variance`) without the (B, m, n) tensor."""

    __slots__ = ("terms", "transposed")

    def __init__(self, terms: list, transposed: bool = False) -> None:
        self.terms, self.transposed = terms, transposed

    @property
    def mT(self) -> Factored:  # noqa: N802 - torch's spelling
        return Factored(self.terms, not self.transposed)

    @property
    def shape(self) -> tuple:
        left, right = self.terms[0]
        return (left.shape[0], left.shape[1] * right.shape[1])

    def __add__(self, other: Any) -> Any:
        if isinstance(other, Factored) and other.transposed == self.transposed:
            return Factored(self.terms + other.terms, self.transposed)
        return self.materialize() + (other.materialize() if isinstance(other, Factored)
                                     else other)

    __radd__ = __add__

    def materialize(self) -> torch.Tensor:
        out = sum(torch.einsum("bi,bj->bij", left, right) for left, right in self.terms)
        return out.mT if self.transposed else out

    def moments(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(B, mean_i c_i, sum_i |c_i - mean|^2) of the contributions, from the factors:
        sum_i |c_i|^2 - B |mean|^2 with |c_i|^2 = sum_ab (l_a[i] . l_b[i]) (r_a[i] . r_b[i])."""
        b = self.terms[0][0].shape[0]
        sq = 0.0
        for la, ra in self.terms:
            for lb, rb in self.terms:
                sq = sq + ((la * lb).sum(1) * (ra * rb).sum(1)).sum()
        mean = sum(left.T @ right for left, right in self.terms) / max(b, 1)
        return b, mean, sq - b * (mean * mean).sum()

    def pooled_variance(self) -> torch.Tensor:
        """sum_jk Var_i(c_ijk), the sample variance over the batch summed over the target."""
        b, _, m2 = self.moments()
        return m2 / max(b - 1, 1)


def factored_outer(g: torch.Tensor, input: torch.Tensor, weight: Any) -> Any:
    """Per-sample contributions to ``weight`` of ``input @ weight`` with output gradient ``g``:
    outer(input[i], g[i]) for each sample, factored.  (Batched or 1-D operands: materialized.)"""
    if input.dim() == 2 and g.dim() == 2:
        return Factored([(input, g)])
    return torch.einsum("b...i,b...j->bij", input, g)


def per_sample_vjp(segment: Any, target: torch.Tensor, g: torch.Tensor, inputs: tuple,
                   site: str = "") -> Any:
    """Per-sample contributions of ``g`` (gradient at the node input, batch first) to a
    ``target`` through ``segment(target, *inputs)``, by torch.func: the general fallback where
    an op's adjoint has no per-sample form.

    A per-sample target (batch first: ``beta.expand(B, 1)``) needs one vector-Jacobian product
    of the whole batch: row i of its gradient is sample i's contribution.  A shared target
    (a weight) needs the product sample by sample: the segment is mapped over the batch with
    vmap, inputs whose first dim is the batch one sample at a time (as a batch of one)."""
    from torch.func import vjp, vmap

    batch = g.shape[0]
    with torch.enable_grad():
        if target.dim() > 0 and target.shape[0] == batch:
            _, pull = vjp(lambda t: segment(t, *inputs), target)
            return pull(g)[0]
        dims = tuple(0 if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch
                     else None for a in inputs)

        def one(gi: torch.Tensor, *ins: Any) -> torch.Tensor:
            ins = tuple(i.unsqueeze(0) if d == 0 else i for i, d in zip(ins, dims))
            _, pull = vjp(lambda tt: segment(tt, *ins), target)
            return pull(gi.unsqueeze(0))[0]

        try:
            return vmap(one, in_dims=(0,) + dims)(g, *inputs)
        except RuntimeError as e:
            raise RuntimeError(
                f"{site}: TotalProp replays the code between the previous node and this one "
                "sample by sample (torch.func.vmap) to get each sample's contribution to the "
                f"shared ivw_target {tuple(target.shape)}, and that failed: {e}.  Code there "
                "that depends on the batch size through a number computed earlier (batch = "
                "x.shape[0]) sees a batch of one: compute it from a tensor of the segment, or "
                "give a per-sample target (w.expand(B, *w.shape) used in the computation)"
            ) from e


def per_sample_unbroadcast(g: torch.Tensor, x: Any) -> torch.Tensor:
    """``unbroadcast(g, x)`` keeping the batch (dim 0 of ``g``): the per-sample contributions
    to a target ``x`` the batch was broadcast against.  A target that already has the batch
    as its first dim (``beta.expand(B, 1)``) is summed as usual."""
    if not isinstance(x, torch.Tensor):
        return g.reshape(g.shape[0], -1).sum(1)
    if x.dim() == g.dim() and x.shape[0] == g.shape[0]:
        return g.sum_to_size(x.shape)
    extra = g.dim() - x.dim()
    if extra >= 1:
        return g.sum_to_size((g.shape[0],) + (1,) * (extra - 1) + tuple(x.shape))
    return g.sum_to_size((g.shape[0],) + tuple(x.shape[1:]))


def batch_moments(c: Any, batch: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(B, mean over the batch, sum of squared deviations from it) of per-sample contributions
    ``c`` (``batch`` of them, on dim 0): the summary one process's samples give."""
    if isinstance(c, Factored):
        return c.moments()
    if c.dim() == 0 or c.shape[0] != batch:
        raise ValueError(
            f"TotalProp needs per-sample contributions to its ivw_target, got shape "
            f"{tuple(c.shape)} for batch {batch}: pass a target with the batch as its first "
            "dimension, e.g. ivw_target=beta.expand(B, 1) used in the computation")
    mean = c.mean(0)
    centred = c - mean  # two passes: stable when V << mean^2
    return batch, mean, (centred * centred).sum()


def pooled_batch_variance(c: Any, batch: int, world: World | None = None) -> torch.Tensor:
    """Sum over a target's elements of the sample variance over the batch (dim 0) of per-sample
    contributions ``c`` (``batch`` of them here; the batch of every process ``world`` spans)."""
    return _pooled([c], batch, world)[0]


def _pooled(cs: list, batch: int, world: World | None) -> list:
    # each process's (n, mean, M2), combined exactly (Chan et al.'s parallel variance): one
    # all_gather for all of ``cs``, whatever the number of processes
    moments = [batch_moments(c, batch) for c in cs]
    if world is None or world.size == 1:
        return [m2 / max(n - 1, 1) for n, _, m2 in moments]
    like = moments[0][2]
    rows = torch.cat([torch.cat([like.new_tensor([float(n)]), mean.reshape(-1).to(like.dtype),
                                 m2.reshape(1).to(like.dtype)]) for n, mean, m2 in moments])
    every = world.gather(rows)  # (processes, len(rows))
    out, start = [], 0
    for _, mean, _ in moments:
        width = mean.numel() + 2
        part = every[:, start: start + width]
        start += width
        n_p, means, m2_p = part[:, 0], part[:, 1:-1], part[:, -1]
        n = n_p.sum()
        mean_all = (n_p[:, None] * means).sum(0) / n.clamp(min=1)
        spread = (n_p * ((means - mean_all) ** 2).sum(1)).sum()
        out.append((m2_p.sum() + spread) / (n - 1).clamp(min=1))
    return out


def inverse_variance_weight(c_rp: Any, c_lr: Any, batch: int,
                            world: World | None = None) -> torch.Tensor:
    """Total propagation's weight of the LR message, k = V_RP / (V_LR + V_RP), in [0, 1], with
    0/0 giving 1/2; V_* pooled over the target from the per-sample contributions (``batch``
    of them: the node's batch size here)."""
    v_rp, v_lr = _pooled([c_rp, c_lr], batch, world)
    total = v_rp + v_lr
    half = torch.full_like(total, 0.5)
    k = torch.where(total > 0, v_rp / torch.where(total > 0, total, torch.ones_like(total)), half)
    return k.clamp(0.0, 1.0)


def mean_gradient(loss: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """The gradient of ``loss.mean()`` over the batch of every process (of the loss itself
    when it is a scalar; a scalar in each of N processes counts 1/N)."""
    if loss.dim() == 0:
        return torch.full_like(loss, 1.0 / (1 if world is None else world.size))
    return torch.full_like(loss, 1.0 / max(_count(loss.numel(), world, loss.device), 1))


def batch_size(x: torch.Tensor, world: World | None = None) -> int:
    """The number of samples (dim 0) of ``x`` over every process the node spans."""
    return _count(x.shape[0], world, x.device)


def flat_matmul(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x @ a`` over the flattened sample dims of a batch ``x``, keeping x's shape."""
    return (x.reshape(x.shape[0], -1) @ a).reshape(x.shape)


def per_row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products of two batches (b may be a single row)."""
    return (a * b).reshape(a.shape[0], -1).sum(1)


def standard_normal_like(x: torch.Tensor, world: World | None = None) -> torch.Tensor:
    """Standard normal noise of ``x``'s shape (batch first; see :func:`sample_like`)."""
    return _draw(lambda s: torch.empty(s, dtype=x.dtype, device=x.device).normal_(), x.shape,
                 x, world)


def batch_cholesky(x: torch.Tensor, mean: torch.Tensor, world: World | None = None,
                   jitter: float = 1e-10) -> torch.Tensor:
    """Cholesky factor L of the batch covariance of ``x`` (samples on dim 0, the rest
    flattened), with a little jitter so a degenerate batch still factors."""
    c = (x - mean).reshape(x.shape[0], -1)
    cov, n = _sum_and_count(c.T @ c, x.shape[0], world)
    cov = cov / max(n - 1, 1)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    scale = cov.diagonal().mean().clamp(min=1e-30)
    return torch.linalg.cholesky(cov + jitter * scale * eye)


def gaussian_curvature(g: torch.Tensor, eps: torch.Tensor, chol: torch.Tensor,
                       world: World | None = None) -> torch.Tensor:
    """d E[c] / d Sigma = E[hessian of c] / 2 (Price), with the Hessian's expectation from
    gradients at the resampled points: E[grad c eps^T] L^-1 (Stein).  ``g`` holds the
    gradients of the batch mean, so the sum over the batch is the expectation."""
    gf = g.reshape(g.shape[0], -1)
    a = _sum(gf.T @ eps.reshape(eps.shape[0], -1), world)  # E[grad c eps^T]
    h = torch.linalg.solve_triangular(chol.T, a.T, upper=True).T  # a @ L^-1
    return 0.25 * (h + h.T)
