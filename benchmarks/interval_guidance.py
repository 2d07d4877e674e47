"""`diffunet eval` with classifier-free guidance applied only inside an interval of flow times (Kynkaanniemi et
al. 2024, "Applying guidance in a limited interval"), elsewhere the plain conditional output: an experiment, not
a package feature (benchmarks/README.md, "A little guidance, and 1,500 steps", says why it stayed out).

    python benchmarks/interval_guidance.py --low 0.0 --high 0.6 -- --checkpoint RUN --data mnist --num 1000 \
        --nll-images 0 --seed 0 --guidance 2

The interval is in tau = t / 1000 of a rectified-flow run (tau = 1 is pure noise): guided where low < tau <= high.
Everything after `--` goes to `diffunet eval` unchanged.
"""
from __future__ import annotations

import argparse
import sys

import torch

import samplers
from diffunet.cli import main as diffunet_main


def interval_guided(low: float, high: float):
    """A drop-in for `samplers.guided` that guides only for model times 1000 low < t <= 1000 high."""
    plain_guided = samplers.guided

    def guided(model, y, scale, null_label=-1):
        both = plain_guided(model, y, scale, null_label)
        labels = torch.as_tensor(y)

        def denoiser(x, t):
            tau = float(torch.as_tensor(t).flatten()[0]) / 1000
            if low < tau <= high:
                return both(x, t)
            return model(x, torch.as_tensor(t, device=x.device).expand(len(x)), y=labels.to(x.device))
        return denoiser
    return guided


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=float, required=True, help="guide where tau > low")
    parser.add_argument("--high", type=float, required=True, help="and tau <= high")
    parser.add_argument("eval_args", nargs=argparse.REMAINDER, help="-- then `diffunet eval` flags")
    args = parser.parse_args()
    samplers.guided = interval_guided(args.low, args.high)   # diffunet.generate looks it up at each call
    rest = args.eval_args[1:] if args.eval_args[:1] == ["--"] else args.eval_args
    return diffunet_main(["eval", *rest])


if __name__ == "__main__":
    sys.exit(main())
