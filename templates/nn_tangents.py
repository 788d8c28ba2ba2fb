"""Tangent (forward-mode) templates of the ``torch.nn.functional`` ops in ``nn.py``.

Same conventions as ``tangents.py``: each template is paired with its adjoint template and
assigns ``t[result]`` linearly in the tangents it reads.
"""

from __future__ import annotations
