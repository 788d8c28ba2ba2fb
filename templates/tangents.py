"""Tangent (forward-mode) templates of the ops in ``ops.py``.

Each template is paired with the op's adjoint template (``@tangent(ops.tanh)``): same
signature, same callables.  ``t[x]`` is the tangent of ``x`` and the template assigns
``t[result]`` with an expression linear in the tangents it reads.  A tangent that is zero
(an argument that does not vary) drops the terms it multiplies when the compiler splices the
template, so ``t[result] = t[input] * other + input * t[other]`` costs one product when only
``input`` varies.  Broadcasting ops return a tangent of the result's shape (``expand_like``),
since the result of ``x + y`` has ``x``'s shape even when only a smaller ``y`` varies.
"""

from __future__ import annotations

import torch
from propgen.templates import ops
from propgen.templates.helpers import expand_like

from propgen.template import t, tangent


@tangent(ops.add)
def add(result, input, other, alpha=1):
    t[result] = expand_like(t[input] + t[other] * alpha, result)


@tangent(ops.sub)
def sub(result, input, other, alpha=1):
    t[result] = expand_like(t[input] - t[other] * alpha, result)


@tangent(ops.mul)
def mul(result, input, other):
    t[result] = expand_like(t[input] * other + input * t[other], result)


@tangent(ops.neg)
def neg(result, input):
    t[result] = -t[input]


@tangent(ops.tanh)
def tanh(result, input):
    t[result] = t[input] * (1 - result * result)


@tangent(ops.exp)
def exp(result, input):
    t[result] = t[input] * result


@tangent(ops.matmul)
def matmul(result, input, other):
    t[result] = t[input] @ other + input @ t[other]


@tangent(ops.sum)
def sum(result, input, dim=None, keepdim=False, dtype=None):
    t[result] = torch.sum(t[input], dim, keepdim, dtype=dtype) if dim is not None else \
        torch.sum(t[input], dtype=dtype)
