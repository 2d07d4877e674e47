"""Direct training (`--objective direct`, diffunet/direct.py): overlap-tile padding, the per-pixel losses,
a small run of the 2015 preset end to end, and the one-line errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffunet import direct, valid
from diffunet.cli import main
from diffunet.errors import UserError
from diffunet.images import to_model_range
from diffunet.run import load_run
from diffunet.training import TrainConfig, resume_config, train
from diffunet.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def unet_2015(*mults: int, out_channels: int = 2) -> UNet:
    """The 2015 preset, 4 channels wide, with len(mults) - 1 poolings."""
    return UNet(UNetConfig.ronneberger2015(base_channels=4, channel_mults=mults, out_channels=out_channels))


def identity_2015(*mults: int) -> UNet:
    """A 2015-preset U-Net whose output is exactly the centre of a non-negative input: channel 0 passes through
    the centre taps of the first level's convolutions and its skip; every other weight is zero."""
    model = unet_2015(*mults, out_channels=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        encoder, decoder = model.down[0][0], model.up[-1][0]
        for conv in (encoder.conv1, encoder.conv2, decoder.conv2):
            conv.weight[0, 0, 1, 1] = 1
        decoder.conv1.weight[0, model.config.widths[0], 1, 1] = 1   # [up-conv channels, skip channels]: the skip
        model.output[0].weight[0, 0] = 1
    return model


# ---- overlap-tile padding ---------------------------------------------------------------------

@pytest.mark.parametrize("mults", [(1, 2), (1, 2, 4), (1, 2, 4, 8, 16)])
@pytest.mark.parametrize("size", [(28, 28), (12, 20), (1, 5), (17, 31)])
def test_overlap_tile_output_covers_the_image(mults, size):
    model = unet_2015(*mults)
    padded = direct.overlap_tile_pad(torch.rand(2, 1, *size), model)
    out_h, out_w = valid.output_size(model, *padded.shape[-2:])
    assert out_h >= size[0] and out_w >= size[1]
    for side, original in zip(padded.shape[-2:], size):        # the smallest input that does it
        assert side == valid.input_size_for(model, original)
        assert not any(valid._fits(model, s) and valid._side(model, s) >= original for s in range(original, side))


def test_paper_geometry_572_to_388():
    with torch.device("meta"):
        model = UNet(UNetConfig.ronneberger2015())
    assert valid.output_size(model, 572, 572) == (388, 388)
    assert valid.input_size_for(model, 388) == 572                  # fig. 2: a 388 tile needs a 572 input
    assert valid.input_size_for(model, 389) == 588                  # the next fitting input, 16 = 2^4 further
    x = torch.rand(1, 1, 388, 388)
    padded = direct.overlap_tile_pad(x, model)
    assert padded.shape == (1, 1, 572, 572)
    assert torch.equal(padded[..., 92:480, 92:480], x)             # a 92-pixel mirrored border on every side


@pytest.mark.parametrize("mults", [(1, 2), (1, 2, 4), (1, 2, 4, 8)])
@pytest.mark.parametrize("size", [(28, 28), (12, 20), (5, 9), (1, 3)])
def test_overlap_tile_output_is_the_image_pixel_for_pixel(mults, size):
    model = identity_2015(*mults)
    x = torch.rand(2, 1, *size)
    out = direct.crop_output(model(direct.overlap_tile_pad(x, model)), *size)
    assert torch.equal(out, x)


def test_padded_border_is_the_mirror_image():
    x = torch.randn(2, 3, 8, 11)
    assert torch.equal(direct.mirror_indices(5, 3, 2), torch.tensor([3, 2, 1, 0, 1, 2, 3, 4, 3, 2]))
    assert torch.equal(direct.mirror_indices(3, 6, 6), torch.tensor([2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0]))
    assert torch.equal(direct.mirror_indices(1, 2, 1), torch.zeros(4, dtype=torch.long))
    x = torch.randn(2, 3, 12, 15)
    model = unet_2015(1, 2)                                    # a narrow border: torch's reflect mode agrees
    padded = direct.overlap_tile_pad(x, model)
    pads = []
    for size in (15, 12):                                      # F.pad order: left, right, top, bottom
        tile = valid.input_size_for(model, size)
        out = valid.output_size(model, tile, tile)[0]
        before = (tile - out) // 2 + (out - size) // 2         # the valid margin, then the output's centring
        pads += [before, tile - size - before]
    assert 0 < max(pads) < 12
    assert torch.equal(padded, F.pad(x, pads, mode="reflect"))
    wide = direct.overlap_tile_pad(x, unet_2015(1, 2, 4, 8))   # a border wider than the image: mirrored again
    top = (wide.shape[-2] - 12) // 2
    assert top > 12
    inside = wide[..., top:top + 12, :]
    assert torch.equal(wide[..., top - 11:top, :], inside[..., 1:12, :].flip(-2))        # about the edge row
    assert torch.equal(wide[..., top - 22:top - 11, :], inside[..., 0:11, :])            # and back again
    same = UNet(UNetConfig.small28(base_channels=8, norm_groups=4))
    assert direct.overlap_tile_pad(x, same) is x                                          # same padding: as is


# ---- losses -----------------------------------------------------------------------------------

def test_loss_rule_and_classes():
    assert direct.loss_kind(1, 1) == "mse" and direct.loss_kind(3, 3) == "mse"
    assert direct.loss_kind(2, 1) == "cross_entropy" and direct.loss_kind(5, 1) == "cross_entropy"
    with pytest.raises(UserError, match="--model-out-channels 3"):
        direct.loss_kind(2, 3)
    gray = to_model_range(torch.tensor([0, 63, 64, 127, 128, 255], dtype=torch.uint8).reshape(1, 1, 1, 6))
    assert direct.target_classes(gray, 2).tolist() == [[[0, 0, 0, 0, 1, 1]]]   # a mask: v >= 128 is foreground
    assert direct.target_classes(gray, 3).tolist() == [[[0, 0, 1, 1, 1, 2]]]   # round(v * 2 / 255)


def test_loss_is_zero_for_a_perfect_prediction_and_matches_a_hand_computation():
    model = identity_2015(1, 2, 4)
    x = torch.rand(3, 1, 9, 14) * 2 - 1
    assert torch.equal(direct.direct_loss(model, model, x.clamp(min=0), x.clamp(min=0)), torch.zeros(3))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 6, 7, generator=generator)
    target = torch.where(torch.rand(2, 1, 6, 7, generator=generator) < 0.5, -1.0, 1.0)   # a 0 / 255 mask
    same = UNet(UNetConfig.small28(base_channels=8, norm_groups=4))        # no padding, so forward sees cond as is
    loss = direct.direct_loss(lambda cond: logits, same, torch.zeros(2, 1, 6, 7), target)
    chosen = torch.where(target[:, 0] > 0, logits[:, 1], logits[:, 0])
    by_hand = (torch.log(logits.exp().sum(1)) - chosen).mean(dim=(1, 2))   # -log softmax of the true class
    torch.testing.assert_close(loss, by_hand)
    constant = direct.direct_loss(lambda cond: torch.full((2, 1, 6, 7), 0.25), same, torch.zeros(2, 1, 6, 7), target)
    torch.testing.assert_close(constant, (0.25 - target).pow(2).mean(dim=(1, 2, 3)))


