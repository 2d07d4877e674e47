"""`diffunet eval` on image-to-image runs (diffunet/task_eval.py): the metrics against closed forms and hand
counts, held-out pairs, the figures of diffusion and direct runs recomputed from their test pairs, the
one-line notes for what cannot be given; and `diffunet sample --cond` at other sizes on direct runs."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffunet import direct, metrics
from diffunet.cli import main
from diffunet.data import BUILTIN_FILE
from diffunet.errors import DataError
from diffunet.evaluate import evaluate, format_table
from diffunet.images import to_model_range, to_uint8
from diffunet.pairs import has_test_pairs, load_pairs
from diffunet.run import load_run
from diffunet.tasks import random_masks, masked_condition, shrink_and_restore
from helpers import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
BUILTIN = np.load(BUILTIN_FILE)
REPO = Path(__file__).resolve().parents[1]
QUICK = ["--batch-size", "8", "--num-samples", "4", "--sample-steps", "2", "--quiet", "--device", "cpu"]
DIRECT = ["--objective", "direct", "--preset", "ronneberger2015", "--model-base-channels", "8",
          "--model-channel-mults", "1,2", "--lr", "1e-2", "--lr-schedule", "constant", "--warmup-steps", "0"]


def stroke_pairs(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 12x12 noisy pictures and their 0 / 255 masks (the bright pixels)."""
    masks = rng.random((count, 12, 12)) < 0.3
    inputs = np.clip(masks * 170 + rng.normal(40, 30, masks.shape), 0, 255).astype(np.uint8)
    return inputs, (masks * 255).astype(np.uint8)


def last_error(capsys) -> str:
    """The one stderr line of a failed command (asserting it is one line, without a traceback)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Digits with a test split, stroke pairs with and without held-out pairs, and a trained direct run."""
    folder = tmp_path_factory.mktemp("task_eval")
    x, y = BUILTIN["images"], BUILTIN["labels"]
    np.savez(folder / "digits.npz", x_train=x[:600], y_train=y[:600], x_test=x[600:800], y_test=y[600:800])
    rng = np.random.default_rng(0)
    inputs, targets = stroke_pairs(64, rng)
    test_inputs, test_targets = stroke_pairs(24, rng)
    np.savez(folder / "pairs.npz", inputs=inputs, targets=targets, test_inputs=test_inputs, test_targets=test_targets)
    np.savez(folder / "train_only.npz", inputs=inputs, targets=targets)
    assert main(["train", "--data-cond", str(folder / "pairs.npz"), "--out", str(folder / "segment"), "--steps",
                 "40", *DIRECT, *QUICK]) == 0
    return folder


@pytest.fixture(scope="module")
def superres(work) -> Path:
    """A 2-step diffusion run of --task superres:4 on the 28x28 digits."""
    out = work / "superres"
    assert main(["train", "--data", str(work / "digits.npz"), "--task", "superres:4", "--no-class-conditional",
                 "--out", str(out), "--steps", "2", *TINY, *QUICK]) == 0
    return out


# ---- the metrics ------------------------------------------------------------------------------

