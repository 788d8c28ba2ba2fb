"""Math helpers called by the adjoint templates in ``ops.py`` and ``nn.py``.

The templates state the math; these functions hold the shape bookkeeping that would hide it
(undoing broadcasting, putting reduced dimensions back, scattering a gradient into the
positions an index selected) and the few derivatives whose case analysis would not fit in a
readable template (norms, products with zeros, cross entropy).  Every function here is pure:
it returns a new tensor and never mutates its arguments.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from propgen.runtime import TensorMeta, seq_adjoint

__all__ = [
    "tanh_backward",
    "sigmoid_backward",
    "relu_backward",
    "unbroadcast",
    "unbroadcast_each",
    "like",
    "reversed_dims",
    "shape_arg",
    "reduced_dims",
    "expand_reduced",
    "reverse_cumsum",
    "var_dim",
    "var_correction",
    "split_ties",
    "minmax_grad",
    "pairwise_grad",
    "index_reduction_grad",
    "picked_grad",
    "scatter_grad",
    "prod_others",
    "cumprod_grad",
    "matmul_grad_input",
    "matmul_grad_other",
    "pow_grad_base",
    "pow_grad_exponent",
    "clamp_pass",
    "clamp_min_wins",
    "clamp_max_wins",
    "getitem_grad",
    "cat_grads",
    "stack_grads",
    "split_sizes",
    "inverse_permutation",
    "repeat_grad",
    "roll_grad",
    "masked_select_grad",
    "vector_norm_grad",
    "norm_grad",
    "linalg_norm_grad",
    "implicit_softmax_dim",
    "reduction_mode",
    "loss_scale",
    "loss_weight_grad",
    "or_one",
    "normalized_dims",
    "gelu_slope",
    "kl_div_target_grad",
    "class_dim_grad",
    "nll_loss_grad",
    "cross_entropy_grad",
    "cross_entropy_target_grad",
    "embedding_grad",
]


# --- fused elementwise derivatives -----------------------------------------------------------
# Each is one pass over memory where the spelled-out formula in its docstring takes three;
# on large tensors the backward pass is memory-bound, so this is what keeps it at autograd's speed.


def tanh_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``g * (1 - y * y)`` for ``y = tanh(x)``."""
    return torch.ops.aten.tanh_backward(g, y)


def sigmoid_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``g * y * (1 - y)`` for ``y = sigmoid(x)``."""
    return torch.ops.aten.sigmoid_backward(g, y)


def relu_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``g * (y > 0)`` for ``y = relu(x)``: the slope at 0 is taken as 0."""
    return torch.ops.aten.threshold_backward(g, y, 0)


# --- broadcasting, casts and shapes ---------------------------------------------------------


def unbroadcast(g: torch.Tensor, x: Any) -> torch.Tensor:
    """Sum ``g`` down to ``x``'s shape, undoing broadcasting, in ``x``'s dtype and device.

    A Python number ``x`` was broadcast to every element: its gradient is ``g.sum()`` (or
    ``g`` itself, when the result was a Python number too: ``i * 2.0`` of a loop counter).
    """
    if not isinstance(x, (torch.Tensor, TensorMeta)):
        return g.sum() if isinstance(g, torch.Tensor) else g
    if g.shape != x.shape:
        g = g.sum_to_size(x.shape)
    return like(g, x)


def update_under_no_grad(old: Any, new: Any) -> Any:
    """``h *= 2`` inside ``torch.no_grad()``: the value becomes ``new`` while the gradient
    still flows to ``old`` as if nothing happened (torch records no op for the update)."""
    return new


def unbroadcast_each(g: torch.Tensor, xs: Any) -> Any:
    """``unbroadcast(g, x)`` for each ``x`` of a list (the terms of a builtin ``sum``).

    Over a tensor the terms are its rows, which all get the same gradient: a tensor of
    ``xs``'s shape, not a list.
    """
    if isinstance(xs, (torch.Tensor, TensorMeta)):
        row = g.sum_to_size(xs.shape[1:]) if g.shape != xs.shape[1:] else g
        return like(row.expand(xs.shape), xs)
    return [unbroadcast(g, x) for x in xs]


