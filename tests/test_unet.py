"""UNetConfig and UNet: shapes over sizes and switches, the 2015 preset, conditioning, errors."""
import io
import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffunet import PRESETS, UNet, UNetConfig
from diffunet.layers import DoubleConv, Downsample, ResBlock, Upsample
from diffunet.valid import center_crop, out_size


def tiny(**overrides) -> UNetConfig:
    """Two levels of 8 and 16 channels: fast enough to build and run dozens of times."""
    fields = dict(in_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4,
                  attention_levels=(1,), num_heads=2)
    return UNetConfig(**{**fields, **overrides})


def perturbed(model: UNet, seed: int = 0) -> UNet:
    """Give the zero-initialised weights random values, so every branch contributes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def fitting_side(model: UNet, start: int) -> int:
    """The smallest side >= start that a valid-padding model accepts."""
    for side in range(start, start + 200):
        try:
            model.output_size(side, side)
            return side
        except ValueError:
            pass
    raise AssertionError("no side fits")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- shapes ----
@pytest.mark.parametrize("size", [(8, 16), (16, 24), (28, 28), (17, 31), (100, 75), (1, 1)])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_output_has_input_shape_for_any_size(size, channels):
    # three downsamplings: 28 and 17x31 are not multiples of 2^3, so the model pads and crops inside
    model = UNet(tiny(in_channels=channels, channel_mults=(1, 2, 2, 2), attention_levels=(2,))).eval()
    x = torch.randn(2, channels, *size)
    assert model(x, 10).shape == x.shape


@settings(max_examples=12, deadline=None)
@given(height=st.integers(1, 40), width=st.integers(1, 40), out_channels=st.integers(1, 5))
def test_same_padding_keeps_any_size(height, width, out_channels):
    model = UNet(tiny(in_channels=2, out_channels=out_channels, channel_mults=(1, 2, 2))).eval()
    assert model(torch.randn(1, 2, height, width), 3).shape == (1, out_channels, height, width)


@pytest.mark.parametrize("t", [7, 7.0, 3.25, torch.tensor(7), torch.tensor(7.0), torch.tensor([7]),
                               torch.tensor([7, 7, 7]), torch.tensor([7.0, 7.0, 7.0])])
def test_every_kind_of_t_gives_the_same_answer(t):
    model = perturbed(UNet(tiny())).eval()
    x = torch.randn(3, 3, 8, 16)
    out = model(x, t)
    assert out.shape == x.shape
    if not (isinstance(t, float) and t != 7.0):
        torch.testing.assert_close(out, model(x, torch.tensor([7, 7, 7])))


def test_fractional_t_differs_from_rounded():
    model = perturbed(UNet(tiny())).eval()
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(model(x, 3.25), model(x, 3))


@pytest.mark.parametrize("block", ["resnet", "double_conv"])
@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "transposed"])
@pytest.mark.parametrize("skip", ["concat", "add"])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_every_switch_gives_the_promised_shape(block, upsample, skip, padding):
    config = tiny(block=block, upsample=upsample, skip=skip, padding=padding, out_channels=2,
                  downsample="maxpool" if block == "double_conv" else "conv", attention_levels=(0,))
    model = UNet(config).eval()
    side = fitting_side(model, 12) if padding == "valid" else 13
    x = torch.randn(2, 3, side, side + 2 * (padding == "same"))
    out = model(x, torch.tensor([1, 500]))
    assert out.shape == (2, 2, *model.output_size(*x.shape[-2:]))
    if padding == "same":
        assert out.shape[-2:] == x.shape[-2:]
    else:
        assert out.shape[-1] < side


@pytest.mark.parametrize("downsample", ["conv", "maxpool"])
def test_plain_unet_without_time(downsample):
    model = UNet(tiny(time_conditional=False, activation="relu", downsample=downsample, norm_groups=0))
    assert model(torch.randn(2, 3, 16, 24)).shape == (2, 3, 16, 24)


# ---- the 2015 paper ----
def test_ronneberger2015_layers_and_parameter_count():
    def conv(c_in, c_out, k=3):                          # weights + biases
        return c_in * c_out * k * k + c_out
    widths = [64, 128, 256, 512, 1024]
    contracting = sum(conv(a, b) + conv(b, b) for a, b in zip([1] + widths[:-1], widths))
    expanding = sum(conv(2 * w, w, 2) + conv(2 * w, w) + conv(w, w) for w in widths[:-1])  # up-conv halves
    expected = contracting + expanding + conv(64, 2, 1)  # final 1x1 conv to the 2 classes
    assert expected == 31_030_658
    with torch.device("meta"):                           # shapes only: no memory, no arithmetic
        model = UNet(UNetConfig.ronneberger2015())
    assert count_parameters(model) == expected
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs) == 23                              # "In total the network has 23 convolutional layers"
    assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.SiLU)) for m in model.modules())


def test_ronneberger2015_shapes():
    with torch.device("meta"):
        model = UNet(UNetConfig.ronneberger2015())
    assert model.output_size(572, 572) == (388, 388)
    seen = {}
    model.middle.register_forward_hook(lambda module, args, out: seen.update(bottleneck=out.shape))
    out = model(torch.empty(1, 1, 572, 572, device="meta"))
    assert seen["bottleneck"] == (1, 1024, 28, 28)
    assert out.shape == (1, 2, 388, 388)


def test_valid_padding_rejects_sizes_that_do_not_fit():
    model = UNet(UNetConfig.ronneberger2015())
    with pytest.raises(ValueError, match="572"):         # 570 would need an odd max-pool: suggest 572
        model.output_size(570, 572)
    with pytest.raises(ValueError, match="padding='same'"):
        model(torch.randn(1, 1, 16, 16))


def test_valid_size_arithmetic_matches_running_the_layers():
    """valid.py's integer sizes are what the layers really output; its crop is the central window."""
    layers = [torch.nn.Conv2d(1, 1, 3), torch.nn.Conv2d(1, 1, 3, stride=2, padding=1),
              torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.ReLU(), torch.nn.Conv2d(1, 1, 3)),
              Downsample(1, "maxpool", padding=0, exact=False), Downsample(1, "conv", padding=0, exact=False),
              Upsample(1, 1, "transposed", padding=0)]
    for layer, side in itertools.product(layers, range(5, 12)):
        assert out_size(layer, side) == layer(torch.zeros(1, 1, side, side)).shape[-1]
    with pytest.raises(ValueError, match="3x3 convolution gets a side of 2"):
        out_size(torch.nn.Conv2d(1, 1, 3), 2)
    x = torch.arange(4 * 7).reshape(1, 4, 7)
    assert torch.equal(center_crop(x, 2, 3), x[:, 1:3, 2:5])


