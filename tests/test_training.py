"""The main job end to end: few-step training per data source, resume, sampling, torchrun, CLI errors."""
from __future__ import annotations

import hashlib
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
from diffunet.checkpoint import load_training_state
from diffunet.errors import CheckpointError
from diffunet.training import TrainConfig, batch_indices, learning_rate, resume_config, train
from ddp_worker import TINY_MODEL as WORKER_MODEL
from helpers import FAST, TINY, write_tiny_npz

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


def _worker(out: Path, data: Path, batch_size: int, steps: int, mode: str, processes: int) -> dict[int, dict]:
    """Run tests/ddp_worker.py on `processes` gloo processes (torchrun) or alone; returns each rank's record."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29531"]
    result = subprocess.run(
        [sys.executable, *(launcher if processes > 1 else []), str(REPO / "tests" / "ddp_worker.py"), str(out),
         str(data), str(batch_size), str(steps), mode], capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)}


def test_torchrun_two_processes_match_one_at_twice_the_batch(tmp_path):
    """Two gloo processes at batch 16 train the weights of one process at batch 32 (with each image's noise a
    function of the image, see ddp_worker.py): DDP averages the ranks' gradients, each rank takes a disjoint
    half of the global batch, and the logged loss is the mean over ranks. Dropout's RNG differs per rank. Resuming the
    two-process run in one process is refused with the fix."""
    data = write_tiny_npz(tmp_path / "data.npz", 64)
    two = _worker(tmp_path / "two", data, 16, 3, "train", processes=2)
    one = _worker(tmp_path / "one", data, 32, 3, "train", processes=1)
    for step, (half0, half1, whole) in enumerate(zip(two[0]["images"], two[1]["images"], one[0]["images"])):
        assert len(half0) == len(half1) == 16 and not set(half0) & set(half1), step      # disjoint shards
        assert sorted(half0 + half1) == sorted(whole), step                              # that make the batch
    assert len(two[0]["images"]) == 3 and two[0]["rng"] != two[1]["rng"]               # per-rank dropout RNG
    a, b = (load_file(tmp_path / run / "training_state.safetensors") for run in ("two", "one"))
    weights = [key for key in a if key.startswith("model")]
    assert weights and a.keys() - {k for k in a if "rank_" in k} == b.keys()
    worst = max((a[key] - b[key]).abs().max().item() for key in weights)
    print(f"2 x 16 vs 1 x 32: largest weight difference {worst:.1e}")
    assert worst < 1e-5, worst      # fp32 summation order only: after 3 AdamW steps of lr 3e-3 (in warmup), ~1e-7
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)                              # the mean over ranks
    with pytest.raises(CheckpointError, match="trained by 2 process.*--nproc_per_node 2"):
        train(resume_config(tmp_path / "two", steps=4), WORKER_MODEL)
    # Resumed on two processes, each rank gets its own global RNG state back, not rank 0's.
    saved = [hashlib.sha256(state.numpy().tobytes()).hexdigest()
             for state in load_training_state(tmp_path / "two")["rng"]["rank_torch"]]
    resumed = _worker(tmp_path / "two", data, 16, 4, "train", processes=2)
    assert [resumed[rank]["rng"] for rank in (0, 1)] == saved


def test_torchrun_divergence_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    """Rank 1's loss is nan at step 2: both ranks stop there with one message (not rank 0 waiting in a collective)."""
    records = _worker(tmp_path / "run", write_tiny_npz(tmp_path / "data.npz", 64), 16, 3, "nan", processes=2)
    assert records[0]["error"] == records[1]["error"]
    assert records[0]["error"].startswith("loss became nan at step 2;")
