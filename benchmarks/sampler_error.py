"""Sampling error against the number of model evaluations (NFE), per sampler and path, with an exact denoiser.

The data are a 1-D two-mode Gaussian mixture, 0.3 N(-0.8, 0.1^2) + 0.7 N(0.6, 0.2^2), whose optimal
denoiser E[x0 | x_t] is known in closed form. Feeding it to each sampler isolates the sampler's own
error, the part a step budget controls. For each sampler and NFE the script prints:
  - W1: the Wasserstein-1 distance between the samples and the true mixture (integral of |F_emp - F|);
  - weight error: |fraction of samples below -0.1 (the narrow mode) - its true weight|;
  - narrow-mode std: std of the samples below -0.1 divided by the true 0.1 (1.00 = right spread).
Each table's title gives the Monte-Carlo floor: the same statistic for exact draws from the mixture.
Model calls are counted, not assumed: Heun makes about two per step, so it gets (NFE + 1) // 2 steps and
its cell shows the calls it made when they differ from the column's NFE.

    python benchmarks/sampler_error.py                  # every path, 100,000 samples, a few minutes
    python benchmarks/sampler_error.py --paths flow linear --num 20000
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
from samplers import NoiseSchedule, randn, sample  # noqa: E402

PATHS = {"linear": NoiseSchedule.linear, "cosine": NoiseSchedule.cosine, "flow": NoiseSchedule.rectified_flow,
         "flow_shift3": lambda: NoiseSchedule.rectified_flow(shift=3.0)}

WEIGHT, MEANS, STDS = 0.3, (-0.8, 0.6), (0.1, 0.2)   # mode 0 (narrow, 30%) and mode 1
SPLIT = -0.1                                         # between the modes
SAMPLERS = {  # row name -> (method, options)
    "ddpm (small var)": ("ddpm", {"variance": "small"}),
    "ddpm (large var)": ("ddpm", {"variance": "large"}),
    "ddim (eta=0)": ("ddim", {"eta": 0.0}),
    "ddim (eta=1)": ("ddim", {"eta": 1.0}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "euler": ("euler", {}),
    "heun": ("heun", {}),
    "heun (karras)": ("heun", {"spacing": "karras"}),
    "dpmpp_2m (karras)": ("dpmpp_2m", {"spacing": "karras"}),
}


def mixture_denoiser(schedule, calls: list[int]):
    """x0-predictor E[x0 | x_t] on any path (from alpha_sigma): mode responsibilities times each mode's
    Gaussian posterior mean. Appends 1 to `calls` per model evaluation."""
    (m0, m1), (s0, s1) = MEANS, STDS

    def model(x, t):
        calls.append(1)
        alpha, sigma = (v.to(x).reshape(-1, *([1] * (x.dim() - 1))) for v in schedule.alpha_sigma(t.cpu()))
        sigma2 = sigma**2
        var0, var1 = alpha**2 * s0**2 + sigma2, alpha**2 * s1**2 + sigma2          # Var(x_t | mode)
        logit = (math.log(WEIGHT / (1 - WEIGHT)) - 0.5 * (var0 / var1).log()
                 - 0.5 * (x - alpha * m0) ** 2 / var0 + 0.5 * (x - alpha * m1) ** 2 / var1)
        first = torch.sigmoid(logit)                                              # P(mode 0 | x_t)
        return (first * (m0 + alpha * s0**2 * (x - alpha * m0) / var0)
                + (1 - first) * (m1 + alpha * s1**2 * (x - alpha * m1) / var1))
    return model


def mixture_cdf(x: torch.Tensor) -> torch.Tensor:
    """F(x) of the mixture."""
    normal_cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return WEIGHT * normal_cdf((x - MEANS[0]) / STDS[0]) + (1 - WEIGHT) * normal_cdf((x - MEANS[1]) / STDS[1])


def statistics(samples: torch.Tensor) -> tuple[float, float, float]:
    """(W1 to the mixture, mode-weight error, narrow-mode std / true std) of 1-D samples."""
    ordered = samples.flatten().sort().values
    grid = torch.linspace(min(ordered[0].item(), -3.0), max(ordered[-1].item(), 3.0), 200_001, dtype=torch.float64)
    empirical = torch.searchsorted(ordered, grid, right=True).double() / len(ordered)
    w1 = torch.trapezoid((empirical - mixture_cdf(grid)).abs(), grid).item()
    narrow = ordered[ordered < SPLIT]
    weight_error = abs(len(narrow) / len(ordered) - mixture_cdf(torch.tensor(SPLIT, dtype=torch.float64)).item())
    return w1, weight_error, narrow.std().item() / STDS[0]


def exact_draws(num: int, generator: torch.Generator) -> torch.Tensor:
    """num samples from the mixture itself (the Monte-Carlo floor)."""
    mode0 = torch.rand(num, generator=generator, dtype=torch.float64) < WEIGHT
    noise = torch.randn(num, generator=generator, dtype=torch.float64)
    return torch.where(mode0, MEANS[0] + STDS[0] * noise, MEANS[1] + STDS[1] * noise)


def print_table(title: str, rows: dict[str, list[str]], nfes: list[int]) -> None:
    """A markdown table: one row per sampler, one column per NFE."""
    print(f"\n{title}\n")
    print("| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|" + "---:|" * len(nfes))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--num", type=int, default=100_000, help="samples per run")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest for 1-D data on shared cores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    floor = statistics(exact_draws(args.num, torch.Generator().manual_seed(args.seed)))
    for path in args.paths:
        schedule, calls = PATHS[path](), []
        model = mixture_denoiser(schedule, calls)
        tables = {"w1": {}, "weight": {}, "std": {}}
        start = time.perf_counter()
        for name, (method, options) in SAMPLERS.items():
            for key in tables:
                tables[key][name] = []
            for nfe in args.nfe:
                generator = torch.Generator().manual_seed(args.seed)
                x = randn((args.num, 1), generator, dtype=torch.float64)
                calls.clear()
                steps = (nfe + 1) // 2 if method == "heun" else nfe
                out = sample(model, x, schedule, method=method, steps=steps, prediction="x0", generator=generator,
                             **options)
                made = f" ({len(calls)})" if len(calls) != nfe else ""
                for key, value in zip(tables, statistics(out)):
                    tables[key][name].append(f"{value:.4f}{made}")

        print(f"\n## {path}: {schedule!r}\n\nMixture 0.3 N(-0.8, 0.1^2) + 0.7 N(0.6, 0.2^2); exact x0 denoiser; "
              f"trailing grid unless named; {args.num:,} samples per cell, seed {args.seed}; "
              f"{time.perf_counter() - start:.0f} s. (N) = model calls made, where not the column's NFE.")
        print_table(f"Wasserstein-1 distance to the true distribution (exact draws: {floor[0]:.4f})",
                    tables["w1"], args.nfe)
        print_table(f"Mode-weight error |P(x < -0.1) - 0.3| (exact draws: {floor[1]:.4f})", tables["weight"], args.nfe)
        print_table(f"Narrow-mode std / true std, 1 is right (exact draws: {floor[2]:.4f})", tables["std"], args.nfe)


if __name__ == "__main__":
    main()
