"""Tests of ``templates/proximal.py`` (ProxProp for one layer) against independent references.

The references never use the module's matrix forms: the Jacobian ``J`` of the flattened output
w.r.t. the flattened trainable parameters comes from ``torch.autograd.functional.jacobian``,
linear systems from ``torch.linalg.solve``, gradients from ``torch.autograd``, and conjugate
gradients from a dense textbook loop on the explicit matrix ``JᵀJ + βI``.  All in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from propgen.templates.proximal import (
    layer_input_grad,
    linear_in_params,
    parse_mode,
    proximal_direction,
)
from torch import Tensor, nn
from torch.func import functional_call

TAU = 0.7
BETA = 1 / TAU
F64 = torch.float64


class Quadratic(nn.Module):
    """``x @ w1 + (x**2) @ w2``: nonlinear in x, linear in (w1, w2)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_in, n_out))
        self.w2 = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w1 + (x**2) @ self.w2


class SplitBilinear(nn.Module):
    """``nn.Bilinear`` on the two halves of one input (the API passes a single input)."""

    def __init__(self, n1: int, n2: int, n_out: int) -> None:
        super().__init__()
        self.n1 = n1
        self.bil = nn.Bilinear(n1, n2, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.bil(x[..., : self.n1], x[..., self.n1 :])


def _frozen(layer: nn.Module, name: str) -> nn.Module:
    getattr(layer, name).requires_grad_(False)
    return layer


def _hooked(layer: nn.Module) -> nn.Module:
    # a hook changes what the layer computes: the Linear matrix form must not be used
    layer.register_forward_hook(lambda module, args, out: 2 * out + args[0][..., :1])
    return layer


# name -> (layer, input); N = rows of the matrix form, p = its columns (per group)
CASES: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    # Linear, N = 6 < p = 11: push-through branch
    "linear_small_n": lambda: (nn.Linear(10, 3), torch.randn(2, 3, 10)),
    # Linear, N = 20 > p = 4
    "linear_large_n": lambda: (nn.Linear(3, 4), torch.randn(4, 5, 3)),
    "linear_nobias": lambda: (nn.Linear(5, 3, bias=False), torch.randn(2, 5)),
    "linear_nobias_large_n": lambda: (nn.Linear(3, 2, bias=False), torch.randn(9, 3)),
    "linear_unbatched": lambda: (nn.Linear(4, 3), torch.randn(4)),
    # a frozen bias is a constant offset: the layer is affine, not linear, in what is trained
    "linear_frozen_bias": lambda: (_frozen(nn.Linear(4, 3), "bias"), torch.randn(6, 4)),
    "linear_frozen_weight": lambda: (_frozen(nn.Linear(4, 3), "weight"), torch.randn(6, 4)),
    "linear_hooked": lambda: (_hooked(nn.Linear(4, 3)), torch.randn(6, 4)),
    # Conv2d, N = B·L = 9 < p = 2·9 + 1 (push-through), stride 2, padding 1, groups 2
    "conv2d_small_n": lambda: (
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2),
        torch.randn(1, 4, 5, 5),
    ),
    # Conv2d, N = 32 > p = 9, no bias
    "conv2d_large_n": lambda: (nn.Conv2d(2, 3, 2, bias=False), torch.randn(2, 2, 5, 5)),
    # everything at once; even input size: stride 2 makes the input size ambiguous
    "conv2d_all": lambda: (
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        torch.randn(2, 4, 8, 8),
    ),
    "conv2d_nobias_dilated": lambda: (
        nn.Conv2d(4, 2, (2, 3), dilation=2, groups=2, bias=False),
        torch.randn(2, 4, 6, 7),
    ),
    "conv2d_unbatched": lambda: (nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 4, 4)),
    "conv2d_frozen_weight": lambda: (
        _frozen(nn.Conv2d(2, 3, 3, stride=2), "weight"),
        torch.randn(2, 2, 6, 6),
    ),
    # no matrix form: the generic operator path
    "conv2d_same": lambda: (nn.Conv2d(2, 3, 3, padding="same"), torch.randn(2, 2, 5, 5)),
    "conv2d_reflect": lambda: (
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
        torch.randn(1, 2, 5, 5),
    ),
    "conv1d_all": lambda: (
        nn.Conv1d(4, 4, 3, stride=2, padding=1, dilation=2, groups=2),
        torch.randn(2, 4, 10),
    ),
    "conv1d_nobias": lambda: (nn.Conv1d(3, 2, 4, bias=False), torch.randn(3, 3, 9)),
    "conv1d_circular": lambda: (
        nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"),
        torch.randn(2, 2, 7),
    ),
    "quadratic": lambda: (Quadratic(4, 3), torch.randn(6, 4)),
    "bilinear": lambda: (SplitBilinear(3, 2, 4), torch.randn(5, 5)),
    "layernorm": lambda: (nn.LayerNorm(5), torch.randn(3, 4, 5)),
}


