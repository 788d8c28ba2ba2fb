"""RP, LR and TP estimators of @propgen.propagate against independent pure-torch references.

Two kinds of checks:

* exact ones, with the noise known: a ``dist_class`` of our own (:func:`fixed_noise`) hands
  each node a draw we chose, so propgen's gradients must equal, to rounding, gradients computed
  here with plain torch from the formulas (RP: backprop with the noise held fixed; LR: score
  times leave-one-out-baselined cost over B, nothing pathwise; TP: the inverse-variance mix of
  the two at every node, with weights from per-sample contributions to the target);
* statistical ones, with ``Normal`` noise from torch's generator: the mean of R estimates must
  be within 4 standard errors, estimated from the same R estimates, of a closed form or of the
  other estimators.  A wrong estimator (a missing 1/B, a wrong score, a biased baseline, a wrong
  TP mix) is off by far more than that.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Distribution, Normal

import propgen as pg

F64 = torch.float64


# --------------------------------------------------------------------- pure-torch helpers


def fixed_noise(draws, scale):
    """A ``dist_class`` whose instances hand out ``draws`` in order, one per node.

    Each node builds its distribution once per forward pass, so the k-th node of a pass gets
    ``draws[k]`` (for ``rsample`` and ``sample`` alike).  Its density is that of
    Normal(0, scale), which is what the likelihood-ratio score is taken from.  The returned
    list is the queue of draws not handed out yet: empty after a complete pass.
    """
    queue = list(draws)

    class FixedNoise(Distribution):
        arg_constraints: dict = {}
        has_rsample = True

        def __init__(self, scale):
            if not queue:
                raise AssertionError("more noise draws were asked for than nodes ran")
            self.scale = scale
            self.draw = queue.pop(0)
            super().__init__(batch_shape=self.draw.shape, validate_args=False)

        def rsample(self, sample_shape=torch.Size()):  # noqa: B008 - torch's signature
            return self.draw.expand(torch.Size(sample_shape) + self.draw.shape)

        def sample(self, sample_shape=torch.Size()):  # noqa: B008
            return self.rsample(sample_shape).detach()

        def log_prob(self, value):
            return Normal(torch.zeros_like(value), self.scale).log_prob(value)

    return FixedNoise, queue


def leave_one_out(cost):
    b = cost.shape[0]
    return (cost.sum() - cost) / (b - 1)


def pooled_variance(c):
    """Sum over the target's elements of the batch sample variance of contributions c."""
    return c.reshape(c.shape[0], -1).var(dim=0, unbiased=True).sum()


def tp_weight(c_rp, c_lr):
    v_rp, v_lr = pooled_variance(c_rp), pooled_variance(c_lr)
    if float(v_rp + v_lr) == 0.0:
        return torch.tensor(0.5, dtype=c_rp.dtype)
    return (v_rp / (v_rp + v_lr)).clamp(0.0, 1.0)


def standard_error(est):
    return est.std(dim=0) / est.shape[0] ** 0.5


def noise_kwargs(scale):
    return dict(dist_class=Normal, dist_params={"loc": 0.0, "scale": scale})


ESTIMATORS = {"RP": pg.RPProp, "LR": pg.LRProp, "TP": pg.TotalProp}


# ------------------------------------------------- 1. unbiasedness against a closed form


@pg.propagate
def quadratic(manager, mu, c, offset, batch):
    x = mu.expand(batch, mu.shape[0])  # per-sample view of mu: TotalProp's target
    z = manager.forward(x, ivw_target=x)
    return ((z - c) ** 2).sum(dim=1) + offset


MU = [0.3, -0.7, 1.1]
C = [1.0, 0.5, -2.0]


def quadratic_estimates(prop, repeats, batch, seed, offset=0.0):
    """``repeats`` estimates of d/dmu E[sum((mu + eps - c)^2)], each from one batch."""
    mu = torch.tensor(MU, dtype=F64, requires_grad=True)
    c = torch.tensor(C, dtype=F64)
    manager = pg.PropagationManager(default_propagator=prop)
    torch.manual_seed(seed)
    out = []
    for _ in range(repeats):
        mu.grad = None
        manager.backward(quadratic(manager, mu, c, offset, batch))
        out.append(mu.grad.clone())
    return torch.stack(out), 2.0 * (mu.detach() - c)  # estimates, truth (any noise scale)


