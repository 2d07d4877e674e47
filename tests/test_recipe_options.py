"""--minutes (the step count fixed from the speed of the first steps and stored, so resume stays exact),
--flip and --alpha-background."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest
from helpers import FAST, TINY

from diffunet.cli import main
from diffunet.training import PROBE_STEPS, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_minutes_fixes_and_stores_the_step_count(tmp_path, tiny_npz, capsys):
    run = tmp_path / "budget"
    started = time.perf_counter()
    assert main(["train", "--data", str(tiny_npz), *TINY, *FAST, "--out", str(run), "--minutes", "0.1",
                 "--save-every", "1000", "--sample-every", "1000"]) == 0
    elapsed = time.perf_counter() - started
    train = json.loads((run / "config.json").read_text())["train"]
    assert train["minutes"] is None and train["steps"] > PROBE_STEPS[1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == train["steps"]                         # trained exactly the stored count
    assert f"done: {train['steps']} steps" in capsys.readouterr().out   # says the count it fixed, not --steps
    assert 2 < elapsed < 30                                           # about 6 s of training, grids on top
    # resuming the finished run continues the stored count, with no new probe
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == train["steps"]


def test_minutes_budget_leaves_time_for_the_sample_grids():
    import torch

    import samplers
    from diffunet.training import FORWARD_SHARE, _steps_for_budget, make_schedule
    per_step = 0.01                                           # seconds, as the probe would measure
    probe = [0.0, per_step * (PROBE_STEPS[1] - PROBE_STEPS[0])]
    cfg = TrainConfig(minutes=1.0, batch_size=32, num_samples=64, sampler="heun", sample_steps=10, sample_every=500,
                      guidance=1.0)
    schedule = make_schedule(cfg)
    fixed = _steps_for_budget(cfg, schedule, time.perf_counter(), probe, 1, torch.device("cpu"), guided=True)
    grid = 64 * samplers.model_calls("heun", schedule, 10) * per_step / 32 * FORWARD_SHARE    # one grid, seconds
    expected = PROBE_STEPS[1] + int((60 - grid) / (per_step + grid / 500))
    assert fixed.minutes is None and abs(fixed.steps - expected) <= 1      # perf_counter moved a little
    # without grids' time the same budget would be about 6,000 steps; guidance doubles each grid's batch,
    # but not for a model without labels, whose grids are never guided
    strong = dataclasses.replace(cfg, guidance=3.0)
    guided = _steps_for_budget(strong, schedule, time.perf_counter(), probe, 1, torch.device("cpu"), guided=True)
    assert guided.steps < fixed.steps < PROBE_STEPS[1] + 6000
    unlabelled = _steps_for_budget(strong, schedule, time.perf_counter(), probe, 1, torch.device("cpu"), guided=False)
    assert abs(unlabelled.steps - fixed.steps) <= 1


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_minutes_must_be_positive(bad):
    with pytest.raises(ValueError, match="--minutes"):
        TrainConfig(minutes=bad)


def test_random_flip_mirrors_about_half_and_keeps_the_rest():
    import torch

    from diffunet.training import random_flip
    x = torch.arange(400 * 6, dtype=torch.float32).reshape(400, 1, 2, 3)
    out = random_flip(x, torch.Generator().manual_seed(0))
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert ((out == x).flatten(1).all(1) | mirrored).all()
    assert 160 < mirrored.sum() < 240                                   # Binomial(400, 1/2): mean 200, sd 10


def test_flip_flag_trains_and_resumes(tmp_path, tiny_npz):
    run = tmp_path / "flip"
    assert main(["train", "--data", str(tiny_npz), *TINY, *FAST, "--out", str(run), "--steps", "2", "--flip"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["flip"] is True


@pytest.mark.parametrize("background", [0, 255, 128])
def test_alpha_background_composites_transparent_pixels(tmp_path, background):
    import numpy as np
    from PIL import Image

    from diffunet.data import load_data
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        rgba = np.zeros((4, 4, 4), dtype=np.uint8)
        rgba[:2] = (200, 10, 10, 255)                                   # opaque red top half, transparent bottom
        Image.fromarray(rgba, "RGBA").save(tmp_path / name / "x.png")
    images = load_data(tmp_path, alpha_background=background, progress=False).images      # [2, 3, 4, 4]
    assert images.shape == (2, 3, 4, 4)
    assert images[:, :, 2:].eq(background).all() and images[:, 0, :2].eq(200).all()
    with pytest.raises(ValueError, match="--alpha-background"):
        TrainConfig(alpha_background=300)


def test_preset_auto_follows_the_data_and_says_why(tmp_path, tiny_npz):
    from diffunet import PRESETS
    from diffunet.training import choose_preset
    assert choose_preset((1, 28, 28))[0] == "small28" and choose_preset((1, 12, 16))[0] == "small28"
    assert choose_preset((3, 32, 32))[0] == "small32" and choose_preset((3, 64, 64))[0] == "small64"
    assert "gray 28x28" in choose_preset((1, 28, 28))[1]
    assert PRESETS["small64"]().in_channels == 3 and TrainConfig().preset == "auto"
    run = tmp_path / "auto"
    assert main(["train", "--data", str(tiny_npz), *TINY, *FAST, "--out", str(run), "--steps", "1"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["preset"] == "auto" and config["preset_choice"][0] == "small28"


def test_small64_preset_runs_at_64x64():
    import torch

    from diffunet import UNet, UNetConfig
    model = UNet(UNetConfig.small64(num_classes=3))
    out = model(torch.randn(2, 3, 64, 64), torch.tensor([3, 700]), y=torch.tensor([0, -1]))
    assert out.shape == (2, 3, 64, 64)


def test_the_default_recipe_is_the_rectified_flow_and_num_timesteps_belongs_to_vp():
    """Issue 13: the default is the recipe that won on MNIST and Fashion-MNIST over three seeds."""
    defaults = TrainConfig()
    assert (defaults.schedule, defaults.prediction, defaults.timestep_sampling) == \
        ("rectified_flow", "flow", "logit_normal")
    assert (defaults.sampler, defaults.sample_steps) == ("heun", 10)
    with pytest.raises(ValueError, match=r"num_timesteps \(--num-timesteps\) is for VP schedules"):
        TrainConfig(num_timesteps=500)
    with pytest.raises(ValueError, match=r"or a VP schedule \(--schedule\) such as linear"):
        TrainConfig(prediction="eps")
    TrainConfig(schedule="linear", prediction="eps", num_timesteps=500)  # the VP recipe takes both