# ---- a direct run end to end ------------------------------------------------------------------

def write_stroke_pairs(path, count: int = 64):
    """Pairs of 12x12 noisy pictures and their 0 / 255 masks (the bright pixels), as an .npz."""
    rng = np.random.default_rng(0)
    masks = rng.random((count, 12, 12)) < 0.3
    inputs = np.clip(masks * 170 + rng.normal(40, 30, masks.shape), 0, 255).astype(np.uint8)
    np.savez(path, inputs=inputs, targets=(masks * 255).astype(np.uint8))
    return inputs, masks


def direct_config(out, data_cond, **changes) -> TrainConfig:
    fields = dict(data_cond=str(data_cond), objective="direct", preset="ronneberger2015", out=str(out), steps=60,
                  batch_size=8, lr=1e-2, lr_schedule="constant", warmup_steps=0, log_every=10, save_every=30,
                  sample_every=60, quiet=True, device="cpu")
    return TrainConfig(**{**fields, **changes})


def test_direct_run_learns_and_samples_through_python_and_cli(tmp_path):
    inputs, masks = write_stroke_pairs(tmp_path / "pairs.npz")
    overrides = {"base_channels": 8, "channel_mults": (1, 2)}
    out = train(direct_config(tmp_path / "run", tmp_path / "pairs.npz", steps=30), overrides)
    out = train(resume_config(out, steps=60), overrides)                  # a direct run resumes too
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]              # measured: 0.68 -> 0.18
    run = load_run(out)
    assert run.objective == "direct" and run.image_shape == (1, 12, 12)
    assert (run.config.in_channels, run.config.out_channels, run.config.padding) == (1, 2, "valid")
    predicted = run.sample(8, cond=torch.from_numpy(inputs[:8])[:, None])
    assert set(predicted.unique().tolist()) <= {-1.0, 1.0}                # the arg-max mask
    assert ((predicted[:, 0] > 0).numpy() == masks[:8]).mean() > 0.9
    Image.fromarray(inputs[3]).save(tmp_path / "input.png")
    assert main(["sample", "--checkpoint", str(out), "--cond", str(tmp_path / "input.png"), "--out",
                 str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each"), "--no-progress"]) == 0
    written = np.array(Image.open(tmp_path / "each" / "input.png"))
    assert np.array_equal(written, ((predicted[3, 0] > 0).numpy() * 255).astype(np.uint8))
    assert (out / "samples_latest.png").exists()


def test_a_same_padding_preset_trains_directly_with_mse(tmp_path):
    write_stroke_pairs(tmp_path / "pairs.npz", 16)
    overrides = {"base_channels": 8, "channel_mults": (1, 2), "attention_levels": (), "norm_groups": 4,
                 "head_channels": 8}
    out = train(direct_config(tmp_path / "run", tmp_path / "pairs.npz", preset="small28", steps=2), overrides)
    run = load_run(out)
    assert (run.config.out_channels, run.config.time_conditional, run.config.padding) == (1, False, "same")


# ---- the 2015 weight map (Ronneberger et al. 2015, eq. 2) --------------------------------------

def test_weight_map_matches_a_hand_computed_example():
    """Objects A = (0, 0) and B = (2, 3), (2, 4) on a 3x5 map; d1 + d2 by hand from squared offsets."""
    classes = torch.tensor([[[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1]]])
    r = math.sqrt
    distance_a = [[0, 1, 2, 3, 4], [1, r(2), r(5), r(10), r(17)], [2, r(5), r(8), r(13), r(20)]]
    distance_b = [[r(13), r(8), r(5), 2, 2], [r(10), r(5), r(2), 1, 1], [3, 2, 1, 0, 0]]
    total = torch.tensor(distance_a) + torch.tensor(distance_b)                  # d1 + d2, either order
    w_c = torch.where(classes[0] > 0, 15 / (2 * 3), 15 / (2 * 12))             # H W / (K' n_k): 2.5 and 0.625
    expected = w_c + 10 * torch.exp(-total ** 2 / (2 * 5 ** 2))
    torch.testing.assert_close(direct.weight_map(classes, 2), expected[None], rtol=1e-6, atol=1e-6)
    assert direct.weight_map(classes, 2)[0, 0, 0].item() == pytest.approx(2.5 + 10 * math.exp(-13 / 50))
    one = torch.tensor([[[0, 1, 1], [0, 1, 0]]])                                  # one object: no border term
    torch.testing.assert_close(direct.weight_map(one, 2), torch.ones(1, 2, 3))    # and 3 + 3 pixels: w_c = 1
    torch.testing.assert_close(direct.weight_map(torch.zeros(1, 2, 3, dtype=torch.long), 2), torch.ones(1, 2, 3))
    lopsided = torch.tensor([[[1, 0, 0, 0]]])                                     # w_c averages 1: 4/2 and 4/6
    torch.testing.assert_close(direct.weight_map(lopsided, 2, 0.0), torch.tensor([[[2.0, 2 / 3, 2 / 3, 2 / 3]]]))


def test_connected_components_are_4_connected_regions_of_one_class():
    classes = torch.tensor([[[1, 0, 1], [1, 0, 1], [1, 1, 1]],                     # a U: one object
                            [[1, 0, 2], [0, 1, 0], [2, 2, 0]]])                    # diagonals and classes part
    ids = direct.connected_components(classes)
    assert (ids[0][classes[0] > 0] == ids[0, 0, 0]).all() and (ids[0][classes[0] == 0] == 0).all()
    second = ids[1][classes[1] > 0].tolist()                                      # (0,0) (0,2) (1,1) (2,0) (2,1)
    assert len(set(second)) == 4 and second[3] == second[4] and ids[0, 0, 0] not in second
    d1, d2 = direct.object_distances(ids[1:])
    assert d1[0, 0, 1].item() == 1 and d2[0, 0, 1].item() == 1                    # between two objects
    assert d1[0, 2, 2].item() == 1 and d2[0, 2, 2].item() == pytest.approx(math.sqrt(2))


def test_border_weight_weights_the_cross_entropy_and_is_refused_for_mse():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 6, 7, generator=generator)
    target = torch.where(torch.rand(2, 1, 6, 7, generator=generator) < 0.4, 1.0, -1.0)
    same = UNet(UNetConfig.small28(base_channels=8, norm_groups=4))
    loss = direct.direct_loss(lambda cond: logits, same, torch.zeros(2, 1, 6, 7), target, border_weight=10.0)
    classes = direct.target_classes(target, 2)
    per_pixel = F.cross_entropy(logits, classes, reduction="none")
    torch.testing.assert_close(loss, (direct.weight_map(classes, 2, 10.0) * per_pixel).mean(dim=(1, 2)))
    assert not torch.allclose(loss, per_pixel.mean(dim=(1, 2)))
    with pytest.raises(UserError, match="drop --border-weight"):
        direct.direct_loss(lambda cond: logits[:, :1], same, torch.zeros(2, 1, 6, 7), target, border_weight=10.0)


def test_border_weight_trains_a_direct_run_and_bad_values_are_one_line_errors(tmp_path, capsys):
    write_stroke_pairs(tmp_path / "pairs.npz", 16)
    out = tmp_path / "run"
    base = ["train", "--data-cond", str(tmp_path / "pairs.npz"), "--out", str(out), "--steps", "2", "--batch-size",
            "8", "--quiet", "--device", "cpu", "--model-base-channels", "4", "--model-channel-mults", "1,2"]
    assert main([*base, "--objective", "direct", "--border-weight", "10"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["border_weight"] == 10
    assert TrainConfig().border_weight == 0                                        # off by default
    for flags in (["--border-weight", "10"], ["--objective", "direct", "--border-weight", "-1"]):
        assert main([*base, *flags, "--out", str(tmp_path / "bad")]) == 1
        error = capsys.readouterr().err
        assert "border_weight (--border-weight) must be a number >= 0" in error and error.count("\n") == 1


# ---- errors -----------------------------------------------------------------------------------

def test_bad_objectives_are_refused():
    with pytest.raises(ValueError, match=r"objective \(--objective\) direct .* give task \(--task\)"):
        TrainConfig(objective="direct")
    with pytest.raises(ValueError, match=r"objective \(--objective\) must be one of diffusion, direct; got 'denoise'"):
        TrainConfig(objective="denoise", task="inpaint")
    with pytest.raises(UserError, match="--model-out-channels 3"):       # 2015 classes on a 3-channel target
        direct.model_config("ronneberger2015", 3, 1)
    with pytest.raises(UserError, match="without time or labels"):
        direct.model_config("ronneberger2015", 1, 1, {"time_conditional": True})


@pytest.mark.parametrize("flags, words", [
    (["--objective", "direct"], "objective (--objective) direct maps a condition image"),
    (["--objective", "noise", "--task", "inpaint"], "objective (--objective) must be one of diffusion, direct"),
    (["--objective", "direct", "--task", "colorize", "--preset", "ronneberger2015"], "colorize needs colour"),
])
def test_bad_objective_flags_are_one_line_errors(tmp_path, capsys, flags, words):
    code = main(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--quiet", *flags])
    error = capsys.readouterr().err
    assert code != 0 and words in error and error.count("\n") == 1 and "Traceback" not in error


def test_cli_trains_the_2015_preset_directly_with_model_flags(tmp_path):
    write_stroke_pairs(tmp_path / "pairs.npz", 16)
    out = tmp_path / "run"
    assert main(["train", "--data-cond", str(tmp_path / "pairs.npz"), "--objective", "direct", "--out", str(out),
                 "--steps", "2", "--batch-size", "8", "--quiet", "--device", "cpu", "--model-base-channels", "4",
                 "--model-channel-mults", "1,2,4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["objective"] == "direct" and config["preset_choice"][0] == "ronneberger2015"
    assert config["model"]["channel_mults"] == [1, 2, 4] and config["model"]["padding"] == "valid"
