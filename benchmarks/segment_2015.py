"""Stroke segmentation on cluttered MNIST: the 2015 U-Net trained directly (`--objective direct`) against a
threshold of the input and a diffusion model trained on the same pairs. Prints one markdown table:

    method | steps (training minutes) | pixel accuracy | IoU | Dice | CPU ms per image

The task, synthesised from the built-in MNIST subset (diffunet/assets/mnist_10k.npz): each digit, dimmed to
50-100 %, is laid over clutter made of `--fragments` 12x12 pieces of other digits, each turned by a multiple of
90 degrees and dimmed to 40-100 %, plus Gaussian noise (std 0.1 of full scale). The target is the digit's stroke
mask (pixel >= 128 of the clean digit), saved as 0 / 255. Digits 0-8999 (and their clutter) train, 9000-9999
are held out. So a pixel's brightness does not say whether it belongs to the digit; its shape and place do.

    threshold      input >= t, t chosen on the training pairs for the best IoU (no learning beyond that)
    2015 direct    `--preset ronneberger2015` with small widths, valid convolutions and overlap-tile mirror
                   padding (Ronneberger et al. 2015, sec. 2, fig. 2), cross-entropy over {background, stroke}
    diffusion      the default conditional denoiser (`--data-cond`, preset auto: small28, the run's sampler),
                   one sample per input, thresholded at 128

IoU is the foreground's intersection over union over all held-out pixels; Dice, 2|A n B| / (|A| + |B|),
is the mean over images (an empty prediction and truth count 1). CPU ms per image is process time (one thread
unless OMP_NUM_THREADS says otherwise) for predicting the held-out set in batches of 250; the threshold's
cost is negligible. Each model trains for `--minutes` (TrainConfig.minutes: steps fixed from the speed of
steps 5-25), so the two networks get the same training time.

    OMP_NUM_THREADS=1 python benchmarks/segment_2015.py --minutes 2.5 --picture docs/segment_2015.png
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run from a clone without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffunet.data import load_data  # noqa: E402
from diffunet.images import make_grid, save_image, to_uint8  # noqa: E402
from diffunet.metrics import segmentation_scores  # noqa: E402
from diffunet.run import Run, load_run  # noqa: E402
from diffunet.training import TrainConfig, train  # noqa: E402

FRAGMENT = 12         # side of a clutter fragment, pixels
HELD_OUT = 9000       # digits from here on are the test set


def cluttered_digits(digits: np.ndarray, rng: np.random.Generator, fragments: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W] digits -> (uint8 inputs [N, H, W], uint8 masks [N, H, W] in {0, 255}); clutter comes from
    fragments of the same set's other digits."""
    x = digits.astype(np.float32) / 255
    count, height, width = x.shape
    inputs = np.empty_like(x)
    for i in range(count):
        canvas = np.zeros((height, width), np.float32)
        for _ in range(fragments):
            source = x[rng.integers(count)]
            top, left = rng.integers(4, height - FRAGMENT - 3), rng.integers(4, width - FRAGMENT - 3)
            piece = np.rot90(source[top:top + FRAGMENT, left:left + FRAGMENT], rng.integers(4)) * rng.uniform(0.4, 1)
            y, z = rng.integers(0, height - FRAGMENT + 1), rng.integers(0, width - FRAGMENT + 1)
            canvas[y:y + FRAGMENT, z:z + FRAGMENT] = np.maximum(canvas[y:y + FRAGMENT, z:z + FRAGMENT], piece)
        picture = np.maximum(x[i] * rng.uniform(0.5, 1), canvas) + rng.normal(0, 0.1, (height, width))
        inputs[i] = np.clip(picture, 0, 1)
    return (inputs * 255).round().astype(np.uint8), ((digits >= 128) * 255).astype(np.uint8)


def scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pixel accuracy, foreground IoU over all pixels, and mean per-image Dice of bool [N, H, W] masks
    (diffunet.metrics.segmentation_scores, as `diffunet eval` reports them for a direct run)."""
    return segmentation_scores(torch.from_numpy(predicted).long(), torch.from_numpy(truth).long(), 2)


def best_threshold(inputs: np.ndarray, masks: np.ndarray) -> int:
    """The gray level t (input >= t is stroke) with the best IoU on the training pairs."""
    return max(range(1, 256, 2), key=lambda t: scores(inputs >= t, masks > 0)["iou"])


def predict(run: Run, inputs: np.ndarray, batch_size: int = 250) -> tuple[np.ndarray, float]:
    """(bool [N, H, W] stroke masks, CPU milliseconds per image) from a run given uint8 inputs [N, H, W]."""
    started, outputs = time.process_time(), []
    for start in range(0, len(inputs), batch_size):
        cond = torch.from_numpy(inputs[start:start + batch_size])[:, None]            # [b, 1, H, W] uint8
        outputs.append(to_uint8(run.sample(len(cond), cond=cond, seed=start, batch_size=batch_size)))
    milliseconds = (time.process_time() - started) * 1000 / len(inputs)
    return torch.cat(outputs)[:, 0].numpy() >= 128, milliseconds


def steps_trained(run: Run) -> int:
    """Optimizer steps behind a run's weights."""
    return int(run.step or json.loads((run.path / "config.json").read_text())["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.5, help="training time of each network (default: 2.5)")
    parser.add_argument("--fragments", type=int, default=4, help="clutter fragments per image (default: 4)")
    parser.add_argument("--test-count", type=int, default=1000, help="held-out images scored (at most 1000)")
    parser.add_argument("--base-channels", type=int, default=8, help="2015 preset's first width (default: 8)")
    parser.add_argument("--channel-mults", default="1,2,4,8", help="2015 preset's levels (default: 1,2,4,8)")
    parser.add_argument("--lr", type=float, default=5e-3, help="2015 preset's peak learning rate (default: 5e-3)")
    parser.add_argument("--no-diffusion", action="store_true", help="skip the diffusion model")
    parser.add_argument("--work", default=None, help="folder for the pairs and runs (default: a temporary one)")
    parser.add_argument("--picture", default=None, help="PNG: rows input, truth, threshold, 2015 direct, diffusion")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    digits = load_data("builtin", progress=False).images[:, 0].numpy()                  # [10000, 28, 28]
    train_inputs, train_masks = cluttered_digits(digits[:HELD_OUT], rng, args.fragments)
    test_inputs, test_masks = cluttered_digits(digits[HELD_OUT:][:args.test_count], rng, args.fragments)
    work = Path(args.work or tempfile.mkdtemp(prefix="segment_2015_"))
    work.mkdir(parents=True, exist_ok=True)
    # The held-out pairs ride along as the set's test split, so `diffunet eval --checkpoint WORK/direct` scores them.
    np.savez(work / "pairs.npz", inputs=train_inputs, targets=train_masks, test_inputs=test_inputs,
             test_targets=test_masks)
    print(f"cluttered MNIST strokes: {len(train_inputs)} training pairs, {len(test_inputs)} held out, "
          f"{train_masks.mean() / 255:.1%} stroke pixels; CPU threads {torch.get_num_threads()}; work in {work}",
          flush=True)

    threshold = best_threshold(train_inputs, train_masks)
    rows = {f"threshold (input >= {threshold})": ("-", scores(test_inputs >= threshold, test_masks > 0), 0.0)}
    predictions = {"threshold": test_inputs >= threshold}
    common = dict(data_cond=str(work / "pairs.npz"), minutes=args.minutes, quiet=True, device="cpu", seed=args.seed,
                  save_every=100_000, sample_every=100_000, class_conditional=False)
    mults = tuple(int(m) for m in args.channel_mults.split(","))
    runs = {f"2015 direct (base {args.base_channels}, levels {args.channel_mults})":
            (dict(objective="direct", preset="ronneberger2015", lr=args.lr),
             {"base_channels": args.base_channels, "channel_mults": mults}, "direct")}
    if not args.no_diffusion:
        runs["diffusion (small28, --data-cond)"] = ({}, {}, "diffusion")
    for name, (fields, overrides, key) in runs.items():
        started = time.perf_counter()
        run = load_run(train(TrainConfig(out=str(work / key), **common, **fields), overrides))
        minutes = (time.perf_counter() - started) / 60
        predicted, cost = predict(run, test_inputs)
        parameters = sum(p.numel() for p in run.model.parameters())
        rows[f"{name}, {parameters / 1e3:.0f}k parameters"] = (f"{steps_trained(run)} ({minutes:.1f} min)",
                                                              scores(predicted, test_masks > 0), cost)
        predictions[key] = predicted
        print(f"{name}: done in {minutes:.1f} min", flush=True)

    print("\n| method | steps (training minutes) | pixel accuracy | IoU | Dice | CPU ms / image |\n|---|---|---|---|---|---|")
    for name, (steps, score, cost) in rows.items():
        print(f"| {name} | {steps} | {score['accuracy']:.4f} | {score['iou']:.4f} | {score['dice']:.4f} | "
              f"{cost:.2f} |")
    if args.picture:
        count = 10
        shown = [test_inputs[:count], test_masks[:count]] + [mask[:count].astype(np.uint8) * 255
                                                              for mask in predictions.values()]
        grid = make_grid(torch.from_numpy(np.concatenate(shown))[:, None], nrow=count)
        save_image(grid, args.picture)
        print(f"\nwrote {args.picture}: rows input, truth, {', '.join(predictions)}")


if __name__ == "__main__":
    main()
