"""`diffunet eval`: how good is a trained denoiser? Likelihood, sample quality and memorisation, with
the baselines needed to read them.

    bits/dim      test-set NLL bound (likelihood.py) with its standard error across images
    FD (floor)    Fréchet distance between N samples and N real test images in the features of the
                  package's own classifier (features.py), next to the same distance from another
                  N real test images: the floor that sampling noise alone gives at that N. Both are
                  means over up to 4 disjoint reference sets
    FD strict     the same FD in a second, harder-to-please feature space: a LeNet-5-style network
                  trained on randomly shifted images (features.STRICT_CLASSIFIER); read both
    entropy       entropy of the classifier's class histogram of the samples (and of real images)
    memorisation  fraction of samples nearer a training image than 99% of real test images are

Which real images (a seeded random draw of the test split, never a block of it) is reference.py's
policy. An image-to-image run (a --task or --data-cond run, diffusion or direct) is scored on held-out
test pairs instead: PSNR, SSIM and FD of its outputs, or IoU, Dice and pixel accuracy of a direct run's
masks (task_eval.py).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

import samplers

from .atomic import atomic_write_text
from .images import to_uint8
from .errors import UserError
from .features import STRICT_CLASSIFIER, ClassifierConfig, memorisation_rate, nearest_distances
from .generate import generate
from .likelihood import nll_bits_per_dim
from .reference import MAX_REFERENCES, EvalData, check_reference, eval_data, feature_statistics, split_real
from .run import load_run
from .task_eval import evaluate_task, task_rows, task_title
from .training import pick_device

MEMORISATION_QUANTILE = 0.01   # share of real test images under the memorisation threshold
__all__ = ["evaluate", "format_table", "add_eval_arguments", "run_eval",
           "MAX_REFERENCES", "eval_data", "split_real"]   # the last three: reference.py's, for older imports


def evaluate(checkpoint: str | Path, *, data: str | None = None, num: int = 1000, sampler: str | None = None,
             steps: int | None = None, guidance: float | None = None, unconditional: bool = False,
             nll_images: int = 100, nll_timesteps: int | None = None, seed: int = 0, batch_size: int = 256,
             classifier: ClassifierConfig = ClassifierConfig(),
             strict_classifier: ClassifierConfig | None = STRICT_CLASSIFIER, device: str | torch.device = "cpu",
             progress: bool = False) -> dict:
    """Evaluate a run; returns the report as a JSON-able dict (see format_table for its reading).

    Args:
        checkpoint: run folder or model.safetensors.
        data: the real data (default: the run's training data).
        num: N, samples for FD, entropy and memorisation (and real images per FD set); for an image-to-image
            run, the test pairs scored (task_eval.py).
        sampler, steps, guidance: how to sample (default: the run's grid settings).
        unconditional: sample a class-conditional model without labels (default: labels i % classes).
        nll_images: test images for the likelihood (0 skips it); nll_timesteps: forwards per image
            (None = every timestep, exact; fewer = stratified, unbiased estimate).
        seed: seeds the samples, the likelihood noise and the draw of the real test images.
        classifier: the feature classifier's config (its steps mostly; cached per config and data).
        strict_classifier: the second, stricter feature space's ("fd_strict"); None skips it.
    """
    device = torch.device(device)
    run = load_run(checkpoint, device=device)
    if run.task.kind != "none":  # image to image: the task's own figures on held-out test pairs (task_eval.py)
        return evaluate_task(run, checkpoint, data=data, num=num, sampler=sampler, steps=steps, guidance=guidance,
                             unconditional=unconditional, nll_images=nll_images, seed=seed, batch_size=batch_size,
                             classifier=classifier, strict_classifier=strict_classifier, progress=progress)
    model, train_config, image_shape = run.model, run.train_config, run.image_shape
    source = data or train_config.get("data") or run.data_name
    real = eval_data(source, train_config, progress)
    check_reference(real.test, source, image_shape, num)
    if not 0 <= nll_images <= len(real.test.images):
        raise UserError(f"nll_images (--nll-images) must be in 0..{len(real.test.images)}; got {nll_images}")
    schedule, prediction = run.schedule, run.prediction
    sampler, steps = sampler or run.sampler, steps or run.steps
    if sampler not in samplers.SAMPLERS or not 1 <= steps <= schedule.num_timesteps:
        raise UserError(f"sampler (--sampler) must be one of {', '.join(samplers.SAMPLERS)} and steps (--steps) in "
                        f"1..{schedule.num_timesteps}; got {sampler!r} with {steps} steps")
    if nll_timesteps is not None and not 2 <= nll_timesteps <= schedule.num_timesteps:
        raise UserError(f"nll_timesteps (--nll-timesteps) must be in 2..{schedule.num_timesteps} (this run's T); "
                        f"got {nll_timesteps}")
    num_classes = run.num_classes
    report = {"checkpoint": str(checkpoint), "step": run.step, "data": source,
              "reference": real.reference, "num": num, "seed": seed}
    order = torch.randperm(len(real.test.images), generator=torch.Generator().manual_seed(seed))  # the real draws

    # Likelihood: the unconditional branch when training dropped labels, else conditioned on the test label.
    # The bound is the discrete-time ELBO of Ho et al. 2020, which a continuous flow path does not have.
    if nll_images and not hasattr(schedule, "betas"):
        report["nll_unavailable"] = (f"no bits/dim: the {schedule.to_dict()['kind']} path has no discrete-time "
                                     "ELBO here (its likelihood needs the ODE's divergence, not implemented)")
    elif nll_images:
        started = time.perf_counter()
        conditional = bool(num_classes) and not train_config.get("label_dropout", 0) > 0
        if conditional and real.test.labels is None:
            raise UserError("this model was trained without label dropout, so its likelihood needs labels, "
                            "and the reference data have none; give --data with labels or --nll-images 0")
        chosen = order[:nll_images]
        result = nll_bits_per_dim(model, real.test.images[chosen], schedule, prediction,
                                  labels=real.test.labels[chosen] if conditional else None,
                                  timesteps_per_image=nll_timesteps, batch_size=batch_size, seed=seed,
                                  device=device, progress=progress)
        report["nll"] = {"bits_per_dim": result.bits_per_dim, "stderr": _finite(result.stderr),
                         "num_images": result.num_images, "timesteps_per_image": result.timesteps_per_image,
                         "num_timesteps": schedule.num_timesteps, "prior_bits_per_dim": result.prior_bits_per_dim,
                         "decoder_bits_per_dim": result.decoder_bits_per_dim,
                         "conditioning": "label" if conditional else "none",
                         "seconds": time.perf_counter() - started}

    # Samples: one class per image in turn for a class-conditional model, with the run's guidance.
    started = time.perf_counter()
    labels = torch.arange(num) % num_classes if num_classes and not unconditional else None
    guidance = (guidance if guidance is not None else run.guidance) if labels is not None else 1.0
    samples = to_uint8(generate(model, schedule, num, image_shape, sampler=sampler, steps=steps,
                                prediction=prediction, labels=labels, guidance=guidance, seed=seed,
                                batch_size=batch_size, device=device, progress=progress))
    report["samples"] = {"num": num, "sampler": sampler, "steps": steps, "guidance": guidance,
                         "labels": "balanced" if labels is not None else "none",
                         "seconds": time.perf_counter() - started}
    if real.labelled.labels is not None and len(real.labelled.labels) > 0:
        report.update(feature_statistics(samples, labels, real, order, classifier, device, progress,
                                          strict_classifier))
    else:
        report["fd_unavailable"] = (f"no FD, class entropy or label agreement: {source} has no labels for the feature "
                                    "classifier to learn; give a folder with one subfolder per class (or an .npz "
                                    "with labels)")
    report["memorisation"] = _memorisation(samples, real, order[:num])
    return report

def _memorisation(samples: torch.Tensor, real: EvalData, calibration: torch.Tensor) -> dict:
    """Nearest training image in pixel space, with the threshold calibrated on the test images `calibration`."""
    started = time.perf_counter()
    sample_nearest = nearest_distances(samples, real.train.images)
    real_nearest = nearest_distances(real.test.images[calibration], real.train.images)
    rate, threshold = memorisation_rate(sample_nearest, real_nearest, MEMORISATION_QUANTILE)
    return {"rate": rate, "real_rate": (real_nearest < threshold).double().mean().item(), "threshold": threshold,
            "quantile": MEMORISATION_QUANTILE, "median_nearest_samples": sample_nearest.median().item(),
            "median_nearest_real": real_nearest.median().item(), "train_images": len(real.train.images),
            "seconds": time.perf_counter() - started}


def format_table(report: dict) -> str:
    """The report as a small aligned table: metric, value, what to compare it with."""
    rows = [("metric", "value", "notes")] + (task_rows(report) if "task" in report else [])
    nll = report.get("nll")
    if nll:
        stderr = f" ± {nll['stderr']:.3f}" if nll["stderr"] is not None else ""
        how = "every timestep" if nll["timesteps_per_image"] == nll["num_timesteps"] else \
            f"{nll['timesteps_per_image']} of {nll['num_timesteps']} timesteps, stratified"
        rows.append(("bits/dim (NLL bound)", f"{nll['bits_per_dim']:.3f}{stderr}",
                     f"{nll['num_images']} test images, {how}; prior {nll['prior_bits_per_dim']:.4f}, "
                     f"decoder {nll['decoder_bits_per_dim']:.3f}"))
    if report.get("nll_unavailable"):
        rows.append(("bits/dim (NLL bound)", "-", report["nll_unavailable"]))
    fd = report.get("fd")
    if fd:
        ratio = f", {fd['ratio']:.2f}x floor" if fd["ratio"] is not None else ""
        rows.append(("FD (floor)", f"{fd['value']:.3f} ({fd['floor']:.3f})",
                     f"N = {fd['num']}{ratio}; floor = {fd['floor_sets']}"))
        entropy = report["entropy"]
        rows.append(("class entropy (bits)", f"{entropy['samples_bits']:.3f}",
                     f"real {entropy['real_bits']:.3f}, max {entropy['max_bits']:.3f}"))
        if entropy["label_agreement"] is not None:
            rows.append(("label agreement", f"{entropy['label_agreement']:.1%}",
                         "samples the classifier puts in their conditioning class"))
        accuracy = report["classifier"]["reference_accuracy"]
        if accuracy is not None:
            rows.append(("classifier accuracy", f"{accuracy:.1%}", f"on the {fd['num']} reference images"))
    strict = report.get("fd_strict")
    if strict:
        ratio = f", {strict['ratio']:.2f}x floor" if strict["ratio"] is not None else ""
        accuracy = report["classifier_strict"]["reference_accuracy"]
        rows.append(("FD strict (floor)", f"{strict['value']:.3f} ({strict['floor']:.3f})",
                     f"N = {strict['num']}{ratio}; LeNet-5 features trained on +-{report['classifier_strict']['shift']} "
                     f"px shifts" + (f", {accuracy:.1%} accurate" if accuracy is not None else "")))
    if report.get("fd_unavailable"):
        rows.append(("FD (floor)", "-", report["fd_unavailable"]))
    if "task" in report:  # an image-to-image run: its figures head the table; no memorisation
        title = task_title(report)
    else:
        memo, samples = report["memorisation"], report["samples"]
        rows.append(("memorisation", f"{memo['rate']:.1%}",
                     f"real test {memo['real_rate']:.1%}; nearest of {memo['train_images']} training images "
                     f"closer than L2 {memo['threshold']:.2f}"))
        title = (f"{report['checkpoint']} (step {report['step']}) | data {report['data']} | reference: "
                 f"{report['reference']} | samples: {samples['sampler']} {samples['steps']} steps, "
                 f"guidance {samples['guidance']}, seed {report['seed']}")
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [title] + [f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}" for row in rows]
    return "\n".join(lines)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The `diffunet eval` flags."""
    parser.add_argument("--checkpoint", required=True, help="run folder or model.safetensors")
    parser.add_argument("--data", default=None, help="real data to compare with (default: the run's; for a --data-cond "
                        "run, a pairs set with held-out pairs)")
    parser.add_argument("--num", type=int, default=1000, help="N: samples, and real images per FD set; for an image-to-"
                        "image run, the test pairs scored (default: 1000)")
    parser.add_argument("--sampler", default=None, help="ddpm | ddim | dpmpp_2m | euler | heun (default: the run's)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the run's)")
    parser.add_argument("--unconditional", action="store_true", help="sample a class-conditional model without labels")
    parser.add_argument("--nll-images", type=int, default=100, help="test images for bits/dim; 0 skips (default: 100)")
    parser.add_argument("--nll-timesteps", type=int, default=None,
                        help="forwards per image for bits/dim (default: all T, exact; fewer: stratified estimate)")
    parser.add_argument("--classifier-steps", type=int, default=ClassifierConfig.steps,
                        help=f"training steps of the feature classifier (default: {ClassifierConfig.steps})")
    parser.add_argument("--strict-classifier-steps", type=int, default=STRICT_CLASSIFIER.steps,
                        help=f"training steps of the stricter second feature network, 0 = skip its FD "
                             f"(default: {STRICT_CLASSIFIER.steps})")
    parser.add_argument("--seed", type=int, default=0, help="seeds the samples and the likelihood noise")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward batch")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--out", default=None, help="JSON report (default: eval.json next to the checkpoint)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def run_eval(args: argparse.Namespace) -> None:
    """`diffunet eval`: evaluate, print the table, write the JSON report atomically."""
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive; got {args.batch_size}")
    report = evaluate(args.checkpoint, data=args.data, num=args.num, sampler=args.sampler, steps=args.steps,
                      guidance=args.guidance, unconditional=args.unconditional, nll_images=args.nll_images,
                      nll_timesteps=args.nll_timesteps, seed=args.seed, batch_size=args.batch_size,
                      classifier=ClassifierConfig(steps=args.classifier_steps),
                      strict_classifier=replace(STRICT_CLASSIFIER, steps=args.strict_classifier_steps)
                      if args.strict_classifier_steps else None, device=pick_device(args.device),
                      progress=args.progress)
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {out}")


def _finite(value: float) -> float | None:
    """value, or None where it is nan or infinite (JSON has no nan)."""
    return value if math.isfinite(value) else None
