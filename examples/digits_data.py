"""Shared by the digits examples (not an example itself): scikit-learn's bundled digits (no
download) and the options both take."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from _common import add_common_args


def load_digits(device: torch.device, dtype: torch.dtype) -> tuple:
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], 1437 / 360 samples."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        sys.exit("this example needs scikit-learn's digits data: pip install -e '.[examples]'")
    data = sklearn_digits()
    x = torch.as_tensor(data.data).to(device, dtype) / 16.0
    y = torch.as_tensor(data.target).to(device, torch.long)
    return x[:1437], y[:1437], x[1437:], y[1437:]


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None,
        experiment: Callable[[argparse.Namespace], dict]) -> dict:
    """Add the options both examples share (``--device``, ``--dtype``, ``--seed``,
    ``--no-progress``, ``--threads``), parse, and run ``experiment`` with the asked-for number
    of CPU threads (restored afterwards)."""
    add_common_args(parser, dtype="float32")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default: torch's own choice); 1 is "
                        "fastest for these small layers on a busy machine")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return experiment(args)
    finally:
        torch.set_num_threads(threads)
