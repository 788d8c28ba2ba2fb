"""Proximal backpropagation (ProxProp) for one layer that is linear in its parameters.

ProxProp (Frerix, Möllenhoff, Moeller, Cremers, ICLR 2018) replaces the explicit gradient step
on a layer's parameters by an implicit (proximal) step.  This module states that step for one
layer as plain torch functions; read it as documentation of the math.

The layer
---------
A layer computes ``y = f(x; θ)`` where ``θ`` stacks all of its trainable parameters (those with
``requires_grad``, in ``layer.parameters()`` order) into one vector of length ``P``.  We need
``f`` to be *affine* in ``θ``: ``f(x; θ) = J θ + c`` with ``J = ∂ vec(y) / ∂θ``.  Linear and
convolution layers, LayerNorm's affine part and Bilinear all are (``c = 0`` unless some
parameters are frozen).  Then ``J`` depends on the input ``x`` only, not on ``θ``.

The proximal step
-----------------
Backpropagation hands the layer ``G = ∂loss/∂y`` (shaped like ``y``).  ProxProp moves the
output towards the target ``y - G`` while staying close to the current parameters:

    θ⁺ = argmin_θ'  ½ ||f(x; θ') - (y - G)||²  +  (β/2) ||θ' - θ||²,     β = 1/τ.

With ``f(x; θ') - y = J (θ' - θ)`` the objective is quadratic in ``θ' - θ``; its gradient
``Jᵀ(J (θ' - θ) + G) + β (θ' - θ)`` vanishes at

    θ⁺ = θ - D,     D = (JᵀJ + βI)⁻¹ JᵀG.

So writing ``param.grad = D`` and taking a plain SGD step with learning rate 1 lands exactly on
the proximal point.  ``JᵀG`` is the ordinary gradient that autograd computes; the proximal step
preconditions it with ``(JᵀJ + βI)⁻¹``: a large τ trusts the linearisation, a small τ shrinks
the step towards ``τ JᵀG`` (a gradient step with learning rate τ).

Modes (see :func:`parse_mode`)
------------------------------
* ``gradient``: ``D = JᵀG``, the explicit gradient (what autograd gives).
* ``exact``:    ``D = (JᵀJ + βI)⁻¹ JᵀG`` from a Cholesky solve (the system is SPD for β > 0).
* ``cgN``:      N steps of conjugate gradients on ``(JᵀJ + βI) D = JᵀG`` from ``D = 0``.
  One CG step gives ``D = α JᵀG`` with ``α = ||JᵀG||² / (||J JᵀG||² + β ||JᵀG||²)``: a
  gradient step with an exact line search on the proximal objective.

Matrix forms
------------
For ``nn.Linear`` (``y = x Wᵀ + b``) let ``A`` be the input flattened to ``[N, in]`` with a
column of ones appended when the bias is trained, and ``G`` the output gradient as ``[N, out]``.
Output unit ``j`` depends only on row ``j`` of ``W`` and on ``b[j]``, so ``JᵀJ`` is block
diagonal with one ``AᵀA`` block per output unit.  With the unknown stored as the matrix
``X = [Wᵀ; bᵀ]`` (``[in + 1, out]``, one column per output unit):

    JᵀG ≅ AᵀG,      JᵀJ X ≅ AᵀA X,      exact:  X = (AᵀA + βI)⁻¹ AᵀG = Aᵀ (AAᵀ + βI)⁻¹ G.

The last equality (push-through identity) follows from ``Aᵀ(AAᵀ + βI) = (AᵀA + βI)Aᵀ``; it
trades the ``p × p`` system (``p = in + 1``) for an ``N × N`` one, cheaper when ``N < p``.

A convolution is a Linear layer applied to every input patch: with the patches of group ``k``
(``F.unfold``) as rows of ``A_k`` (``[B·L, C_g·kh·kw]``, ``L`` output positions) and the output
gradient of the group's channels as ``G_k`` (``[B·L, out_g]``), the same formulas hold per group.
Conv1d is a Conv2d with a kernel of height 1.  Any other layer (or a convolution with string
padding or a non-zero padding mode) uses the operators directly: ``J v`` by forward-mode AD
(``torch.func.jvp``), ``Jᵀ u`` by reverse mode (``torch.func.vjp``).

CG blocking follows the original implementation: for ``nn.Linear`` every output unit (column of
``X``) runs its own CG with its own step sizes, in parallel; for every other layer CG runs on
the one flattened vector of all parameters (one step size per iteration for the whole layer).
Only stock layers get a matrix form: a subclass, a forward hook or a parametrization may change
what the layer computes, so such a layer takes the generic path (and flattened CG).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["parse_mode", "check_settings", "proximal_direction", "layer_input_grad",
           "linear_in_params"]

# 'cgN' or the original spelling 'prox_cgN'; [0-9] rather than \d so that only ASCII digits count.
_CG_MODE = re.compile(r"(?:prox_)?cg([0-9]+)")

Dot = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- public functions


def parse_mode(mode: str) -> tuple[str, int]:
    """Parse a ProxProp mode name.

    ``'exact'`` / ``'prox_exact'`` -> ``('exact', 0)``; ``'gradient'`` -> ``('gradient', 0)``;
    ``'cgN'`` / ``'prox_cgN'`` -> ``('cg', N)`` for an integer ``N >= 1``.  Anything else raises
    ``ValueError``.
    """
    if mode in ("exact", "prox_exact"):
        return ("exact", 0)
    if mode == "gradient":
        return ("gradient", 0)
    match = _CG_MODE.fullmatch(mode) if isinstance(mode, str) else None
    if match is not None:
        steps = int(match.group(1))
        if steps >= 1:
            return ("cg", steps)
        raise ValueError(f"proximal mode {mode!r}: the number of CG steps N must be >= 1")
    raise ValueError(
        f"unknown proximal mode {mode!r}: expected 'exact', 'gradient' or 'cgN' with an integer "
        "N >= 1 (the spellings 'prox_exact' and 'prox_cgN' are accepted too)"
    )


def check_settings(tau: float, mode: str) -> None:
    """Raise ``ValueError`` unless ``tau`` is a finite number > 0 and ``mode`` a valid mode."""
    parse_mode(mode)
    _beta(tau)


def proximal_direction(
    layer: nn.Module, x: Tensor, g: Tensor, tau: float, mode: str
) -> list[Tensor]:
    """The ProxProp update direction ``D`` for each trainable parameter of ``layer``.

    ``x`` is the layer's input, ``g`` the loss gradient w.r.t. its output, ``tau`` the proximal
    step size (``β = 1/τ``), ``mode`` one of :func:`parse_mode`'s modes.  Returns one tensor per
    parameter with ``requires_grad`` (``layer.parameters()`` order), shaped like the parameter,
    so that ``param.grad = D`` followed by SGD with learning rate 1 takes the proximal step.

    The layer must be (affine-)linear in its trainable parameters (see
    :func:`linear_in_params`).  Nothing is modified: not the layer, its ``.grad`` fields or
    buffers, nor ``x`` and ``g``; works under ``torch.no_grad()``.
    """
    kind, steps = parse_mode(mode)
    beta = 0.0 if kind == "gradient" else _beta(tau)
    x, g = x.detach(), g.detach()
    if not _trainable(layer)[0]:
        return []
    with torch.no_grad():
        patches = _patch_matrices(layer, x, g)
        if patches is not None:
            A, G = patches
            return _direction_from_patches(layer, A, G, beta, kind, steps)
    return _direction_generic(layer, x, g, beta, kind, steps)


def layer_input_grad(layer: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """The ordinary backprop gradient w.r.t. the layer's input: ``(∂y/∂x)ᵀ g``.

    Linear: ``g W``.  Conv1d/Conv2d: the transposed convolution; the input size is passed
    explicitly because with stride > 1 several input sizes give the same output size.  Any other
    layer: autograd through a fresh forward pass, differentiated w.r.t. (a detached copy of) ``x``
    only, so no parameter's ``.grad`` is touched.
    """
    x, g = x.detach(), g.detach()
    with torch.no_grad():
        if _is_plain(layer, (nn.Linear,)):
            _check_shape(g, (*x.shape[:-1], layer.out_features))
            return g @ layer.weight.detach()
        if _is_plain(layer, (nn.Conv1d, nn.Conv2d)) and _zero_padded(layer):
            one_d = isinstance(layer, nn.Conv1d)
            conv_input = torch.nn.grad.conv1d_input if one_d else torch.nn.grad.conv2d_input
            unbatched = x.dim() == len(layer.kernel_size) + 1
            xb, gb = (x[None], g[None]) if unbatched else (x, g)
            gx = conv_input(
                xb.shape,
                layer.weight.detach(),
                gb,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
            )
            return gx[0] if unbatched else gx
    x_in = x.clone().requires_grad_(True)
    with torch.enable_grad():
        y = _functional(layer, [], x_in)()
        _check_shape(g, y.shape)
        (gx,) = torch.autograd.grad(y, x_in, g, allow_unused=True)
    return torch.zeros_like(x) if gx is None else gx


def linear_in_params(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``layer``'s output at input ``x`` is (affine-)linear in its trainable parameters.

    Checks additivity of increments at a random ``δ`` (scaled like ``θ``):
    ``f(x; θ + δ) - f(x; θ) == f(x; δ) - f(x; 0)`` up to a dtype-aware tolerance.  For a layer
    without a constant offset (``f(x; 0) = 0``, e.g. Linear or Conv with all parameters trained)
    this is exactly ``f(θ + δ) == f(θ) + f(δ)``; the ``f(x; 0)`` term also admits offsets that
    do not depend on ``θ`` (a frozen bias), for which the proximal step is just as exact.

    Additivity rather than scaling: ``Sequential(Linear, ReLU)`` satisfies
    ``f(2θ) = 2 f(θ)`` (ReLU is positively homogeneous) but is not linear.  A layer without
    trainable parameters returns False.  Global RNG state and the layer's buffers are untouched.
    """
    names, params = _trainable(layer)
    if not params:
        return False
    x = x.detach()
    gen = torch.Generator(device=x.device)
    gen.manual_seed(0)
    deltas = [
        torch.randn(p.shape, generator=gen, device=x.device, dtype=p.dtype).to(p.device) * _rms(p)
        for p in params
    ]
    theta = [p.detach() for p in params]
    # fork_rng: a stochastic layer (dropout) must not advance the caller's random stream.
    with torch.no_grad(), _rng_guard(x.device):
        call = _functional(layer, names, x)
        outs = [
            call(*[t + d for t, d in zip(theta, deltas)]),
            call(*theta),
            call(*deltas),
            call(*[torch.zeros_like(t) for t in theta]),
        ]
    if not all(isinstance(o, Tensor) and o.is_floating_point() for o in outs):
        return False
    f_sum, f_theta, f_delta, f_zero = outs
    defect = ((f_sum - f_theta) - (f_delta - f_zero)).abs().max()
    scale = torch.stack([o.abs().max() for o in outs]).max()
    # Rounding errors of a genuinely linear layer are a few eps relative to the output scale;
    # sqrt(eps) leaves ample room for that while any real nonlinearity shows up at O(1).
    tol = math.sqrt(torch.finfo(f_sum.dtype).eps) * scale
    return bool(torch.isfinite(defect) and defect <= tol)


