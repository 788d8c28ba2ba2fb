"""A program in the style of Proppo's RNN demo, ported by adding the decorator.

The four ways a Proppo program configures its nodes (everything at the call site; the
distribution class in the constructor; the distribution in the constructor as a function of
x; everything including the TotalProp target in the constructor) must give the same
gradients from the same noise.  The per-sample target is an expanded view of beta made
outside the program, as in Proppo, and the loss keeps a trailing dim of 1.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

import propgen as pg

F64 = torch.float64


def layer(s, W, beta):
    return torch.sigmoid(beta * torch.matmul(s, W))


def zero_mean(x):
    return {"loc": torch.zeros_like(x), "scale": 0.01}


def make_manager(kind, option, expanded):
    cls = {"TP": pg.TotalProp, "RP": pg.RPProp, "LR": pg.LRProp}[kind]
    if option == 1:
        return pg.PropagationManager(default_propagator=cls())
    if option == 2:
        return pg.PropagationManager(default_propagator=cls(dist_class=Normal))
    if option == 3:
        return pg.PropagationManager(default_propagator=cls(dist_class=Normal,
                                                            dist_params=zero_mean))
    kw = {"ivw_target": expanded} if kind == "TP" else {}
    return pg.PropagationManager(default_propagator=cls(dist_class=Normal,
                                                        dist_params=zero_mean, **kw))


@pg.propagate
def rollout(manager, s, W, expanded, horizon, option):
    for _ in range(horizon):
        s = layer(s, W, expanded)
        if option == 1:
            s = manager.forward(s, dist_class=Normal,
                                dist_params={"loc": torch.zeros_like(s), "scale": 0.01},
                                ivw_target=expanded)
        elif option == 2:
            s = manager.forward(s, dist_params={"loc": torch.zeros_like(s), "scale": 0.01},
                                ivw_target=expanded)
        elif option == 3:
            s = manager.forward(s, ivw_target=expanded)
        else:
            s = manager.forward(s)
    return (0.5 * (1.0 - s) ** 2).sum(dim=1, keepdim=True)


@pytest.mark.parametrize("kind", ["RP", "LR", "TP"])
def test_the_four_configuration_styles_agree(kind):
    W = torch.tensor([[-5.0, -25.0], [5.0, 25.0]], dtype=F64)
    beta = torch.tensor([2.4], dtype=F64, requires_grad=True)
    batch = 200
    expanded = beta.expand(batch, *beta.shape)  # made outside the program, as in Proppo
    s0 = torch.tensor([0.35, 0.55], dtype=F64).repeat(batch, 1)
    grads = []
    for option in (1, 2, 3, 4):
        if kind != "TP" and option == 4:
            continue
        manager = make_manager(kind, option, expanded)
        torch.manual_seed(11)
        for _ in range(2):  # reused across iterations, as a training loop does
            beta.grad = None
            loss = rollout(manager, s0, W, expanded, 12, option)
            manager.backward(loss)
        grads.append(beta.grad.clone())
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])
    assert torch.isfinite(grads[0]).all()


@pg.propagate
def two_paths(manager, s, W, expanded, horizon, pause):
    for _ in range(horizon):
        side = 2 * s + 0.02  # a second path around the node
        s = layer(s, W, expanded)
        s = manager.forward(s)
        if pause:
            side = manager.forward(side, local_propagator="pause")
        s = (side + s) / 2
    return (0.5 * (1.0 - s) ** 2).sum(dim=1, keepdim=True)


@pytest.mark.parametrize("kind", ["RP", "LR", "TP"])
def test_a_path_around_the_nodes_with_and_without_pause(kind):
    W = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    beta = torch.tensor([0.8], dtype=F64, requires_grad=True)
    batch = 100
    expanded = beta.expand(batch, *beta.shape)
    s0 = torch.rand(batch, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    s0.requires_grad_()  # the initial state is differentiated too
    grads = []
    for pause in (False, True):
        manager = make_manager(kind, 4, expanded)
        manager.add_propagator(name="pause", propagator=pg.PauseProp(backprop=False))
        manager.loss_propagator = pg.LossProp()  # the side path needs the loss gradient
        beta.grad, s0.grad = None, None
        torch.manual_seed(5)
        manager.backward(two_paths(manager, s0, W, expanded, 6, pause))
        grads.append((beta.grad.clone(), s0.grad.clone()))
    # a pause node is the identity: the same noise gives the same gradients
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    if kind == "RP":  # against autograd through the same noise
        torch.manual_seed(5)
        s = s0
        for _ in range(6):
            side = 2 * s + 0.02
            s = layer(s, W, expanded)
            s = s + zero_mean(s)["scale"] * torch.empty_like(s).normal_()
            s = (side + s) / 2
        ref = torch.autograd.grad((0.5 * (1.0 - s) ** 2).sum(1).mean(), [beta, s0])
        torch.testing.assert_close(grads[0][0], ref[0])
        torch.testing.assert_close(grads[0][1], ref[1])


def quadratic_cost(obs, act):
    # (LR's loss nodes send no pathwise gradient, as in Proppo: a cost that depended on the
    # action directly would add a term only RP sees)
    return (obs ** 2).sum(1) + 0.0 * (act ** 2).sum(1)


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1).double()

    def forward(self, obs):
        return torch.tanh(self.lin(obs))


@pg.propagate
def simulate(manager, obs, policy, A, horizon):
    """A model-based rollout in the style of PIPPS: a noisy model whose noise scale the
    program computes, costs appended at every step with manager.append_loss."""
    total = 0.0
    act = policy(obs)
    for _ in range(horizon):
        mean = torch.tanh(obs @ A) + 0.5 * act
        scale = 0.05 + 0.1 * torch.sigmoid(mean)  # state-dependent noise
        obs = manager.forward(obs + mean, dist_class=Normal,
                              dist_params={"loc": torch.zeros_like(obs), "scale": scale})
        act = policy(obs)
        cost = manager.append_loss({"obs": obs, "act": act}, lossfunc=quadratic_cost)
        total = total + cost.view(-1, 1)
    return total


def simulate_reference(obs, policy, A, horizon):
    total = 0.0
    act = policy(obs)
    for _ in range(horizon):
        mean = torch.tanh(obs @ A) + 0.5 * act
        scale = 0.05 + 0.1 * torch.sigmoid(mean)
        obs = Normal(obs + mean, scale).rsample()
        act = policy(obs)
        total = total + quadratic_cost(obs, act).view(-1, 1)
    return total


def test_append_loss_and_a_computed_noise_scale_rp_equals_autograd():
    torch.manual_seed(0)
    policy = Policy()
    A = torch.randn(2, 2, dtype=F64) * 0.5
    obs = torch.randn(64, 2, dtype=F64) * 0.1
    manager = pg.PropagationManager(pg.RPProp())
    torch.manual_seed(1)
    simulate(manager, obs, policy, A, 5)
    manager.backward()  # the costs were appended inside
    got = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    torch.manual_seed(1)
    simulate_reference(obs, policy, A, 5).mean().backward()
    for g, p in zip(got, policy.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_append_loss_lr_and_tp_are_unbiased_against_rp():
    # the policy gradient: RP, LR and TP estimate the same expectation
    torch.manual_seed(0)
    policy = Policy()
    A = torch.randn(2, 2, dtype=F64) * 0.5
    obs = torch.randn(256, 2, dtype=F64) * 0.1
    means = {}
    for name, prop in (("RP", pg.RPProp()), ("LR", pg.LRProp())):
        manager = pg.PropagationManager(prop)
        runs = []
        for _ in range(60):
            policy.zero_grad()
            simulate(manager, obs, policy, A, 4)
            manager.backward()
            runs.append(policy.lin.weight.grad.clone())
        est = torch.stack(runs)
        means[name] = (est.mean(0), est.std(0) / len(runs) ** 0.5)
    (m_rp, se_rp), (m_lr, se_lr) = means["RP"], means["LR"]
    assert ((m_rp - m_lr).abs() < 4 * (se_rp ** 2 + se_lr ** 2) ** 0.5 + 1e-9).all()
