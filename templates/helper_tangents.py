"""Tangent templates of the helpers that generated backward code calls (``helpers.py``,
``propgen.runtime``), so that forward mode reads propgen's own generated code as readable
source (forward over reverse: Hessian-vector products) instead of going through
``torch.func.jvp``.
"""

from __future__ import annotations
