"""Shared by all examples (not an example itself): the options every example takes
(``--device``, ``--dtype``, ``--no-progress``), progress bars that fall back to plain loops
when tqdm is not installed, and the figures of the propagation examples, drawn with
matplotlib, which is imported only when a figure is asked for.

tqdm and matplotlib are optional: ``pip install -e '.[examples]'`` installs both.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence

import torch

INSTALL_HINT = "pip install -e '.[examples]'"


def default_device() -> str:
    """'cuda' when a CUDA device is available, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_args(parser: argparse.ArgumentParser, *, dtype: str = "float64",
                    dtypes: Sequence[str] = ("float32", "float64"), seed: bool = True) -> None:
    """Add ``--device`` (default: cuda when available), ``--dtype``, ``--no-progress`` and,
    with ``seed``, ``--seed`` to ``parser``."""
    device = default_device()
    parser.add_argument("--device", default=device,
                        help=f"torch device, e.g. cpu, cuda, cuda:1 (default: {device})")
    parser.add_argument("--dtype", default=dtype, choices=list(dtypes),
                        help=f"floating point type (default: {dtype})")
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype the parsed ``--device`` and ``--dtype`` name."""
    return torch.device(args.device), getattr(torch, args.dtype)


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def progress(iterable: Iterable, enabled: bool, **kwargs):
    """A tqdm bar over ``iterable`` when asked for and installed, else the iterable itself."""
    tqdm = _tqdm() if enabled else None
    return iterable if tqdm is None else tqdm(iterable, **kwargs)


class _NoBar:
    """What ``progress_bar`` returns without tqdm: the same methods, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_description_str(self, desc: str) -> None:
        pass

    def write(self, text: str) -> None:
        print(text)

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, **kwargs):
    """A bar advanced by hand (``update()``, ``set_description_str()``; print with
    ``write()`` so the text does not tear the bar; ``close()`` at the end): tqdm's when asked
    for and installed, else an object with the same methods that only prints."""
    tqdm = _tqdm() if enabled else None
    return _NoBar() if tqdm is None else tqdm(total=total, **kwargs)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (works without a display);
    exits with an install hint when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        sys.exit(f"--plot needs matplotlib: {INSTALL_HINT}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


Lines = Mapping[str, Mapping[float, float]]  # label -> {x: y}


def plot_lines(path: str, panels: Mapping[str, Lines], *, xlabel: str, ylabel: str,
               title: str, xlog: int | None = None) -> None:
    """Save a figure to ``path``: one subplot per entry of ``panels`` (its key is the subplot's
    title), one line with markers per label, a log-scale y axis (values that are not positive
    are left out), ``xlog`` the base of a log-scale x axis (None: linear)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(1 + 5.5 * len(panels), 4.6),
                             squeeze=False, sharey=True)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for label, points in lines.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
        ax.set_yscale("log")
        if xlog is not None:
            ax.set_xscale("log", base=xlog)
            ax.set_xticks(sorted({x for points in lines.values() for x in points}))
            ax.xaxis.set_major_formatter(plt.ScalarFormatter())
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        if name:
            ax.set_title(name)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
