"""Tangent (forward-mode) templates of the structural ops in ``ops.py``: linear algebra,
indexing, joining and splitting, shapes, casts and the builtins that pick an argument.

Same conventions as ``tangents.py``: each template is paired with its adjoint template and
assigns ``t[result]`` linearly in the tangents it reads.  Most ops here are linear maps of
their input (they select, copy or rearrange elements), so the tangent is the same op applied
to the input's tangent.
"""

from __future__ import annotations

from typing import Any

import torch
from propgen.templates import ops
from propgen.templates.helpers import like, shape_arg

from propgen.runtime_forward import item_tangent, tangent_or_zeros, zeros_tangent
from propgen.template import t, tangent

# ==========================================================================================
# Linear algebra
# ==========================================================================================


@tangent(ops.det)
def det(result, input):
    """Jacobi's formula: d det(A) = det(A) tr(A^{-1} dA)."""
    t[result] = result * torch.linalg.solve(input, t[input]).diagonal(0, -2, -1).sum(-1)


@tangent(ops.linalg_det)
def linalg_det(result, A):
    """Jacobi's formula: d det(A) = det(A) tr(A^{-1} dA)."""
    t[result] = result * torch.linalg.solve(A, t[A]).diagonal(0, -2, -1).sum(-1)


@tangent(ops.logdet)
def logdet(result, input):
    """d log det(A) = tr(A^{-1} dA)"""
    t[result] = torch.linalg.solve(input, t[input]).diagonal(0, -2, -1).sum(-1)


@tangent(ops.inverse)
def inverse(result, input):
    """B = A^{-1}:  dB = -B dA B"""
    t[result] = -result @ t[input] @ result


@tangent(ops.linalg_inv)
def linalg_inv(result, A):
    """B = A^{-1}:  dB = -B dA B"""
    t[result] = -result @ t[A] @ result


# ==========================================================================================
# Indexing: the same positions of the tangent
# ==========================================================================================


@tangent(ops.getitem, none_is_zero=True)
def getitem(result, input, index):
    """x[index]: the same positions of the tangent (for a list, tuple or dict, the element's
    tangent, None when that element does not vary)."""
    t[result] = item_tangent(t[input], index)


@tangent(ops.select)
def select(result, input, dim, index):
    t[result] = torch.select(t[input], dim, index)


@tangent(ops.narrow)
def narrow(result, input, dim, start, length):
    t[result] = torch.narrow(t[input], dim, start, length)


@tangent(ops.index_select)
def index_select(result, input, dim, index):
    t[result] = torch.index_select(t[input], dim, index)


@tangent(ops.gather)
def gather(result, input, dim, index, sparse_grad=False):
    t[result] = torch.gather(t[input], dim, index)


@tangent(ops.masked_select)
def masked_select(result, input, mask):
    t[result] = torch.masked_select(t[input], mask)


@tangent(ops.diagonal)
def diagonal(result, input, offset=0, dim1=0, dim2=1):
    t[result] = torch.diagonal(t[input], offset, dim1, dim2)


@tangent(ops.tril)
def tril(result, input, diagonal=0):
    t[result] = torch.tril(t[input], diagonal)


@tangent(ops.triu)
def triu(result, input, diagonal=0):
    t[result] = torch.triu(t[input], diagonal)


# ==========================================================================================
# Joining and splitting: the tangents are joined and split the same way
# ==========================================================================================


@tangent(ops.cat)
def cat(result, tensors, dim=0):
    """The inputs' tangents side by side (zeros for inputs that do not vary)."""
    t[result] = torch.cat(tangent_or_zeros(t[tensors], tensors), dim)


@tangent(ops.concatenate)
def concatenate(result, tensors, axis=0):
    t[result] = torch.cat(tangent_or_zeros(t[tensors], tensors), axis)


@tangent(ops.stack)
def stack(result, tensors, dim=0):
    t[result] = torch.stack(tangent_or_zeros(t[tensors], tensors), dim)


@tangent(ops.split)
def split(result, tensor, split_size_or_sections, dim=0):
    """The pieces' tangents are the same pieces of the tangent (also below)."""
    t[result] = torch.split(t[tensor], split_size_or_sections, dim)


@tangent(ops.split_method)
def split_method(result, input, split_size, dim=0):
    t[result] = t[input].split(split_size, dim)


@tangent(ops.chunk)
def chunk(result, input, chunks, dim=0):
    t[result] = torch.chunk(t[input], chunks, dim)


@tangent(ops.tensor_split)
def tensor_split(result, input, indices_or_sections, dim=0):
    t[result] = torch.tensor_split(t[input], indices_or_sections, dim)


@tangent(ops.unbind)
def unbind(result, input, dim=0):
    t[result] = torch.unbind(t[input], dim)


# ==========================================================================================
# Shapes: the tangent takes the result's shape
# ==========================================================================================


@tangent(ops.reshape)
def reshape(result, input, shape):
    """Ops that only rearrange the shape: the tangent is rearranged the same way (also below).
    ``reshape`` rather than ``view``: a tangent need not be contiguous where its value is."""
    t[result] = t[input].reshape(result.shape)


@tangent(ops.reshape_method)
def reshape_method(result, input, *shape):
    """x.view(2, 3) or x.view((2, 3))"""
    t[result] = t[input].reshape(result.shape)