def test_bilinear_upsampling_follows_half_pixel_formula_by_hand():
    # x_src = (x_dst + 0.5) * (2 / 4) - 0.5 for x_dst = 0, 1, 2, 3 gives -0.25, 0.25, 0.75, 1.25,
    # clamped to the image: 0, 0.25, 0.75, 1. The image [[0, 1], [2, 3]] is 2 * row + col, which
    # bilinear interpolation reproduces exactly, so out[i, j] = 2 * src[i] + src[j].
    expected = torch.tensor([[0.0, 0.25, 0.75, 1.0],
                             [0.5, 0.75, 1.25, 1.5],
                             [1.5, 1.75, 2.25, 2.5],
                             [2.0, 2.25, 2.75, 3.0]])
    upsample = Upsample(1, 1, "bilinear", padding=1)
    with torch.no_grad():                                # make the 3x3 conv the identity
        upsample.conv.weight.zero_()
        upsample.conv.weight[0, 0, 1, 1] = 1.0
        upsample.conv.bias.zero_()
    out = upsample(torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]))
    torch.testing.assert_close(out[0, 0], expected)
    model = UNet(tiny(upsample="bilinear"))
    assert [m.kind for m in model.modules() if isinstance(m, Upsample)] == ["bilinear"]


# ---- conditioning ----
@pytest.mark.parametrize("block", ["resnet", "double_conv"])
@pytest.mark.parametrize("injection", ["scale_shift", "add"])
def test_t_reaches_every_block(block, injection):
    model = perturbed(UNet(tiny(block=block, time_injection=injection, channel_mults=(1, 2, 2)))).eval()
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, DoubleConv))]
    outputs = {}
    for block_module in blocks:
        block_module.register_forward_hook(lambda m, args, out: outputs.setdefault(m, []).append(out) or None)
    x = torch.randn(2, 3, 8, 16)
    model(x, 1)
    model(x, 700)
    assert len(outputs) == len(blocks) >= 5
    for early, late in outputs.values():
        assert not torch.allclose(early, late)


