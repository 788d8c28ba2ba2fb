"""Tangent (forward-mode) templates of the structural ops in ``ops.py``: linear algebra,
indexing, joining and splitting, shapes, casts and the builtins that pick an argument.

Same conventions as ``tangents.py``: each template is paired with its adjoint template and
assigns ``t[result]`` linearly in the tangents it reads.
"""

from __future__ import annotations
