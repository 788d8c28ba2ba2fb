"""Stage 8, load: write generated source to a real file and execute it.

The file lives at a content-hashed path in the cache directory (``PROPGEN_CACHE_DIR``, else
``$XDG_CACHE_HOME/propgen`` or ``~/.cache/propgen``), created user-only and written
atomically (a temporary file renamed over the name, so a reader never sees half a file and
two processes writing the same code both succeed).  The code is compiled from the source held
in memory, with the file's path as its filename, so pdb and IDE breakpoints set in the file
bind and tracebacks show the generated lines; the file is never read back to be executed.  A
file whose content no longer matches its name's hash (truncated, edited by hand, deleted) is
written again whenever propgen hands out its path.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from propgen.errors import PropgenError

__all__ = ["CacheError", "cache_dir", "write_source", "ensure_file"]


class CacheError(OSError, PropgenError):
    """The cache directory cannot hold propgen's generated files (not writable, full)."""


def cache_dir() -> Path:
    """The directory of generated files, created user-only (mode 0700) when missing."""
    env = os.environ.get("PROPGEN_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "propgen"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_error(path, e) from e
    return path


def _cache_error(path: Path, e: OSError) -> CacheError:
    return CacheError(
        e.errno, f"propgen cannot write its generated code to {path} ({e.strerror or e}); set "
        "the environment variable PROPGEN_CACHE_DIR to a writable directory of your own")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def write_source(stem: str, source: str) -> Path:
    """The path of ``source`` in the cache, ``<stem>_<hash of source>.py``, written there
    (atomically) unless a file with that content is already there."""
    return ensure_file(cache_dir() / f"{stem}_{_digest(source)}.py", source)


def ensure_file(path: Path, source: str) -> Path:
    """``path``, holding exactly ``source``: a missing, truncated or edited file is replaced."""
    try:
        if path.read_bytes() == source.encode("utf-8"):
            return path
    except OSError:
        pass  # missing or unreadable: written below
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    except OSError as e:
        raise _cache_error(path.parent, e) from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(source)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _cache_error(path.parent, e) from e
        raise
    return path

