"""A run is one object: load_run, Run.sample against `diffunet sample`, UNet.from_pretrained, and resuming
through train() (exact, and refused when the config cannot continue the run)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffunet
from diffunet import Run, UNet, load_run
from diffunet.checkpoint import save_model
from diffunet.run import load_model
from diffunet.cli import main
from diffunet.images import to_uint8
from diffunet.errors import CheckpointError, UserError
from diffunet.run import LEGACY_SAMPLING, run_guidance
from diffunet.training import resume_config, train
from helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def train_argv(data: Path, out: Path, steps: int) -> list[str]:
    # constant lr and no grid before the end: a run of N steps is the first N steps of a longer one
    return ["train", "--data", str(data), "--out", str(out), "--steps", str(steps), "--lr-schedule", "constant",
            "--sample-every", "100", "--device", "cpu", *FAST, *TINY]


@pytest.fixture(scope="module")
def run_dir(tiny_npz, tmp_path_factory) -> Path:
    """A 3-step class-conditional run of the tiny model on 12x12 images."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(train_argv(tiny_npz, out, 3)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_load_run_reads_the_whole_run(run_dir):
    run = load_run(run_dir)
    assert isinstance(run, Run) and "load_run" in diffunet.__all__ and "Run" in diffunet.__all__
    assert isinstance(run.model, UNet) and not run.model.training
    assert run.config == run.model.config and run.config.base_channels == 8
    assert run.image_shape == (1, 12, 12) and run.num_classes == 2 and run.prediction == "flow"
    assert run.schedule.to_dict()["kind"] == "rectified_flow" and run.step == 3   # the default path
    assert (run.sampler, run.steps, run.guidance) == ("heun", 2, 1.2)  # FAST's --sample-steps 2, default guidance
    assert run.train_config["steps"] == 3 and run.device == torch.device("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.steps = 5


def test_run_sample_equals_diffunet_sample(run_dir, tmp_path):
    npz = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(run_dir), "--num", "3", "--seed", "7", "--steps", "3",
                 "--out", str(tmp_path / "grid.png"), "--npz", str(npz), "--device", "cpu", "--no-progress"]) == 0
    x0 = load_run(run_dir).sample(3, seed=7, steps=3)
    assert x0.shape == (3, 1, 12, 12) and x0.dtype == torch.float32
    assert x0.min() >= -1 and x0.max() <= 1
    np.testing.assert_array_equal(to_uint8(x0)[:, 0].numpy(), np.load(npz)["samples"])


def test_run_sample_label_and_guidance(run_dir):
    run = load_run(run_dir)
    ones = run.sample(2, label=1, guidance=2.0, sampler="ddim", steps=2)
    assert ones.shape == (2, 1, 12, 12) and torch.isfinite(ones).all()
    assert torch.equal(run.labels(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(UserError, match=r"label must be in 0\.\.1"):
        run.sample(1, label=2)


def test_runs_predating_the_sampling_fields_use_the_defaults_of_their_time(run_dir, tmp_path):
    # Before the sampling fields were stored, runs sampled with ancestral DDPM, 50 steps, no guidance boost.
    assert LEGACY_SAMPLING == {"sampler": "ddpm", "sample_steps": 50, "guidance": 1.0}
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    config = json.loads((old / "config.json").read_text())
    for key in LEGACY_SAMPLING:
        del config["train"][key]
    (old / "config.json").write_text(json.dumps(config))
    run = load_run(old)
    assert (run.sampler, run.steps, run.guidance) == tuple(LEGACY_SAMPLING.values())


def test_a_run_without_label_dropout_samples_unguided_by_default(run_dir, tmp_path):
    # guidance extrapolates away from the "no label" branch, which only label dropout trains
    assert run_guidance({"guidance": 1.2, "label_dropout": 0.1}) == 1.2
    assert run_guidance({"guidance": 1.2, "label_dropout": 0.0}) == 1.0
    undropped = tmp_path / "undropped"
    shutil.copytree(run_dir, undropped)
    config = json.loads((undropped / "config.json").read_text())
    config["train"]["label_dropout"] = 0.0
    (undropped / "config.json").write_text(json.dumps(config))
    assert load_run(run_dir).guidance == 1.2 and load_run(undropped).guidance == 1.0


def test_unet_from_pretrained_reproduces_outputs(run_dir, tmp_path):
    x, t, y = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 900]), None
    reference, _ = load_model(run_dir)
    network = UNet.from_pretrained(run_dir)
    assert isinstance(network, UNet) and not network.training
    with torch.no_grad():
        assert torch.equal(network(x, t, y=torch.tensor([0, 1])), reference(x, t, y=torch.tensor([0, 1])))
        save_model(tmp_path / "alone.safetensors", network)          # a network file without run settings
        assert torch.equal(UNet.from_pretrained(tmp_path / "alone.safetensors")(x, t, y), network(x, t, y))
    with pytest.raises(CheckpointError, match="holds a network, not a run; load it with UNet.from_pretrained"):
        load_run(tmp_path / "alone.safetensors")


def test_resume_through_train_equals_an_uninterrupted_run(tiny_npz, tmp_path):
    assert main(train_argv(tiny_npz, tmp_path / "straight", 6)) == 0
    assert main(train_argv(tiny_npz, tmp_path / "resumed", 3)) == 0
    cfg = resume_config(tmp_path / "resumed", steps=6)   # the run's own settings; the stored architecture
    assert cfg.resume and cfg.batch_size == 8 and cfg.lr_schedule == "constant"
    assert train(cfg) == tmp_path / "resumed"
    for name in ("model.safetensors", "training_state.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert load_run(tmp_path / "resumed").step == 6


@pytest.mark.parametrize("change, overrides, words", [
    ({"prediction": "v"}, None, "prediction is 'v' here but 'flow' in the run"),
    ({"schedule": "cosine"}, None, "schedule field kind is 'cosine' here but 'rectified_flow' in the run"),
    ({"flow_shift": 3.0}, None, "schedule field shift is 3.0 here but 1.0"),
    ({}, {"base_channels": 16}, "model field base_channels is 16 here but 8 in the run"),
    ({"class_conditional": False}, {"num_classes": None}, "model field num_classes is None here but 2"),
])
def test_resume_refuses_a_config_that_cannot_continue_the_run(run_dir, tmp_path, change, overrides, words):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = {path.name: path.read_bytes() for path in run.iterdir()}
    with pytest.raises(CheckpointError) as error:
        train(dataclasses.replace(resume_config(run, steps=4), **change), overrides)
    message = str(error.value)
    assert words in message and f"cannot resume {run}" in message and "\n" not in message
    assert "--" not in message  # a library error names fields, not command-line flags
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before  # nothing was written
