"""Tangent templates of the helpers that generated backward code calls (``helpers.py``,
``propgen.runtime``), so that forward mode reads propgen's own generated code as readable
source (forward over reverse: Hessian-vector products) instead of going through
``torch.func.jvp``.
"""

from __future__ import annotations

from propgen import runtime, runtime_forward
from propgen.template import nondifferentiable

# What generated code keeps of a tensor only for its shape, and the seed of a backward pass.
_constant = nondifferentiable(runtime.meta, runtime_forward.ones_seed)

from propgen.template import t, tangent  # noqa: E402


@tangent(list)
def list_(result, iterable=()):
    """A copy of a list (the backward's own copy of the forward's stack)."""
    t[result] = list(t[iterable])


@tangent(tuple)
def tuple_(result, iterable=()):
    t[result] = tuple(t[iterable])