def make(
    name: str, dtype: torch.dtype = F64, device: str = "cpu"
) -> tuple[nn.Module, Tensor, Tensor]:
    """Layer, input and output gradient of a case, all in ``dtype`` on ``device``."""
    layer, x = CASES[name]()
    layer = layer.to(dtype=dtype, device=device)
    x = x.to(dtype=dtype, device=device)
    # LayerNorm starts at weight 1, bias 0: move it somewhere generic
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.randn_like(layer(x))
    return layer, x, g


def trainable(layer: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(v: Tensor, like: list[Tensor]) -> list[Tensor]:
    return [c.view_as(t) for c, t in zip(v.split([t.numel() for t in like]), like)]


def jacobian(layer: nn.Module, x: Tensor) -> Tensor:
    """``J = ∂ vec(f(x; θ)) / ∂θ`` as a dense ``[M, P]`` matrix."""
    names, params = trainable(layer)
    theta = flat([p.detach() for p in params])

    def f(v: Tensor) -> Tensor:
        return functional_call(layer, dict(zip(names, unflat(v, params))), (x,)).reshape(-1)

    return torch.autograd.functional.jacobian(f, theta, vectorize=True)


def dense_cg(H: Tensor, b: Tensor, steps: int) -> Tensor:
    """Textbook conjugate gradients on the explicit SPD matrix ``H``, from 0."""
    d = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    for _ in range(steps):
        rr = r @ r
        if rr == 0:
            break
        alpha = rr / (p @ H @ p)
        d = d + alpha * p
        r = r - alpha * (H @ p)
        p = r + (r @ r) / rr * p
    return d


def blocks(layer: nn.Module) -> list[Tensor]:
    """Index sets (into the flat trainable vector) of the independent CG systems.

    A stock ``nn.Linear``: one per output unit (row j of W and b[j]); any other layer
    (a hooked Linear included, its forward is not the textbook one): everything.
    """
    _, params = trainable(layer)
    total = sum(p.numel() for p in params)
    if type(layer) is not nn.Linear or layer._forward_hooks:
        return [torch.arange(total)]
    out, n_in = layer.out_features, layer.in_features
    units = [[] for _ in range(out)]
    offset = 0
    for p in params:
        for j in range(out):
            if p is layer.weight:
                units[j].extend(range(offset + j * n_in, offset + (j + 1) * n_in))
            else:
                units[j].append(offset + j)
        offset += p.numel()
    return [torch.tensor(u) for u in units]


def reference(layer: nn.Module, x: Tensor, g: Tensor, mode: str, J: Tensor | None = None) -> Tensor:
    """The flat direction ``D`` from the explicit Jacobian ``J`` (computed when not given)."""
    J = jacobian(layer, x) if J is None else J
    b = J.T @ g.reshape(-1)
    H = J.T @ J + BETA * torch.eye(J.shape[1], dtype=J.dtype)
    if mode == "gradient":
        return b
    if mode == "exact":
        return torch.linalg.solve(H, b)
    steps = int(mode.removeprefix("cg"))
    d = torch.zeros_like(b)
    for idx in blocks(layer):
        d[idx] = dense_cg(H[idx][:, idx], b[idx], steps)
    return d


def direction(layer: nn.Module, x: Tensor, g: Tensor, mode: str) -> Tensor:
    return flat(proximal_direction(layer, x, g, TAU, mode))


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-9) -> None:
    """Close relative to the size of the whole expected vector."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * max(scale, 1e-30))


# --------------------------------------------------------------------------- parse_mode


@pytest.mark.parametrize(
    "mode, parsed",
    [
        ("exact", ("exact", 0)),
        ("prox_exact", ("exact", 0)),
        ("gradient", ("gradient", 0)),
        ("cg1", ("cg", 1)),
        ("cg12", ("cg", 12)),
        ("prox_cg3", ("cg", 3)),
    ],
)
def test_parse_mode(mode, parsed):
    assert parse_mode(mode) == parsed


@pytest.mark.parametrize(
    "mode", ["cg0", "prox_cg0", "cg", "cg-1", "cg1.5", "cg 2", "Exact", "", "prox_", "sgd", "cg٣"]
)
def test_parse_mode_rejects(mode):
    with pytest.raises(ValueError, match="mode"):
        parse_mode(mode)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_tau(tau):
    layer, x, g = make("linear_large_n")
    with pytest.raises(ValueError, match="tau"):
        proximal_direction(layer, x, g, tau, "exact")


def test_gradient_shape_mismatch():
    layer, x, g = make("linear_large_n")
    with pytest.raises(ValueError, match="shape"):
        proximal_direction(layer, x, g[..., :-1], TAU, "exact")


# --------------------------------------------------------------------------- directions


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_mode_is_autograd(name):
    layer, x, g = make(name)
    expected = copy.deepcopy(layer)
    expected(x).backward(g)
    actual = proximal_direction(layer, x, g, TAU, "gradient")
    _, params = trainable(expected)
    assert len(actual) == len(params)
    for d, p in zip(actual, params):
        assert d.shape == p.shape
        assert_close(d, p.grad)


@pytest.mark.parametrize("name", list(CASES))
def test_direction_matches_jacobian_reference(name):
    layer, x, g = make(name)
    J = jacobian(layer, x)
    for mode in ["exact", "cg1", "cg2", "cg3"]:
        expected = reference(layer, x, g, mode, J)
        assert_close(direction(layer, x, g, mode), expected, rtol=1e-8)
        # the original spellings mean the same
        assert_close(direction(layer, x, g, "prox_" + mode), expected, rtol=1e-8)


@pytest.mark.parametrize("name", list(CASES))
def test_cg_converges_to_exact(name):
    # CG on an n×n SPD system is exact after at most n steps (here: the largest block)
    layer, x, g = make(name)
    steps = max(len(idx) for idx in blocks(layer))
    assert_close(direction(layer, x, g, f"cg{steps}"), reference(layer, x, g, "exact"), 1e-7)


@pytest.mark.parametrize("name", ["linear_small_n", "linear_large_n", "linear_nobias"])
def test_cg1_linear_closed_form_per_column(name):
    # one CG step per output unit j: D_j = α_j g_j, α_j = |g_j|² / (|A g_j|² + β |g_j|²)
    layer, x, g = make(name)
    A = x.reshape(-1, layer.in_features)
    if layer.bias is not None:
        A = torch.cat([A, torch.ones(A.shape[0], 1, dtype=A.dtype)], dim=1)
    grad = A.T @ g.reshape(-1, layer.out_features)  # [p, out]: column j = unit j's gradient
    alpha = (grad**2).sum(0) / (((A @ grad) ** 2).sum(0) + BETA * (grad**2).sum(0))
    X = alpha * grad
    expected = [X[: layer.in_features].T] + ([X[-1]] if layer.bias is not None else [])
    assert_close(direction(layer, x, g, "cg1"), flat(expected))
    # it is not the flattened (single-α) step: the blocking matters
    J = jacobian(layer, x)
    b = J.T @ g.reshape(-1)
    single = (b @ b) / ((J @ b) @ (J @ b) + BETA * (b @ b)) * b
    assert (direction(layer, x, g, "cg1") - single).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["conv2d_small_n", "conv2d_all", "conv1d_all", "quadratic"])
def test_cg1_flat_closed_form(name):
    # one CG step on the whole parameter vector: D = α b, α = |b|² / (|J b|² + β |b|²)
    layer, x, g = make(name)
    J = jacobian(layer, x)
    b = J.T @ g.reshape(-1)
    alpha = (b @ b) / ((J @ b) @ (J @ b) + BETA * (b @ b))
    assert_close(direction(layer, x, g, "cg1"), alpha * b)


@pytest.mark.parametrize("name", ["linear_small_n", "linear_frozen_bias", "conv2d_all", "bilinear"])
@pytest.mark.parametrize("mode", ["exact", "cg2"])
def test_sgd_step_lands_on_proximal_point(name, mode):
    """``param.grad = D`` and SGD(lr=1): exact lands on the argmin of the proximal objective
    ``½|f(x; θ') - (y - g)|² + (β/2)|θ' - θ|²``, and CG at least decreases it."""
    layer, x, g = make(name)
    names, params = trainable(layer)
    theta = [p.detach().clone() for p in params]
    target = (layer(x) - g).detach()

    def objective(*theta_new: Tensor) -> Tensor:
        out = functional_call(layer, dict(zip(names, theta_new)), (x,))
        prox = sum(((a - b) ** 2).sum() for a, b in zip(theta_new, theta))
        return 0.5 * ((out - target) ** 2).sum() + 0.5 * BETA * prox

    stepped = copy.deepcopy(layer)
    _, new_params = trainable(stepped)
    for p, d in zip(new_params, proximal_direction(layer, x, g, TAU, mode)):
        p.grad = d
    torch.optim.SGD(new_params, lr=1.0).step()
    theta_new = [p.detach().requires_grad_(True) for p in new_params]
    grad_new = flat(list(torch.autograd.grad(objective(*theta_new), theta_new)))
    theta_old = [t.clone().requires_grad_(True) for t in theta]
    grad_old = flat(list(torch.autograd.grad(objective(*theta_old), theta_old)))  # = Jᵀg
    if mode == "exact":
        assert grad_new.norm() <= 1e-9 * grad_old.norm()
    else:
        assert objective(*theta_new) < objective(*theta)


# --------------------------------------------------------------------------- input gradient


@pytest.mark.parametrize("name", list(CASES))
def test_layer_input_grad_is_autograd(name):
    layer, x, g = make(name)
    x_ref = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(layer(x_ref), x_ref, g)
    actual = layer_input_grad(layer, x, g)
    assert actual.shape == x.shape
    assert_close(actual, expected)
    assert all(p.grad is None for p in layer.parameters())


def test_layer_input_grad_conv_output_padding_ambiguity():
    # stride 2: inputs of size 7 and 8 both give 4 outputs; the input size decides
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    for size in (7, 8):
        x = torch.randn(2, 2, size, size, dtype=F64, requires_grad=True)
        g = torch.randn_like(layer(x))
        (expected,) = torch.autograd.grad(layer(x), x, g)
        assert_close(layer_input_grad(layer, x, g), expected)


# --------------------------------------------------------------------------- linearity


class Positive(nn.Module):
    """``relu(x Wᵀ)``: positively homogeneous in W, f(2W) = 2 f(W), but not linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.lin(x))


