"""Signal propagation: the losses against their closed forms, local learning against updates
computed here with plain torch, inference, deferred updates, the manager preset, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from propgen.templates.sigprop import (
    Stream,
    accuracy,
    input_target_argmax,
    input_target_max,
    input_target_topk,
    label_direct,
)
from torch import nn

import propgen as pg
from propgen.sigprop import LayerNetwork

F64 = torch.float64


def _shared_targets(b=12, c=4, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(b) % c
    labels = labels[torch.randperm(b, generator=g)]
    labels[labels == c - 1] = 0  # class c-1 absent from the batch: n_c = 0
    protos = torch.randn(c, dim, generator=g, dtype=F64)
    h = torch.randn(b, dim, generator=g, dtype=F64)
    onehot = F.one_hot(labels, c).to(F64)
    return h, protos[labels], Stream(protos[labels], onehot, labels), labels, protos


# ------------------------------------------------------------------------------ losses


def test_input_target_max_is_count_weighted_cross_entropy():
    h, t, stream, labels, protos = _shared_targets()
    s = h @ protos.t()  # s_ic
    n = torch.bincount(labels, minlength=protos.shape[0]).to(F64)
    # -n_{y_i} log(exp(s_{i,y_i}) / sum_c n_c exp(s_ic)), classes absent from the batch drop
    log_norm = torch.logsumexp(s + torch.log(n), dim=1)
    expected = (n[labels] * (log_norm - s[torch.arange(len(labels)), labels])).mean()
    torch.testing.assert_close(input_target_max(h, t, stream), expected)


def test_input_target_argmax_is_class_cross_entropy():
    h, t, stream, labels, protos = _shared_targets(seed=1)
    s = h @ protos.t()
    n = torch.bincount(labels, minlength=protos.shape[0]).to(F64)
    log_norm = torch.logsumexp(s + torch.log(n), dim=1)
    expected = (log_norm - s[torch.arange(len(labels)), labels]).mean()
    torch.testing.assert_close(input_target_argmax(h, t, stream), expected)


def test_input_target_topk_against_loops():
    g = torch.Generator().manual_seed(2)
    b, dim, k = 7, 5, 3
    h = torch.randn(b, dim, generator=g, dtype=F64)
    t = torch.randn(b, dim, generator=g, dtype=F64)
    context = torch.randn(b, 4, generator=g, dtype=F64)  # distinct: no ties
    loss = input_target_topk(k)(h, t, Stream(t, context, None))
    total = 0.0
    for i in range(b):
        sims = [float(context[i] @ context[j]) for j in range(b)]
        top = sorted(range(b), key=lambda j: -sims[j])[:k]
        logits = torch.stack([h[i] @ t[j] for j in range(b)])
        logp = logits - torch.logsumexp(logits, 0)
        total += -sum(float(logp[j]) for j in top)
    assert abs(float(loss) - total / b) < 1e-10


def test_label_direct_and_feature_maps():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 3, 2, 2, generator=g, dtype=F64)
    t = torch.randn(4, 3, 2, 2, generator=g, dtype=F64)  # one row per class
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    stream = Stream(t, torch.eye(4, dtype=F64), labels, classes=True)
    # feature maps: the mean over the 4 positions of the channel inner products
    s = torch.einsum("bcp,kcp->bk", h.flatten(2), t.flatten(2)) / 4
    torch.testing.assert_close(label_direct(h, t, stream), F.cross_entropy(s, labels))
    assert int(accuracy(h, t, stream)) == int((s.argmax(1) == labels).sum())


def test_accuracy_counts_right_rows():
    h, t, stream, labels, protos = _shared_targets(seed=4)
    s = h @ t.t()
    right = labels[s.argmax(1)] == labels
    assert int(accuracy(h, t, stream)) == int(right.sum())


# --------------------------------------------------------------------- local learning


def _blocks(seed=0, dtype=F64):
    torch.manual_seed(seed)
    seq = nn.Sequential(
        nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Linear(8, 3))
    ctx = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
    return seq.to(dtype), ctx.to(dtype)


def _data(b=10, dtype=F64, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 5, generator=g, dtype=dtype), torch.randint(0, 3, (b,), generator=g)


def _sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


def test_each_layer_learns_from_its_own_loss_only():
    seq, ctx = _blocks()
    ref_seq, ref_ctx = copy.deepcopy(seq), copy.deepcopy(ctx)
    x, y = _data()
    lr = 0.1
    man = pg.SigpropManager(optimizer=_sgd(lr), context_layer=ctx, num_classes=3)
    out = man.wrap(seq)(x, y)

    # the same step with plain torch: each layer's update is -lr * grad of its own loss,
    # computed with the parameters before any update and detached inputs
    t0 = F.one_hot(y, 3).to(F64)
    h, t = ref_seq[0](x), ref_ctx(t0)
    losses = [(list(ref_seq[0].parameters()) + list(ref_ctx.parameters()),
               input_target_max(h, t, Stream(t, t0, y)))]
    for block in list(ref_seq)[1:-1]:
        h, t = block(h.detach()), block(t.detach())
        losses.append((list(block.parameters()), input_target_max(h, t, Stream(t, t0, y))))
    expected = [[p - lr * g for p, g in zip(ps, torch.autograd.grad(loss, ps))]
                for ps, loss in losses]
    got = [list(seq[0].parameters()) + list(ctx.parameters())] + [
        list(b.parameters()) for b in list(seq)[1:-1]]
    for e_list, g_list in zip(expected, got):
        for e, g in zip(e_list, g_list):
            torch.testing.assert_close(g.detach(), e.detach())
    torch.testing.assert_close(out, ref_seq[-1](h.detach()).detach())
    # the output layer is untouched by the forward pass; its .grad comes from the loss
    assert all(p.grad is None for b in list(seq)[:-1] for p in b.parameters())


def test_deferred_updates_give_the_same_numbers():
    nets = []
    for update in ("forward", "backward"):
        seq, ctx = _blocks(seed=7)
        man = pg.SigpropManager(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                                context_layer=ctx, num_classes=3, update=update)
        net = man.wrap(seq)
        opt = torch.optim.SGD(seq[-1].parameters(), lr=0.1)
        for step in range(3):
            x, y = _data(seed=10 + step)
            before = [p.clone() for p in seq[1].parameters()]
            loss = F.cross_entropy(net(x, y), y)
            changed = any(not torch.equal(a, b) for a, b in zip(before, seq[1].parameters()))
            assert changed == (update == "forward")  # deferred: nothing moved yet
            opt.zero_grad()
            man.backward(loss)
            opt.step()
        nets.append((seq, ctx))
    for a, b in zip(nets[0][0].parameters(), nets[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(nets[0][1].parameters(), nets[1][1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inference_without_context_computes_the_input_stream_only():
    seq, ctx = _blocks()
    mon = pg.Monitor()
    man = pg.SigpropManager(optimizer=_sgd(), context_layer=ctx, num_classes=3, monitor=mon)
    net = man.wrap(seq)
    x, _ = _data()
    before = copy.deepcopy(seq.state_dict())
    out = net(x)
    torch.testing.assert_close(out, seq(x).detach())
    for k, v in seq.state_dict().items():
        assert torch.equal(v, before[k])
    assert mon.summary() == {}
    # with a context but under no_grad: evaluation, the monitor records, nothing learns
    with torch.no_grad():
        net(x, _data()[1])
    for k, v in seq.state_dict().items():
        assert torch.equal(v, before[k])
    assert len(mon.summary()) == 3 and all(n.startswith("layers.") for n in mon.summary())


def test_eval_mode_does_not_learn():
    seq, ctx = _blocks()
    man = pg.SigpropManager(optimizer=_sgd(), context_layer=ctx, num_classes=3)
    net = man.wrap(seq)
    seq.eval()
    ctx.eval()
    before = copy.deepcopy(seq.state_dict())
    x, y = _data()
    net(x, y)
    assert all(torch.equal(v, before[k]) for k, v in seq.state_dict().items())


def test_backprop_configuration_is_ordinary_backprop():
    seq, _ = _blocks()
    x, y = _data()
    man = pg.SigpropManager(algorithm="backprop")
    loss = F.cross_entropy(man.wrap(seq)(x, y), y)
    man.backward(loss)
    got = [p.grad.clone() for p in seq.parameters()]
    seq.zero_grad(set_to_none=True)
    F.cross_entropy(seq(x), y).backward()
    for g, p in zip(got, seq.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_hand_written_program_with_label_loss_and_given_optimizer():
    torch.manual_seed(0)
    first, block, out_layer = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
    ctx = nn.Linear(3, 6, bias=False)
    ref = copy.deepcopy((first, block, ctx))
    lr = 0.05
    opt = torch.optim.SGD([*first.parameters(), *block.parameters(), *ctx.parameters()], lr=lr)
    man = pg.PropagationManager(pg.SigProp(loss=pg.sigprop.label_direct, optimizer=opt))
    man.add_propagator("signal", pg.SignalProp(classes=True, context_layer=ctx, num_classes=3,
                                               loss=pg.sigprop.label_direct, optimizer=opt))
    act = nn.Tanh()

    @pg.propagate
    def net(x, y, manager):
        h = manager.forward(x, layer=first, context=y, local_propagator="signal")
        h = manager.forward(h, layer=act)  # no parameters: both streams, nothing learns
        for _ in range(2):  # the same block at two nodes
            h = manager.forward(h, layer=block)
        return out_layer(h)

    x, y = _data(dtype=torch.float32)
    out = net(x, y, man)

    # by hand: one SGD step per learning node on its own label loss, one row per class
    r_first, r_block, r_ctx = ref
    eye = torch.eye(3)

    def step(params, loss):
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.data -= lr * g

    h, t = r_first(x), r_ctx(eye)
    step([*r_first.parameters(), *r_ctx.parameters()],
         label_direct(h, t, Stream(t, eye, y, classes=True)))
    h, t = torch.tanh(h.detach()), torch.tanh(t.detach())
    for _ in range(2):
        h, t = r_block(h.detach()), r_block(t.detach())
        step(list(r_block.parameters()), label_direct(h, t, Stream(t, eye, y, classes=True)))
    for a, b in zip([*first.parameters(), *block.parameters(), *ctx.parameters()],
                    [*r_first.parameters(), *r_block.parameters(), *r_ctx.parameters()]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out, out_layer(h.detach()).detach())


# --------------------------------------------------------------------------- bad input


def test_target_stream_of_the_wrong_shape_names_the_layer():
    seq, _ = _blocks()
    man = pg.SigpropManager(optimizer=_sgd(), context_layer=nn.Linear(3, 7, bias=False).double(),
                            num_classes=3)
    x, y = _data()
    with pytest.raises(pg.ConfigurationError, match=r"target stream has shape \[10, 7\]"):
        man.wrap(seq)(x, y)


def test_missing_optimizer_names_the_layer():
    seq, ctx = _blocks()
    man = pg.SigpropManager(context_layer=ctx, num_classes=3)
    x, y = _data()
    with pytest.raises(pg.ConfigurationError, match=r"sigprop\.py:\d+: the forward-learning "
                       r"layer Sequential\( has no optimizer"):
        man.wrap(seq)(x, y)


def test_labels_without_num_classes_and_bad_update():
    seq, ctx = _blocks()
    man = pg.SigpropManager(optimizer=_sgd(), context_layer=ctx)
    x, y = _data()
    with pytest.raises(pg.ConfigurationError, match="num_classes"):
        man.wrap(seq)(x, y)
    with pytest.raises(ValueError, match="update='later'"):
        pg.SigProp(update="later")
    with pytest.raises(ValueError, match="at least two layers"):
        LayerNetwork(nn.Sequential(nn.Linear(2, 2)), man)


def test_optimizer_missing_parameters_is_refused():
    seq, ctx = _blocks()
    opt = torch.optim.SGD(seq[-1].parameters(), lr=0.1)
    man = pg.SigpropManager(optimizer=opt, context_layer=ctx, num_classes=3)
    x, y = _data()
    with pytest.raises(pg.ConfigurationError, match="does not hold"):
        man.wrap(seq)(x, y)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_devices_and_dtypes(device, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seq, ctx = _blocks(dtype=dtype)
    seq, ctx = seq.to(device), ctx.to(device)
    man = pg.SigpropManager(optimizer=_sgd(), context_layer=ctx, num_classes=3)
    x, y = _data(dtype=dtype)
    out = man.wrap(seq)(x.to(device), y.to(device))
    assert out.dtype == dtype and out.device.type == device