@pytest.mark.parametrize("name,prop", [
    ("RP", pg.RPProp(**noise_kwargs(0.7))),
    ("LR", pg.LRProp(**noise_kwargs(0.7))),
    ("LR-no-baseline", pg.LRProp(baseline=False, **noise_kwargs(0.7))),
    ("TP", pg.TotalProp(**noise_kwargs(0.7))),
], ids=["RP", "LR", "LR-no-baseline", "TP"])
def test_estimators_are_unbiased_for_a_gaussian_node(name, prop):
    est, truth = quadratic_estimates(prop, repeats=300, batch=16, seed=10)
    se = standard_error(est)
    assert (se > 0).all(), f"{name}: the estimates do not vary: is the noise drawn at all?"
    err = (est.mean(0) - truth).abs()
    assert (err < 4 * se + 1e-12).all(), (name, est.mean(0), truth, se)


def test_rp_estimate_of_the_quadratic_is_the_batch_mean_of_the_pathwise_gradient():
    # RP on one node: the estimate is exactly mean_i 2 (mu + eps_i - c), from the same noise
    batch, scale = 16, 0.7
    eps = scale * torch.randn(batch, 3, dtype=F64)
    cls, queue = fixed_noise([eps], scale)
    mu = torch.tensor(MU, dtype=F64, requires_grad=True)
    c = torch.tensor(C, dtype=F64)
    manager = pg.PropagationManager(pg.RPProp(dist_class=cls, dist_params={"scale": scale}))
    manager.backward(quadratic(manager, mu, c, 0.0, batch))
    assert not queue
    torch.testing.assert_close(mu.grad, (2 * (mu.detach() + eps - c)).mean(0),
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------ 2. RP through identity nodes equals autograd


@pg.propagate
def mlp(manager, x, W1, b1, W, W2, y, steps):
    h = torch.tanh(x @ W1 + b1)
    h = manager.forward(h)
    for _ in range(steps):
        h = manager.forward(torch.tanh(h @ W) + 0.5 * h)
    out = h @ W2
    return ((out - y) ** 2).sum(dim=1)


def mlp_reference(x, W1, b1, W, W2, y, steps, noises=None):
    """The same program in plain torch; ``noises[k]`` is added at the k-th node if given."""
    noises = list(noises) if noises is not None else None

    def node(h):
        return h + noises.pop(0) if noises is not None else h

    h = node(torch.tanh(x @ W1 + b1))
    for _ in range(steps):
        h = node(torch.tanh(h @ W) + 0.5 * h)
    return (((h @ W2) - y) ** 2).sum(dim=1)


def mlp_params(seed, batch=10, din=3, hidden=5, dout=2):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, grad=True):
        t = torch.randn(*shape, dtype=F64, generator=g) * 0.6
        return t.requires_grad_() if grad else t

    x, y = rnd(batch, din, grad=False), rnd(batch, dout, grad=False)
    return x, rnd(din, hidden), rnd(hidden), rnd(hidden, hidden), rnd(hidden, dout), y


@pytest.mark.parametrize("prop", [pg.Propagator(), pg.BackPropagator()],
                         ids=["Propagator", "BackPropagator"])
def test_identity_nodes_in_a_loop_equal_autograd(prop):
    x, W1, b1, W, W2, y = mlp_params(0)
    params = [W1, b1, W, W2]
    manager = pg.PropagationManager(default_propagator=prop)
    manager.backward(mlp(manager, x, W1, b1, W, W2, y, 4))
    ref = torch.autograd.grad(mlp_reference(x, W1, b1, W, W2, y, 4).mean(), params)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)
    # gradients accumulate in .grad as with loss.backward()
    manager.backward(mlp(manager, x, W1, b1, W, W2, y, 4))
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, 2 * r, rtol=1e-10, atol=1e-12)


def test_rp_with_known_noise_in_a_loop_equals_autograd_with_the_same_noise():
    x, W1, b1, W, W2, y = mlp_params(1)
    params = [W1, b1, W, W2]
    steps, scale = 4, 0.2
    noises = [scale * torch.randn(x.shape[0], 5, dtype=F64) for _ in range(steps + 1)]
    cls, queue = fixed_noise(noises, scale)
    manager = pg.PropagationManager(pg.RPProp(dist_class=cls, dist_params={"scale": scale}))
    manager.backward(mlp(manager, x, W1, b1, W, W2, y, steps))
    assert not queue, "every node draws its noise once"
    ref = torch.autograd.grad(mlp_reference(x, W1, b1, W, W2, y, steps, noises).mean(), params)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)
    # and the noise matters: without it the gradient differs
    plain = torch.autograd.grad(mlp_reference(x, W1, b1, W, W2, y, steps).mean(), params)
    assert not torch.allclose(W.grad, plain[2], rtol=1e-6, atol=1e-8)