def test_psnr_and_ssim_follow_their_closed_forms_and_the_benchmark_uses_them():
    flat = torch.full((2, 3, 16, 24), 51, dtype=torch.uint8)
    brighter = torch.full((2, 3, 16, 24), 102, dtype=torch.uint8)
    c1 = 0.01 ** 2                                              # constant 0.2 and 0.4: no variance, only the means
    torch.testing.assert_close(metrics.ssim(flat, brighter), torch.full((2,), (2 * 0.08 + c1) / (0.2 + c1),
                                                                       dtype=torch.float64))
    noise = torch.randint(0, 256, (2, 1, 16, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(metrics.ssim(noise, noise), torch.ones(2, dtype=torch.float64))
    a = torch.full((2, 1, 16, 16), 255, dtype=torch.uint8)
    a[..., ::2] = 0                                             # columns 0 / 1: mean 0.5, variance 0.25
    b = torch.where(a > 0, torch.tensor(204, dtype=torch.uint8), torch.tensor(51, dtype=torch.uint8))  # 0.8 / 0.2
    assert metrics.psnr(a, b).tolist() == pytest.approx([10 * math.log10(1 / 0.04)] * 2)
    # The window's weighted mean of a column pattern is not 0.5 exactly; compute the local statistics by hand.
    window = metrics.gaussian_window()
    columns = (torch.arange(16) % 2).double()                   # 1 where a is white
    x = columns[None].expand(16, 16)
    mu = sum(window[i, j] * x[i:i + 6, j:j + 6] for i in range(11) for j in range(11))     # [6, 6]
    var = sum(window[i, j] * x[i:i + 6, j:j + 6] ** 2 for i in range(11) for j in range(11)) - mu ** 2
    mu_b, var_b, cov = 0.2 + 0.6 * mu, 0.36 * var, 0.6 * var
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = ((2 * mu * mu_b + c1) * (2 * cov + c2) / ((mu ** 2 + mu_b ** 2 + c1) * (var + var_b + c2))).mean()
    assert metrics.ssim(a, b).tolist() == pytest.approx([expected.item()] * 2, rel=1e-9)
    assert metrics.ssim(a, a).tolist() == pytest.approx([1.0, 1.0]) and metrics.psnr(a, a)[0] == pytest.approx(100)
    assert window.sum().item() == pytest.approx(1.0) and window.shape == (11, 11) and window[5, 5] == window.max()
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[..., :8], b[..., :8])
    spec = importlib.util.spec_from_file_location("task_quality", REPO / "benchmarks" / "task_quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    assert quality.psnr is metrics.psnr and quality.ssim is metrics.ssim          # one piece of code


def test_segmentation_scores_match_a_hand_count():
    truth = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[2, 2, 1], [0, 1, 0]]])
    predicted = torch.tensor([[[1, 0, 0], [0, 1, 0]], [[0, 0, 0], [0, 0, 0]], [[2, 1, 1], [0, 0, 0]]])
    two = metrics.segmentation_scores((predicted > 0).long(), (truth > 0).long())
    # foreground: image 0 P n T = 1 pixel, |P| + |T| = 2 + 2; image 1 empty; image 2 3 pixels of 3 + 4; 3 wrong.
    assert two["accuracy"] == pytest.approx(15 / 18)
    assert two["iou"] == pytest.approx((1 + 3) / ((4 - 1) + (7 - 3))) and two["dice"] == pytest.approx(
        (2 / 4 + 1 + 6 / 7) / 3)
    three = metrics.segmentation_scores(predicted, truth, 3)
    iou1, iou2 = 2 / 6, 1 / 2                     # class 1: 1 of 2 + 2 in images 0 and 2; class 2: 1 of 1 + 2
    dice1 = (2 / 4 + 1 + 2 / 4) / 3               # image 1 has neither: Dice 1
    dice2 = (1 + 1 + 2 / 3) / 3                   # class 2 only in image 2
    assert three["iou_per_class"] == pytest.approx([iou1, iou2]) and three["iou"] == pytest.approx((iou1 + iou2) / 2)
    assert three["dice_per_class"] == pytest.approx([dice1, dice2]) and three["accuracy"] == pytest.approx(14 / 18)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        metrics.segmentation_scores(predicted[0], truth)


# ---- held-out pairs ---------------------------------------------------------------------------

def test_pairs_sets_have_a_test_split_in_npz_and_folders(work, tmp_path):
    targets, inputs = load_pairs(work / "pairs.npz", split="test", progress=False)
    assert tuple(targets.images.shape) == (24, 1, 12, 12) and tuple(inputs.shape) == (24, 1, 12, 12)
    assert len(load_pairs(work / "pairs.npz", progress=False)[0].images) == 64        # training ignores the test part
    assert has_test_pairs(work / "pairs.npz") and not has_test_pairs(work / "train_only.npz")
    with pytest.raises(DataError, match="no held-out pairs; save them in it as arrays test_inputs and test_targets"):
        load_pairs(work / "train_only.npz", split="test")
    for part in ("inputs", "targets", "test/inputs", "test/targets"):
        (tmp_path / part).mkdir(parents=True)
        for i in range(3 if part.startswith("test") else 5):
            Image.fromarray(np.full((8, 6), 40 * i, np.uint8)).save(tmp_path / part / f"{i}.png")
    assert has_test_pairs(tmp_path) and len(load_pairs(tmp_path, split="test", progress=False)[1]) == 3
    assert len(load_pairs(tmp_path, progress=False)[1]) == 5
    assert not has_test_pairs(tmp_path / "test")


# ---- eval on a direct segmentation run ----------------------------------------------------------

