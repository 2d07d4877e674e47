"""Inpainting quality of a trained run on held-out test images: RePaint against plain replacement and
against unconditional samples. Prints one table per mask:

    method | model calls | FD (floor) | FD / floor | label kept | seconds

The N images to complete are the random test draw that `diffunet eval` uses as its real stand-in (same
seed), so the FD floor is exactly "the originals, unmasked" against the same reference sets. "label kept" is
how often eval's feature classifier gives the completion the original's label (chance is 1/classes; the
unconditional samples show it). Masks: the lower half, and a random half of the 4x4 patches (one pattern
per image, seeded). Completions are unconditional (label "none"): the model must read the class off the
known pixels. A picture (originals, masks, completions) goes to --picture.

    python benchmarks/inpaint_quality.py --checkpoint runs/mnist --data mnist
    python benchmarks/inpaint_quality.py --checkpoint RUN --num 50 --steps 10 --resamples 2   # smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run from a clone without installing
SHARED_DATA = REPO.parent / "shared" / "data"
if "DIFFUNET_DATA" not in os.environ and (SHARED_DATA / "mnist.npz").is_file():
    os.environ["DIFFUNET_DATA"] = str(SHARED_DATA)

import torch  # noqa: E402

from diffunet.images import make_grid, save_image, to_uint8  # noqa: E402
from diffunet.reference import eval_data, feature_statistics, split_real  # noqa: E402
from diffunet.features import ClassifierConfig  # noqa: E402
from diffunet.generate import generate  # noqa: E402
from diffunet.run import load_run  # noqa: E402


def masks(kind: str, num: int, height: int, width: int, seed: int) -> torch.Tensor:
    """[num, 1, H, W] float, 1 = keep. "lower_half": the top half kept; "patches": each 4x4 patch kept with p = 1/2."""
    if kind == "lower_half":
        keep = torch.zeros(num, 1, height, width)
        keep[:, :, : height // 2] = 1
        return keep
    generator = torch.Generator().manual_seed(seed)
    patches = (torch.rand(num, 1, -(-height // 4), -(-width // 4), generator=generator) < 0.5).float()
    return patches.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)[:, :, :height, :width]


def complete(run, originals: torch.Tensor, keep: torch.Tensor, args, resamples: int) -> tuple[torch.Tensor, int]:
    """RePaint completions (resamples = 1: plain replacement) of uint8 `originals` with no label; returns
    (uint8 completions, model calls per batch)."""
    calls = []
    hook = run.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        filled = run.inpaint(originals, keep, seed=args.seed, steps=args.steps, jump_length=args.jump_length,
                             resamples=resamples, batch_size=args.batch_size)
    finally:
        hook.remove()
    return to_uint8(filled), len(calls) // -(-len(originals) // args.batch_size)


def unconditional(run, num: int, args) -> torch.Tensor:
    """Samples that ignore the image: ancestral DDPM with the run's default steps, no label."""
    return to_uint8(generate(run.model, run.schedule, num, run.image_shape, sampler="ddpm", steps=args.steps,
                             prediction=run.prediction, labels=run.no_labels(num), seed=args.seed,
                             batch_size=args.batch_size, device=run.device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run folder")
    parser.add_argument("--data", default=None, help="real data (default: the run's)")
    parser.add_argument("--num", type=int, default=500, help="test images completed, and N for FD (default: 500)")
    parser.add_argument("--steps", type=int, default=50, help="timesteps of the descent (default: 50)")
    parser.add_argument("--jump-length", type=int, default=10)
    parser.add_argument("--resamples", type=int, default=5, help="RePaint's R (default: 5; replacement is R = 1)")
    parser.add_argument("--masks", default="lower_half,patches")
    parser.add_argument("--seed", type=int, default=0, help="the test draw (as diffunet eval's), noise and masks")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--picture", default=None, help="PNG: rows of original, mask, then completions")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    run = load_run(args.checkpoint)
    run.no_labels(1)                          # refuses a run that never trained its no-label branch
    source = args.data or run.train_config.get("data") or run.data_name
    real = eval_data(source, run.train_config)
    order = torch.randperm(len(real.test.images), generator=torch.Generator().manual_seed(args.seed))
    chosen = split_real(order, args.num)[0]                       # eval's real stand-in: the floor's originals
    originals, labels = real.test.images[chosen], real.test.labels[chosen]
    _, channels, height, width = originals.shape
    print(f"{args.checkpoint}: {source}, N = {args.num}, {args.steps} steps, jump {args.jump_length}; "
          f"CPU threads {torch.get_num_threads()}")

    def report(name, images, calls, seconds):
        stats = feature_statistics(images, labels, real, order, ClassifierConfig(), run.device, False)
        fd = stats["fd"]
        print(f"| {name} | {calls} | {fd['value']:.2f} ({fd['floor']:.2f}) | {fd['ratio']:.2f}x "
              f"| {stats['entropy']['label_agreement']:.1%} | {seconds:.0f} |", flush=True)

    started = time.perf_counter()
    samples = unconditional(run, args.num, args)
    print("\n| method | model calls | FD (floor) | FD / floor | label kept | seconds |\n|---|---|---|---|---|---|")
    report("unconditional samples (no mask)", samples, args.steps, time.perf_counter() - started)
    rows = [originals[:8]]
    for kind in args.masks.split(","):
        keep = masks(kind, args.num, height, width, args.seed)
        rows.append((keep[:8] * 255).to(torch.uint8).expand(-1, channels, -1, -1))
        for name, resamples in ((f"{kind}: replace (R = 1)", 1), (f"{kind}: RePaint (R = {args.resamples})",
                                                                     args.resamples)):
            started = time.perf_counter()
            completed, calls = complete(run, originals, keep, args, resamples)
            report(name, completed, calls, time.perf_counter() - started)
            rows.append(completed[:8])
    if args.picture:
        save_image(make_grid(torch.stack(rows, dim=1).flatten(0, 1), nrow=len(rows)), args.picture)
        print(f"\nwrote {args.picture}: one test image per row; original, then per mask: mask, replace, RePaint")


if __name__ == "__main__":
    main()
