"""@propgen.propagate and PropagationManager: program structure, configuration, errors.

Estimator statistics (unbiasedness, variances, TP weights) are in test_estimators.py; here
every check is exact, against torch.autograd or a hand computation with the same noise.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

import propgen as pg
from propgen import d, m
from propgen.errors import ConfigurationError

F64 = torch.float64


def layer(manager, h, w):
    h = torch.tanh(h @ w)
    return manager.forward(h)


@pg.propagate
def net(manager, x, w1, w2, flag):
    h = layer(manager, x, w1)  # a node inside a called user function
    if flag:
        h = manager.forward(h * 2.0)  # a node in a branch
    for _ in range(3):
        h = manager.forward(torch.sin(h))  # nodes in a loop
    out = h @ w2
    return (out ** 2).sum(1)


def net_ref(x, w1, w2, flag):
    h = torch.tanh(x @ w1)
    if flag:
        h = h * 2.0
    for _ in range(3):
        h = torch.sin(h)
    return ((h @ w2) ** 2).sum(1)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, dtype=F64, generator=g)
    w1 = torch.randn(3, 4, dtype=F64, generator=g).requires_grad_()
    w2 = torch.randn(4, 2, dtype=F64, generator=g).requires_grad_()
    return x, w1, w2


@pytest.mark.parametrize("prop", [pg.Propagator(), pg.BackPropagator()])
@pytest.mark.parametrize("flag", [True, False])
def test_identity_nodes_equal_autograd(prop, flag):
    x, w1, w2 = _params()
    manager = pg.PropagationManager(default_propagator=prop)
    loss = net(manager, x, w1, w2, flag)
    manager.backward(loss)
    ref = torch.autograd.grad(net_ref(x, w1, w2, flag).mean(), [w1, w2])
    torch.testing.assert_close(w1.grad, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w2.grad, ref[1], rtol=1e-12, atol=1e-12)
    # the manager is reusable and gradients accumulate as with loss.backward()
    loss = net(manager, x, w1, w2, flag)
    manager.backward(loss)
    torch.testing.assert_close(w1.grad, 2 * ref[0], rtol=1e-12, atol=1e-12)


def test_loss_computed_outside_and_scalar_loss():
    x, w1, w2 = _params(1)
    manager = pg.PropagationManager()
    out = net(manager, x, w1, w2, True)
    manager.backward(out.sum() * 3.0)  # a scalar: differentiated as itself
    ref = torch.autograd.grad(net_ref(x, w1, w2, True).sum() * 3.0, [w1, w2])
    torch.testing.assert_close(w1.grad, ref[0])
    torch.testing.assert_close(w2.grad, ref[1])


def test_per_sample_loss_of_shape_b_by_1_is_averaged():
    x, w1, w2 = _params(2)
    manager = pg.PropagationManager()
    out = net(manager, x, w1, w2, False)
    manager.backward(out[:, None])
    ref = torch.autograd.grad(net_ref(x, w1, w2, False).mean(), [w1])
    torch.testing.assert_close(w1.grad, ref[0])


@pg.propagate
def step(manager, h, w):
    return manager.forward(torch.tanh(h @ w))


def test_calls_chain_through_their_results_and_into_autograd():
    x, w1, _ = _params(3)
    w = torch.randn(4, 4, dtype=F64, requires_grad=True)
    manager = pg.PropagationManager()
    h = x @ w1  # made by autograd: the gradient goes back into that graph
    for _ in range(3):
        h = step(manager, h, w)
    manager.backward((h ** 2).sum(1))
    hh = x @ w1
    for _ in range(3):
        hh = torch.tanh(hh @ w)
    ref = torch.autograd.grad((hh ** 2).sum(1).mean(), [w, w1])
    torch.testing.assert_close(w.grad, ref[0])
    torch.testing.assert_close(w1.grad, ref[1])


@pg.propagate
def noisy(manager, x, w):
    h = torch.tanh(x @ w)
    h = manager.forward(h)
    return (h * h).sum(1)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rp_equals_autograd_through_the_same_noise(device, dtype):
    x, w1, _ = _params(4)
    x = x.to(device, dtype)
    w1 = w1.detach().to(device, dtype).requires_grad_()
    scale = 0.3
    manager = pg.PropagationManager(pg.RPProp(dist_class=Normal,
                                              dist_params={"loc": 0.0, "scale": scale}))
    torch.manual_seed(123)
    manager.backward(noisy(manager, x, w1))
    assert w1.grad.device == w1.device and w1.grad.dtype == dtype
    torch.manual_seed(123)
    h = torch.tanh(x @ w1)
    zero = torch.tensor(0.0, dtype=dtype, device=device)
    h = h + Normal(zero, zero + scale).rsample(h.shape)
    ref = torch.autograd.grad((h * h).sum(1).mean(), w1)[0]
    torch.testing.assert_close(w1.grad, ref)


def test_lr_equals_its_formula_with_the_same_noise():
    x, w1, _ = _params(5)
    scale = 0.3
    manager = pg.PropagationManager(pg.LRProp(dist_class=Normal,
                                              dist_params=(0.0, scale)))
    torch.manual_seed(7)
    manager.backward(noisy(manager, x, w1))
    torch.manual_seed(7)
    mean = torch.tanh(x @ w1).detach().requires_grad_()
    noise = Normal(torch.tensor(0.0, dtype=F64), torch.tensor(scale, dtype=F64)).rsample(
        mean.shape)
    cost = ((mean + noise) ** 2).sum(1).detach()
    b = cost.shape[0]
    baselined = cost - (cost.sum() - cost) / (b - 1)
    logp = Normal(mean, scale).log_prob(mean.detach() + noise).sum(1)
    ref = torch.autograd.grad((logp * baselined).mean(), mean)[0]
    w_ref = torch.autograd.grad(torch.tanh(x @ w1), w1, ref)[0]
    torch.testing.assert_close(w1.grad, w_ref)


def test_changing_values_does_not_recompile_and_changes_the_result():
    x, w1, _ = _params(6)
    params = {"loc": 0.0, "scale": 0.1}
    prop = pg.RPProp(dist_class=Normal, dist_params=params)
    manager = pg.PropagationManager(prop)
    manager.backward(noisy(manager, x, w1))
    first = noisy.last
    prop.defaults["dist_params"] = {"loc": 0.0, "scale": 1e-9}
    w1.grad = None
    manager.backward(noisy(manager, x, w1))
    assert noisy.last is first
    ref = torch.autograd.grad((torch.tanh(x @ w1) ** 2).sum(1).mean(), w1)[0]
    torch.testing.assert_close(w1.grad, ref, rtol=1e-6, atol=1e-6)


def test_local_propagator_by_name_and_by_object():
    x, w1, _ = _params(7)

    @pg.propagate
    def two(manager, x, w):
        h = manager.forward(torch.tanh(x @ w), local_propagator="exact")
        h = manager.forward(h, local_propagator=IDENTITY)
        return (h * h).sum(1)

    # an LR default asks for a loss node without gradient; these nodes need one
    manager = pg.PropagationManager(pg.LRProp(dist_class=Normal, dist_params=(0.0, 1.0)),
                                    loss_propagator=pg.LossProp(lossgrad=True))
    manager.add_propagator("exact", pg.Propagator())
    manager.backward(two(manager, x, w1))
    ref = torch.autograd.grad((torch.tanh(x @ w1) ** 2).sum(1).mean(), w1)[0]
    torch.testing.assert_close(w1.grad, ref)
    assert "[Propagator()]" in pg.source(two, manager)


IDENTITY = pg.Propagator()


def test_source_shows_the_estimator_arithmetic():
    x, w1, _ = _params(8)
    manager = pg.PropagationManager(pg.TotalProp(dist_class=Normal, dist_params=(0.0, 0.1)))
    b = torch.ones(8, 1, dtype=F64, requires_grad=True)

    @pg.propagate
    def f(manager, x, w, b):
        h = manager.forward(torch.tanh(b * (x @ w)), ivw_target=b)
        return (h * h).sum(1)

    manager.backward(f(manager, x, w1, b))
    text = pg.source(f, manager)
    for piece in ("leave_one_out", "inverse_variance_weight", "location_score",
                  "batch_weights", "# Grad of: test_propagate.py"):
        assert piece in text
    assert "autograd" not in text


def test_backprop_false_depends_on_the_terminal_step():
    x, w1, _ = _params(9)
    for terminal, expect in ((pg.BackPropagator(), True), (None, False)):
        manager = pg.PropagationManager(pg.RPProp(backprop=False, dist_class=Normal,
                                                  dist_params=(0.0, 1e-12)),
                                        terminal_propagator=terminal)
        w1.grad = None
        manager.backward(noisy(manager, x, w1))
        assert (w1.grad is not None) == expect


# ------------------------------------------------------------------------- bad input


def test_unknown_keyword_names_it_and_the_line():
    @pg.propagate
    def bad(manager, x):
        return manager.forward(x, dist_clas=Normal)

    with pytest.raises(ConfigurationError, match=r"test_propagate.py:\d+.*dist_clas"):
        bad(pg.PropagationManager(), torch.zeros(2, 2))


def test_keywords_of_other_propagators_are_accepted():
    x, w1, _ = _params(10)

    @pg.propagate
    def f(manager, x, w):
        return (manager.forward(torch.tanh(x @ w), ivw_target=w) ** 2).sum(1)

    manager = pg.PropagationManager(pg.Propagator())
    manager.backward(f(manager, x, w1))
    assert w1.grad is not None


def test_unregistered_local_propagator():
    @pg.propagate
    def bad(manager, x):
        return manager.forward(x, local_propagator="nope")

    with pytest.raises(ConfigurationError, match="(?s)nope.*add_propagator"):
        bad(pg.PropagationManager(), torch.zeros(2, 2))


def test_forward_outside_a_propagated_function():
    with pytest.raises(RuntimeError, match=r"test_propagate.py:\d+.*@propgen.propagate"):
        pg.PropagationManager().forward(torch.zeros(2))


def test_backward_twice_or_without_forward_and_manager_usable_after():
    x, w1, _ = _params(11)
    manager = pg.PropagationManager()
    with pytest.raises(RuntimeError, match="nothing recorded"):
        manager.backward(torch.zeros(3))
    loss = noisy(manager, x, w1)
    manager.backward(loss)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        manager.backward(loss)
    manager.backward(noisy(manager, x, w1))


def test_loss_batch_size_must_match_the_nodes():
    x, w1, _ = _params(12)
    manager = pg.PropagationManager(pg.LRProp(dist_class=Normal, dist_params=(0.0, 1.0)))
    noisy(manager, x, w1)
    with pytest.raises(ValueError, match=r"test_propagate.py:\d+.*batch size 8"):
        manager.backward(torch.zeros(5, requires_grad=True))
    manager.backward(noisy(manager, x, w1))  # still usable
    assert w1.grad is not None


def test_lr_needs_a_per_sample_loss():
    x, w1, _ = _params(13)
    manager = pg.PropagationManager(pg.LRProp(dist_class=Normal, dist_params=(0.0, 1.0)))
    out = noisy(manager, x, w1)
    with pytest.raises(RuntimeError, match="per-sample loss"):
        manager.backward(out.mean())


def test_propagator_construction_is_checked():
    with pytest.raises(TypeError, match="dist_clas"):
        pg.RPProp(dist_clas=Normal)
    with pytest.raises(ValueError, match="baseline"):
        pg.LRProp(baseline="median")
    with pytest.raises(ValueError, match="k_interval"):
        pg.TotalProp(k_interval=0)
    with pytest.raises(TypeError, match="default_propagator"):
        pg.PropagationManager(default_propagator="RP")


def test_function_without_manager():
    @pg.propagate
    def f(x):
        return x * 2

    with pytest.raises(TypeError, match="PropagationManager"):
        f(torch.zeros(2))


# ------------------------------------------------------------ user-written propagators


def clip_backward(output, x, max_norm):
    g = pg.d[output]
    norm = g.flatten(1).norm(dim=1).clamp(min=1e-12)
    pg.d[x] = g * (max_norm / norm).clamp(max=1.0).reshape(-1, *([1] * (g.dim() - 1)))


class ClipProp(pg.Propagator):
    keywords = ("max_norm",)

    def parts(self):
        return [pg.Part(backward=clip_backward)]


def activity_backward(output, x):
    pg.d[x] = pg.d[output]
    pg.m["activity"] = x.abs().sum(1) + (0.0 if pg.m["activity"] is None else pg.m["activity"])


class ActivityProp(pg.Propagator):
    def parts(self):
        return [pg.Part(backward=activity_backward)]


@pg.propagate
def clipped(manager, x, w):
    h = manager.forward(torch.tanh(x @ w), local_propagator="clip")
    for _ in range(2):
        h = manager.forward(torch.sin(h) @ w)
    return (h * h).sum(1)


def test_user_propagators_clip_and_running_sum():
    x, _, _ = _params(14)
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)
    x = x[:, :3]
    manager = pg.PropagationManager(ActivityProp())
    manager.add_propagator("clip", ClipProp(max_norm=0.05))
    messages = manager.backward(clipped(manager, x, w))
    # reference: autograd with a hook clipping the first node's gradient per sample
    h0 = torch.tanh(x @ w)
    h0.register_hook(lambda g: g * (0.05 / g.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)[:, None])
    h, acts = h0, torch.zeros(x.shape[0], dtype=F64)
    for _ in range(2):
        h = torch.sin(h) @ w
        acts = acts + h.detach().abs().sum(1)
    ref = torch.autograd.grad((h * h).sum(1).mean(), w)[0]
    torch.testing.assert_close(w.grad, ref)
    torch.testing.assert_close(messages["activity"], acts)


# ------------------------------------------------------------ messages and composition


@pg.propagate
def rewards(manager, x, w):
    h = x
    for _ in range(3):
        h = torch.tanh(h @ w)
        manager.forward((h ** 2).sum(1), local_propagator="loss")  # a cost at each step
    return (h * 0.0).sum(1)


def test_loss_nodes_inside_the_program_sum_the_cost_to_go():
    x, _, _ = _params(15)
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)
    manager = pg.PropagationManager(pg.Propagator())
    manager.add_propagator("loss", pg.LossProp())
    out = manager.backward(rewards(manager, x, w))
    h, total = x, 0.0
    for _ in range(3):
        h = torch.tanh(h @ w)
        total = total + (h ** 2).sum(1)
    torch.testing.assert_close(w.grad, torch.autograd.grad(total.mean(), w)[0])
    torch.testing.assert_close(out["local_loss"], total.detach())


SEEN: list = []


def _record(probe, x):
    SEEN.append(None if probe is None else round(float(probe[0]), 6))
    return torch.full((x.shape[0],), float(len(SEEN)), dtype=x.dtype)


def spy_backward(output, x):
    pg.d[x] = pg.d[output]
    pg.m["probe"] = _record(pg.m["probe"], x)


class Spy(pg.Propagator):
    """Records the 'probe' message each node receives, and sends its visit number."""

    def parts(self):
        return [pg.Part(backward=spy_backward)]


@pg.propagate
def five_nodes(manager, x, target):
    for _ in range(4):
        x = manager.forward(x * 1.0)
    x = manager.forward(x, local_propagator="last", force_targets=target)
    return x.sum(1)


@pytest.mark.parametrize("target, expect", [
    (-1, [None, 1.0, 2.0, 3.0, 4.0]),            # the default: the previous node
    (-3, [None, None, 2.0, 4.0, 4.0]),           # to node 1: nodes 3 and 2 see only theirs
    ([-1, -4], [None, 1.0, 2.0, 3.0, 5.0]),      # to nodes 3 and 0 (summed there)
    (pg.AbsoluteTarget(0), [None, None, 2.0, 3.0, 5.0]),
])
def test_message_targets_reach_the_intended_nodes(target, expect):
    manager = pg.PropagationManager(Spy())
    manager.add_propagator("last", Spy())
    SEEN.clear()
    manager.backward(five_nodes(manager, torch.ones(2, 2, dtype=F64), target))
    assert SEEN == expect


def test_skipprop_sends_messages_past_nodes():
    manager = pg.PropagationManager(Spy())
    manager.add_propagator("last", pg.ComboProp(Spy(), pg.SkipProp(skip=3)))
    SEEN.clear()
    manager.backward(five_nodes(manager, torch.ones(2, 2, dtype=F64), None))
    assert SEEN == [None, None, 2.0, 4.0, 4.0]


def test_target_outside_the_recorded_nodes_names_the_call_site():
    manager = pg.PropagationManager(Spy())
    manager.add_propagator("last", Spy())
    with pytest.raises(IndexError, match=r"test_propagate.py:\d+.*node -2"):
        manager.backward(five_nodes(manager, torch.ones(2, 2, dtype=F64), -6))
    manager.backward(five_nodes(manager, torch.ones(2, 2, dtype=F64), -1))  # usable after


def test_sumprop_accumulates_a_message():
    def put_backward(output, x):
        pg.d[x] = pg.d[output]
        pg.m["reward"] = x.sum(1)

    class Put(pg.Propagator):
        def parts(self):
            return [pg.Part(backward=put_backward)]

    @pg.propagate
    def f(manager, x):
        for _ in range(3):
            x = manager.forward(x + 1.0)
        return x.sum(1)

    manager = pg.PropagationManager(pg.ComboProp(pg.SumProp("ret", "reward"), Put()))
    out = manager.backward(f(manager, torch.zeros(2, 2, dtype=F64)))
    torch.testing.assert_close(out["ret"], torch.full((2,), 2.0 + 4.0 + 6.0, dtype=F64))


def test_chainprop_applies_its_members_in_turn():
    x, w1, _ = _params(16)
    manager = pg.PropagationManager(pg.ChainProp(pg.Propagator(), pg.ResampleProp()))
    torch.manual_seed(3)
    manager.backward(noisy(manager, x, w1))
    assert "[Propagator()]" in pg.source(noisy, manager)
    assert "[ResampleProp()]" in pg.source(noisy, manager)
    with pytest.raises(ValueError, match="more than one member"):
        pg.ComboProp(pg.RPProp(), pg.LRProp())


def test_resample_gradient_is_the_gradient_through_the_fitted_gaussian():
    # E[c(x~)] for c = sum(x~^2) is |mean|^2 + tr(cov): its exact gradient w.r.t. the batch
    # is 2 mean / B + 2 (x_i - mean) / (B - 1); Stein's estimate of the Hessian makes the
    # resampled estimate noisy, so compare its average over many batches
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, dtype=F64, generator=g) * torch.tensor([1.0, 0.5], dtype=F64) + 1.0
    x = x.requires_grad_()

    @pg.propagate
    def f(manager, x):
        y = manager.forward(x * 1.0)
        return (y * y).sum(1)

    manager = pg.PropagationManager(pg.ResampleProp())
    torch.manual_seed(1)
    runs = []
    for _ in range(200):
        x.grad = None
        manager.backward(f(manager, x))
        runs.append(x.grad.clone())
    est = torch.stack(runs)
    mean = x.detach().mean(0)
    exact = 2 * mean / 400 + 2 * (x.detach() - mean) / 399
    err = (est.mean(0) - exact).abs()
    se = est.std(0) / 200 ** 0.5
    assert (err < 5 * se + 1e-12).all()


def test_nan_check_names_the_node_and_is_off_by_default():
    @pg.propagate
    def f(manager, x):
        h = manager.forward(torch.sqrt(x))
        return (h * h).sum(1)

    x = torch.tensor([[1.0, -1.0]], dtype=F64, requires_grad=True)
    quiet = pg.PropagationManager(pg.Propagator())
    quiet.backward(f(quiet, x))  # no check: NaN flows as in torch
    assert torch.isnan(x.grad).any()
    loud = pg.PropagationManager(pg.Propagator(), check_nan=True)
    with pytest.raises(FloatingPointError, match=r"test_propagate.py:\d+ \[Propagator\(\)\]"):
        f(loud, x)
    loud.backward(f(loud, torch.ones(1, 2, dtype=F64)))  # usable afterwards


# ------------------------------------------------------------------ TotalProp weights


class FixedNoise:
    """A Normal whose draws are given: to compute the estimators by hand."""

    def __init__(self, loc, scale):
        self.loc, self.scale = loc, scale
        self.batch_shape = torch.Size()

    def sample(self, shape=()):
        return FIXED["noise"]

    rsample = sample

    def log_prob(self, v):
        return Normal(0.0, self.scale).log_prob(v)


FIXED: dict = {}


def _tp_by_hand(x, W, noise, scale, per_sample_target):
    """beta's or W's gradient as TotalProp should give it, from materialized contributions."""
    pre = torch.sigmoid(x @ W)
    out = pre + noise
    loss = ((out - 0.3) ** 2).sum(1)
    b = x.shape[0]
    g_rp = 2 * (out - 0.3) / b
    baselined = loss - (loss.sum() - loss) / (b - 1)
    score = noise / scale ** 2
    g_lr = score * baselined[:, None] / b
    sig = pre * (1 - pre)

    def contrib(g):  # per-sample d/dW of g . sigmoid(x @ W): outer(x_i, g_i * sig_i)
        return torch.einsum("bi,bj->bij", x, g * sig)

    c_rp, c_lr = contrib(g_rp), contrib(g_lr)
    v_rp = c_rp.var(0).sum()
    v_lr = c_lr.var(0).sum()
    k = v_rp / (v_rp + v_lr)
    return x.T @ ((k * g_lr + (1 - k) * g_rp) * sig), k


@pg.propagate
def one_node(manager, x, W):
    h = torch.sigmoid(x @ W)
    h = manager.forward(h, ivw_target=W)
    return ((h - 0.3) ** 2).sum(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_interval", [1, 3])
def test_tp_weight_for_a_shared_weight_is_the_inverse_variance_formula(k_interval, device):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3, dtype=F64, generator=g).to(device)
    W = torch.randn(3, 2, dtype=F64, generator=g).to(device).requires_grad_()
    scale = 0.2
    FIXED["noise"] = (torch.randn(64, 2, dtype=F64, generator=g) * scale).to(device)
    manager = pg.PropagationManager(pg.TotalProp(dist_class=FixedNoise,
                                                 dist_params=(0.0, scale),
                                                 k_interval=k_interval))
    manager.backward(one_node(manager, x, W))
    expect, k = _tp_by_hand(x, W.detach(), FIXED["noise"], scale, False)
    assert 0.0 < float(k) < 1.0
    torch.testing.assert_close(W.grad, expect)
    assert "factored_outer" in pg.source(one_node, manager)


# ------------------------------------------------------------- configurations that run


@pg.propagate
def gaussian_cost(manager, theta, batch):
    x = manager.forward(theta.expand(batch, theta.shape[0]) * 1.0)
    x = manager.forward(x, local_propagator="shape")
    return ((x - 1.0) ** 2).sum(1)


@pytest.mark.parametrize("default, shape", [
    (pg.LRProp, pg.GSLoss),
    (pg.LRProp, pg.Propagator),
    (pg.TotalProp, pg.GSProp),
])
def test_gaussian_shaping_is_unbiased_for_a_quadratic_cost(default, shape):
    # x ~ N(theta, s^2): d/dtheta E[sum (x - 1)^2] = 2 (theta - 1); a Gaussian fit is exact in
    # expectation for a quadratic cost, so GS is unbiased here too
    theta = torch.tensor([0.3, -0.5], dtype=F64, requires_grad=True)
    kw = dict(dist_class=Normal, dist_params=(0.0, 0.5))
    opts = {"ivw_target": None} if default is pg.TotalProp else {}
    manager = pg.PropagationManager(default(**kw), loss_propagator=pg.LossProp(lossgrad=True))
    manager.add_propagator("shape", shape())
    torch.manual_seed(0)
    runs = []
    for _ in range(300):
        theta.grad = None
        if opts:
            with pytest.raises(ConfigurationError, match="needs ivw_target"):
                gaussian_cost(manager, theta, 64)  # TotalProp needs a target
            return
        manager.backward(gaussian_cost(manager, theta, 64))
        runs.append(theta.grad.clone())
    est = torch.stack(runs)
    truth = 2 * (theta.detach() - 1.0)
    se = est.std(0) / len(runs) ** 0.5
    assert ((est.mean(0) - truth).abs() < 4 * se + 1e-9).all(), (est.mean(0), truth, se)


@pytest.mark.parametrize("prop", [
    pg.TotalProp(baseline=False, dist_class=Normal, dist_params=(0.0, 0.1)),
    pg.TotalProp(baseline="mean", k_interval=2, dist_class=Normal, dist_params=(0.0, 0.1)),
    pg.TotalProp(backprop=False, dist_class=Normal, dist_params=(0.0, 0.1)),
    pg.LRProp(baseline=lambda cost: cost.median(), dist_class=Normal, dist_params=(0.0, 0.1)),
    pg.RPProp(backprop=False, dist_class=Normal, dist_params=(0.0, 0.1)),
    pg.ComboProp(pg.RPProp(dist_class=Normal, dist_params=(0.0, 0.1)), pg.SkipProp(1)),
    pg.ChainProp(pg.RPProp(dist_class=Normal, dist_params=(0.0, 0.1)), pg.PauseProp()),
])
def test_constructor_options_run_on_a_recurrent_program(prop):
    @pg.propagate
    def rnn(manager, x, w, beta):
        b = beta.expand(x.shape[0], 1)
        for _ in range(4):
            x = torch.sigmoid(b * (x @ w))  # the loss's last op saves its output
            x = manager.forward(x, ivw_target=b)
        return torch.sigmoid(x.sum(1))

    x, w1, _ = _params(17)
    w = torch.randn(3, 3, dtype=F64) * 0.5
    beta = torch.tensor([1.0], dtype=F64, requires_grad=True)
    manager = pg.PropagationManager(prop)
    for _ in range(2):  # reused across iterations
        beta.grad = None
        manager.backward(rnn(manager, x, w, beta))
        assert beta.grad is not None and torch.isfinite(beta.grad).all()


def _input_scaled(h):
    return {"loc": 0.0, "scale": h.abs() + 0.1}


def test_dist_params_depending_on_the_input_are_refused():
    @pg.propagate
    def f(manager, x, w):
        h = manager.forward(x @ w, dist_params=_input_scaled)
        return (h * h).sum(1)

    x, w1, _ = _params(18)
    manager = pg.PropagationManager(pg.RPProp(dist_class=Normal))
    with pytest.raises(NotImplementedError, match="depend on the node input"):
        f(manager, x, w1)


class QueuedNoise(FixedNoise):
    """Hands out the queued draws in order, one per node."""

    def sample(self, shape=()):
        return FIXED["queue"].pop(0)

    rsample = sample


@pg.propagate
def two_steps(manager, x, W, beta):
    b = beta.expand(x.shape[0], 1)
    for _ in range(2):
        x = torch.sigmoid(b * (x @ W))
        x = manager.forward(x, ivw_target=b)
    return ((x - 0.3) ** 2).sum(1)


@pytest.mark.parametrize("k_interval", [1, 2])
def test_tp_two_nodes_by_hand_with_reused_weights(k_interval):
    g = torch.Generator().manual_seed(6)
    bsz, s = 50, 0.3
    x0 = torch.randn(bsz, 2, dtype=F64, generator=g)
    W = torch.randn(2, 2, dtype=F64, generator=g)
    beta = torch.tensor([0.7], dtype=F64, requires_grad=True)
    n1, n2 = (torch.randn(bsz, 2, dtype=F64, generator=g) * s for _ in range(2))
    FIXED["queue"] = [n1, n2]
    manager = pg.PropagationManager(pg.TotalProp(dist_class=QueuedNoise, dist_params=(0.0, s),
                                                 k_interval=k_interval))
    manager.backward(two_steps(manager, x0, W, beta))

    bt = 0.7
    a1 = x0 @ W
    h1 = torch.sigmoid(bt * a1)
    x1 = h1 + n1
    a2 = x1 @ W
    h2 = torch.sigmoid(bt * a2)
    x2 = h2 + n2
    loss = ((x2 - 0.3) ** 2).sum(1)
    lb = loss - (loss.sum() - loss) / (bsz - 1)

    def k_of(g_rp, g_lr, sig, a):
        c_rp, c_lr = (g_rp * sig * a).sum(1), (g_lr * sig * a).sum(1)
        v_rp, v_lr = c_rp.var(), c_lr.var()
        return v_rp / (v_rp + v_lr)

    sig2, sig1 = h2 * (1 - h2), h1 * (1 - h1)
    g_rp2, g_lr2 = 2 * (x2 - 0.3) / bsz, (n2 / s ** 2) * lb[:, None] / bsz
    k2 = k_of(g_rp2, g_lr2, sig2, a2)
    d_h2 = k2 * g_lr2 + (1 - k2) * g_rp2
    grad = (d_h2 * sig2 * a2).sum()
    g_rp1 = (d_h2 * sig2 * bt) @ W.T
    g_lr1 = (n1 / s ** 2) * lb[:, None] / bsz
    k1 = k2 if k_interval == 2 else k_of(g_rp1, g_lr1, sig1, a1)
    d_h1 = k1 * g_lr1 + (1 - k1) * g_rp1
    grad = grad + (d_h1 * sig1 * a1).sum()
    torch.testing.assert_close(beta.grad, grad.reshape(1))


MANAGER = pg.PropagationManager()


def test_manager_forward_under_propgen_grad_and_other_methods_are_refused():
    def f(x):
        return MANAGER.forward(x * 2.0).sum()

    with pytest.raises(pg.UnsupportedSyntaxError, match="@propgen.propagate"):
        pg.grad(f)(torch.ones(2))

    @pg.propagate
    def g(manager, x):
        manager.backward(x)
        return x

    with pytest.raises(pg.UnsupportedSyntaxError, match="manager.backward"):
        g(MANAGER, torch.ones(2))


def test_manager_closed_over_and_global():
    x, w1, _ = _params(19)

    @pg.propagate
    def f(x, w):
        return (MANAGER.forward(torch.tanh(x @ w)) ** 2).sum(1)

    MANAGER.backward(f(x, w1))
    ref = torch.autograd.grad((torch.tanh(x @ w1) ** 2).sum(1).mean(), w1)[0]
    torch.testing.assert_close(w1.grad, ref)


class Cell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()

    def forward(self, x, b):
        return torch.tanh(b * self.lin(x))


@pg.propagate
def module_rollout(manager, cell, x, beta, horizon):
    b = beta.expand(x.shape[0], 1)
    for _ in range(horizon):
        x = cell(x, b)  # an nn.Module: called through autograd (opaque)
        x = manager.forward(x, ivw_target=b)
    return (x ** 2).sum(1)


def test_modules_inside_propagated_functions_rp_equals_autograd_and_tp_runs():
    torch.manual_seed(0)
    cell = Cell()
    x0 = torch.randn(16, 3, dtype=F64)
    beta = torch.tensor([0.9], dtype=F64, requires_grad=True)
    noise = dict(dist_class=Normal, dist_params={"loc": 0.0, "scale": 0.1})
    manager = pg.PropagationManager(pg.RPProp(**noise))
    torch.manual_seed(1)
    manager.backward(module_rollout(manager, cell, x0, beta, 4))
    got = (beta.grad.clone(), cell.lin.weight.grad.clone())
    beta.grad = None
    cell.zero_grad()
    torch.manual_seed(1)
    x, b = x0, beta.expand(16, 1)
    for _ in range(4):
        x = cell(x, b)
        x = x + Normal(torch.tensor(0.0, dtype=F64), torch.tensor(0.1, dtype=F64)).rsample(
            x.shape)
    (x ** 2).sum(1).mean().backward()
    torch.testing.assert_close(got[0], beta.grad)
    torch.testing.assert_close(got[1], cell.lin.weight.grad)
    tp = pg.PropagationManager(pg.TotalProp(**noise))
    beta.grad = None
    cell.zero_grad()
    tp.backward(module_rollout(tp, cell, x0, beta, 4))
    assert torch.isfinite(beta.grad).all() and cell.lin.weight.grad is not None
    assert "opaque_grad" in pg.source(module_rollout, tp)


@pg.propagate
def inline_rollout(manager, W, bias, x, beta, horizon):
    b = beta.expand(x.shape[0], 1)
    for _ in range(horizon):
        x = torch.tanh(b * (x @ W.T + bias))
        x = manager.forward(x, ivw_target=b)
    return (x ** 2).sum(1)


def test_tp_through_a_module_equals_tp_through_its_inlined_twin():
    torch.manual_seed(0)
    cell = Cell()
    x0 = torch.randn(16, 3, dtype=F64)
    beta = torch.tensor([0.9], dtype=F64, requires_grad=True)
    manager = pg.PropagationManager(pg.TotalProp(dist_class=Normal, dist_params=(0.0, 0.1)))
    torch.manual_seed(5)
    manager.backward(module_rollout(manager, cell, x0, beta, 4))
    through_module = beta.grad.clone()
    beta.grad = None
    torch.manual_seed(5)
    manager.backward(inline_rollout(manager, cell.lin.weight.detach(), cell.lin.bias.detach(),
                                    x0, beta, 4))
    torch.testing.assert_close(through_module, beta.grad)


@pg.propagate
def mm_rollout(manager, x, W, horizon):
    for _ in range(horizon):
        x = torch.sigmoid(torch.mm(x, W))  # mm's adjoint has no per-sample form: torch.func
        x = manager.forward(x, ivw_target=W)
    return 0.5 * ((1.0 - x) ** 2).sum(dim=1)


@pg.propagate
def matmul_rollout(manager, x, W, horizon):
    for _ in range(horizon):
        x = torch.sigmoid(x @ W)  # factored per-sample rule
        x = manager.forward(x, ivw_target=W)
    return 0.5 * ((1.0 - x) ** 2).sum(dim=1)


def test_tp_torch_func_fallback_equals_the_factored_rule():
    g = torch.Generator().manual_seed(8)
    W = (torch.randn(3, 3, dtype=F64, generator=g) * 0.5).requires_grad_()
    x0 = torch.rand(64, 3, dtype=F64, generator=g)
    manager = pg.PropagationManager(pg.TotalProp(dist_class=Normal, dist_params=(0.0, 0.1)))
    torch.manual_seed(0)
    manager.backward(mm_rollout(manager, x0, W, 3))
    fallback = W.grad.clone()
    W.grad = None
    torch.manual_seed(0)
    manager.backward(matmul_rollout(manager, x0, W, 3))
    torch.testing.assert_close(fallback, W.grad)
    assert "per_sample_vjp" in pg.source(mm_rollout, manager)
    assert "factored_outer" in pg.source(matmul_rollout, manager)


def test_per_sample_vjp_against_one_backward_per_sample():
    from propgen.templates.estimators import per_sample_vjp

    b, k = 5, 3
    x = torch.randn(b, k, dtype=F64)
    w = torch.randn(k, 2, dtype=F64)
    g = torch.randn(b, 2, dtype=F64)
    n = x.shape[0]  # the batch size as a number, computed before the segment

    def per_sample_target(t, x):  # t: (B, 1); the segment builds (B, 2) from the number n
        return torch.cat([t, t.new_ones(n, 1)], 1) * torch.tanh(x @ w)

    t = torch.randn(b, 1, dtype=F64)
    expected = []
    for i in range(b):  # sample i's contribution: its own output's gradient at its own row
        ti = t.clone().requires_grad_()
        (gi,) = torch.autograd.grad((per_sample_target(ti, x)[i] * g[i]).sum(), ti)
        expected.append(gi[i])
    got = per_sample_vjp(per_sample_target, t, g, (x,), "model.py:3")
    torch.testing.assert_close(got, torch.stack(expected))

    def shared_target(wt, x):
        return torch.sin(x @ wt)

    expected = torch.stack([_one_grad(shared_target, w, x[i:i + 1], g[i]) for i in range(b)])
    torch.testing.assert_close(per_sample_vjp(shared_target, w, g, (x,), "model.py:3"),
                               expected)

    def shared_with_batch_number(wt, x):  # replayed with a batch of one, n no longer fits
        return (x @ wt) * torch.ones(n, 1, dtype=F64)

    with pytest.raises(RuntimeError, match=r"model\.py:7: TotalProp replays .* batch size"):
        per_sample_vjp(shared_with_batch_number, w, g, (x,), "model.py:7")


def _one_grad(f, w, xi, gi):
    wi = w.clone().requires_grad_()
    return torch.autograd.grad((f(wi, xi) * gi).sum(), wi)[0]


def test_inverse_variance_weight_closed_forms():
    from propgen.templates.estimators import Factored, inverse_variance_weight

    c_rp = torch.tensor([[1.0], [3.0], [5.0]], dtype=F64)  # variance 4
    c_lr = torch.tensor([[0.0], [2.0], [-2.0]], dtype=F64)  # variance 4
    assert float(inverse_variance_weight(c_rp, c_lr, 3)) == pytest.approx(0.5)
    assert float(inverse_variance_weight(c_rp, 3 * c_lr, 3)) == pytest.approx(4 / 40)
    flat = torch.ones(3, 1, dtype=F64)
    assert float(inverse_variance_weight(flat, flat, 3)) == 0.5  # 0/0
    assert float(inverse_variance_weight(flat, c_lr, 3)) == 0.0
    with pytest.raises(ValueError, match="per-sample contributions"):
        inverse_variance_weight(torch.ones(2, 2), torch.ones(2, 2), 3)  # summed over batch
    left, right = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    full = torch.einsum("bi,bj->bij", left, right)
    fac = Factored([(left, right), (right @ torch.ones(2, 3, dtype=F64), right)])
    full = full + torch.einsum("bi,bj->bij", right @ torch.ones(2, 3, dtype=F64), right)
    torch.testing.assert_close(fac.pooled_variance(), full.var(0).sum())


def test_constant_target_outside_the_nodes_is_refused_when_compiling():
    @pg.propagate
    def f(manager, x):
        x = manager.forward(x * 1.0)
        x = manager.forward(x * 1.0, force_targets=-3)  # node 1: -3 reaches before the start
        return x.sum(1)

    with pytest.raises(ConfigurationError, match=r"test_propagate.py:\d+.*target -3"):
        f(pg.PropagationManager(), torch.ones(2, 2))


def test_loss_node_baseline_serves_lr_nodes_without_their_own():
    x, w1, _ = _params(20)
    kw = dict(dist_class=Normal, dist_params=(0.0, 0.2))
    grads = []
    for prop, loss in ((pg.LRProp(**kw), None),
                       (pg.LRProp(baseline=None, **kw), pg.LossProp(backprop=False,
                                                                    lossgrad=False,
                                                                    baseline="loo"))):
        manager = pg.PropagationManager(prop, loss_propagator=loss)
        w1.grad = None
        torch.manual_seed(4)
        manager.backward(noisy(manager, x, w1))
        grads.append(w1.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_no_grad_calls_record_nothing_and_clear_frees_the_tape():
    x, w1, _ = _params(21)
    manager = pg.PropagationManager()
    with torch.no_grad():
        out = noisy(manager, x, w1)
    assert manager.nodes == 0 and not out.requires_grad
    torch.testing.assert_close(out, (torch.tanh(x @ w1) ** 2).sum(1).detach())
    noisy(manager, x, w1)
    assert manager.nodes == 1
    manager.clear()
    with pytest.raises(RuntimeError, match="nothing recorded"):
        manager.backward(torch.zeros(8))


@pg.propagate
def via_mm(manager, x, W, ones, beta):
    b = beta.expand(x.shape[0], 1)
    for _ in range(3):
        x = torch.sigmoid(torch.mm(b, ones) * (x @ W))  # b's adjoint through mm: torch.func
        x = manager.forward(x, ivw_target=b)
    return ((x - 0.5) ** 2).sum(1)


@pg.propagate
def via_mul(manager, x, W, ones, beta):
    b = beta.expand(x.shape[0], 1)
    for _ in range(3):
        x = torch.sigmoid(b * (x @ W))
        x = manager.forward(x, ivw_target=b)
    return ((x - 0.5) ** 2).sum(1)


def test_torch_func_fallback_for_a_per_sample_target():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(2, 2, dtype=F64, generator=g)
    x0 = torch.rand(40, 2, dtype=F64, generator=g)
    beta = torch.tensor([1.3], dtype=F64, requires_grad=True)
    ones = torch.ones(1, 2, dtype=F64)
    manager = pg.PropagationManager(pg.TotalProp(dist_class=Normal, dist_params=(0.0, 0.05)))
    out = []
    for f in (via_mm, via_mul):
        beta.grad = None
        torch.manual_seed(2)
        manager.backward(f(manager, x0, W, ones, beta))
        out.append(beta.grad.clone())
    torch.testing.assert_close(out[0], out[1])
    assert "per_sample_vjp" in pg.source(via_mm, manager)


# --------------------------------------------------------------------------------------------
# user propagators: branches in backward templates, names nobody supplies
# --------------------------------------------------------------------------------------------


def _clip_forward(x):
    return x


def _clip_backward(output, x, limit):
    # decided when the call site binds a constant; both branches only send gradients
    if limit is None:
        d[x] = d[output]
    else:
        d[x] = d[output].clamp(-limit, limit)


def _gate_backward(output, x, limit):
    # decided at run time by a message: each branch starts from the state before the if
    if m["off"] is None:
        d[x] = d[output].clamp(-limit, limit)
    else:
        d[x] = d[output] * 0.0


class _Clip(pg.Propagator):
    keywords = ("limit",)

    def parts(self):
        return [pg.Part(_clip_forward, _clip_backward)]


class _Gate(_Clip):
    def parts(self):
        return [pg.Part(_clip_forward, _gate_backward)]


@pg.propagate
def _clipped(manager, x, w):
    h = manager.forward(x @ w, limit=0.5)
    h = manager.forward(torch.tanh(h) @ w.T, limit=0.2)
    return (h * h).sum(1)


@pytest.mark.parametrize("prop", [_Clip, _Gate])
def test_branches_of_a_backward_template_against_autograd_hooks(prop):
    x, w = torch.randn(6, 3, dtype=F64), torch.randn(3, 3, dtype=F64, requires_grad=True)
    manager = pg.PropagationManager(prop())
    manager.backward(_clipped(manager, x, w))
    w_ref = w.detach().clone().requires_grad_()
    h = x @ w_ref
    h.register_hook(lambda g: g.clamp(-0.5, 0.5))
    h2 = torch.tanh(h) @ w_ref.T
    h2.register_hook(lambda g: g.clamp(-0.2, 0.2))
    (h2 * h2).sum(1).mean().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
    code = pg.source(_clipped, manager)
    assert ("if off is None" in code) == (prop is _Gate)
    assert "0.5 is None" not in code and "0.2 is None" not in code  # decided, not emitted


def _bad_backward(output, x, nobody):
    d[x] = d[output] * nobody


def _bad_forward(x, nobody):
    return x * nobody


class _Bad(pg.Propagator):
    def __init__(self, which):
        super().__init__()
        self.which = which

    def parts(self):
        if self.which == "forward":
            return [pg.Part(_bad_forward, _clip_backward)]
        return [pg.Part(_clip_forward, _bad_backward)]


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_a_template_reading_a_name_nobody_supplies_is_refused(which):
    x, w = torch.randn(6, 3, dtype=F64), torch.randn(3, 3, dtype=F64, requires_grad=True)
    manager = pg.PropagationManager(_Bad(which))
    with pytest.raises(ConfigurationError,
                       match=rf"test_propagate\.py:\d+: the propagator template _bad_{which} "
                       r"\(.*test_propagate\.py:\d+\) reads 'nobody'"):
        manager.backward(_clipped(manager, x, w))


@pytest.mark.parametrize("params", [{"scale": 1.0}, {"loc": 0.0, "sigma": 1.0}, (1.0,)])
def test_normal_noise_with_wrong_parameters_names_the_ones_it_needs(params):
    manager = pg.PropagationManager(pg.RPProp(dist_class=Normal, dist_params=params))
    x = torch.randn(4, 3, dtype=F64)
    w = torch.randn(3, 2, dtype=F64, requires_grad=True)

    @pg.propagate
    def f(manager, x, w):
        return manager.forward(x @ w).sum(1)

    with pytest.raises(TypeError, match="'loc': ..., 'scale'"):
        f(manager, x, w)


@pytest.mark.parametrize("name", ["BP", "RP", "LR", "TP"])
def test_the_same_seed_gives_bitwise_the_same_gradients(name):
    # docs/guarantees.md: the noise comes from torch's generator, so seeding reproduces a run
    noise = {"dist_class": Normal, "dist_params": {"loc": 0.0, "scale": 0.5}}
    prop = {"BP": pg.BackPropagator, "RP": pg.RPProp, "LR": pg.LRProp, "TP": pg.TotalProp}[name]

    @pg.propagate
    def f(manager, x, w):
        h = manager.forward(x @ w, ivw_target=w)  # ivw_target: TotalProp's (others ignore it)
        return (manager.forward(torch.tanh(h) @ w, ivw_target=w) ** 2).sum(1)

    def run():
        torch.manual_seed(7)
        x = torch.randn(16, 3, dtype=F64)
        w = torch.randn(3, 3, dtype=F64, requires_grad=True)
        manager = pg.PropagationManager(prop() if name == "BP" else prop(**noise))
        manager.backward(f(manager, x, w))
        return w.grad

    first, second = run(), run()
    assert torch.equal(first, second)
    assert first.abs().sum() > 0
