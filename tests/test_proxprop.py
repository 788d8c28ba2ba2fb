"""ProxProp at layer nodes of propagated programs: the parameters' .grad against the closed
forms (computed here from autograd's output gradients), the upstream message against
backprop's, the proximal point, optimizers, configuration switching, bad input.
(The solver math on its own: tests/test_proximal_math.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import propgen as pg

F64 = torch.float64


def _mlp(dtype=F64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(6, 9).to(dtype), nn.Linear(9, 4).to(dtype)


def _data(n=13, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _program(fc1, fc2):
    @pg.propagate
    def net(x, manager):
        h = torch.tanh(manager.forward(x, layer=fc1))
        return manager.forward(h, layer=fc2)

    return net


def _reference(fc1, fc2, x, y):
    """Autograd: each layer's input, output gradient and parameter gradients."""
    x = x.clone().requires_grad_()
    z1 = fc1(x)
    h = torch.tanh(z1)
    z2 = fc2(h)
    loss = F.cross_entropy(z2, y)
    g1, g2, gx = torch.autograd.grad(loss, [z1, z2, x], retain_graph=True)
    grads = torch.autograd.grad(loss, [*fc1.parameters(), *fc2.parameters()])
    return {"a": (x.detach(), h.detach()), "g": (g1, g2), "gx": gx, "grads": grads}


def _run(prop, fc1, fc2, x, y, x_grad=False):
    for p in (*fc1.parameters(), *fc2.parameters()):
        p.grad = None
    man = pg.PropagationManager(prop)
    x = x.clone().requires_grad_(x_grad)
    man.backward(F.cross_entropy(_program(fc1, fc2)(x, man), y))
    return [p.grad for p in (*fc1.parameters(), *fc2.parameters())], x.grad


def _exact(a, g, tau):
    """(A^T A + I/tau)^-1 A^T G with A = [a, 1]: rows (weight^T; bias)."""
    a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    m = a1.t() @ a1 + torch.eye(a1.shape[1], dtype=a.dtype) / tau
    x = torch.linalg.solve(m, a1.t() @ g)
    return [x[:-1].t(), x[-1]]


def test_gradient_mode_is_backprop_and_the_upstream_message_too():
    fc1, fc2 = _mlp()
    x, y = _data()
    ref = _reference(fc1, fc2, x, y)
    grads, gx = _run(pg.ProxProp(mode="gradient"), fc1, fc2, x, y, x_grad=True)
    for got, want in zip(grads, ref["grads"]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, ref["gx"])  # the message sent to the program's input


@pytest.mark.parametrize("tau", [0.05, 1.0, 100.0])
def test_exact_mode_is_the_closed_form(tau):
    fc1, fc2 = _mlp()
    x, y = _data()
    ref = _reference(fc1, fc2, x, y)
    grads, _ = _run(pg.ProxProp(tau=tau, mode="exact"), fc1, fc2, x, y)
    want = _exact(ref["a"][0], ref["g"][0], tau) + _exact(ref["a"][1], ref["g"][1], tau)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w)


def test_exact_mode_upstream_message_is_backprops():
    # fc1's direction depends on the message fc2's node sends: equal to backprop's, it
    # matches the closed form built from autograd's gradient at fc1's output
    fc1, fc2 = _mlp(seed=3)
    x, y = _data(seed=4)
    ref = _reference(fc1, fc2, x, y)
    grads, gx = _run(pg.ProxProp(tau=0.3, mode="exact"), fc1, fc2, x, y, x_grad=True)
    for got, w in zip(grads[:2], _exact(ref["a"][0], ref["g"][0], 0.3)):
        torch.testing.assert_close(got, w)
    torch.testing.assert_close(gx, ref["gx"])


def test_cg1_is_its_one_step_closed_form():
    fc1, fc2 = _mlp()
    x, y = _data()
    ref = _reference(fc1, fc2, x, y)
    tau = 0.5
    grads, _ = _run(pg.ProxProp(tau=tau, mode="cg1"), fc1, fc2, x, y)
    for (a, g), got in zip(zip(ref["a"], ref["g"]), (grads[:2], grads[2:])):
        a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        grad = a1.t() @ g  # one column per output unit, each its own CG system
        alpha = (grad * grad).sum(0) / (((a1 @ grad) ** 2).sum(0) + (grad * grad).sum(0) / tau)
        step = grad * alpha
        torch.testing.assert_close(got[0], step[:-1].t())
        torch.testing.assert_close(got[1], step[-1])