# --------------------------------------------------------------------------- the math


def _ridge_solve(A: Tensor, G: Tensor, beta: float) -> Tensor:
    """``X = (AᵀA + βI)⁻¹ AᵀG`` for batched ``A`` ``[..., n, p]``, ``G`` ``[..., n, m]``."""
    n, p = A.shape[-2:]
    if n < p:
        # Push-through identity: (AᵀA + βI)⁻¹Aᵀ = Aᵀ(AAᵀ + βI)⁻¹, an n×n system instead of p×p.
        gram = A @ A.mT + beta * torch.eye(n, dtype=A.dtype, device=A.device)
        return A.mT @ torch.cholesky_solve(G, torch.linalg.cholesky(gram))
    gram = A.mT @ A + beta * torch.eye(p, dtype=A.dtype, device=A.device)
    return torch.cholesky_solve(A.mT @ G, torch.linalg.cholesky(gram))


def _conjugate_gradient(
    apply_h: Callable[[Tensor], Tensor], b: Tensor, steps: int, dot: Dot
) -> Tensor:
    """Exactly ``steps`` CG iterations on ``H d = b`` from ``d = 0`` (``H`` SPD, via ``apply_h``).

    ``dot`` decides the blocking: it reduces over the entries of one independent system and
    keeps the others apart (one step size per output unit for Linear, one for the whole vector
    otherwise).  Once a residual is exactly zero the system is solved; step sizes become 0.
    """
    d = torch.zeros_like(b)
    r = b.clone()  # residual b - H d at d = 0
    p = r.clone()  # first search direction: steepest descent
    rr = dot(r, r)
    for _ in range(steps):
        hp = apply_h(p)
        alpha = _ratio_or_zero(rr, dot(p, hp))  # exact line search along p
        d = d + alpha * p
        r = r - alpha * hp
        rr_new = dot(r, r)
        p = r + _ratio_or_zero(rr_new, rr) * p  # next direction, H-conjugate to the previous ones
        rr = rr_new
    return d