def like(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g`` cast to ``x``'s dtype and device (the gradient of a cast goes back through it)."""
    if g.dtype != x.dtype or g.device != x.device:
        g = g.to(dtype=x.dtype, device=x.device)
    return g


def reversed_dims(x: torch.Tensor) -> list[int]:
    """The permutation that reverses all dims (``x.T``); it is its own inverse."""
    return list(range(x.dim()))[::-1]


def shape_arg(shape: tuple) -> tuple:
    """A ``*shape`` argument: ``x.view(2, 3)`` and ``x.view((2, 3))`` both mean ``(2, 3)``."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        return tuple(shape[0])
    return tuple(shape)


def reduced_dims(dim: Any, ndim: int) -> list[int]:
    """The dims a reduction over ``dim`` removed, sorted and non-negative (None or () = all)."""
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        dim = (dim,)
    if len(dim) == 0:
        return list(range(ndim))
    if ndim == 0:
        return []
    return sorted(int(d) % ndim for d in dim)


def expand_reduced(g: torch.Tensor, x: torch.Tensor, dim: Any = None, keepdim: bool = False):
    """Broadcast ``g``, the gradient of a reduction of ``x`` over ``dim``, back to x's shape."""
    if not keepdim:
        for d in reduced_dims(dim, x.dim()):
            g = g.unsqueeze(d)
    return like(g.expand(x.shape), x)


def reverse_cumsum(g: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[i] = sum_{j >= i} g[j]`` along ``dim``: the adjoint of ``cumsum``."""
    return g.flip(dim).cumsum(dim).flip(dim)


def var_dim(dim: Any) -> Any:
    """``torch.var(x, True)`` passes ``unbiased`` where ``dim`` usually goes."""
    return None if isinstance(dim, bool) else dim


def var_correction(dim: Any, unbiased: Any, correction: Any) -> float:
    """The ``N - correction`` denominator's correction from var/std's overloaded arguments."""
    if correction is not None:
        return correction
    if isinstance(dim, bool):
        unbiased = dim
    return 0 if unbiased is False else 1


# --- max / min, sort, gather-like selections ---------------------------------------------


def split_ties(g: torch.Tensor, x: torch.Tensor, result: torch.Tensor, dim: Any, keepdim: bool):
    """Gradient of an extremum that reduces over ``dim`` (amax, max(x)): the elements equal to
    the result share its gradient evenly, as torch does."""
    hit = x == expand_reduced(result, x, dim, keepdim)
    count = hit.sum(reduced_dims(dim, x.dim()), keepdim=True)
    return expand_reduced(g, x, dim, keepdim) * hit / count


def pairwise_grad(g: torch.Tensor, wins: torch.Tensor, ties: torch.Tensor, x: Any):
    """Gradient of maximum/minimum for the operand ``x``: all of it where x won, half on ties."""
    return unbroadcast(g * (wins + 0.5 * ties), x)


def minmax_grad(g, result, input, dim, keepdim, other, largest):
    """torch.max / torch.min's three overloads, for ``input``:

    * ``max(x)`` reduces everything: ties share the gradient;
    * ``max(x, dim)`` returns (values, indices): the values' gradient goes to the indices;
    * ``max(x, other)`` is ``maximum(x, other)`` (``other`` usually arrives in ``dim``).
    """
    if other is not None:
        dim = other
    if isinstance(dim, torch.Tensor):
        wins = input > dim if largest else input < dim
        return pairwise_grad(g, wins, input == dim, input)
    if dim is None:
        return split_ties(g, input, result, None, False)
    return index_reduction_grad(g[0], input, result[1], dim, keepdim)


def index_reduction_grad(g: Any, x: torch.Tensor, indices: torch.Tensor, dim: int, keepdim: bool):
    """Gradient of a reduction that picked ``x`` at ``indices`` along ``dim`` (max(x, dim))."""
    if g is None:
        return torch.zeros_like(x)
    if x.dim() == 0:
        return like(g, x)
    if not keepdim:
        g = g.unsqueeze(dim)
        indices = indices.unsqueeze(dim)
    return torch.zeros_like(x).scatter(dim, indices, like(g, x))


def scatter_grad(g: Any, x: torch.Tensor, indices: torch.Tensor, dim: int) -> torch.Tensor:
    """Gradient of sort/topk values: each output's gradient goes back to where it came from."""
    if g is None:
        return torch.zeros_like(x)
    if x.dim() == 0:
        return like(g, x)
    return torch.zeros_like(x).scatter(dim, indices, like(g, x))


def picked_grad(g: Any, result: Any, args: tuple) -> list:
    """Gradient of builtin ``max``/``min``: one entry per argument, ``g`` for the returned one.

    With a single iterable argument the entry is itself a list over the iterable's elements.
    """
    if len(args) == 1 and isinstance(args[0], torch.Tensor):
        # over a tensor's rows: the first row equal to the result is the one returned
        xs = args[0]
        same = (xs == result).reshape(len(xs), -1).all(1)
        grad = torch.zeros_like(xs)
        if bool(same.any()):
            grad[int(same.int().argmax())] = g
        return [grad]
    if len(args) == 1:
        return [[g if e is result else None for e in args[0]]]
    return [g if a is result else None for a in args]


# --- products --------------------------------------------------------------------------


def prod_others(x: torch.Tensor, dim: Any) -> torch.Tensor:
    """``out[i] = prod_{j != i} x[j]`` along ``dim`` (all elements when dim is None).

    Computed as (product of the elements before i) * (product of those after i), without
    dividing, so it is exact when ``x`` has zeros.
    """
    if dim is None or x.dim() == 0:
        return prod_others(x.reshape(-1), 0).reshape(x.shape)
    n = x.shape[dim]
    if n == 0:
        return x.clone()
    one = torch.ones_like(x.narrow(dim, 0, 1))
    before = torch.cat([one, x.narrow(dim, 0, n - 1)], dim).cumprod(dim)
    after = torch.cat([x.narrow(dim, 1, n - 1), one], dim).flip(dim).cumprod(dim).flip(dim)
    return before * after


def cumprod_grad(g: torch.Tensor, x: torch.Tensor, result: torch.Tensor, dim: int):
    """Adjoint of ``y = cumprod(x, dim)``:
    ``dx[i] = sum_{j >= i} dy[j] * prod_{k <= j, k != i} x[k]``.

    Without zeros that is ``reverse_cumsum(dy * y) / x``; with zeros it is evaluated directly
    (quadratic in the length of ``dim``).
    """
    if x.dim() == 0:
        return g
    if bool((x != 0).all()):
        return reverse_cumsum(g * result, dim) / x
    xs = x.movedim(dim, -1)
    n = xs.shape[-1]
    rows = xs.unsqueeze(-2).expand(*xs.shape[:-1], n, n).clone()  # rows[..., i, k] = x[k]
    rows.diagonal(dim1=-2, dim2=-1).fill_(1)  # ... with x[i] left out of row i
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu()  # j >= i
    terms = rows.cumprod(-1) * upper * g.movedim(dim, -1).unsqueeze(-2)
    return terms.sum(-1).movedim(-1, dim)


# --- matmul, pow, clamp ------------------------------------------------------------------


def _as_matrices(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """View a matmul's operands and output gradient as (batched) matrices, like torch.matmul."""
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    if a.dim() == 1:
        g = g.unsqueeze(-2)
    if b.dim() == 1:
        g = g.unsqueeze(-1)
    return g, a2, b2


def matmul_grad_input(g: torch.Tensor, input: torch.Tensor, other: torch.Tensor):
    """``d input = d result @ other^T``, for torch.matmul's 1-D, 2-D and batched cases."""
    if input.dim() == 1 and other.dim() == 1:
        return like(g * other, input)
    g, a2, b2 = _as_matrices(g, input, other)
    ga = (g @ b2.mT).sum_to_size(a2.shape)
    return like(ga.reshape(input.shape), input)


def matmul_grad_other(g: torch.Tensor, input: torch.Tensor, other: torch.Tensor):
    """``d other = input^T @ d result``, for torch.matmul's 1-D, 2-D and batched cases."""
    if input.dim() == 1 and other.dim() == 1:
        return like(g * input, other)
    g, a2, b2 = _as_matrices(g, input, other)
    gb = (a2.mT @ g).sum_to_size(b2.shape)
    return like(gb.reshape(other.shape), other)


def pow_grad_base(g: torch.Tensor, input: Any, exponent: Any) -> torch.Tensor:
    """``d x**p / dx = p * x**(p-1)``, and 0 where ``p == 0`` (torch's convention)."""
    if not isinstance(exponent, torch.Tensor) and exponent == 0:
        return unbroadcast(g * 0, input)
    local = exponent * input ** (exponent - 1)
    if isinstance(exponent, torch.Tensor):
        local = torch.where(exponent == 0, 0.0, local)
    return unbroadcast(g * local, input)


def pow_grad_exponent(g: torch.Tensor, result: torch.Tensor, input: Any, exponent: Any):
    """``d x**p / dp = x**p * log(x)``, and 0 where ``x == 0`` and ``p >= 0`` (torch)."""
    if isinstance(input, torch.Tensor):
        local = torch.where((input == 0) & (exponent >= 0), 0.0, result * input.log())
    else:
        local = result * math.log(input) if input != 0 else result * 0
    return unbroadcast(g * local, exponent)


def clamp_pass(input: torch.Tensor, min: Any, max: Any) -> torch.Tensor:
    """Where clamp lets the input through: ``min <= x <= max``, bounds inclusive."""
    keep = torch.ones_like(input, dtype=torch.bool)
    if min is not None:
        keep = keep & (input >= min)
    if max is not None:
        keep = keep & (input <= max)
    return keep


def clamp_min_wins(input: torch.Tensor, min: Any, max: Any) -> torch.Tensor:
    """Where clamp's output is the lower bound: ``x < min`` (and ``min < max`` if both)."""
    wins = input < min
    if max is not None:
        wins = wins & (min < max)
    return wins


def clamp_max_wins(input: torch.Tensor, min: Any, max: Any) -> torch.Tensor:
    """Where clamp's output is the upper bound: ``x > max``, or everywhere ``max < min``."""
    wins = input > max
    if min is not None:
        wins = wins | (max < min)
    return wins


# --- indexing, joining, reshaping ---------------------------------------------------------


def _is_basic(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


def getitem_grad(g: Any, x: Any, index: Any) -> Any:
    """Adjoint of ``x[index]``.

    For a tensor: the gradient lands in the selected positions of a zero tensor; with
    advanced indices (tensors, lists, masks) a position selected twice gets both
    contributions.  For a list or tuple: a list holding the gradient at the selected
    position(s) and None elsewhere; for a dict: ``{index: g}``.
    """
    if not isinstance(x, torch.Tensor):
        if isinstance(x, (list, tuple)) and isinstance(index, slice):
            out: list = [None] * len(x)
            for pos, gi in zip(range(*index.indices(len(x))), g):
                out[pos] = gi
            return out
        return seq_adjoint(x, index, g)
    g = like(g, x)
    if _is_basic(index):
        gx = torch.zeros_like(x)
        gx[index] = g
        return gx
    items = index if isinstance(index, tuple) else (index,)
    # only index tensors: scatter-add (index_put refuses a 0-d x, which a 0-d mask can index)
    if x.dim() > 0 and all(isinstance(i, torch.Tensor) for i in items):
        return torch.zeros_like(x).index_put(items, g, accumulate=True)
    # Mixed indices: find which flat position of x each output element was read from.
    positions = torch.arange(x.numel(), device=x.device).reshape(x.shape)[index]
    flat = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
    flat = flat.index_add(0, positions.reshape(-1), g.reshape(-1))
    return flat.reshape(x.shape)


def cat_grads(grads: list, outputs: Any, dim: int) -> torch.Tensor:
    """Concatenate the gradients of split/chunk pieces, zeros for pieces that got none."""
    parts = [torch.zeros_like(o) if gi is None else gi for gi, o in zip(grads, outputs)]
    return torch.cat(parts, dim)


def stack_grads(grads: list, outputs: Any, dim: int) -> torch.Tensor:
    """Stack the gradients of unbind's slices, zeros for slices that got none."""
    parts = [torch.zeros_like(o) if gi is None else gi for gi, o in zip(grads, outputs)]
    return torch.stack(parts, dim)


def split_sizes(tensors: Any, dim: int) -> list[int]:
    """How much of ``dim`` each input of a concatenation took."""
    return [t.shape[dim] for t in tensors]


def inverse_permutation(dims: Any) -> list[int]:
    """The permutation that undoes ``permute(dims)``."""
    n = len(dims)
    inv = [0] * n
    for i, p in enumerate(dims):
        inv[p % n] = i
    return inv


def repeat_grad(g: torch.Tensor, x: torch.Tensor, repeats: Any) -> torch.Tensor:
    """Adjoint of ``x.repeat(*repeats)`` / ``torch.tile(x, repeats)``: sum over the copies."""
    repeats = list(repeats)
    shape = list(x.shape)
    if len(repeats) < len(shape):  # tile pads the repeats with ones on the left
        repeats = [1] * (len(shape) - len(repeats)) + repeats
    shape = [1] * (len(repeats) - len(shape)) + shape  # new leading dims have size 1
    split = []
    for r, s in zip(repeats, shape):
        split += [r, s]
    g = g.reshape(split).sum(list(range(0, 2 * len(shape), 2)))
    return like(g.reshape(x.shape), x)


def roll_grad(g: torch.Tensor, shifts: Any, dims: Any) -> torch.Tensor:
    """Adjoint of ``roll(x, shifts, dims)``: roll the gradient back."""
    back = [-s for s in shifts] if isinstance(shifts, (tuple, list)) else -shifts
    if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
        return g.flatten().roll(back).reshape(g.shape)
    return g.roll(back, dims)


def masked_select_grad(g: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Adjoint of ``masked_select(x, mask)``: the gradient goes back to the selected positions."""
    shape = torch.broadcast_shapes(x.shape, mask.shape)
    gx = torch.zeros(shape, dtype=x.dtype, device=x.device)
    gx = gx.masked_scatter(mask.expand(shape), like(g, x))
    return unbroadcast(gx, x)


# --- norms -------------------------------------------------------------------------------


def vector_norm_grad(g, x, result, ord, dim, keepdim):
    """Gradient of ``||x||_ord`` over ``dim``.

    ord=2: ``x / ||x||``; ord=1: ``sign(x)``; ord=inf/-inf: ``sign(x)`` shared evenly between the
    elements with the extreme magnitude; ord=0: zero; otherwise
    ``sign(x) |x|^(ord-1) / ||x||^(ord-1)``.  Where the norm is 0 the gradient is 0, as in torch.
    """
    g = expand_reduced(g, x, dim, keepdim)
    norm = expand_reduced(result, x, dim, keepdim)
    if ord == 0:
        return torch.zeros_like(x)
    if ord == 1:
        return g * x.sgn()
    if math.isinf(ord):
        hit = x.abs() == norm
        return g * x.sgn() * hit / hit.sum(reduced_dims(dim, x.dim()), keepdim=True)
    if ord == 2:
        scale = x / norm
    else:
        scale = x.sgn() * (x.abs() / norm) ** (ord - 1)
    return g * torch.where(norm == 0, 0.0, scale)


def norm_grad(g, x, result, p, dim, keepdim):
    """Gradient of ``torch.norm(x, p, dim)``: 'fro' is the 2-norm of the selected elements."""
    if p == "fro" or p is None:
        p = 2
    if isinstance(p, str):
        raise NotImplementedError(f"propgen has no adjoint for torch.norm with p={p!r}")
    return vector_norm_grad(g, x, result, p, dim, keepdim)


def linalg_norm_grad(g, x, result, ord, dim, keepdim):
    """Gradient of ``torch.linalg.norm``: vector norms and the Frobenius norm."""
    if ord is None or ord == "fro":
        return vector_norm_grad(g, x, result, 2, dim, keepdim)
    is_vector = isinstance(dim, int) or (dim is None and x.dim() == 1)
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        is_vector = True
    if not is_vector or isinstance(ord, str):
        raise NotImplementedError(
            f"propgen has no adjoint for the matrix norm torch.linalg.norm(ord={ord!r})"
        )
    return vector_norm_grad(g, x, result, ord, dim, keepdim)


# --- nn.functional ---------------------------------------------------------------------


def implicit_softmax_dim(dim: Any, ndim: int) -> int:
    """The dim F.softmax uses when none is given (a deprecated legacy rule)."""
    if dim is not None:
        return dim
    return 0 if ndim in (0, 1, 3) else 1


def reduction_mode(size_average: Any, reduce: Any, reduction: str) -> str:
    """A loss's reduction, honouring the deprecated ``size_average`` / ``reduce`` flags."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def loss_scale(g, elementwise, reduction, weight, mean_over_weights):
    """The gradient reaching each element of an unreduced loss (shaped like ``elementwise``).

    ``g`` is the gradient of the reduced loss; ``weight`` (or None) multiplies each element.
    'mean' divides by the number of elements, or by ``weight.sum()`` when
    ``mean_over_weights`` (mse_loss and l1_loss do that, huber_loss does not); 'batchmean'
    divides by the batch size.
    """
    w = 1.0 if weight is None else weight
    if reduction == "none":
        return g * w
    if reduction == "mean":
        count = weight.sum() if weight is not None and mean_over_weights else elementwise.numel()
        return (g / count * w).expand(elementwise.shape)
    if reduction == "batchmean":
        count = elementwise.shape[0] if elementwise.dim() else 1
        return (g / count * w).expand(elementwise.shape)
    return (g * w).expand(elementwise.shape)


def loss_weight_grad(g, result, elementwise, weight, reduction, mean_over_weights):
    """Gradient of a weighted loss ``reduce(weight * elementwise)`` w.r.t. ``weight``."""
    if reduction == "mean" and mean_over_weights:  # loss = sum(w * e) / sum(w)
        return g * (elementwise - result) / weight.sum()
    return loss_scale(g, elementwise, reduction, None, False) * elementwise


def or_one(weight: Any) -> Any:
    """An optional multiplier: 1 when absent."""
    return 1.0 if weight is None else weight


def normalized_dims(input: torch.Tensor, normalized_shape: Any) -> list[int]:
    """The trailing dims that layer_norm normalizes over."""
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return list(range(input.dim() - n, input.dim()))


def gelu_slope(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """Derivative of gelu.

    Exact: ``gelu(x) = x Phi(x)``, slope ``Phi(x) + x phi(x)`` (standard normal cdf and pdf).
    approximate='tanh': ``gelu(x) = x (1 + tanh(u)) / 2`` with ``u = k (x + 0.044715 x^3)``,
    ``k = sqrt(2 / pi)``: slope
    ``(1 + tanh u) / 2 + x (1 - tanh^2 u) k (1 + 3 * 0.044715 x^2) / 2``.
    """
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def kl_div_target_grad(per, input, target, log_target):
    """d/dt of kl_div's elementwise ``t (log t - x)`` (or ``e^t (t - x)`` with log_target)."""
    if log_target:
        return per * torch.exp(target) * (target - input + 1)
    return per * torch.where(target > 0, torch.log(target) + 1 - input, 0.0)


def class_dim_grad(dlogp: torch.Tensor, logits: torch.Tensor, log_softmax: bool):
    """Back through ``log_softmax`` over the class dim (dim 1, or 0 without a batch dim)."""
    if not log_softmax:
        return dlogp
    cdim = 0 if logits.dim() == 1 else 1
    probs = logits.softmax(cdim)
    return dlogp - probs * dlogp.sum(cdim, keepdim=True)


def _per_sample_scale(g, target, weight, ignore_index, reduction):
    """Coefficient of each sample's loss in the reduced loss (0 for ignored samples), the
    samples' class weights, and the targets with ignored ones replaced by class 0."""
    keep = target != ignore_index
    safe = torch.where(keep, target, 0)
    w = weight[safe] if weight is not None else torch.ones_like(safe, dtype=g.dtype)
    w = w * keep
    if reduction == "mean":
        return keep * (g / w.sum()), w, safe
    return keep * g, w, safe


def _onehot(safe: torch.Tensor, like_logits: torch.Tensor) -> torch.Tensor:
    cdim = 0 if like_logits.dim() == 1 else 1
    eye = torch.zeros_like(like_logits)
    return eye.scatter(cdim, safe.unsqueeze(cdim), 1.0)


def _expand_class(v: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample values (N, d1, ...) broadcast over the class dim of logits (N, C, d1, ...)."""
    return v.unsqueeze(0 if logits.dim() == 1 else 1)


def _class_weight(weight: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    shape = [1] * logits.dim()
    shape[0 if logits.dim() == 1 else 1] = -1
    return weight.reshape(shape)


def nll_loss_grad(g, input, target, weight, ignore_index, reduction):
    """Gradient of ``nll_loss = -w[y] * input[y]`` (per sample) w.r.t. the log-probabilities."""
    scale, w, safe = _per_sample_scale(g, target, weight, ignore_index, reduction)
    return -_onehot(safe, input) * _expand_class(scale * w, input)


def cross_entropy_grad(g, input, target, weight, ignore_index, reduction, label_smoothing):
    """Gradient of F.cross_entropy w.r.t. the logits.

    With logp = log_softmax(input), eps = label_smoothing and C classes, a sample's loss is
    ``-(1-eps) w[y] logp[y] - (eps/C) sum_c w[c] logp[c]`` (class-index targets) or
    ``-sum_c w[c] q[c] logp[c]`` with ``q = (1-eps) target + eps/C`` (probability targets);
    'mean' divides by the summed weights of the kept samples (by N for probability targets).
    The gradient w.r.t. logp is then pulled back through log_softmax.
    """
    cdim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[cdim]
    cw = _class_weight(weight, input) if weight is not None else 1.0
    if target.is_floating_point():  # class probabilities
        q = (1 - label_smoothing) * target + label_smoothing / n_classes
        per = g if reduction != "mean" else g / (input.numel() // n_classes)
        if reduction == "none":
            per = _expand_class(g, input)
        dlogp = -q * cw * per
        return class_dim_grad(dlogp, input, True)
    scale, w, safe = _per_sample_scale(g, target, weight, ignore_index, reduction)
    scale = _expand_class(scale, input)
    dlogp = -(1 - label_smoothing) * _onehot(safe, input) * _expand_class(w, input)
    dlogp = dlogp - (label_smoothing / n_classes) * cw
    return class_dim_grad(dlogp * scale, input, True)


def cross_entropy_target_grad(g, input, target, weight, reduction, label_smoothing):
    """Gradient of F.cross_entropy w.r.t. probability targets: ``-(1-eps) w[c] logp[c]``."""
    cdim = 0 if input.dim() == 1 else 1
    logp = input.log_softmax(cdim)
    cw = _class_weight(weight, input) if weight is not None else 1.0
    per = g if reduction != "mean" else g / (input.numel() // input.shape[cdim])
    if reduction == "none":
        per = _expand_class(g, input)
    return -(1 - label_smoothing) * cw * logp * per


def embedding_grad(g, input, weight, padding_idx, scale_grad_by_freq):
    """Adjoint of ``weight[input]``: rows read several times add up (divided by the count
    with scale_grad_by_freq); the padding_idx row gets none."""
    idx = input.reshape(-1)
    rows = like(g.reshape(-1, weight.shape[-1]), weight)
    if scale_grad_by_freq:
        counts = torch.bincount(idx, minlength=weight.shape[0])
        rows = rows / counts[idx].unsqueeze(-1)
    gw = torch.zeros_like(weight).index_add(0, idx, rows)
    if padding_idx is not None:
        gw[padding_idx] = 0
    return gw


def expand_like(tangent: Any, result: Any) -> Any:
    """A tangent given the result's shape and dtype (tangents always have their value's).

    In ``x + y`` with only a smaller ``y`` varying, the tangent ``t[y]`` broadcasts up to the
    result.  The dtype: an integer operand's zero tangent is a tensor of the default dtype,
    which wins the type promotion against a 0-d float64 tangent although the result
    (``x.sum() + indices``) is float64.  Templates that add tangents bring each to the
    result's dtype first (``add``), so that the float64 one is never rounded to float32.
    """
    if isinstance(tangent, torch.Tensor) and isinstance(result, torch.Tensor):
        if tangent.shape != result.shape:
            tangent = tangent.expand(result.shape)
        if tangent.dtype != result.dtype and (result.is_floating_point() or result.is_complex()):
            tangent = tangent.to(result.dtype)
        return tangent
    if isinstance(result, torch.Tensor) and not isinstance(tangent, torch.Tensor):
        return torch.full_like(result, tangent)
    return tangent