def test_plain_sgd_with_lr_one_lands_on_the_proximal_point():
    fc1, fc2 = _mlp()
    x, y = _data()
    tau = 0.2
    ref = _reference(fc1, fc2, x, y)
    z_target = fc2(ref["a"][1]).detach() - ref["g"][1]  # the output after a gradient step
    man = pg.PropagationManager(pg.ProxProp(tau=tau, mode="exact"))
    opt = torch.optim.SGD([*fc1.parameters(), *fc2.parameters()], lr=1.0)
    old = [p.detach().clone() for p in fc2.parameters()]
    opt.zero_grad()
    man.backward(F.cross_entropy(_program(fc1, fc2)(x, man), y))
    opt.step()
    # the new parameters minimise 1/2 |fc2(a) - z_target|^2 + 1/(2 tau) |theta - old|^2
    w, b = (p.detach().clone().requires_grad_() for p in fc2.parameters())
    obj = 0.5 * ((F.linear(ref["a"][1], w, b) - z_target) ** 2).sum() + (
        ((w - old[0]) ** 2).sum() + ((b - old[1]) ** 2).sum()) / (2 * tau)
    for g in torch.autograd.grad(obj, [w, b]):
        assert g.abs().max() < 1e-10


def test_any_optimizer_and_configuration_switch_without_editing_the_program():
    fc1, fc2 = _mlp()
    x, y = _data()
    losses = {}
    for name, prop in [("backprop", pg.BackPropagator()), ("prox", pg.ProxProp(mode="cg3"))]:
        a, b = copy.deepcopy(fc1), copy.deepcopy(fc2)
        net = _program(a, b)
        man = pg.PropagationManager(prop)
        opt = torch.optim.Adam([*a.parameters(), *b.parameters()], lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            loss = F.cross_entropy(net(x, man), y)
            man.backward(loss)
            opt.step()
        losses[name] = F.cross_entropy(b(torch.tanh(a(x))), y).item()
    start = F.cross_entropy(fc2(torch.tanh(fc1(x))), y).item()
    assert losses["backprop"] < start and losses["prox"] < start


def test_backpropagator_layer_node_is_the_layer_call():
    fc1, fc2 = _mlp()
    x, y = _data()
    ref = _reference(fc1, fc2, x, y)
    grads, gx = _run(pg.BackPropagator(), fc1, fc2, x, y, x_grad=True)
    for got, want in zip(grads, ref["grads"]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, ref["gx"])


def test_shared_layer_accumulates_one_direction_per_node():
    torch.manual_seed(0)
    fc = nn.Linear(5, 5).double()
    man = pg.PropagationManager(pg.ProxProp(tau=0.7, mode="exact"))

    @pg.propagate
    def net(x, manager):
        for _ in range(2):
            x = torch.sin(manager.forward(x, layer=fc))
        return x

    x = torch.randn(8, 5, dtype=F64)
    man.backward(net(x, man).pow(2).sum())
    # by hand: both nodes' inputs and output gradients from autograd
    a0 = x
    z0 = fc(a0)
    a1 = torch.sin(z0)
    z1 = fc(a1)
    loss = torch.sin(z1).pow(2).sum()
    g0, g1 = torch.autograd.grad(loss, [z0, z1])
    want = [w0 + w1 for w0, w1 in zip(_exact(a0, g0, 0.7), _exact(a1.detach(), g1, 0.7))]
    torch.testing.assert_close(fc.weight.grad, want[0])
    torch.testing.assert_close(fc.bias.grad, want[1])


def test_conv2d_exact_satisfies_the_proximal_optimality():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    tau = 0.4
    man = pg.PropagationManager(pg.ProxProp(tau=tau, mode="exact"))

    @pg.propagate
    def net(x, manager):
        return manager.forward(x, layer=conv)

    x = torch.randn(4, 2, 6, 6, dtype=F64)
    target = torch.randn(4, 3, 3, 3, dtype=F64)
    out = net(x, man)
    man.backward(((out - target) ** 2).sum() / 2)
    g = (conv(x) - target).detach()
    new = [(p - p.grad).detach().requires_grad_() for p in conv.parameters()]
    old = [p.detach() for p in conv.parameters()]
    obj = 0.5 * ((F.conv2d(x, *new, stride=2, padding=1) - (conv(x).detach() - g)) ** 2).sum()
    obj = obj + sum(((n - o) ** 2).sum() for n, o in zip(new, old)) / (2 * tau)
    for gr in torch.autograd.grad(obj, new):
        assert gr.abs().max() < 1e-9


def test_generic_layer_linear_in_its_parameters():
    class Poly(nn.Module):  # linear in (w1, w2), not in x
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(3, 2, dtype=F64))
            self.w2 = nn.Parameter(torch.randn(3, 2, dtype=F64))

        def forward(self, x):
            return x @ self.w1 + (x ** 2) @ self.w2

    torch.manual_seed(0)
    layer = Poly()
    man = pg.PropagationManager(pg.ProxProp(tau=2.0, mode="exact"))

    @pg.propagate
    def net(x, manager):
        return manager.forward(x, layer=layer)

    x = torch.randn(5, 3, dtype=F64)
    man.backward(net(x, man).pow(3).sum())
    g = 3 * layer(x).detach() ** 2
    a = torch.cat([x, x ** 2], 1)  # the output is a @ [w1; w2]
    want = torch.linalg.solve(a.t() @ a + torch.eye(6, dtype=F64) / 2.0, a.t() @ g)
    torch.testing.assert_close(layer.w1.grad, want[:3])
    torch.testing.assert_close(layer.w2.grad, want[3:])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["exact", "cg2", "gradient"])