LINEAR_LAYERS = {
    "linear": lambda: nn.Linear(4, 3),
    "conv2d": lambda: nn.Sequential(nn.Unflatten(-1, (1, 2, 2)), nn.Conv2d(1, 2, 2, padding=1)),
    "layernorm": lambda: nn.LayerNorm(4),
    "bilinear": lambda: SplitBilinear(2, 2, 3),
    "quadratic": lambda: Quadratic(4, 3),
    "batchnorm_train": lambda: nn.BatchNorm1d(4),  # normalises with batch stats, affine after
    # only the second Linear is trained, the first is a fixed feature map
    "frozen_first": lambda: nn.Sequential(nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 2)),
    "frozen_bias": lambda: _frozen(nn.Linear(4, 3), "bias"),
}

NONLINEAR_LAYERS = {
    "linear_relu": lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU()),
    # f = (x W1ᵀ + b1) W2ᵀ + b2 is bilinear in (W1, b1) and (W2, b2), not linear: with
    # u(θ) = x W1ᵀ + b1, f(θ + δ) - f(θ) - f(δ) + f(0) = u(θ) δW2ᵀ + u(δ) W2ᵀ, nonzero for
    # generic θ, δ.  It is not even homogeneous: f(2θ) = 4 f(θ) - 2 b2.
    "linear_linear": lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)),
    "positive": Positive,
    "tanh": lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh()),
    "dropout": lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)),  # random, not a function
    "no_params": nn.ReLU,
    "all_frozen": lambda: nn.Linear(4, 3).requires_grad_(False),
}