def test_rp_with_normal_noise_equals_autograd_with_the_same_draws():
    # Normal noise from torch's generator: the draws are those of Normal(0, s).rsample(shape)
    # in node order (checked by replaying the generator here)
    x, W1, b1, W, W2, y = mlp_params(2)
    params = [W1, b1, W, W2]
    steps, scale = 3, 0.1
    manager = pg.PropagationManager(pg.RPProp(**noise_kwargs(scale)))
    torch.manual_seed(1234)
    manager.backward(mlp(manager, x, W1, b1, W, W2, y, steps))
    torch.manual_seed(1234)
    zero = torch.zeros((), dtype=F64)
    noises = [Normal(zero, zero + scale).rsample((x.shape[0], 5)) for _ in range(steps + 1)]
    ref = torch.autograd.grad(mlp_reference(x, W1, b1, W, W2, y, steps, noises).mean(), params)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)


# ----------------------------------------------- 3. a baseline keeps the mean, lowers variance


def test_leave_one_out_baseline_keeps_the_mean_and_lowers_the_variance():
    offset = 50.0  # a large constant in the loss: pure variance for LR without a baseline
    with_b, truth = quadratic_estimates(pg.LRProp(**noise_kwargs(0.7)), 300, 16, 3, offset)
    without, _ = quadratic_estimates(pg.LRProp(baseline=False, **noise_kwargs(0.7)), 300, 16,
                                     3, offset)
    se = (standard_error(with_b) ** 2 + standard_error(without) ** 2) ** 0.5
    assert ((with_b.mean(0) - without.mean(0)).abs() < 4 * se).all()
    for est in (with_b, without):
        assert ((est.mean(0) - truth).abs() < 4 * standard_error(est)).all()
    assert (with_b.var(0) < 0.5 * without.var(0)).all(), (with_b.var(0), without.var(0))
    # the offset is invisible to the baselined estimator: same estimates as without it
    again, _ = quadratic_estimates(pg.LRProp(**noise_kwargs(0.7)), 300, 16, 3, 0.0)
    torch.testing.assert_close(again, with_b, rtol=1e-8, atol=1e-9)


# -------------------------------------------------- 4. TP's weight on a hand-built node


@pg.propagate
def scaled_node(manager, beta, a, y, c):
    b = beta.expand(a.shape[0], beta.shape[0])  # (B, 1) or (B, D): per-sample target
    z = manager.forward(b * a + y, ivw_target=b)
    return (torch.sin(3.0 * z) + (z - c) ** 2).sum(dim=1)


def scaled_node_by_hand(beta, a, y, c, eps, scale):
    """RP and LR per-sample contributions to the target b, and the gradients at the node."""
    batch = a.shape[0]
    z = beta.detach() * a + y.detach() + eps
    cost = (torch.sin(3.0 * z) + (z - c) ** 2).sum(dim=1)
    g_rp = (3.0 * torch.cos(3.0 * z) + 2.0 * (z - c)) / batch  # d mean cost / d z, eps fixed
    g_lr = eps / scale ** 2 * ((cost - leave_one_out(cost)) / batch)[:, None]
    per = (lambda g: g * a) if beta.shape[0] == a.shape[1] else (
        lambda g: (g * a).sum(dim=1, keepdim=True))  # d(b * a)/db, per sample
    return g_rp, g_lr, per(g_rp), per(g_lr)


