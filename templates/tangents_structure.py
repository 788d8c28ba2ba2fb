"""Tangent (forward-mode) templates of the structural ops in ``ops.py``: linear algebra,
indexing, joining and splitting, shapes, casts and the builtins that pick an argument.

Same conventions as ``tangents.py``: each template is paired with its adjoint template and
assigns ``t[result]`` linearly in the tangents it reads.
"""

from __future__ import annotations

from propgen.templates import ops

from propgen.template import t, tangent

# ==========================================================================================
# Indexing
# ==========================================================================================


@tangent(ops.getitem)
def getitem(result, input, index):
    """x[index]: the same positions of the tangent (for a list, tuple or dict, the element's
    tangent, None when that element does not vary)."""
    t[result] = t[input][index]
