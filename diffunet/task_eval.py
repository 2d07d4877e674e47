"""`diffunet eval` on an image-to-image run (`--task superres:F | inpaint | colorize` or `--data-cond PATH`,
with `--objective diffusion` or `direct`): the run's outputs on held-out test pairs against their truth.

    test pairs    N images of the run's test split in a seeded random order (the `--seed` draw that
                  `diffunet eval` takes as its real stand-in; reference.py says which images), each with
                  its condition derived as training derives it (`tasks.split_batch`; inpaint masks drawn
                  from the seed). For --data-cond, the pairs set's held-out pairs (pairs.py: test_inputs and
                  test_targets in the .npz, or PATH/test/inputs and PATH/test/targets)
    PSNR, SSIM    image targets (metrics.py: Wang et al. 2004, eq. 13 for SSIM), means over the test
                  pairs with their standard errors
    FD (floor)    image targets, where the feature classifier applies (labelled data): FD of the outputs
                  to the reference sets, beside the truths' own FD to them (benchmarks/task_quality.py's)
    accuracy, IoU, Dice   mask targets, a direct run with K >= 2 output channels (cross-entropy over K
                  classes; direct.py): the arg-max class map against the target's classes (metrics.py)

A diffusion run is sampled once per input with the run's sampler (per-image seeds, as `diffunet sample`); a
direct run is its network's output (`direct.predict`): no sampler, no noise and no likelihood. Where a figure
cannot be given (no held-out pairs, no labels for the classifier) the report says why in one line.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from . import direct
from .errors import UserError
from .features import ClassifierConfig
from .images import to_model_range, to_uint8
from .metrics import psnr, segmentation_scores, ssim
from .pairs import has_test_pairs, load_pairs
from .reference import EvalData, check_reference, eval_data, feature_statistics, split_real
from .run import Run
from .tasks import split_batch

SSIM_WINDOW = 11   # SSIM's Gaussian window side (Wang et al. 2004); smaller images get no SSIM


def target_kind(run: Run) -> str:
    """"mask" for a direct run trained with cross-entropy (K >= 2 outputs, 1-channel targets), else "image"."""
    if run.objective == "direct" and direct.loss_kind(run.model.out_channels, run.image_shape[0]) == "cross_entropy":
        return "mask"
    return "image"


def test_pairs(run: Run, data: str | None, progress: bool = False) -> tuple[EvalData | None, Tensor | None, str]:
    """(the real images with the test targets, the test inputs of a pairs run or None, the source name); the
    real images are None for a pairs set without held-out pairs."""
    config = run.train_config
    if run.task.kind != "pairs":
        source = data or config.get("data") or run.data_name
        return eval_data(source, config, progress), None, source
    source = data or config.get("data_cond")
    if not has_test_pairs(source):
        return None, None, source
    options = {"image_size": config.get("image_size"), "channels": config.get("channels"),
               "alpha_background": config.get("alpha_background", 0), "progress": progress}
    train, _ = load_pairs(source, **options)
    test, inputs = load_pairs(source, split="test", **options)
    if inputs.shape[1] != run.task.cond_channels:
        raise UserError(f"the held-out inputs of {source} have {inputs.shape[1]} channel(s) but the run's inputs have "
                        f"{run.task.cond_channels}; save them as the training inputs are")
    return EvalData(train, test, train, f"{len(test.images)} held-out pairs of {train.name}"), inputs, source


def evaluate_task(run: Run, checkpoint, *, data: str | None = None, num: int = 1000, sampler: str | None = None,
                  steps: int | None = None, guidance: float | None = None, unconditional: bool = False,
                  nll_images: int = 100, seed: int = 0, batch_size: int = 256,
                  classifier: ClassifierConfig = ClassifierConfig(), strict_classifier: ClassifierConfig | None = None,
                  progress: bool = False) -> dict:
    """The report of an image-to-image run as a JSON-able dict (`evaluate.format_table` prints it).

    Args:
        run: the loaded run (its task is not none).
        data: the real data (default: the run's; for a --data-cond run a pairs set with held-out pairs).
        num: N, the test pairs scored (and the real images per FD reference set).
        sampler, steps, guidance: a diffusion run's sampling (default: the run's); refused for a direct run.
        nll_images: only says, when > 0, that no bits/dim is given.
        seed: the draw of the test pairs, their inpaint masks and the sampling noise.
        classifier, strict_classifier: the feature spaces of FD (image targets); None skips the strict one.
    """
    if unconditional:
        raise UserError("unconditional (--unconditional) is for class-conditional sampling; an image-to-image run is "
                        "conditioned on its input: drop it")
    if run.objective == "direct" and (sampler, steps, guidance) != (None, None, None):
        raise UserError(f"{checkpoint} was trained directly (--objective direct): no sampler, steps or guidance; "
                        f"drop --sampler, --steps and --guidance")
    kind = target_kind(run)
    real, inputs, source = test_pairs(run, data, progress)
    report = {"checkpoint": str(checkpoint), "step": run.step, "data": source, "num": num, "seed": seed,
              "reference": real.reference if real is not None else "none"}
    if nll_images:
        report["nll_unavailable"] = ("no bits/dim: a direct run (--objective direct) maps its input to one output "
                                     "and has no likelihood" if run.objective == "direct" else
                                     "no bits/dim: the bound of a conditional (task) run is not implemented; "
                                     "the task figures measure it")
    outputs_are = "the network's output (direct)" if run.objective == "direct" else \
        f"{sampler or run.sampler} {steps or run.steps} steps, one sample per input"
    report["task"] = {"name": run.task.name, "objective": run.objective, "targets": kind, "outputs": outputs_are}
    if real is None:
        figures = "pixel accuracy, IoU or Dice" if kind == "mask" else "PSNR, SSIM or FD"
        report["task_unavailable"] = (f"no {figures}: {source} has no held-out pairs (the run trained on all of "
                                      f"them); save some in it (test_inputs and test_targets in the .npz, test/inputs "
                                      f"and test/targets in a folder) or give --data PAIRS with them")
        return report
    check_reference(real.test, source, run.image_shape, num)

    # The test pairs: a seeded random draw, their conditions derived exactly as in training.
    order = torch.randperm(len(real.test.images), generator=torch.Generator().manual_seed(seed))
    chosen = split_real(order, num)[0]
    truth = real.test.images[chosen]                                                      # [N, C, H, W] uint8
    x = to_model_range(truth)                                                             # [N, C, H, W]
    if inputs is not None:  # pairs: the input follows the target on the channels, as in a training batch
        x = torch.cat([x, to_model_range(inputs[chosen])], dim=1)
    _, cond = split_batch(run.task, x, torch.Generator().manual_seed(seed))              # [N, Cc, H, W]
    started = time.perf_counter()
    outputs = run.sample_conditioned(cond, num, seed=seed, guidance=guidance, sampler=sampler, steps=steps,
                                     batch_size=batch_size, progress=progress)           # [N, C, H, W] in [-1, 1]
    report["task"].update(num=num, seconds=time.perf_counter() - started,
                          test=f"{num} random test {'pairs' if inputs is not None else 'images'} (seed {seed}), "
                               f"conditions derived as in training")

    if kind == "mask":
        classes = run.model.out_channels
        predicted = direct.target_classes(outputs, classes)                              # [N, H, W]
        target = direct.target_classes(to_model_range(truth), classes)                   # as the loss saw it
        report["segmentation"] = {**segmentation_scores(predicted, target, classes), "classes": classes}
        return report
    images = to_uint8(outputs)
    report["psnr"] = _mean_and_stderr(psnr(images, truth))
    if min(truth.shape[-2:]) >= SSIM_WINDOW:
        report["ssim"] = _mean_and_stderr(ssim(images, truth, SSIM_WINDOW))
    else:
        report["ssim_unavailable"] = (f"no SSIM: its {SSIM_WINDOW}x{SSIM_WINDOW} window needs images of at least "
                                      f"that size; these are {truth.shape[-1]}x{truth.shape[-2]}")
    if real.labelled.labels is not None and len(real.labelled.labels) > 0:
        report.update(feature_statistics(images, None, real, order, classifier, run.device, progress,
                                         strict_classifier, stand_in_is="truths of the outputs"))
    else:
        report["fd_unavailable"] = (f"no FD: {source} has no labels for the feature classifier to learn; give "
                                    f"labelled data (a folder with one subfolder per class, or an .npz with labels)")
    return report


def _mean_and_stderr(values: Tensor) -> dict:
    """{"mean", "stderr"} of per-image values [N] (stderr None for one image)."""
    stderr = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": values.mean().item(), "stderr": stderr, "num": len(values)}


def task_rows(report: dict) -> list[tuple[str, str, str]]:
    """The table rows of a task report's own figures (metric, value, notes)."""
    task, rows = report["task"], []
    test = task.get("test", "")
    window = f"{SSIM_WINDOW}x{SSIM_WINDOW} Gaussian window (Wang et al. 2004)"
    for key, name, unit, notes in (("psnr", "PSNR", " dB", f"outputs against their truth, {test}"),
                                   ("ssim", "SSIM", "", window)):
        if key in report:
            figure, digits = report[key], 2 if unit else 4
            stderr = f" ± {figure['stderr']:.{digits}f}" if figure["stderr"] is not None else ""
            rows.append((name, f"{figure['mean']:.{digits}f}{unit}{stderr}", notes))
    if report.get("ssim_unavailable"):
        rows.append(("SSIM", "-", report["ssim_unavailable"]))
    segmentation = report.get("segmentation")
    if segmentation:
        classes = "foreground" if segmentation["classes"] == 2 else f"mean of classes 1-{segmentation['classes'] - 1}"
        rows += [("pixel accuracy", f"{segmentation['accuracy']:.4f}", f"arg-max class against the target's, {test}"),
                 ("IoU", f"{segmentation['iou']:.4f}", f"{classes}, over all pixels"),
                 ("Dice", f"{segmentation['dice']:.4f}", f"{classes}, mean per image")]
    if report.get("task_unavailable"):
        rows.append(("task figures", "-", report["task_unavailable"]))
    return rows


def task_title(report: dict) -> str:
    """The table's first line for a task report."""
    task = report["task"]
    return (f"{report['checkpoint']} (step {report['step']}) | {task['name']}, {task['objective']} | data "
            f"{report['data']} | reference: {report['reference']} | outputs: {task['outputs']}, seed {report['seed']}")
