"""`diffunet eval` with a variant of classifier-free guidance patched in for `samplers.guided`: an experiment
on rectified-flow runs that predict the flow (the default), to compare the variants before one goes in the
package (benchmarks/README.md, "A little guidance, and 1,500 steps", says why none did).

    python benchmarks/guidance_variants.py apg --eta 0 -- --checkpoint RUN --data mnist --num 1000 \
        --nll-images 0 --seed 0 --guidance 2
    python benchmarks/guidance_variants.py rescale --phi 0.7 -- ...
    python benchmarks/guidance_variants.py interval --low 0 --high 0.6 -- ...

Variants, each in the clean-image estimate x0 = x_t - tau v (tau = t / 1000):
    apg       Sadat et al. 2024 (arXiv:2410.02416), adaptive projected guidance without its momentum or norm
              threshold: the guidance difference split into its parts parallel and orthogonal to the
              conditional x0; the parallel part (which raises intensity and saturation) is scaled by eta,
              so eta = 1 is plain guidance.
    rescale   Lin et al. 2024 (arXiv:2305.08891), sec. 3.4: the guided x0 rescaled to the standard deviation
              of the conditional one, mixed phi : 1 - phi with the plain guided x0.
    interval  Kynkaanniemi et al. 2024 (arXiv:2404.07724): guidance only where low < tau <= high, elsewhere
              the plain conditional output.
Everything after `--` goes to `diffunet eval` unchanged.
"""
from __future__ import annotations

import argparse
import sys

import torch

import samplers
from samplers.guidance import both_branches
from diffunet.cli import main as diffunet_main


def _per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over every dimension but the batch, shaped [B, 1, 1, 1]."""
    return (a * b).flatten(1).sum(1).view(-1, *[1] * (a.dim() - 1))


def variant_guided(mode: str, eta: float, phi: float, low: float, high: float):
    """A drop-in for `samplers.guided` (same signature) that applies the named variant."""
    plain_guided = samplers.guided

    def guided(model, y, scale, null_label=-1):
        labels = torch.as_tensor(y)
        both = plain_guided(model, y, scale, null_label)

        def denoiser(x, t):
            t = torch.as_tensor(t, device=x.device).expand(len(x))
            tau = (t.to(torch.float32) / 1000).view(-1, 1, 1, 1)
            if mode == "interval":
                if low < float(tau.flatten()[0]) <= high:
                    return both(x, t)
                return model(x, t, y=labels.to(x.device))
            cond, uncond = both_branches(model, x, t, labels.to(x.device), null_label)
            v_cond, v_uncond = cond.float(), uncond.float()
            x0_cond, x0_uncond = x - tau * v_cond, x - tau * v_uncond
            delta = x0_cond - x0_uncond
            if mode == "apg":
                parallel = _per_image(delta, x0_cond) / _per_image(x0_cond, x0_cond).clamp_min(1e-12) * x0_cond
                x0 = x0_cond + (scale - 1) * (delta - parallel + eta * parallel)
            else:  # rescale
                x0_cfg = x0_cond + (scale - 1) * delta
                std_cond = x0_cond.flatten(1).std(1).view(-1, 1, 1, 1)
                std_cfg = x0_cfg.flatten(1).std(1).view(-1, 1, 1, 1).clamp_min(1e-12)
                x0 = phi * x0_cfg * std_cond / std_cfg + (1 - phi) * x0_cfg
            return ((x - x0) / tau.clamp_min(1e-6)).to(cond.dtype)
        return denoiser
    return guided


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("apg", "rescale", "interval"))
    parser.add_argument("--eta", type=float, default=0.0, help="apg: weight of the parallel part (1 = plain)")
    parser.add_argument("--phi", type=float, default=0.7, help="rescale: share of the rescaled estimate")
    parser.add_argument("--low", type=float, default=0.0, help="interval: guide where tau > low")
    parser.add_argument("--high", type=float, default=1.0, help="interval: and tau <= high")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)     # after `--`: `diffunet eval` flags
    args = parser.parse_args(argv[:split])
    samplers.guided = variant_guided(args.mode, args.eta, args.phi, args.low, args.high)  # looked up at each call
    return diffunet_main(["eval", *argv[split + 1:]])


if __name__ == "__main__":
    sys.exit(main())
