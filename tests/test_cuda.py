"""The CUDA path: training (fp32, bf16 autocast, torch.compile), sampling, checkpoints moving between
devices, and `diffunet eval`. Skipped where no CUDA device is present (CI has none); run on a GPU machine
with `python3 -m pytest -q tests/test_cuda.py`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffunet import UNet, UNetConfig
from diffunet.run import load_model
from diffunet.cli import main
from diffunet.data import BUILTIN_FILE
from diffunet.generate import generate
from helpers import FAST, TINY
from samplers import NoiseSchedule, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")



@pytest.fixture
def exact_fp32():
    """CUDA convolutions and matmuls may use TF32 (10-bit mantissa); comparisons with the CPU need fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_forward_on_cuda_matches_cpu(exact_fp32):
    torch.manual_seed(0)
    model = UNet(UNetConfig.small28(num_classes=10, zero_init=False)).eval()   # non-zero outputs to compare
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, -1, 9])
    with torch.no_grad():
        expected = model(x, t, y=y)
        got = model.cuda()(x.cuda(), t.cuda(), y=y.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_forward_is_close_to_fp32():
    torch.manual_seed(0)
    model = UNet(UNetConfig.small28(zero_init=False)).cuda().eval()
    x, t = torch.randn(8, 1, 28, 28, device="cuda"), torch.full((8,), 300, device="cuda")
    with torch.no_grad():
        full = model(x, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(x, t).float()
    assert full.abs().mean() > 0.01
    assert (half - full).norm() / full.norm() < 0.03


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_on_cuda_then_load_and_sample_on_cpu(tmp_path, precision):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "4", "--device", "cuda", "--precision", precision,
                 *FAST, *TINY]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(row["loss"]) for row in rows)
    weights = load_file(out / "model.safetensors")
    assert all(tensor.device.type == "cpu" and torch.isfinite(tensor).all() for tensor in weights.values())
    model, config = load_model(out, device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    assert main(["sample", "--checkpoint", str(out), "--num", "4", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "cpu.png"), "--no-progress"]) == 0
    assert main(["sample", "--checkpoint", str(out), "--num", "4", "--steps", "2", "--device", "cuda",
                 "--out", str(tmp_path / "cuda.png"), "--npz", str(tmp_path / "cuda.npz"), "--no-progress"]) == 0
    assert np.load(tmp_path / "cuda.npz")["samples"].shape[0] == 4


def test_resume_on_cuda_continues_the_run(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--device", "cuda", "--save-every", "2", *FAST, *TINY]
    assert main([*argv, "--steps", "2"]) == 0
    assert main([*argv, "--steps", "4", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_compiled_training_on_cuda(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "3", "--device", "cuda", "--compile", "--precision", "bf16",
                 *FAST, *TINY]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(row["loss"]) for row in rows)


def test_cuda_sampling_is_seeded_per_image_and_batch_free():
    torch.manual_seed(0)
    model = UNet(UNetConfig.small28(num_classes=10, zero_init=False)).cuda().eval()
    schedule = NoiseSchedule.cosine(1000)
    labels = torch.arange(6, device="cuda") % 10
    common = dict(sampler="dpmpp_2m", steps=3, prediction="v", labels=labels, guidance=1.5, seed=7, device="cuda")
    whole = generate(model, schedule, 6, (1, 28, 28), batch_size=6, **common)
    pieces = generate(model, schedule, 6, (1, 28, 28), batch_size=4, **common)
    assert whole.device.type == "cpu"          # generate hands images back on the CPU, ready to save
    torch.testing.assert_close(whole, pieces, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(whole[0], whole[1])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_samplers_run_on_cuda(sampler):
    torch.manual_seed(0)
    model = UNet(UNetConfig.small28()).cuda().eval()
    schedule = NoiseSchedule.cosine(1000)
    generator = torch.Generator("cuda").manual_seed(0)
    x_T = torch.randn(2, 1, 28, 28, device="cuda", generator=generator)
    with torch.inference_mode():
        x0 = sample(model, x_T, schedule, method=sampler, steps=4, prediction="v", generator=generator)
    assert x0.shape == x_T.shape and x0.device.type == "cuda" and torch.isfinite(x0).all()


def test_eval_on_cuda(tmp_path, monkeypatch):
    builtin = np.load(BUILTIN_FILE)
    x, y = builtin["images"], builtin["labels"]
    np.savez(tmp_path / "digits.npz", x_train=x[:600], y_train=y[:600], x_test=x[600:800], y_test=y[600:800])
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "digits.npz"), "--out", str(out), "--steps", "2",
                 "--device", "cuda", *TINY]) == 0
    monkeypatch.setenv("DIFFUNET_DATA", str(tmp_path / "cache"))
    assert main(["eval", "--checkpoint", str(out), "--num", "30", "--nll-images", "3", "--nll-timesteps", "20",
                 "--classifier-steps", "20", "--strict-classifier-steps", "20", "--steps", "2", "--device", "cuda",
                 "--no-progress"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert 0 < report["nll"]["bits_per_dim"] < 9 and report["fd"]["value"] > 0


@pytest.mark.parametrize("schedule", [NoiseSchedule.linear(100), NoiseSchedule.rectified_flow()], ids=["vp", "flow"])
def test_training_loss_with_min_snr_makes_no_host_sync(schedule):
    """Issue 15: min-SNR's SNR(t) is looked up on the GPU, not by copying t to the host (sync debug mode errors
    on any synchronising call)."""
    from diffunet.loss import training_loss
    model = lambda x_t, t: x_t * 0.5  # noqa: E731  (no parameters: only the loss's own ops run)
    x0 = torch.randn(8, 1, 4, 4, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    prediction = "v" if isinstance(schedule, NoiseSchedule) else "flow"
    training_loss(model, x0, schedule, prediction=prediction, weighting="min_snr", generator=generator)  # warm tables
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = training_loss(model, x0, schedule, prediction=prediction, weighting="min_snr", generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert loss.shape == (8,) and loss.device.type == "cuda"