def test_devices_and_dtypes(device, dtype, mode):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    fc1, fc2 = (m.to(device) for m in _mlp(dtype))
    x, y = _data(dtype=dtype)
    grads, _ = _run(pg.ProxProp(tau=0.5, mode=mode), fc1, fc2, x.to(device), y.to(device))
    assert all(g.dtype == dtype and g.device.type == device for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------- bad input


def test_layer_not_linear_in_its_parameters_is_refused_naming_the_layer():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # positively homogeneous, not linear
    man = pg.PropagationManager(pg.ProxProp())

    @pg.propagate
    def net(x, manager):
        return manager.forward(x, layer=block)

    x = torch.randn(6, 4)
    with pytest.raises(pg.ConfigurationError,
                       match=r"test_proxprop\.py:\d+: ProxProp's layer Sequential\( is not "
                             r"linear in its parameters"):
        man.backward(net(x, man).sum())


def test_missing_layer_and_bad_settings():
    man = pg.PropagationManager(pg.ProxProp())

    @pg.propagate
    def net(x, manager):
        return manager.forward(x)

    with pytest.raises(pg.ConfigurationError, match=r"test_proxprop\.py:\d+: .*layer=None"):
        net(torch.randn(3, 2), man)
    with pytest.raises(ValueError, match="mode"):
        pg.ProxProp(mode="newton")
    with pytest.raises(ValueError, match="tau"):
        pg.ProxProp(tau=0)
    with pytest.raises(TypeError, match="lr"):
        pg.ProxProp(lr=1.0)


# ------------------------------------------------- ProxProp layers in ordinary PyTorch code


@pytest.mark.parametrize("mode", ["exact", "cg2", "gradient"])
def test_proxprop_layers_in_plain_torch_equal_the_node(mode):
    fc1, fc2 = _mlp()
    x, y = _data()
    want, want_gx = _run(pg.ProxProp(tau=0.3, mode=mode), fc1, fc2, x, y, x_grad=True)
    p1 = pg.ProxPropLayer(copy.deepcopy(fc1), tau=0.3, mode=mode)
    p2 = pg.proxprop_module(nn.Linear)(9, 4, tau=0.3, mode=mode).double()
    p2.layer.load_state_dict(fc2.state_dict())
    xg = x.clone().requires_grad_()
    F.cross_entropy(p2(torch.tanh(p1(xg))), y).backward()
    got = [p.grad for p in (*p1.parameters(), *p2.parameters())]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(xg.grad, want_gx)


def test_generated_conv_class_and_refusals():
    conv = pg.proxprop_module(nn.Conv2d)(2, 3, 3, padding=1, tau=0.5, mode="exact").double()
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    conv(x).pow(2).sum().backward()
    g = 2 * conv.layer(x).detach()  # closed form through the optimality condition
    new = [(p - p.grad).detach().requires_grad_() for p in conv.parameters()]
    old = [p.detach() for p in conv.parameters()]
    obj = 0.5 * ((F.conv2d(x, *new, padding=1) - (conv.layer(x).detach() - g)) ** 2).sum()
    obj = obj + sum(((n - o) ** 2).sum() for n, o in zip(new, old)) / (2 * 0.5)
    assert all(gr.abs().max() < 1e-9 for gr in torch.autograd.grad(obj, new))
    with pytest.raises(pg.ConfigurationError, match="not linear in its parameters"):
        pg.ProxPropLayer(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))(torch.randn(4, 3))
    with pytest.raises(ValueError, match="mode"):
        pg.ProxPropLayer(nn.Linear(2, 2), mode="cg0")


def test_layer_keyword_under_a_noise_propagator_is_the_call_then_the_node():
    from torch.distributions import Normal

    fc1, fc2 = _mlp()
    x, y = _data()
    noise = {"dist_class": Normal, "dist_params": {"loc": 0.0, "scale": 0.1}}
    grads = []
    for layer_node in (True, False):
        for p in (*fc1.parameters(), *fc2.parameters()):
            p.grad = None
        man = pg.PropagationManager(pg.RPProp(**noise))

        if layer_node:
            @pg.propagate
            def net(x, manager):
                h = torch.tanh(manager.forward(x, layer=fc1))
                return manager.forward(h, layer=fc2)
        else:
            @pg.propagate
            def net(x, manager):
                h = torch.tanh(manager.forward(fc1(x)))
                return manager.forward(fc2(h))

        torch.manual_seed(5)
        man.backward(F.cross_entropy(net(x, man), y))
        grads.append([p.grad.clone() for p in (*fc1.parameters(), *fc2.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert grads[0][0].abs().sum() > 0


def test_frozen_layer_only_passes_the_message():
    fc1, fc2 = _mlp()
    x, y = _data()
    ref = _reference(fc1, fc2, x, y)
    fc2.requires_grad_(False)
    grads, gx = _run(pg.ProxProp(mode="gradient"), fc1, fc2, x, y, x_grad=True)
    assert grads[2] is None and grads[3] is None
    torch.testing.assert_close(grads[0], ref["grads"][0])
    torch.testing.assert_close(gx, ref["gx"])