def test_labels_and_no_label():
    model = perturbed(UNet(tiny(num_classes=10))).eval()
    x = torch.randn(4, 3, 8, 16)
    labels = torch.tensor([0, 3, 9, 3])
    no_label = model(x, 5)
    torch.testing.assert_close(model(x, 5, y=torch.full((4,), -1)), no_label)     # -1 = y None
    mixed = model(x, 5, y=torch.tensor([0, -1, 9, -1]))                            # cond and uncond in one batch
    torch.testing.assert_close(mixed[1::2], no_label[1::2])
    torch.testing.assert_close(mixed[0::2], model(x, 5, y=labels)[0::2])
    assert not torch.allclose(model(x, 5, y=labels), no_label)
    assert model.class_embedding.num_embeddings == 11                              # one extra "no label" row


def test_cond_image_is_used():
    model = perturbed(UNet(tiny(in_channels=1, cond_channels=2, num_classes=3))).eval()
    x, cond = torch.randn(2, 1, 12, 20), torch.randn(2, 2, 12, 20)
    out = model(x, 3, y=torch.tensor([0, 2]), cond=cond)
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, 3, y=torch.tensor([0, 2]), cond=torch.zeros_like(cond)))


# ---- training properties ----
def test_diffusion_model_starts_from_zero_output():
    model = UNet(tiny())
    assert torch.count_nonzero(model(torch.randn(2, 3, 8, 8), 3)) == 0
    assert all(not block.conv2.weight.any() for block in model.modules() if isinstance(block, ResBlock))


@pytest.mark.parametrize("skip", ["concat", "add"])
def test_gradients_reach_every_parameter(skip):
    config = tiny(skip=skip, num_classes=4, cond_channels=1, dropout=0.1, channel_mults=(1, 2, 2))
    model = perturbed(UNet(config))
    x, cond = torch.randn(3, 3, 9, 14), torch.randn(3, 1, 9, 14)
    out = model(x, torch.tensor([1.0, 20.0, 300.0]), y=torch.tensor([0, 3, -1]), cond=cond)
    (out * torch.randn_like(out)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_state_dict_and_config_round_trip_reproduce_outputs():
    config = tiny(num_classes=5, upsample="transposed", skip="add")
    model = perturbed(UNet(config)).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = UNet(UNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))).eval()
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    x, y = torch.randn(2, 3, 10, 12), torch.tensor([4, -1])
    assert rebuilt.config == config
    torch.testing.assert_close(rebuilt(x, 9, y=y), model(x, 9, y=y), rtol=0, atol=0)


def test_channels_last_input_and_model():
    model = perturbed(UNet(tiny(attention_levels=(0, 1)))).eval()
    x = torch.randn(2, 3, 12, 16)
    expected = model(x, 4)
    channels_last = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(channels_last, 4), expected, rtol=1e-4, atol=1e-5)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(channels_last, 4), expected, rtol=1e-4, atol=1e-5)


# ---- presets and config ----
def test_presets_and_their_sizes():
    assert set(PRESETS) == {"small28", "small32", "small64", "ddpm_cifar10", "ronneberger2015"}
    with torch.device("meta"):
        counts = {name: count_parameters(UNet(preset())) for name, preset in PRESETS.items()}
    assert counts["ddpm_cifar10"] == 35_746_307           # Ho et al. 2020: "35.7 million parameters"
    assert 2e5 <= counts["small28"] <= 5e6 and 2e5 <= counts["small32"] <= 5e6 and 1e6 <= counts["small64"] <= 5e6
    config = PRESETS["small28"](num_classes=10)
    assert (config.in_channels, config.num_classes, config.base_channels) == (1, 10, 16)
    assert UNetConfig.ddpm_cifar10(dropout=0.0) == UNetConfig.ddpm_cifar10().__class__(
        **{**UNetConfig.ddpm_cifar10().to_dict(), "dropout": 0.0})


