"""``python -m propgen``: see :mod:`propgen.cli` (``show`` prints generated code, ``doctor``
checks the installation)."""

from propgen.cli import main

raise SystemExit(main())