def _ratio_or_zero(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den == 0`` (a solved system; its ``num`` is 0 there too).

    ``torch.where`` instead of a Python branch keeps it free of host syncs and per-column.
    """
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, 1, den))


def _column_dot(u: Tensor, v: Tensor) -> Tensor:
    """Inner product per column of ``[..., p, m]`` blocks: each output unit its own system."""
    return (u * v).sum(dim=-2, keepdim=True)


def _total_dot(u: Tensor, v: Tensor) -> Tensor:
    """Inner product of the whole flattened vectors: one system for the whole layer."""
    return (u * v).sum()


def _direction_from_patches(
    layer: nn.Module, A: Tensor, G: Tensor, beta: float, kind: str, steps: int
) -> list[Tensor]:
    """``D`` through the matrix form: ``A`` ``[groups, n, p]``, ``G`` ``[groups, n, m]``."""
    if kind == "exact":
        X = _ridge_solve(A, G, beta)
    else:
        rhs = A.mT @ G  # JᵀG, as [groups, p, m] blocks
        if kind == "gradient":
            X = rhs
        else:
            dot = _column_dot if isinstance(layer, nn.Linear) else _total_dot
            X = _conjugate_gradient(lambda V: A.mT @ (A @ V) + beta * V, rhs, steps, dot)
    # Back from blocks X_k = [W_kᵀ; b_kᵀ] to the parameters' own layouts (weight, then bias).
    directions = []
    weight = layer.weight
    if weight.requires_grad:
        directions.append(X[:, : weight[0].numel(), :].mT.reshape(weight.shape).contiguous())
    if layer.bias is not None and layer.bias.requires_grad:
        directions.append(X[:, -1, :].reshape(-1).contiguous())
    return directions


def _direction_generic(
    layer: nn.Module, x: Tensor, g: Tensor, beta: float, kind: str, steps: int
) -> list[Tensor]:
    """``D`` through the operators ``J v`` (forward mode) and ``Jᵀ u`` (reverse mode)."""
    names, params = _trainable(layer)
    theta = tuple(p.detach() for p in params)
    # Function transforms would respect an outer no_grad only partially; be explicit.
    with torch.enable_grad():
        call = _functional(layer, names, x)
        y, vjp_fn = torch.func.vjp(call, *theta)  # J is constant, so one vjp serves every u
        _check_shape(g, y.shape)

        def jt(u: Tensor) -> Tensor:
            return _flatten(vjp_fn(u))

        def jtj(v: Tensor) -> Tensor:
            return jt(torch.func.jvp(call, theta, _unflatten(v, theta))[1])

        rhs = jt(g)
        if kind == "gradient":
            d = rhs
        elif kind == "exact":
            eye = torch.eye(rhs.numel(), dtype=rhs.dtype, device=rhs.device)
            gram = torch.func.vmap(jtj)(eye)  # row i = JᵀJ e_i; symmetric up to rounding
            h = (gram + gram.mT) / 2 + beta * eye
            d = torch.cholesky_solve(rhs[:, None], torch.linalg.cholesky(h))[:, 0]
        else:
            d = _conjugate_gradient(lambda v: jtj(v) + beta * v, rhs, steps, _total_dot)
    return [t.detach().contiguous() for t in _unflatten(d, theta)]


# --------------------------------------------------------------------------- bookkeeping


def _beta(tau: float) -> float:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"the proximal step size tau must be a finite number > 0, got {tau!r}")
    return 1.0 / tau


def _trainable(layer: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def _functional(layer: nn.Module, names: Sequence[str], x: Tensor) -> Callable[..., Tensor]:
    """``θ ↦ f(x; θ)`` for the named parameters; the others and the buffers keep their values.

    Buffers are cloned so that a layer updating them in its forward (BatchNorm in training
    mode) leaves the real layer unmodified; cloned inside each call because torch.func
    transforms refuse in-place updates of tensors captured from outside the function.
    """
    buffers = dict(layer.named_buffers())

    def call(*theta: Tensor) -> Tensor:
        state = {name: b.clone() for name, b in buffers.items()} | dict(zip(names, theta))
        return torch.func.functional_call(layer, state, (x,))

    return call


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    sizes = [t.numel() for t in like]
    return tuple(c.view_as(t) for c, t in zip(flat.split(sizes), like))


def _is_plain(layer: nn.Module, kinds: tuple[type, ...]) -> bool:
    """A stock layer whose forward is exactly the textbook formula.

    A subclass may override ``forward``, a hook or a parametrization may change what the layer
    computes: those take the generic operator path, which runs the real forward.
    """
    return (
        type(layer) in kinds
        and not parametrize.is_parametrized(layer)
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
    )


def _zero_padded(conv: nn.Module) -> bool:
    return not isinstance(conv.padding, str) and conv.padding_mode == "zeros"


def _patch_matrices(layer: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(A, G)`` as ``[groups, n, p]`` and ``[groups, n, m]``, or None without a matrix form.

    ``A``'s columns are the trainable parameters' inputs: the input (patch) entries when the
    weight is trained, then a constant 1 when the bias is.
    """
    if _is_plain(layer, (nn.Linear,)):
        _check_shape(g, (*x.shape[:-1], layer.out_features))
        A = x.reshape(1, -1, layer.in_features)
        G = g.reshape(1, -1, layer.out_features)
    elif _is_plain(layer, (nn.Conv1d, nn.Conv2d)) and _zero_padded(layer):
        A, G = _conv_patches(layer, x, g)
    else:
        return None
    if not layer.weight.requires_grad:
        A = A[..., :0]  # a frozen weight only adds a constant to the output
    if layer.bias is not None and layer.bias.requires_grad:
        A = torch.cat([A, A.new_ones((*A.shape[:-1], 1))], dim=-1)  # bias: a constant input 1
    return A, G


def _conv_patches(conv: nn.Conv1d | nn.Conv2d, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per group, the input patches as rows (``[B·L, C_g·kh·kw]``) and the output gradient
    (``[B·L, out_g]``); Conv1d becomes a Conv2d of height 1."""
    one_d = isinstance(conv, nn.Conv1d)
    if x.dim() == len(conv.kernel_size) + 1:  # unbatched input
        x, g = x[None], g[None]
    if one_d:
        x, g = x[:, :, None, :], g[:, :, None, :]
    kernel, stride, padding, dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if one_d:  # the extra height dimension: kernel 1, stride 1, no padding, dilation 1
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        padding = (0, *padding)
    out_size = tuple(
        (n + 2 * pad - dil * (k - 1) - 1) // s + 1
        for n, k, s, pad, dil in zip(x.shape[-2:], kernel, stride, padding, dilation)
    )
    _check_shape(g, (x.shape[0], conv.out_channels, *out_size))
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C·kh·kw, L]
    batch, _, positions = cols.shape
    groups = conv.groups
    # unfold orders the rows channel-major, so each group's channels are one contiguous slice.
    A = cols.reshape(batch, groups, -1, positions).permute(1, 0, 3, 2)
    G = g.reshape(batch, groups, conv.out_channels // groups, positions).permute(1, 0, 3, 2)
    return A.reshape(groups, batch * positions, -1), G.reshape(groups, batch * positions, -1)


def _check_shape(g: Tensor, expected: Sequence[int]) -> None:
    if tuple(g.shape) != tuple(expected):
        raise ValueError(
            f"output gradient has shape {tuple(g.shape)}, the layer's output has "
            f"shape {tuple(expected)}"
        )


def _rms(p: Tensor) -> Tensor:
    """Root mean square of a parameter, 1 for an all-zero one (a bias initialised to 0)."""
    rms = p.detach().pow(2).mean().sqrt() if p.numel() else p.new_zeros(())
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def _rng_guard(device: torch.device) -> AbstractContextManager[None]:
    """Save and restore the global RNG state (CPU, plus ``device``'s when it is a GPU)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index], device_type="cuda")
    return torch.random.fork_rng(devices=[])
