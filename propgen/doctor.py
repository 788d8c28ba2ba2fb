"""``python -m propgen doctor``: the environment propgen runs in, and end-to-end checks.

Prints the versions, the cache directory (and whether it is user-only and writable), the
devices and torch.distributed's backends, then checks that reverse mode and forward mode
agree with torch on every device, that a propagated function runs, and that the generated
file on disk passes its content-hash check.  The programs it compiles are module-level
functions here, so that propgen can read their source.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

import propgen
from propgen.errors import one_line as _one_line

__all__ = ["doctor"]




def _doctor_loss(x, w, steps):
    h = x
    for _ in range(steps):
        h = torch.tanh(h @ w)
        if h.sum() > 0:
            h = h * 1.5
        else:
            h = h - 0.5
    return torch.sum(h * h)


def _doctor_rollout(manager, s, W, beta, horizon):
    b = beta.expand(s.shape[0], 1)
    for _ in range(horizon):
        s = torch.sigmoid(b * (s @ W))
        s = manager.forward(s, ivw_target=b)
    return 0.5 * ((1.0 - s) ** 2).sum(dim=1)


def _devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"not importable ({type(e).__name__}: {_one_line(e)})"
    v = getattr(mod, "__version__", None)
    if v is None:
        try:
            from importlib.metadata import version

            v = version(module)
        except Exception:  # noqa: BLE001
            v = "unknown version"
    return str(v)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _check_reverse(device: str) -> str:
    dtype = torch.float32 if device == "mps" else torch.float64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, dtype=dtype, generator=g).to(device)
    w = (torch.randn(4, 4, dtype=dtype, generator=g) * 0.5).to(device)
    df = propgen.grad(_doctor_loss, wrt=(0, 1))
    gx, gw = df(x, w, 3)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ex, ew = torch.autograd.grad(_doctor_loss(xr, wr, 3), (xr, wr))
    err = max(float((gx - ex).abs().max()), float((gw - ew).abs().max()))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    if not err <= tol:
        raise AssertionError(f"propgen.grad differs from torch.autograd by {err:.2e} "
                             f"(tolerance {tol:.0e})")
    return f"propgen.grad matches torch.autograd ({str(dtype)[6:]}, max error {err:.1e})"


def _check_forward() -> str:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, dtype=torch.float64, generator=g)
    w = torch.randn(4, 4, dtype=torch.float64, generator=g) * 0.5
    vx, vw = torch.randn_like(x), torch.randn_like(w)
    jf = propgen.autodiff(_doctor_loss, mode="forward", wrt=(0, 1))
    got = jf(x, w, 3, tangents=(vx, vw))
    _, want = torch.func.jvp(lambda a, b: _doctor_loss(a, b, 3), (x, w), (vx, vw))
    err = float((got - want).abs().max())
    if not err <= 1e-10:
        raise AssertionError(f"JVP differs from torch.func.jvp by {err:.2e}")
    return f"propgen.autodiff(mode='forward') matches torch.func.jvp (max error {err:.1e})"


def _check_propagate() -> str:
    rollout = propgen.propagate(_doctor_rollout)
    noise = {"dist_class": torch.distributions.Normal, "dist_params": {"loc": 0.0,
                                                                        "scale": 1e-2}}
    manager = propgen.PropagationManager(propgen.TotalProp(**noise))
    W = torch.tensor([[-5.0, -25.0], [5.0, 25.0]], dtype=torch.float64)
    s0 = torch.tensor([0.35, 0.55], dtype=torch.float64).expand(32, 2)
    beta = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    loss = rollout(manager, s0, W, beta, 5)
    manager.backward(loss)
    if beta.grad is None:
        raise AssertionError("manager.backward left beta.grad unset")
    if not math.isfinite(float(beta.grad)):
        raise AssertionError(f"beta.grad is not finite: {float(beta.grad)}")
    return f"@propgen.propagate with TotalProp: forward, backward, d/dbeta = {float(beta.grad):.3g}"


def _check_file() -> str:
    from propgen import load

    df = propgen.grad(_doctor_loss, wrt=(0, 1))
    path = Path(df.path)
    if not path.is_file():
        raise AssertionError(f"generated file {path} is missing")
    text = path.read_text(encoding="utf-8")
    digest = load._digest(text)
    if not path.stem.endswith(digest):
        raise AssertionError(f"{path.name}: its content does not match the hash in its name")
    if text != df.compiled.source:
        raise AssertionError(f"{path.name} differs from the code propgen compiled")
    again = load.write_source(path.stem[: -len(digest) - 1], text)
    if again != path:
        raise AssertionError(f"writing the same code again gave {again}, not {path}")
    return f"generated file {path.name} found, content hash matches"


def doctor(out: TextIO | None = None) -> int:
    """Print the environment (versions, cache directory, devices) and run the checks.

    Returns 0 when every check passes, 1 otherwise."""
    out = out or sys.stdout

    def line(key: str, value: str) -> None:
        print(f"  {key:<13}{value}", file=out)

    print("propgen doctor\n\nversions", file=out)
    line("python", f"{platform.python_version()} ({platform.python_implementation()}, "
                   f"{sys.platform}, {sys.executable})")
    line("propgen", f"{propgen.__version__} ({Path(propgen.__file__).parent})")
    cuda = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if cuda else None
    mps = getattr(torch.backends, "mps", None)
    mps_built = bool(mps is not None and mps.is_built())
    build = f"CUDA {cuda}" + (f", cuDNN {cudnn}" if cudnn else "") if cuda else "no CUDA"
    line("torch", f"{torch.__version__} (built with {build}; MPS "
                  f"{'built' if mps_built else 'not built'})")
    for mod in ("gast", "astor", "numpy"):
        line(mod, _version(mod))

    print("\ncache", file=out)
    from propgen.load import cache_dir

    try:
        cache = cache_dir()
    except OSError as e:
        line("directory", f"cannot be created: {type(e).__name__}: {_one_line(e)}")
        cache = None
    if cache is not None:
        line("directory", str(cache))
        line("exists", "yes" if cache.is_dir() else "no")
        if cache.is_dir():
            mode = cache.stat().st_mode & 0o777
            private = not mode & 0o077
            line("permissions", f"{mode:04o} ({'user-only' if private else 'readable by others'})")
            line("writable", "yes" if os.access(cache, os.W_OK | os.X_OK) else "NO")
            files = [p for p in cache.glob("*.py") if not p.name.startswith(".tmp-")]
            total = sum(p.stat().st_size for p in files)
            line("files", f"{len(files)} generated file(s), {_size(total)}")

    print("\ndevices", file=out)
    for dev in _devices():
        if dev.startswith("cuda"):
            p = torch.cuda.get_device_properties(int(dev.split(":")[1]))
            line(dev, f"{p.name} (compute {p.major}.{p.minor}, "
                      f"{p.total_memory / 2**30:.1f} GiB)")
        else:
            line(dev, "available")
    dist = torch.distributed
    if dist.is_available():
        backends = ", ".join(f"{b}: {'yes' if ok() else 'no'}" for b, ok in
                             (("gloo", dist.is_gloo_available), ("nccl", dist.is_nccl_available)))
        line("distributed", f"available ({backends})")
    else:
        line("distributed", "not available in this torch build")

    print("\nchecks", file=out)
    checks: list[tuple[str, Callable[[], str]]] = [
        (f"reverse mode on {dev}", (lambda d=dev: _check_reverse(d))) for dev in _devices()]
    checks += [("forward mode", _check_forward), ("propagate", _check_propagate),
               ("generated file", _check_file)]
    failed = 0
    for name, check in checks:
        start = time.perf_counter()
        try:
            detail = check()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - every failure is reported, none raised
            detail = f"{type(e).__name__}: {_one_line(e)}"
            status = "FAIL"
            failed += 1
        ms = (time.perf_counter() - start) * 1e3
        print(f"  {status:<5}{name}: {detail} ({ms:.0f} ms)", file=out)
    print(f"\n{len(checks) - failed} of {len(checks)} checks passed", file=out)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
