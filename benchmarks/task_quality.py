"""Quality of an image-to-image run (`diffunet train --task superres:F | colorize`) on held-out test images,
against the classical answer (bicubic upsampling; for colorize, the gray image itself). Prints one table:

    method | PSNR (dB) | SSIM | FD (floor) | FD / floor | seconds per image

PSNR = 10 log10(1 / MSE) on pixels in [0, 1], SSIM per Wang et al. 2004 ("Image Quality Assessment: From
Error Visibility to Structural Similarity", eq. 13) with their 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
K2 = 0.03, over the valid part of the window and averaged over channels (both from diffunet/metrics.py, as
`diffunet eval` reports them for a task run); both are means over the images of the per-image values, on the uint8 outputs as written to disk. The test images are the random draw `diffunet
eval` uses as its real stand-in (same seed), so the FD floor is "the originals themselves" against the same
reference sets, as in benchmarks/inpaint_quality.py. One output per input, from the run's sampler.

    DIFFUNET_DATA=../shared/data python benchmarks/task_quality.py --checkpoint runs/superres_mnist \\
        --picture docs/superres_mnist.png
"""
from __future__ import annotations

import argparse
import math
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
import torch.nn.functional as F  # noqa: E402

from diffunet.reference import eval_data, feature_statistics, split_real  # noqa: E402
from diffunet.features import ClassifierConfig  # noqa: E402
from diffunet.images import make_grid, save_image, to_model_range, to_uint8  # noqa: E402
from diffunet.metrics import psnr, ssim  # noqa: E402
from diffunet.run import load_run  # noqa: E402
from diffunet.tasks import cond_picture, luma  # noqa: E402


def baseline(task, truth: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(name, the run's inputs, the classical answer) for uint8 truths: superres's shrunk image and its bicubic
    upsampling (F.interpolate, align_corners=False, clamped); colorize's gray image, shown as gray RGB."""
    x = to_model_range(truth)
    if task.kind == "superres":
        low = F.interpolate(x, size=(x.shape[-2] // task.factor, x.shape[-1] // task.factor), mode="area")
        return "bicubic", low, F.interpolate(low, scale_factor=task.factor, mode="bicubic", align_corners=False)
    if task.kind == "colorize":
        gray = luma(x)
        return "gray (no colour)", gray, gray.expand(-1, 3, -1, -1)
    raise SystemExit(f"task_quality.py measures superres and colorize runs; this run's task is {task.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run folder of a superres or colorize run")
    parser.add_argument("--data", default=None, help="real data (default: the run's)")
    parser.add_argument("--num", type=int, default=500, help="test images (default: 500)")
    parser.add_argument("--sampler", default=None, help="default: the run's")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="the test draw (as diffunet eval's) and the noise")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--columns", type=int, default=10, help="test images in the picture")
    parser.add_argument("--picture", default=None, help="PNG: rows of input, baseline, ours, truth")
    parser.add_argument("--no-fd", action="store_true", help="skip FD (no feature classifier needed)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    run = load_run(args.checkpoint)
    source = args.data or run.train_config.get("data") or run.data_name
    real = eval_data(source, run.train_config)
    order = torch.randperm(len(real.test.images), generator=torch.Generator().manual_seed(args.seed))
    chosen = split_real(order, args.num)[0]
    truth, labels = real.test.images[chosen], real.test.labels[chosen] if real.test.labels is not None else None
    name, inputs, classical = baseline(run.task, truth)
    print(f"{args.checkpoint}: {run.task.name} on {source} test, N = {args.num}, "
          f"{args.sampler or run.sampler} {args.steps or run.steps} steps, step {run.step}; "
          f"CPU threads {torch.get_num_threads()}")

    started = time.perf_counter()
    ours = to_uint8(run.sample(args.num, seed=args.seed, cond=inputs, sampler=args.sampler, steps=args.steps,
                               batch_size=args.batch_size))
    seconds = (time.perf_counter() - started) / args.num
    rows = {f"{name} ({run.task.name})": (to_uint8(classical), 0.0), "ours (diffusion)": (ours, seconds),
            "truth": (truth, 0.0)}
    print("\n| method | PSNR (dB) | SSIM | FD (floor) | FD / floor | s / image |\n|---|---|---|---|---|---|")
    for method, (images, cost) in rows.items():
        fd = "| - | - " if args.no_fd else ""
        if not args.no_fd:
            stats = feature_statistics(images, labels, real, order, ClassifierConfig(), run.device, False)["fd"]
            fd = f"| {stats['value']:.2f} ({stats['floor']:.2f}) | {stats['ratio']:.2f}x "
        quality = psnr(images, truth).mean().item(), ssim(images, truth).mean().item()
        shown = "inf" if math.isinf(quality[0]) or quality[0] > 99 else f"{quality[0]:.2f}"
        print(f"| {method} | {shown} | {quality[1]:.4f} {fd}| {cost:.3f} |", flush=True)
    if args.picture:
        count = args.columns
        condition = run.condition(count, inputs[:count])
        picture = [to_uint8(cond_picture(run.task, condition, truth.shape[1])), rows[f"{name} ({run.task.name})"][0][:count],
                   ours[:count], truth[:count]]
        save_image(make_grid(torch.cat(picture), nrow=count), args.picture)
        print(f"\nwrote {args.picture}: rows input (as the model sees it), {name}, ours, truth")


if __name__ == "__main__":
    main()