def test_small_presets_run_at_their_sizes():
    assert UNet(UNetConfig.small28()).eval()(torch.randn(1, 1, 28, 28), 5).shape == (1, 1, 28, 28)
    assert UNet(UNetConfig.small32()).eval()(torch.randn(1, 3, 32, 32), 5).shape == (1, 3, 32, 32)


def test_config_dict_is_json_and_rejects_unknown_keys():
    config = UNetConfig(channel_mults=[1, 2], attention_levels=[1])     # lists are stored as tuples
    assert config.channel_mults == (1, 2) and hash(config)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["channel_mults"] == [1, 2] and UNetConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({**data, "chanel_mults": [1]})


@pytest.mark.parametrize("overrides, message", [
    (dict(base_channels=12, norm_groups=8), "divisible by norm_groups"),
    (dict(attention_levels=(2,)), "attention_levels must lie in 0..1"),
    (dict(num_heads=3), "divisible by num_heads"),
    (dict(head_channels=5), "divisible by head_channels"),
    (dict(upsample="cubic"), "upsample must be one of"),
    (dict(padding="reflect"), "padding must be one of"),
    (dict(channel_mults=()), "at least one level"),
    (dict(channel_mults=3), r"channel_mults must be a tuple of integers"),
    (dict(attention_levels=1), r"attention_levels must be a tuple of integers"),
    (dict(num_res_blocks=0), "num_res_blocks must be >= 1"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(in_channels=1.5), "in_channels must be an integer"),
    (dict(num_classes=0), "num_classes must be >= 1"),
])
def test_configs_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.randn(3, 8, 8), 1), r"\[B, C, H, W\].*x\[None\]"),
    (lambda m: m(torch.randn(1, 2, 8, 8), 1), "in_channels=3"),
    (lambda m: m(torch.randn(1, 3, 8, 8)), "pass t"),
    (lambda m: m(torch.randn(2, 3, 8, 8), torch.zeros(3)), "t must be"),
    (lambda m: m(torch.randn(1, 3, 8, 8), 1, y=torch.tensor([10])), r"labels must lie in 0\.\.9"),
    (lambda m: m(torch.randn(1, 3, 8, 8), 1, y=torch.tensor([-2])), r"labels must lie in 0\.\.9"),
    (lambda m: m(torch.randn(1, 3, 8, 8), 1, y=torch.tensor([1.0])), "integer class labels"),
    (lambda m: m(torch.randn(2, 3, 8, 8), 1, y=torch.tensor([1])), r"\[B\] = \[2\]"),
    (lambda m: m(torch.randn(1, 3, 8, 8), 1, cond=torch.randn(1, 1, 8, 8)), "cond_channels=C"),
])
def test_bad_inputs_raise_value_errors_that_name_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call(UNet(tiny(num_classes=10)))


@pytest.mark.parametrize("cond", [None, torch.randn(1, 1, 8, 8), torch.randn(1, 2, 8, 6)])
def test_missing_or_misshapen_cond_is_refused(cond):
    with pytest.raises(ValueError, match="cond must be"):
        UNet(tiny(cond_channels=2))(torch.randn(1, 3, 8, 8), 1, cond=cond)


def test_inputs_a_model_does_not_take_are_refused():
    with pytest.raises(ValueError, match="time_conditional=False"):
        UNet(tiny(time_conditional=False))(torch.randn(1, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="num_classes=N"):
        UNet(tiny())(torch.randn(1, 3, 8, 8), 1, y=torch.tensor([0]))


def test_switch_combinations_build():
    for upsample, downsample, activation in itertools.product(["nearest", "bilinear", "transposed"],
                                                              ["conv", "maxpool"], ["silu", "relu"]):
        UNet(tiny(upsample=upsample, downsample=downsample, activation=activation))
