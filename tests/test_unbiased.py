"""Monte Carlo estimators against closed forms, with tolerances from their own variance.

x = theta + noise (noise ~ N(0, s^2), one node), f(x) = sum((x - c)^2) per sample:
d/dtheta E[f] = 2 (theta - c) whatever the noise.  Each estimator is run R times on batches
of B; the mean of the R estimates must be within 4 standard errors (estimated from the same
R estimates) of the truth.  A wrong estimator (a missing 1/B, a wrong score, a biased
baseline, a wrong TP mix) is off by far more than that.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

import propgen as pg

F64 = torch.float64
R, B, S = 200, 64, 0.5
C = torch.tensor([1.0, -2.0, 0.5], dtype=F64)


@pg.propagate
def quadratic(manager, theta, c, offset):
    t = theta.expand(B, theta.shape[0])  # per-sample view of theta: TotalProp's target
    x = manager.forward(t * 1.0, ivw_target=t)
    return ((x - c) ** 2).sum(1) + offset


def _estimates(prop, offset=0.0, seed=0):
    theta = torch.tensor([0.2, 0.4, -0.3], dtype=F64, requires_grad=True)
    manager = pg.PropagationManager(prop)
    torch.manual_seed(seed)
    out = []
    for _ in range(R):
        theta.grad = None
        manager.backward(quadratic(manager, theta, C, offset))
        out.append(theta.grad.clone())
    return torch.stack(out), 2 * (theta.detach() - C)


NOISE = dict(dist_class=Normal, dist_params={"loc": 0.0, "scale": S})


@pytest.mark.parametrize("prop", [
    pg.RPProp(**NOISE),
    pg.LRProp(**NOISE),
    pg.LRProp(baseline="mean", **NOISE),
    pg.LRProp(baseline=None, **NOISE),
    pg.TotalProp(**NOISE),
    pg.TotalProp(k_interval=3, **NOISE),
], ids=["RP", "LR-loo", "LR-mean", "LR-none", "TP", "TP-k3"])
def test_estimators_are_unbiased(prop):
    est, truth = _estimates(prop)
    se = est.std(0) / R ** 0.5
    err = (est.mean(0) - truth).abs()
    assert (err < 4 * se + 1e-12).all(), (est.mean(0), truth, se)


def test_baseline_keeps_the_mean_and_lowers_the_variance():
    with_b, truth = _estimates(pg.LRProp(**NOISE), offset=100.0, seed=1)
    without, _ = _estimates(pg.LRProp(baseline=None, **NOISE), offset=100.0, seed=1)
    se = (with_b.var(0) / R + without.var(0) / R) ** 0.5
    assert ((with_b.mean(0) - without.mean(0)).abs() < 4 * se).all()
    assert (with_b.var(0) < 0.01 * without.var(0)).all()
    assert ((with_b.mean(0) - truth).abs() < 4 * with_b.std(0) / R ** 0.5).all()


def test_tp_is_no_worse_than_its_parts():
    rp, _ = _estimates(pg.RPProp(**NOISE), seed=2)
    lr, _ = _estimates(pg.LRProp(**NOISE), seed=2)
    tp, _ = _estimates(pg.TotalProp(**NOISE), seed=2)
    # inverse-variance weighting of two unbiased estimators: at most the smaller variance
    # (up to the noise of estimating the weights from one batch)
    assert (tp.var(0) <= 1.5 * torch.minimum(rp.var(0), lr.var(0))).all()


@pg.propagate
def learned_noise(manager, x, log_sigma):
    sigma = torch.exp(log_sigma)  # the program computes the noise scale (a noise model)
    h = manager.forward(x * 1.0, dist_class=Normal,
                        dist_params={"loc": torch.zeros_like(x), "scale": sigma})
    return (h ** 2).sum(1)


@pytest.mark.parametrize("prop", [pg.RPProp(), pg.LRProp(), pg.TotalProp()],
                         ids=["RP", "LR", "TP"])
def test_gradients_reach_a_computed_noise_scale(prop):
    # h = x + sigma * eps: E[h^2] = x^2 + sigma^2, so d/dlog_sigma E = 2 sigma^2 per element
    x = torch.full((B, 2), 0.5, dtype=F64)
    log_sigma = torch.tensor([-0.5, 0.3], dtype=F64, requires_grad=True)
    manager = pg.PropagationManager(prop)
    torch.manual_seed(3)
    runs = []
    for _ in range(R):
        log_sigma.grad = None
        if isinstance(prop, pg.TotalProp):  # no target: the weights need one
            with pytest.raises(pg.ConfigurationError, match="needs ivw_target"):
                learned_noise(manager, x, log_sigma)
            return
        manager.backward(learned_noise(manager, x, log_sigma))
        runs.append(log_sigma.grad.clone())
    est = torch.stack(runs)
    truth = 2 * torch.exp(log_sigma.detach()) ** 2
    se = est.std(0) / R ** 0.5
    assert ((est.mean(0) - truth).abs() < 4 * se + 1e-12).all(), (est.mean(0), truth, se)


def test_rp_through_a_computed_noise_scale_equals_autograd():
    x = torch.randn(B, 2, dtype=F64)
    log_sigma = torch.tensor([-0.5, 0.3], dtype=F64, requires_grad=True)
    manager = pg.PropagationManager(pg.RPProp())
    torch.manual_seed(4)
    manager.backward(learned_noise(manager, x, log_sigma))
    torch.manual_seed(4)
    h = x + Normal(torch.zeros_like(x), torch.exp(log_sigma)).rsample()
    ref = torch.autograd.grad((h ** 2).sum(1).mean(), log_sigma)[0]
    torch.testing.assert_close(log_sigma.grad, ref)


def test_a_differentiated_scale_in_the_configuration_is_refused():
    sigma = torch.tensor(0.5, dtype=F64, requires_grad=True)

    @pg.propagate
    def f(manager, x):
        return (manager.forward(x * 1.0) ** 2).sum(1)

    manager = pg.PropagationManager(pg.RPProp(dist_class=Normal,
                                              dist_params={"loc": 0.0, "scale": sigma}))
    with pytest.raises(pg.ConfigurationError, match="at the call site"):
        f(manager, torch.ones(4, 2, dtype=F64))
