"""Image-to-image tasks (SR3 / Palette): the conditions each task derives, the user's pairs and their
refusals, the CLI's one-line errors, and a task run trained, sampled (CLI = Python API) and resumed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffunet import load_run
from diffunet.cli import main
from diffunet.data import convert_channels
from diffunet.errors import DataError, UserError
from diffunet.images import save_image, to_uint8
from diffunet.tasks import (Task, bind, condition_from_inputs, load_pairs, luma, parse_task, random_masks,
                            shrink_and_restore, split_batch, with_condition)
from diffunet.training import resume_config, train
from helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def images(shape, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- conditions ------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("height, width", [(8, 16), (16, 24)])
def test_superres_condition_of_a_blockwise_constant_image_is_the_image(channels, height, width):
    low = images((2, channels, height // 4, width // 4))
    x0 = low.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)                # constant per 4x4 block
    task = bind(parse_task("superres:4"), (channels, height, width))
    restored, cond = split_batch(task, x0)
    assert task.cond_channels == channels and restored is x0
    torch.testing.assert_close(cond, x0, rtol=0, atol=1e-6)


def test_superres_condition_is_the_block_mean():
    x0 = images((3, 2, 8, 12))
    cond = shrink_and_restore(x0, 4)
    means = x0.reshape(3, 2, 2, 4, 3, 4).mean(dim=(3, 5))                            # [B, C, H/4, W/4]
    torch.testing.assert_close(cond[:, :, ::4, ::4], means, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond, means.repeat_interleave(4, 2).repeat_interleave(4, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_inpaint_condition_is_zero_where_masked_and_carries_the_mask(channels):
    x0 = images((64, channels, 16, 24)) * 0.5 + 0.5                                  # no zero pixels of its own
    task = bind(parse_task("inpaint"), (channels, 16, 24))
    assert task.cond_channels == channels + 1
    same_x0, cond = split_batch(task, x0, torch.Generator().manual_seed(1))
    keep = cond[:, -1:]
    assert same_x0 is x0 and set(keep.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(cond[:, :channels], x0 * keep)
    assert (cond[:, :channels][keep.expand_as(x0) == 0] == 0).all()
    assert (cond[:, :channels][keep.expand_as(x0) == 1] != 0).all()
    kept = keep.mean(dim=(1, 2, 3))
    assert (kept > 0).all() and (kept < 1).all()                                     # every mask has a hole
    again = split_batch(task, x0, torch.Generator().manual_seed(1))[1]
    assert torch.equal(cond, again)                                                  # masks come from the generator


def test_random_masks_mix_boxes_and_cells():
    keep = random_masks(200, 16, 16, torch.Generator().manual_seed(0))[:, 0]         # [B, H, W]
    holes = keep == 0
    rows, columns = holes.any(dim=2), holes.any(dim=1)
    box = holes.sum(dim=(1, 2)) == rows.sum(dim=1) * columns.sum(dim=1)              # the hole fills its bounding box
    assert 0.3 < box.float().mean() < 0.8
    cells = keep[~box].reshape(-1, 4, 4, 4, 4)                                       # the others: whole 4x4 cells
    assert (cells == cells[:, :, :1, :, :1]).all()


def test_colorize_condition_is_the_luma():
    x0 = images((4, 3, 8, 16))
    task = bind(parse_task("colorize"), (3, 8, 16))
    cond = split_batch(task, x0)[1]
    assert task.cond_channels == 1 and cond.shape == (4, 1, 8, 16)
    torch.testing.assert_close(cond[:, 0], 0.299 * x0[:, 0] + 0.587 * x0[:, 1] + 0.114 * x0[:, 2])
    pixels = torch.randint(0, 256, (4, 3, 8, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gray = convert_channels(pixels.permute(0, 2, 3, 1).numpy(), 1)                  # data.py's RGB -> gray
    ours = to_uint8(luma(pixels.float() / 127.5 - 1))[:, 0].numpy()
    assert np.abs(ours.astype(int) - gray[..., 0].astype(int)).max() <= 1
    with pytest.raises(UserError, match="colorize needs colour"):
        bind(parse_task("colorize"), (1, 8, 16))


def test_cond_dropout_zeroes_whole_conditions_and_none_draws_nothing():
    x0 = images((400, 1, 8, 8))
    task = bind(parse_task("superres:2"), (1, 8, 8))
    cond = split_batch(task, x0, torch.Generator().manual_seed(0), dropout=0.3)[1]
    dropped = (cond == 0).flatten(1).all(dim=1)
    assert 0.2 < dropped.float().mean() < 0.4
    torch.testing.assert_close(cond[~dropped], shrink_and_restore(x0, 2)[~dropped])
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert split_batch(Task(), x0, generator, dropout=0.3) == (x0, None)
    assert torch.equal(generator.get_state(), state)  # runs without a task keep their exact noise stream


def test_with_condition_tiles_for_label_guidance_and_guides_on_the_condition():
    calls = []

    def model(x, t, cond, y=None):
        calls.append((len(x), len(cond)))
        return x + cond.mean(dim=(1, 2, 3), keepdim=True)

    x, cond = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert with_condition(model, cond)(torch.zeros(4, 1, 4, 4), torch.zeros(4), y=torch.zeros(4)).shape[0] == 4
    assert calls[-1] == (4, 4)
    guided = with_condition(model, cond, guidance=3.0)(x, torch.zeros(2))
    torch.testing.assert_close(guided, torch.full_like(x, 3.0))                      # 0 + 3 * (1 - 0)


def test_condition_from_inputs_takes_low_or_full_resolution():
    task = bind(parse_task("superres:4"), (1, 8, 12))
    full = images((2, 1, 8, 12))
    low = torch.nn.functional.interpolate(full, size=(2, 3), mode="area")
    torch.testing.assert_close(condition_from_inputs(task, low, (1, 8, 12)), shrink_and_restore(full, 4))
    torch.testing.assert_close(condition_from_inputs(task, full, (1, 8, 12)), shrink_and_restore(full, 4))
    with pytest.raises(UserError, match=r"takes condition inputs of 1x12x8 or 1x3x2") as error:
        condition_from_inputs(task, images((1, 1, 5, 5)), (1, 8, 12))
    assert "\n" not in str(error.value)


def test_task_dict_round_trip_and_runs_that_predate_tasks():
    task = bind(parse_task("superres:4"), (3, 8, 8))
    assert Task.from_dict(task.to_dict()) == task and task.name == "superres:4"
    assert Task.from_dict(None) == Task() and Task().kind == "none"
    assert parse_task("none", data_cond="pairs.npz") == Task("pairs")


# ---- the user's pairs ------------------------------------------------------------------------

def write_pairs(root: Path, names=("a.png", "b.png"), input_size=(8, 12), target_size=(8, 12)) -> Path:
    for side, (height, width), channels in (("inputs", input_size, 1), ("targets", target_size, 3)):
        for i, name in enumerate(names):
            pixels = torch.full((channels, height, width), 20 * (i + 1), dtype=torch.uint8)
            pixels[:, 0] = 0 if side == "inputs" else 255                             # not gray: [255,x,x]
            if side == "targets":
                pixels[1:, 0] = 7
            save_image(pixels, root / side / name)
    return root


def test_load_pairs_from_folders_and_npz(tmp_path):
    targets, inputs = load_pairs(write_pairs(tmp_path / "pairs"), progress=False)
    assert targets.images.shape == (2, 3, 8, 12) and inputs.shape == (2, 1, 8, 12)
    assert inputs[1, 0, 1, 0] == 40 and targets.images[0, 0, 0, 0] == 255
    rng = np.random.default_rng(0)
    npz = tmp_path / "pairs.npz"
    np.savez(npz, inputs=rng.integers(0, 256, (5, 8, 12), dtype=np.uint8),
             targets=rng.integers(0, 256, (5, 8, 12, 3), dtype=np.uint8), labels=np.arange(5) % 2)
    targets, inputs = load_pairs(npz)
    assert targets.images.shape == (5, 3, 8, 12) and inputs.shape == (5, 1, 8, 12) and targets.num_classes == 2
    np.testing.assert_array_equal(inputs[:, 0].numpy(), np.load(npz)["inputs"])


def test_unaligned_pairs_are_refused_naming_the_first_offender(tmp_path):
    root = write_pairs(tmp_path / "names", names=("a.png", "b.png", "c.png"))
    (root / "inputs" / "b.png").unlink()
    with pytest.raises(DataError, match=r"targets/b\.png has no inputs/b\.png"):
        load_pairs(root, progress=False)
    sizes = write_pairs(tmp_path / "sizes", input_size=(4, 6))
    with pytest.raises(DataError, match=r"inputs/a\.png is 6x4 but targets/a\.png is 12x8"):
        load_pairs(sizes, progress=False)
    npz = tmp_path / "short.npz"
    np.savez(npz, inputs=np.zeros((3, 8, 8), np.uint8), targets=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"targets\[3\] has no partner"):
        load_pairs(npz)


def test_unaligned_pairs_through_the_cli_are_one_line(tmp_path, capsys):
    root = write_pairs(tmp_path / "pairs", names=("a.png", "b.png"))
    (root / "targets" / "a.png").unlink()
    assert main(["train", "--data-cond", str(root), "--out", str(tmp_path / "run"), "--steps", "1", *FAST]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "inputs/a.png has no targets/a.png" in error and "Traceback" not in error


@pytest.mark.parametrize("flags, words", [
    (["--task", "superres"], "got 'superres'"),
    (["--task", "superres:1"], "superres:F (F an integer >= 2"),
    (["--task", "superres:x"], "got 'superres:x'"),
    (["--task", "inpaint:3"], "got 'inpaint:3'"),
    (["--task", "pairs"], "set by data_cond (--data-cond PATH"),
    (["--task", "deblur"], "task (--task) must be none, superres:F"),
    (["--task", "colorize"], "colorize needs colour (RGB) images"),                 # builtin digits are gray
    (["--task", "superres:5"], "needs image sides divisible by 5"),
    (["--task", "superres:4", "--data-cond", "x.npz"], "cannot be used with it"),
    (["--task", "inpaint", "--cond-dropout", "1.5"], "cond_dropout (--cond-dropout) must be in [0, 1)"),
])
def test_bad_task_flags_are_one_line_errors(tmp_path, capsys, flags, words):
    code = main(["train", "--out", str(tmp_path / "run"), "--steps", "1", *FAST, *TINY, *flags])
    error = capsys.readouterr().err
    assert code != 0 and words in error and error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "run").exists()


# ---- a task run, end to end ------------------------------------------------------------------

def task_argv(out: Path, steps: int, *flags: str) -> list[str]:
    return ["train", "--out", str(out), "--steps", str(steps), "--lr-schedule", "constant", "--sample-every", "100",
            "--device", "cpu", *FAST, *TINY, *flags]


def test_superres_run_trains_and_samples_the_same_through_cli_and_python(tmp_path, capsys):
    run_dir = tmp_path / "sr"
    assert main(task_argv(run_dir, 2, "--data", "builtin", "--task", "superres:4", "--no-class-conditional")) == 0
    run = load_run(run_dir)
    assert run.task == Task("superres", 4, 1) and run.config.cond_channels == 1
    assert (run_dir / "samples_latest.png").is_file()                                # conditions, outputs, targets
    lows = torch.randint(0, 256, (3, 1, 7, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for i, low in enumerate(lows):
        save_image(low, tmp_path / "lows" / f"digit{i}.png")
    npz = tmp_path / "out.npz"
    assert main(["sample", "--checkpoint", str(run_dir), "--cond", str(tmp_path / "lows"), "--num", "2", "--seed", "3",
                 "--steps", "2", "--out", str(tmp_path / "grid.png"), "--npz", str(npz),
                 "--out-dir", str(tmp_path / "each"), "--device", "cpu", "--no-progress"]) == 0
    assert sorted(path.name for path in (tmp_path / "each").iterdir()) == \
        [f"digit{i}_{k}.png" for i in range(3) for k in range(2)]
    x0 = run.sample(6, seed=3, steps=2, cond=lows.repeat_interleave(2, dim=0))
    np.testing.assert_array_equal(to_uint8(x0)[:, 0].numpy(), np.load(npz)["samples"])
    one = run.sample(2, seed=3, steps=2, cond=lows[:1])                                # one input for all images
    torch.testing.assert_close(one, x0[:2])
    with pytest.raises(UserError, match="is a superres:4 run: give its inputs as cond"):
        run.sample(1)
    assert main(["sample", "--checkpoint", str(run_dir), "--steps", "2", "--out", str(tmp_path / "x.png")]) == 1
    assert "give its inputs as cond" in capsys.readouterr().err


def test_runs_without_a_task_key_load_as_task_none(tmp_path, tiny_npz):
    run_dir = tmp_path / "plain"
    assert main(task_argv(run_dir, 1, "--data", str(tiny_npz))) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == Task().to_dict()
    del config["task"]
    (run_dir / "config.json").write_text(json.dumps(config))
    run = load_run(run_dir)
    assert run.task == Task() and run.sample(1, steps=1).shape == (1, 1, 12, 12)
    with pytest.raises(UserError, match="trained without a condition"):
        run.sample(1, steps=1, cond=torch.zeros(1, 1, 12, 12))


def test_inpaint_run_resumes_exactly_and_samples_with_a_mask(tmp_path, tiny_npz, capsys):
    flags = ("--data", str(tiny_npz), "--task", "inpaint", "--cond-dropout", "0.2")
    assert main(task_argv(tmp_path / "straight", 4, *flags)) == 0
    assert main(task_argv(tmp_path / "resumed", 2, *flags)) == 0
    cfg = resume_config(tmp_path / "resumed", steps=4)
    assert cfg.task == "inpaint" and cfg.cond_dropout == 0.2
    train(cfg)
    for name in ("model.safetensors", "training_state.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name
    run = load_run(tmp_path / "resumed")
    keep = torch.ones(1, 1, 12, 12)
    keep[..., 6:] = 0
    assert run.task.cond_channels == 2 and run.sample(2, steps=2, cond=torch.zeros(1, 1, 12, 12), mask=keep,
                                                        label=1).shape == (2, 1, 12, 12)
    save_image(torch.full((1, 12, 12), 200, dtype=torch.uint8), tmp_path / "digit.png")
    save_image((keep[0] * 255).to(torch.uint8), tmp_path / "mask.png")
    sample = ["sample", "--checkpoint", str(tmp_path / "resumed"), "--cond", str(tmp_path / "digit.png"), "--steps", "2",
              "--out", str(tmp_path / "grid.png"), "--no-progress"]
    assert main([*sample, "--mask", str(tmp_path / "mask.png")]) == 0
    assert main(sample) == 1
    error = capsys.readouterr().err
    assert "an inpaint run needs a mask" in error and error.count("\n") == 1


def test_resume_refuses_another_task(tmp_path, tiny_npz, capsys):
    run_dir = tmp_path / "run"
    assert main(task_argv(run_dir, 1, "--data", str(tiny_npz), "--task", "superres:2")) == 0
    shutil.copy(run_dir / "config.json", tmp_path / "before.json")
    capsys.readouterr()
    assert main(task_argv(run_dir, 2, "--data", str(tiny_npz), "--task", "superres:3", "--resume")) == 1
    assert "task is 'superres:3' here but 'superres:2' in the run" in capsys.readouterr().err
    assert main(task_argv(run_dir, 2, "--data", str(tiny_npz), "--task", "inpaint", "--resume")) == 1
    assert "task is 'inpaint' here but 'superres:2'" in capsys.readouterr().err
    assert (run_dir / "config.json").read_bytes() == (tmp_path / "before.json").read_bytes()


def test_pairs_run_trains_with_flips_and_samples_from_an_input(tmp_path):
    root = write_pairs(tmp_path / "pairs", names=tuple(f"{i}.png" for i in range(8)))
    run_dir = tmp_path / "run"
    assert main(task_argv(run_dir, 2, "--data-cond", str(root), "--flip")) == 0
    run = load_run(run_dir)
    assert run.task == Task("pairs", 1, 1) and run.image_shape == (3, 8, 12)
    assert main(["sample", "--checkpoint", str(run_dir), "--cond", str(root / "inputs" / "3.png"), "--steps", "2",
                 "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each"), "--no-progress"]) == 0
    assert [path.name for path in (tmp_path / "each").iterdir()] == ["3.png"]

