"""Stage 8, load: write generated source to a real file and execute it.

The file lives at a content-hashed path in the cache directory (``PROPGEN_CACHE_DIR``, else
``$XDG_CACHE_HOME/propgen`` or ``~/.cache/propgen``), created user-only and written
atomically, and the code is compiled with that path as its filename, so pdb and IDE
breakpoints set in the file bind and tracebacks show the generated lines.  A file whose
content no longer matches its hash (truncated, edited by hand) is rewritten, never executed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["cache_dir", "write_source", "load_source"]


def cache_dir() -> Path:
    env = os.environ.get("PROPGEN_CACHE_DIR")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "propgen"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def write_source(stem: str, source: str) -> Path:
    """The path of ``source`` in the cache, writing it there (atomically) unless it is intact."""
    path = cache_dir() / f"{stem}_{_digest(source)}.py"
    try:
        if path.read_text(encoding="utf-8") == source:
            return path
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(source)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_source(path: Path, source: str, namespace: dict) -> dict:
    """Execute the generated module in ``namespace`` (code compiled under the file's path)."""
    code = compile(source, str(path), "exec")
    exec(code, namespace)
    return namespace