def test_linear_linear_is_bilinear():
    # the claim in NONLINEAR_LAYERS, checked: the additivity defect is the cross term
    layer = NONLINEAR_LAYERS["linear_linear"]().double()
    x = torch.randn(5, 4, dtype=F64)
    names, params = trainable(layer)
    theta = [p.detach() for p in params]
    delta = [torch.randn_like(p) for p in params]

    def f(ps: list[Tensor]) -> Tensor:
        return functional_call(layer, dict(zip(names, ps)), (x,))

    def u(ps: list[Tensor]) -> Tensor:  # first layer's output, linear in (W1, b1)
        return x @ ps[0].T + ps[1]

    zero = [torch.zeros_like(p) for p in params]
    defect = f([t + d for t, d in zip(theta, delta)]) - f(theta) - f(delta) + f(zero)
    cross = u(theta) @ delta[2].T + u(delta) @ theta[2].T
    torch.testing.assert_close(defect, cross)
    assert cross.abs().max() > 0.1
    assert not linear_in_params(layer, x)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", list(LINEAR_LAYERS))
def test_linear_in_params_true(name, dtype):
    layer = LINEAR_LAYERS[name]().to(dtype)
    assert linear_in_params(layer, torch.randn(5, 4, dtype=dtype))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", list(NONLINEAR_LAYERS))
