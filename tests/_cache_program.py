"""Run by tests/test_cache.py in separate processes: compile one function with propgen (cache
directory from PROPGEN_CACHE_DIR), check its gradient against torch.autograd, print the file.

``python tests/_cache_program.py DIR N`` first waits for N processes to have announced
themselves in DIR, so that they all compile at the same moment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import propgen as pg


def model(x, w):
    h = torch.tanh(x @ w)
    for _ in range(2):
        h = torch.sin(h) * h
    return (h * h).sum()


def _barrier(folder: Path, n: int) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"ready-{time.monotonic_ns()}-{id(folder)}").touch()
    deadline = time.monotonic() + 120
    while len(list(folder.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.001)


def main(argv: list[str]) -> None:
    if argv:
        _barrier(Path(argv[0]), int(argv[1]))
    df = pg.grad(model, wrt=(1,))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w_ref = w.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model(x, w_ref), [w_ref])
    torch.testing.assert_close(df(x, w), expected, rtol=1e-12, atol=1e-14)
    print(df.compiled.path)


if __name__ == "__main__":
    main(sys.argv[1:])
