"""RP, LR and TP gradient estimates on the chaotic sigmoid RNN (Proppo paper, Sec. 4).

    python examples/chaotic_rnn.py [--betas 1.0 2.0 2.5 3.5] [--repeats 30] [--batch 1000]
                                   [--horizon 100] [--plot variance.png] [--quiet]
                                   [--device cpu|cuda] [--dtype float32|float64] [--seed 0]
                                   [--no-progress]

The state s_t = sigmoid(beta * s_{t-1} @ W) + noise (W = [[-5, -25], [5, 25]],
s0 = [0.35, 0.55], Gaussian noise of scale 1e-3 at every step) is chaotic for beta above
about 2.5.  The per-sample loss is 0.5 ||1 - s_H||^2.  For each beta the script estimates
d E[L] / d beta ``--repeats`` times with each estimator and prints the mean and variance of
the estimates: reparameterization gradients (RP) explode in the chaotic regime, likelihood
ratio gradients (LR) do not, and total propagation (TP), which mixes the two at every node
by inverse-variance weighting, is better than both.  The program is written once; the
estimator is the manager's configuration.  At the end the generated backward of the TP
configuration is printed.  ``--plot FILE`` saves the paper's figure: the variance of the
estimates against beta, one line per estimator, on a log scale (needs matplotlib).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import add_common_args, device_and_dtype, plot_lines, progress_bar
from torch.distributions import Normal

import propgen as pg


@pg.propagate
def rollout(manager, s, W, beta, horizon):
    b = beta.expand(s.shape[0], 1)  # beta per sample: TotalProp weighs its contributions
    for _ in range(horizon):
        s = torch.sigmoid(b * (s @ W))
        s = manager.forward(s, ivw_target=b)
    return 0.5 * ((1.0 - s) ** 2).sum(dim=1)


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns {estimator: {beta: (mean, variance)}} of the estimates."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 2.0, 2.5, 3.5])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--scale", type=float, default=1e-3, help="noise scale")
    parser.add_argument("--plot", metavar="FILE", help="save the variance figure (PNG) here")
    parser.add_argument("--quiet", action="store_true", help="do not print generated code")
    add_common_args(parser)
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args)
    torch.manual_seed(args.seed)
    W = torch.tensor([[-5.0, -25.0], [5.0, 25.0]], dtype=dtype, device=device)
    s0 = torch.tensor([0.35, 0.55], dtype=dtype, device=device).expand(args.batch, 2)
    noise = dict(dist_class=Normal, dist_params={"loc": 0.0, "scale": args.scale})
    managers = {
        "RP": pg.PropagationManager(pg.RPProp(**noise)),
        "LR": pg.PropagationManager(pg.LRProp(**noise)),
        "TP": pg.PropagationManager(pg.TotalProp(**noise)),
    }
    print(f"d E[L] / d beta over {args.repeats} estimates (batch {args.batch}, horizon "
          f"{args.horizon}, noise {args.scale}, {device} {args.dtype}): mean and variance")
    print(f"{'beta':>5} " + " ".join(f"{k + ' mean':>12} {k + ' var':>10}" for k in managers))
    figures: dict = {name: {} for name in managers}
    bar = progress_bar(len(args.betas) * len(managers) * args.repeats, not args.no_progress,
                       unit="estimate", leave=False)
    start = time.perf_counter()
    for beta_value in args.betas:
        beta = torch.tensor([beta_value], dtype=dtype, device=device, requires_grad=True)
        cells = []
        for name, manager in managers.items():
            bar.set_description_str(f"beta {beta_value} {name}")
            grads = []
            for _ in range(args.repeats):
                beta.grad = None
                manager.backward(rollout(manager, s0, W, beta, args.horizon))
                grads.append(float(beta.grad))
                bar.update()
            g = torch.tensor(grads, dtype=torch.float64)  # statistics of Python floats
            figures[name][beta_value] = (float(g.mean()), float(g.var()))
            cells.append(f"{float(g.mean()):>12.4e} {float(g.var()):>10.2e}")
        bar.write(f"{beta_value:>5} " + " ".join(cells))
    bar.close()
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.plot:
        plot_lines(args.plot, {"": {name: {b: var for b, (_, var) in per_beta.items()}
                                    for name, per_beta in figures.items()}},
                   xlabel="beta", ylabel="variance of d E[L] / d beta",
                   title=f"Chaotic RNN: variance of the gradient estimates\nbatch "
                         f"{args.batch}, horizon {args.horizon}, {args.repeats} repeats")
        print(f"figure saved to {args.plot}")
    if not args.quiet:
        print("\nGenerated code of the TotalProp configuration:\n")
        print(pg.source(rollout, managers["TP"]))
    return figures


if __name__ == "__main__":
    main()