@pytest.mark.parametrize("target_dim", [1, 3])
def test_tp_mixes_rp_and_lr_with_the_inverse_variance_weight(target_dim):
    batch, dim, scale = 24, 3, 0.4
    g = torch.Generator().manual_seed(5)
    a = torch.randn(batch, dim, dtype=F64, generator=g)
    c = torch.randn(dim, dtype=F64, generator=g)
    eps = scale * torch.randn(batch, dim, dtype=F64, generator=g)
    beta0 = torch.linspace(0.5, 1.5, target_dim, dtype=F64)
    g_rp, g_lr, c_rp, c_lr = scaled_node_by_hand(beta0, a, torch.zeros(()), c, eps, scale)
    k = tp_weight(c_rp, c_lr)
    assert 0.02 < float(k) < 0.98, "the case must mix both messages to test the mix"

    grads = {}
    for name, cls in ESTIMATORS.items():
        dist, queue = fixed_noise([eps], scale)
        beta = beta0.clone().requires_grad_()
        y = torch.zeros(batch, dim, dtype=F64, requires_grad=True)
        manager = pg.PropagationManager(cls(dist_class=dist, dist_params={"scale": scale}))
        manager.backward(scaled_node(manager, beta, a, y, c))
        assert not queue
        grads[name] = beta.grad, y.grad
    exact = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["RP"][0], c_rp.sum(0), **exact)
    torch.testing.assert_close(grads["LR"][0], c_lr.sum(0), **exact)
    torch.testing.assert_close(grads["TP"][0], k * c_lr.sum(0) + (1 - k) * c_rp.sum(0), **exact)
    # the node sends the mixed gradient to its input, also along paths not reaching the target
    torch.testing.assert_close(grads["RP"][1], g_rp, **exact)
    torch.testing.assert_close(grads["LR"][1], g_lr, **exact)
    torch.testing.assert_close(grads["TP"][1], k * g_lr + (1 - k) * g_rp, **exact)


def test_tp_weight_is_one_half_when_both_contributions_are_constant():
    # a = 0: the target does not reach the node, every contribution is 0, 0/0 gives k = 1/2
    batch, dim, scale = 12, 2, 0.3
    g = torch.Generator().manual_seed(6)
    a = torch.zeros(batch, dim, dtype=F64)
    c = torch.randn(dim, dtype=F64, generator=g)
    y0 = torch.randn(batch, dim, dtype=F64, generator=g)
    eps = scale * torch.randn(batch, dim, dtype=F64, generator=g)
    g_rp, g_lr, _, _ = scaled_node_by_hand(torch.ones(1, dtype=F64), a, y0, c, eps, scale)
    dist, _ = fixed_noise([eps], scale)
    beta = torch.ones(1, dtype=F64, requires_grad=True)
    y = y0.clone().requires_grad_()
    manager = pg.PropagationManager(pg.TotalProp(dist_class=dist, dist_params={"scale": scale}))
    manager.backward(scaled_node(manager, beta, a, y, c))
    torch.testing.assert_close(y.grad, 0.5 * g_lr + 0.5 * g_rp, rtol=1e-10, atol=1e-12)
    assert torch.all(torch.isfinite(beta.grad)) and float(beta.grad.abs().sum()) == 0.0


# ------------------------------------- TP node by node on the RNN, against a pure-torch TP

W_PAPER = [[-5.0, -25.0], [5.0, 25.0]]
S0_PAPER = [0.35, 0.55]


@pg.propagate
def rollout(manager, s, W, beta, horizon):
    b = beta.expand(s.shape[0], 1)
    for _ in range(horizon):
        s = torch.sigmoid(b * (s @ W))
        s = manager.forward(s, ivw_target=b)
    return 0.5 * ((1.0 - s) ** 2).sum(dim=1)


def rollout_reference(mode, beta, W, s0, noises, scale):
    """d mean(L) / d (beta, W) by RP, LR (leave-one-out) or TP, written out step by step.

    Plain torch: the forward adds ``noises[t]`` at step t; the backward visits the nodes in
    reverse, forms the RP message (the gradient arriving at the node) and the LR message
    (score times baselined cost over B), and for TP their per-sample contributions to the
    target b = beta.expand(B, 1) through this step's ``sigmoid(b * (s @ W))``, whose pooled
    batch variances give the weight.  Returns (d beta, d W, the TP weights in node order).
    """
    batch = s0.shape[0]
    beta_, W_ = beta.detach(), W.detach()
    states = [s0]
    for eps in noises:
        states.append(torch.sigmoid(beta_ * (states[-1] @ W_)) + eps)
    cost = 0.5 * ((1.0 - states[-1]) ** 2).sum(dim=1)
    advantage = ((cost - leave_one_out(cost)) / batch)[:, None]
    g = -(1.0 - states[-1]) / batch
    d_beta, d_W, weights = torch.zeros_like(beta_), torch.zeros_like(W_), []
    for t in reversed(range(len(noises))):
        s = states[t].detach().clone().requires_grad_()
        b = beta_.expand(batch, 1).clone().requires_grad_()
        Wt = W_.clone().requires_grad_()
        x = torch.sigmoid(b * (s @ Wt))
        g_lr = noises[t] / scale ** 2 * advantage
        if mode == "RP":
            g_in = g
        elif mode == "LR":
            g_in = g_lr
        else:
            (c_rp,) = torch.autograd.grad(x, b, g, retain_graph=True)
            (c_lr,) = torch.autograd.grad(x, b, g_lr, retain_graph=True)
            k = tp_weight(c_rp, c_lr)
            weights.insert(0, float(k))
            g_in = k * g_lr + (1 - k) * g
        db, ds, dW = torch.autograd.grad(x, (b, s, Wt), g_in)
        d_beta += db.sum(0)
        d_W += dW
        g = ds
    return d_beta, d_W, weights


