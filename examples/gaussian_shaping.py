"""Gaussian shaping on the multi-path chaotic RNN (Proppo paper, Appendix C.3).

    python examples/gaussian_shaping.py [--paths 1 4 16] [--betas 2.0 3.5] [--repeats 40]
                                        [--batch 1000] [--horizon 30] [--plot variance.png]
                                        [--device cpu|cuda] [--dtype float32|float64]
                                        [--seed 0] [--no-progress]

D copies of the chaotic sigmoid RNN (W = [[-5, -25], [5, 25]], s0 = [0.35, 0.55], Gaussian
noise of scale 1e-3 at every step) run side by side with their own beta; the loss sums
0.5 ||1 - s_H||^2 over all paths, and the gradient is estimated for the first path's beta
only.  The other paths add nothing to that gradient but noise to the cost: the likelihood-
ratio estimator's variance grows with D.  Gaussian shaping fits a Gaussian to the first
path's last state, resamples it, and sends earlier nodes a cost built from the gradients at
the resampled points, which knows nothing of the other paths: its variance stays flat.

The program is written once; each estimator is a configuration of the manager:
LR and LR+GS (GSLoss at the first path's last state), TP and TP+GS (GSProp there).
``--plot FILE`` saves the variance against D, one panel per beta and one line per estimator
(needs matplotlib).
"""

from __future__ import annotations

import argparse

import torch
from _common import add_common_args, device_and_dtype, plot_lines, progress_bar
from torch.distributions import Normal

import propgen as pg


@pg.propagate
def multipath(manager, s0, W, beta1, others, horizon):
    """Per-sample loss of D parallel RNNs; path 0's beta is ``beta1``."""
    batch = s0.shape[0]
    x = s0
    for _ in range(horizon):
        b1 = beta1.expand(batch, 1)
        b = torch.cat([b1, others.expand(batch, others.shape[0])], 1)  # (B, D)
        pre = (x.unsqueeze(-1) * W).sum(-2)  # (B, D, 2): each path's x @ W
        x = torch.sigmoid(b.unsqueeze(-1) * pre)
        x = manager.forward(x, ivw_target=b1)
    first = manager.forward(x[:, 0], local_propagator="shape")  # the GS node (or identity)
    rest = x[:, 1:]
    return 0.5 * ((1.0 - first) ** 2).sum(1) + 0.5 * ((1.0 - rest) ** 2).sum((1, 2))


def configurations(noise: dict) -> dict:
    """Estimator name -> (default propagator, propagator of the GS call site)."""
    return {
        "LR": (pg.LRProp(**noise), pg.Propagator()),
        "LR+GS": (pg.LRProp(**noise), pg.GSLoss()),
        "TP": (pg.TotalProp(**noise), pg.Propagator()),
        "TP+GS": (pg.TotalProp(**noise), pg.GSProp()),
    }


def estimate(props, d, beta, args, device, dtype, bar) -> tuple[float, float]:
    """(mean, variance) of ``args.repeats`` estimates of d E[L] / d beta_1 with D = ``d``."""
    default, shape = props
    # GS needs the loss gradient at its node even when the default (LR) would not ask for it
    manager = pg.PropagationManager(default, loss_propagator=pg.LossProp(lossgrad=True))
    manager.add_propagator("shape", shape)
    W = torch.tensor([[-5.0, -25.0], [5.0, 25.0]], dtype=dtype, device=device).expand(d, 2, 2)
    s0 = torch.tensor([0.35, 0.55], dtype=dtype, device=device).expand(args.batch, d, 2)
    beta1 = torch.tensor([beta], dtype=dtype, device=device, requires_grad=True)
    others = torch.full((d - 1,), beta, dtype=dtype, device=device)
    grads = []
    for _ in range(args.repeats):
        beta1.grad = None
        manager.backward(multipath(manager, s0, W, beta1, others, args.horizon))
        grads.append(float(beta1.grad))
        bar.update()
    g = torch.tensor(grads, dtype=torch.float64)  # statistics of Python floats
    return float(g.mean()), float(g.var())


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns {estimator: {beta: {D: (mean, variance)}}}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--betas", type=float, nargs="+", default=[2.0, 3.5])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--horizon", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--plot", metavar="FILE", help="save the variance figure (PNG) here")
    add_common_args(parser)
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args)
    torch.manual_seed(args.seed)
    noise = dict(dist_class=Normal, dist_params={"loc": 0.0, "scale": 1e-3})
    configs = configurations(noise)
    print(f"variance of d E[L] / d beta_1 over {args.repeats} estimates (batch {args.batch}, "
          f"horizon {args.horizon}, {device} {args.dtype}); mean in brackets")
    figures: dict = {name: {beta: {} for beta in args.betas} for name in configs}
    bar = progress_bar(len(args.betas) * len(args.paths) * len(configs) * args.repeats,
                       not args.no_progress, unit="estimate", leave=False)
    for beta in args.betas:
        bar.write(f"\nbeta = {beta}")
        bar.write(f"{'D':>4} " + " ".join(f"{name:>22}" for name in configs))
        for d in args.paths:
            cells = []
            for name, props in configs.items():
                bar.set_description_str(f"beta {beta} D {d} {name}")
                mean, var = estimate(props, d, beta, args, device, dtype, bar)
                figures[name][beta][d] = (mean, var)
                cells.append(f"{var:10.3e} [{mean:+9.2e}]")
            bar.write(f"{d:>4} " + " ".join(f"{c:>22}" for c in cells))
    bar.close()
    if args.plot:
        panels = {f"beta = {beta}": {name: {d: var for d, (_, var) in per_beta[beta].items()}
                                     for name, per_beta in figures.items()}
                  for beta in args.betas}
        plot_lines(args.plot, panels, xlabel="number of paths D", xlog=2,
                   ylabel="variance of d E[L] / d beta_1",
                   title=f"Multi-path chaotic RNN: variance of the gradient estimates\nbatch "
                         f"{args.batch}, horizon {args.horizon}, {args.repeats} repeats")
        print(f"figure saved to {args.plot}")
    return figures


if __name__ == "__main__":
    main()