@tangent(ops.reshape_as)
def reshape_as(result, input, other):
    t[result] = t[input].reshape(result.shape)


@tangent(ops.flatten)
def flatten(result, input, start_dim=0, end_dim=-1):
    t[result] = torch.flatten(t[input], start_dim, end_dim)


@tangent(ops.unflatten)
def unflatten(result, input, dim, sizes):
    t[result] = torch.unflatten(t[input], dim, sizes)


@tangent(ops.squeeze)
def squeeze(result, input, dim=None):
    t[result] = t[input].reshape(result.shape)


@tangent(ops.unsqueeze)
def unsqueeze(result, input, dim):
    t[result] = torch.unsqueeze(t[input], dim)


@tangent(ops.clone)
def clone(result, input, memory_format=None):
    """A copy: a store into the clone must not reach the input's tangent."""
    t[result] = torch.clone(t[input])


@tangent(ops.transpose)
def transpose(result, input, dim0, dim1):
    t[result] = torch.transpose(t[input], dim0, dim1)


@tangent(ops.t)
def t_(result, input):
    """x.t() (named t_: ``t`` is the template language's tangent object)."""
    t[result] = torch.t(t[input])


@tangent(ops.T)
def T(result, input):
    t[result] = t[input].T


@tangent(ops.mT)
def mT(result, input):
    t[result] = t[input].mT


@tangent(ops.H)
def H(result, input):
    t[result] = t[input].H


@tangent(ops.mH)
def mH(result, input):
    t[result] = t[input].mH


@tangent(ops.values)
def values(result, input):
    """The ``values`` field of a (values, indices) result: the first item of its tangent."""
    t[result] = t[input][0]


@tangent(ops.permute)
def permute(result, input, dims):
    t[result] = torch.permute(t[input], dims)


@tangent(ops.permute_method)
def permute_method(result, input, *dims):
    """x.permute(2, 0, 1) or x.permute((2, 0, 1))"""
    t[result] = t[input].permute(shape_arg(dims))


@tangent(ops.movedim)
def movedim(result, input, source, destination):
    t[result] = torch.movedim(t[input], source, destination)


@tangent(ops.expand)
def expand(result, input, *sizes):
    """Broadcasting copies: the tangent is copied the same way (also the two below)."""
    t[result] = t[input].expand(result.shape)


@tangent(ops.expand_as)
def expand_as(result, input, other):
    t[result] = t[input].expand(result.shape)


@tangent(ops.broadcast_to)
def broadcast_to(result, input, size):
    t[result] = t[input].expand(result.shape)


@tangent(ops.repeat)
def repeat(result, input, *repeats):
    """Tiled copies of the tangent."""
    t[result] = t[input].repeat(shape_arg(repeats))


@tangent(ops.tile)
def tile(result, input, dims):
    t[result] = torch.tile(t[input], dims)


@tangent(ops.flip)
def flip(result, input, dims):
    t[result] = torch.flip(t[input], dims)


@tangent(ops.flip_method)
def flip_method(result, input, *dims):
    t[result] = torch.flip(t[input], shape_arg(dims))


@tangent(ops.roll)
def roll(result, input, shifts, dims=None):
    t[result] = torch.roll(t[input], shifts, dims)


# ==========================================================================================
# Casts and moves: the tangent goes to the result's dtype and device
# ==========================================================================================


@tangent(ops.to)
def to(result, input, *args, **kwargs):
    """x.to(dtype / device), x.float(), x.cpu(), ...: the same cast of the tangent (zero when
    the result is not floating)."""
    t[result] = _cast_tangent(t[input], result)


@tangent(ops.type_as)
def type_as(result, input, other):
    t[result] = _cast_tangent(t[input], result)


# ==========================================================================================
# Builtins that pick one of their arguments
# ==========================================================================================


@tangent(ops.builtin_max)
def builtin_max(result, *args, key=None, default=None):
    """max(a, b, ...) and max(iterable) return one of the elements: its tangent."""
    t[result] = _picked_tangent(t[args], result, args)


# ==========================================================================================
# Helpers
# ==========================================================================================


def _cast_tangent(tangent: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``tangent`` in ``result``'s dtype and device; zeros when the cast left the floating
    (and complex) types, whose values do not vary continuously."""
    if result.is_floating_point() or result.is_complex():
        return like(tangent, result)
    return torch.zeros_like(result, dtype=tangent.dtype)


def _picked_tangent(tangents: tuple, result: Any, args: tuple) -> Any:
    """The tangent of the argument builtin ``max``/``min`` returned (the element of the single
    iterable argument, when there is one); zero when it has none (``default``)."""
    if len(args) == 1:
        tangents, args = tangents[0], args[0]
        if tangents is None:
            return zeros_tangent(result)
        if isinstance(args, torch.Tensor):  # over a tensor's rows: the first equal row
            same = (args == result).reshape(len(args), -1).all(1)
            if not bool(same.any()):
                return zeros_tangent(result)
            return tangents[int(same.int().argmax())]
    for tan, arg in zip(tangents, args):
        if arg is result:
            return tangent_or_zeros(tan, arg)
    return zeros_tangent(result)