def test_eval_direct_run_reports_accuracy_iou_and_dice_of_its_held_out_masks(work, capsys):
    run = load_run(work / "segment")
    assert run.objective == "direct" and run.model.out_channels == 2
    assert main(["eval", "--checkpoint", str(work / "segment"), "--num", "24", "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads((work / "segment" / "eval.json").read_text())
    assert report["task"]["targets"] == "mask" and report["task"]["objective"] == "direct"
    assert report["reference"] == "24 held-out pairs of pairs"
    assert "samples" not in report and "nll" not in report and "fd" not in report   # no sampler, no likelihood
    assert "direct" in report["nll_unavailable"]
    # All 24 held-out pairs: the figures are the network's own arg-max masks scored by hand.
    targets, inputs = load_pairs(work / "pairs.npz", split="test", progress=False)
    predicted = direct.target_classes(run.sample(24, cond=inputs), 2)
    truth = targets.images[:, 0] >= 128
    both, sizes = (predicted.bool() & truth).flatten(1).sum(1), predicted.flatten(1).sum(1) + truth.flatten(1).sum(1)
    segmentation = report["segmentation"]
    assert segmentation["accuracy"] == pytest.approx((predicted.bool() == truth).double().mean().item())
    assert segmentation["iou"] == pytest.approx((both.sum() / (sizes.sum() - both.sum())).item())
    assert segmentation["dice"] == pytest.approx((2 * both / sizes).double().mean().item())
    assert segmentation["accuracy"] > 0.85 and segmentation["iou"] > 0.5          # it learnt (measured: 0.92, 0.71)
    for words in ("pixel accuracy", "IoU", "Dice", "foreground", "no bits/dim"):
        assert words in table
    assert format_table(report) in table
    python = evaluate(work / "segment", num=10, seed=3)                              # the Python API: a draw of 10
    assert python["task"]["num"] == 10 and python["segmentation"]["accuracy"] != segmentation["accuracy"]


def test_eval_direct_run_refuses_sampler_flags_and_says_when_pairs_have_no_held_out_part(work, capsys):
    base = ["eval", "--checkpoint", str(work / "segment"), "--no-progress"]
    for flags, words in [(["--steps", "4"], "drop --sampler, --steps and --guidance"),
                         (["--sampler", "ddim"], "trained directly (--objective direct)"),
                         (["--unconditional"], "conditioned on its input: drop it"),
                         (["--num", "25"], "num (--num) must be in 2..24")]:
        assert main([*base, *flags]) == 1
        assert words in last_error(capsys)
    out = work / "no_test"
    assert main(["train", "--data-cond", str(work / "train_only.npz"), "--out", str(out), "--steps", "1", *DIRECT,
                 *QUICK]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert "segmentation" not in report and report["task_unavailable"].startswith(
        "no pixel accuracy, IoU or Dice: ") and "has no held-out pairs" in report["task_unavailable"]
    assert report["task_unavailable"] in table and "\n" not in report["task_unavailable"]
    assert main(["eval", "--checkpoint", str(out), "--no-progress", "--num", "24", "--data", str(work / "pairs.npz"),
                 "--out", str(out / "given.json")]) == 0                             # held-out pairs given with --data
    assert "segmentation" in json.loads((out / "given.json").read_text())


# ---- eval on diffusion and direct image runs --------------------------------------------------

def test_eval_superres_diffusion_run_gives_psnr_ssim_and_fd_of_seeded_test_pairs(superres, work, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUNET_DATA", str(work / "cache"))
    out = superres
    argv = ["eval", "--checkpoint", str(out), "--num", "30", "--classifier-steps", "20", "--strict-classifier-steps",
            "0", "--steps", "2", "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["task"]["targets"] == "image" and report["reference"] == "digits test split"
    assert report["task"]["outputs"] == "heun 2 steps, one sample per input" and "memorisation" not in report
    # The same test draw by hand: the first 30 of the seed's order, shrunk as in training, sampled per image seed.
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    truth = torch.from_numpy(BUILTIN["images"][600:800][order[:30].numpy()])[:, None]
    run = load_run(out)
    outputs = to_uint8(run.sample_conditioned(shrink_and_restore(to_model_range(truth), 4), 30, steps=2))
    assert report["psnr"]["mean"] == pytest.approx(metrics.psnr(outputs, truth).mean().item(), rel=1e-9)
    assert report["ssim"]["mean"] == pytest.approx(metrics.ssim(outputs, truth).mean().item(), rel=1e-9)
    assert report["psnr"]["stderr"] > 0 and report["psnr"]["num"] == 30
    fd = report["fd"]
    assert fd["value"] > 0 and fd["floor"] > 0 and fd["floor_sets"].startswith("30 truths of the outputs vs 4")
    assert "fd_strict" not in report and "conditional (task) run" in report["nll_unavailable"]
    for words in ("PSNR", "SSIM", "FD (floor)", " dB ± "):
        assert words in table
    assert main([*argv, "--seed", "1", "--out", str(out / "seed1.json")]) == 0
    assert json.loads((out / "seed1.json").read_text())["psnr"] != report["psnr"]    # another draw
    assert main([*argv, "--out", str(out / "again.json")]) == 0
    assert json.loads((out / "again.json").read_text())["psnr"] == report["psnr"]    # deterministic


def test_eval_direct_inpaint_run_scores_masks_drawn_from_the_seed_and_notes_missing_labels(work, capsys):
    np.savez(work / "plain.npz", x_train=BUILTIN["images"][:200], x_test=BUILTIN["images"][200:260])  # no labels
    out = work / "inpaint"
    assert main(["train", "--data", str(work / "plain.npz"), "--task", "inpaint", "--out", str(out), "--steps", "3",
                 *DIRECT, "--model-out-channels", "1", *QUICK]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--num", "20", "--seed", "5", "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["task"]["targets"] == "image" and "has no labels" in report["fd_unavailable"]
    assert "fd" not in report and "no FD" in table
    order = torch.randperm(60, generator=torch.Generator().manual_seed(5))
    truth = torch.from_numpy(BUILTIN["images"][200:260][order[:20].numpy()])[:, None]
    keep = random_masks(20, 28, 28, torch.Generator().manual_seed(5))               # training's masks, seed 5
    outputs = to_uint8(direct.predict(load_run(out).model, masked_condition(to_model_range(truth), keep), 1))
    assert report["psnr"]["mean"] == pytest.approx(metrics.psnr(outputs, truth).mean().item(), rel=1e-9)


# ---- sample --cond at other sizes ---------------------------------------------------------------

def test_sample_cond_on_a_direct_run_takes_any_size(work, tmp_path):
    run = load_run(work / "segment")
    picture = np.random.default_rng(1).integers(0, 256, (16, 21), dtype=np.uint8)  # trained on 12x12
    Image.fromarray(picture).save(tmp_path / "wide.png")
    assert main(["sample", "--checkpoint", str(work / "segment"), "--cond", str(tmp_path / "wide.png"), "--out",
                 str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each"), "--no-progress"]) == 0
    written = np.array(Image.open(tmp_path / "each" / "wide.png"))
    expected = run.sample(1, cond=torch.from_numpy(picture)[None, None])             # the Python API, same size
    assert written.shape == (16, 21) and expected.shape == (1, 1, 16, 21)
    assert np.array_equal(written, to_uint8(expected)[0, 0].numpy())
    whole = direct.predict(run.model, to_model_range(torch.from_numpy(picture))[None, None], 1)
    assert torch.equal(expected, whole)                                               # overlap-tile at 16x21


def test_sample_cond_on_a_direct_superres_run_at_another_size_upsamples_by_the_factor(work, tmp_path):
    out = work / "superres_direct"
    assert main(["train", "--data", str(work / "digits.npz"), "--task", "superres:4", "--out", str(out),
                 "--steps", "1", *DIRECT, "--model-out-channels", "1", *QUICK]) == 0
    run = load_run(out)
    small = torch.from_numpy(BUILTIN["images"][:2, ::3, ::2].copy())[:, None]       # 10x14: not 7x7 or 28x28
    assert run.sample(2, cond=small).shape == (2, 1, 40, 56)
    full = torch.from_numpy(BUILTIN["images"][:2])[:, None]                          # the training size: shrunk first
    low = shrink_and_restore(to_model_range(full), 4)[..., ::4, ::4]                 # its 7x7 block means
    assert torch.equal(run.sample(2, cond=full), run.sample(2, cond=low))


def test_sample_cond_on_a_diffusion_run_at_another_size_names_the_size_it_needs(superres, tmp_path, capsys):
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "odd.png")
    assert main(["sample", "--checkpoint", str(superres), "--cond", str(tmp_path / "odd.png"), "--out",
                 str(tmp_path / "grid.png"), "--no-progress"]) == 1
    line = last_error(capsys)
    assert "inputs must be 28x28 or 7x7 (width x height); got 20x16: resize the input" in line


def test_sample_cond_with_a_mask_on_a_direct_inpaint_run_at_another_size(work, tmp_path):
    out = work / "inpaint_direct_any_size"
    assert main(["train", "--data", str(work / "digits.npz"), "--task", "inpaint", "--out", str(out), "--steps", "1",
                 *DIRECT, "--model-out-channels", "1", *QUICK]) == 0
    picture = BUILTIN["images"][0][4:20, 2:22].copy()                                # 20x16 of a 28x28 digit
    keep = np.zeros((16, 20), np.uint8)
    keep[:, :10] = 255                                                                # keep the left half
    Image.fromarray(picture).save(tmp_path / "image.png")
    Image.fromarray(keep).save(tmp_path / "keep.png")
    assert main(["sample", "--checkpoint", str(out), "--cond", str(tmp_path / "image.png"), "--mask",
                 str(tmp_path / "keep.png"), "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each"),
                 "--no-progress"]) == 0
    written = np.array(Image.open(tmp_path / "each" / "image.png"))
    expected = load_run(out).sample(1, cond=torch.from_numpy(picture)[None, None],
                                    mask=torch.from_numpy(keep >= 128)[None, None])
    assert written.shape == (16, 20) and np.array_equal(written, to_uint8(expected)[0, 0].numpy())
