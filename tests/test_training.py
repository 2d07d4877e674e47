"""The main job end to end: few-step training per data source, resume, sampling, torchrun, CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffunet.cli import main
from diffunet.training import TrainConfig, batch_indices, learning_rate
from helpers import FAST, TINY

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_cli(*argv: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m diffunet.cli ARGV` in a fresh process; returns the completed process."""
    return subprocess.run([sys.executable, "-m", "diffunet.cli", *argv], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_train_builtin_writes_run_folder(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "3", "--save-every", "2", "--sample-every", "3",
                 *FAST, *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["steps"] == 3 and config["model"]["base_channels"] == 8
    assert config["model"]["num_classes"] == 10  # the built-in MNIST subset has labels
    for name in ("model.safetensors", "training_state.safetensors", "samples_000003.png",
                 "samples_latest.png", "metrics.jsonl"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
    grid = Image.open(out / "samples_latest.png")
    assert grid.mode == "L"  # grayscale stays one channel


def test_train_npz_and_folder_sources(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=rng.integers(0, 256, (16, 12, 20), dtype=np.uint8))
    assert main(["train", "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "a"),
                 "--steps", "2", *FAST, *TINY]) == 0
    folder = tmp_path / "images"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / label / f"{i}.png")
    assert main(["train", "--data", str(folder), "--image-size", "16", "--out", str(tmp_path / "b"),
                 "--steps", "2", *FAST, *TINY]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["image_shape"] == [3, 16, 16] and config["model"]["num_classes"] == 2


@pytest.mark.skipif(not (SHARED_DATA / "mnist.npz").exists(), reason="needs ../shared/data/mnist.npz")
def test_train_full_mnist_from_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUNET_DATA", str(SHARED_DATA))
    assert main(["train", "--data", "mnist", "--out", str(tmp_path / "m"), "--steps", "1", *FAST, *TINY]) == 0


def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch):
    common = ["--steps", "6", "--save-every", "2", "--sample-every", "100", *FAST, *TINY]
    assert main(["train", "--out", str(tmp_path / "straight"), *common]) == 0

    # Interrupt the second run right after the optimizer step of step 4 (the last save was at step 2).
    import diffunet.training as training
    real_update, calls = training.ema_update, {"n": 0}

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        real_update(*args, **kwargs)
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(training, "ema_update", crash_on_fourth)
    with pytest.raises(RuntimeError):
        main(["train", "--out", str(tmp_path / "resumed"), *common])
    monkeypatch.setattr(training, "ema_update", real_update)
    assert main(["train", "--out", str(tmp_path / "resumed"), "--resume", "--quiet"]) == 0

    for name in ("model.safetensors", "training_state.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_existing_run_needs_resume(tmp_path):
    assert main(["train", "--out", str(tmp_path / "r"), "--steps", "1", *FAST, *TINY]) == 0
    assert main(["train", "--out", str(tmp_path / "r"), "--steps", "1", *FAST, *TINY]) == 1


def test_sample_from_saved_run_needs_no_architecture_flags(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "2", *FAST, *TINY]) == 0
    result = run_cli("sample", "--checkpoint", str(run), "--num", "5", "--steps", "3", "--seed", "1",
                     "--out", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "s.npz"),
                     "--out-dir", str(tmp_path / "each"), "--batch-size", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    samples = np.load(tmp_path / "s.npz")["samples"]
    assert samples.shape == (5, 28, 28) and samples.dtype == np.uint8
    assert len(list((tmp_path / "each").glob("*.png"))) == 5
    # Per-image seeds: the first two images are the same when drawn in a batch of 5.
    again = run_cli("sample", "--checkpoint", str(run), "--num", "2", "--steps", "3", "--seed", "1",
                    "--out", str(tmp_path / "g2.png"), "--npz", str(tmp_path / "s2.npz"), "--no-progress")
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "s2.npz")["samples"], samples[:2])


def test_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png at all")
    assert_one_line_error(run_cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")))
    assert_one_line_error(run_cli("train", "--data", str(empty), "--out", str(tmp_path / "o")))
    assert_one_line_error(run_cli("train", "--data", str(bad), "--out", str(tmp_path / "o")), "x.png")
    assert_one_line_error(run_cli("train", "--prediction", "noise"), "--prediction")
    assert_one_line_error(run_cli("train", "--steps", "0"), "--steps")
    assert_one_line_error(run_cli("train", "--no-such-flag"), "--no-such-flag")
    assert_one_line_error(run_cli("sample", "--checkpoint", str(empty)))
    assert_one_line_error(run_cli("sample", "--checkpoint", str(tmp_path / "nope")))


def test_learning_rate_and_data_order():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0)
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 10) == pytest.approx(1.0) and learning_rate(cfg, 55) == pytest.approx(0.5)
    # Each epoch visits every image once; the order depends on the seed and the epoch.
    epoch = torch.cat([batch_indices(20, 5, p, seed=0) for p in range(4)])
    assert sorted(epoch.tolist()) == list(range(20))
    assert not torch.equal(batch_indices(20, 5, 4, seed=0), batch_indices(20, 5, 0, seed=0))
    assert torch.equal(batch_indices(20, 5, 6, seed=3), batch_indices(20, 5, 6, seed=3))


def test_torchrun_two_processes(tmp_path):
    """The same command under torchrun trains with DDP (gloo on CPU); rank 0 alone writes files."""
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         str(REPO / "train.py"), "--out", str(out), "--steps", "3", "--device", "cpu", *FAST, *TINY],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_file(out / "training_state.safetensors")
    assert any("noise" in key for key in state)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3