def test_linear_in_params_false(name, dtype):
    layer = NONLINEAR_LAYERS[name]().to(dtype)
    assert not linear_in_params(layer, torch.randn(5, 4, dtype=dtype))


def test_positive_homogeneity_is_not_enough():
    # why additivity, not scaling, is checked: a scaling test would accept this layer
    layer = Positive().double()
    x = torch.randn(5, 4, dtype=F64)
    w = layer.lin.weight.detach()
    f = functional_call
    torch.testing.assert_close(f(layer, {"lin.weight": 2 * w}, (x,)), 2 * layer(x))
    assert not linear_in_params(layer, x)


def test_linear_in_params_has_no_side_effects():
    layer = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3), nn.Dropout(0.3))
    x = torch.randn(5, 4)
    state = copy.deepcopy(layer.state_dict())
    rng = torch.get_rng_state()
    linear_in_params(layer, x)
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in layer.parameters())


# --------------------------------------------------------------------------- side effects


@pytest.mark.parametrize("name", ["linear_small_n", "conv2d_all", "conv1d_all", "bilinear"])
@pytest.mark.parametrize("mode", ["gradient", "exact", "cg2"])
def test_no_side_effects(name, mode):
    layer, x, g = make(name)
    _, params = trainable(layer)
    before = [p.detach().clone() for p in params]
    marker = [torch.full_like(p, 7.0) for p in params]
    for p, m in zip(params, marker):
        p.grad = m.clone()
    x.requires_grad_(True)
    x_before, g_before = x.detach().clone(), g.clone()
    expected = direction(layer, x.detach(), g, mode)
    with torch.no_grad():
        out = proximal_direction(layer, x, g, TAU, mode)
    assert_close(flat(out), expected, 1e-12)
    for d, p, b, m in zip(out, params, before, marker):
        assert not d.requires_grad
        assert d.shape == p.shape and d.dtype == p.dtype and d.device == p.device
        assert torch.equal(p, b) and torch.equal(p.grad, m)
    assert torch.equal(x.detach(), x_before) and torch.equal(g, g_before) and x.grad is None
    with torch.no_grad():
        gx = layer_input_grad(layer, x, g)
    assert not gx.requires_grad and x.grad is None
    assert all(torch.equal(p.grad, m) for p, m in zip(params, marker))


def test_batchnorm_buffers_untouched():
    # a BatchNorm in training mode is affine in (weight, bias); its running stats must not move
    layer = nn.BatchNorm1d(4).double()
    x = torch.randn(6, 4, dtype=F64)
    g = torch.randn(6, 4, dtype=F64)
    state = copy.deepcopy(layer.state_dict())
    expected = reference(copy.deepcopy(layer), x, g, "exact")  # the reference moves the stats
    assert_close(direction(layer, x, g, "exact"), expected, rtol=1e-8)
    layer_input_grad(layer, x, g)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


# --------------------------------------------------------------------------- dtypes, devices

DEVICES = [
    pytest.param("cpu", torch.float32, id="cpu-float32"),
    pytest.param(
        "cuda",
        F64,
        id="cuda-float64",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
    pytest.param(
        "cuda",
        torch.float32,
        id="cuda-float32",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


@pytest.mark.parametrize("device, dtype", DEVICES)
@pytest.mark.parametrize(
    "name",
    ["linear_small_n", "linear_large_n", "conv2d_all", "conv1d_all", "conv2d_same", "bilinear"],
)
def test_dtype_and_device(name, device, dtype):
    layer64, x64, g64 = make(name)
    layer = copy.deepcopy(layer64).to(dtype=dtype, device=device)
    x, g = x64.to(dtype=dtype, device=device), g64.to(dtype=dtype, device=device)
    rtol = 1e-9 if dtype == F64 else 2e-4
    for mode in ["gradient", "exact", "cg3"]:
        out = proximal_direction(layer, x, g, TAU, mode)
        for d, p in zip(out, trainable(layer)[1]):
            assert d.dtype == dtype and d.device == p.device and d.shape == p.shape
        assert_close(flat(out).cpu().double(), reference(layer64, x64, g64, mode), rtol)
    gx = layer_input_grad(layer, x, g)
    assert gx.dtype == dtype and gx.device == x.device
    assert_close(gx.cpu().double(), layer_input_grad(layer64, x64, g64), rtol)
    assert linear_in_params(layer, x)
    assert not linear_in_params(nn.Sequential(layer, nn.ReLU()), x)