@pytest.mark.parametrize("mode", ["RP", "LR", "TP"])
@pytest.mark.parametrize("beta_value", [1.0, 3.5])
def test_rnn_with_known_noise_equals_the_step_by_step_reference(mode, beta_value):
    batch, horizon, scale = 48, 8, 0.05
    gen = torch.Generator().manual_seed(7)
    noises = [scale * torch.randn(batch, 2, dtype=F64, generator=gen) for _ in range(horizon)]
    W = torch.tensor(W_PAPER, dtype=F64, requires_grad=True)
    beta = torch.tensor([beta_value], dtype=F64, requires_grad=True)
    s0 = torch.tensor(S0_PAPER, dtype=F64).expand(batch, 2)
    ref_beta, ref_W, weights = rollout_reference(mode, beta, W, s0, noises, scale)
    if mode == "TP":  # the case must exercise the mix, not only its ends
        assert any(0.02 < k < 0.98 for k in weights), weights
    dist, queue = fixed_noise(noises, scale)
    manager = pg.PropagationManager(ESTIMATORS[mode](dist_class=dist,
                                                     dist_params={"scale": scale}))
    manager.backward(rollout(manager, s0, W, beta, horizon))
    assert not queue
    torch.testing.assert_close(beta.grad, ref_beta, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(W.grad, ref_W, rtol=1e-9, atol=1e-12)


# ------------------------------------------- 5. the chaotic RNN in its non-chaotic regime


def rnn_estimates(prop, beta_value, repeats, batch, horizon, seed):
    W = torch.tensor(W_PAPER, dtype=F64)
    s0 = torch.tensor(S0_PAPER, dtype=F64).expand(batch, 2)
    beta = torch.tensor([beta_value], dtype=F64, requires_grad=True)
    manager = pg.PropagationManager(default_propagator=prop)
    torch.manual_seed(seed)
    out = []
    for _ in range(repeats):
        beta.grad = None
        manager.backward(rollout(manager, s0, W, beta, horizon))
        out.append(beta.grad.clone())
    return torch.cat(out)


def test_rp_lr_tp_agree_on_the_rnn_for_beta_one():
    repeats, batch, horizon, scale = 64, 1000, 25, 1e-3
    est = {name: rnn_estimates(cls(**noise_kwargs(scale)), 1.0, repeats, batch, horizon, 20 + i)
           for i, (name, cls) in enumerate(ESTIMATORS.items())}
    mean = {k: v.mean() for k, v in est.items()}
    se = {k: standard_error(v) for k, v in est.items()}
    for a in est:
        assert se[a] > 0, a
        for b in est:
            if a < b:
                tol = 4 * (se[a] ** 2 + se[b] ** 2) ** 0.5
                assert (mean[a] - mean[b]).abs() < tol, (a, b, mean, se)
    # with noise this small the expected gradient is the noiseless one up to O(scale^2) terms
    # (second derivatives along the rollout: about 7e-4 relative here), far below the error of
    # a wrong estimator
    W = torch.tensor(W_PAPER, dtype=F64)
    beta = torch.tensor([1.0], dtype=F64, requires_grad=True)
    s = torch.tensor(S0_PAPER, dtype=F64).expand(1, 2)
    for _ in range(horizon):
        s = torch.sigmoid(beta * (s @ W))
    (exact,) = torch.autograd.grad(0.5 * ((1.0 - s) ** 2).sum(), beta)
    for name in est:
        assert (mean[name] - exact).abs() < 4 * se[name] + 5e-3 * exact.abs(), (name, mean,
                                                                                 exact, se)
    # TP picks the better estimator at every node: not worse than the better of the two
    assert est["TP"].var() <= 2.0 * min(est["RP"].var(), est["LR"].var())
