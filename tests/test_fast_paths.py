"""The CPU fast paths in kernels.py and layers.py compute what the plain ops compute: fused GroupNorm + FiLM + SiLU,
the channels_last GroupNorm detour, small-map attention, and a channels_last UNet with NCHW output."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import torch.nn.functional as F
from torch import nn

from diffunet import UNet, UNetConfig
from diffunet.kernels import GroupNorm, norm_act
from diffunet.layers import Attention


def plain_norm_act(x, weight, bias, groups, scale=None, shift=None):
    h = F.group_norm(x, groups, weight, bias)
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.silu(h)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [16, 64])          # 2 and 8 channels per group: below 16 takes the detour
@pytest.mark.parametrize("film", [False, True])
def test_fused_norm_act_matches_plain_ops_and_gradients(dtype, tolerance, channels_last, channels, film):
    generator = torch.Generator().manual_seed(0)
    norm = GroupNorm(8, channels)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=generator))
        norm.bias.copy_(torch.randn(channels, generator=generator))
    x = torch.randn(3, channels, 5, 6, generator=generator) * 2 + 1
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x = x.to(dtype).requires_grad_()
    emb = torch.randn(3, 2 * channels, 1, 1, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(3, channels, 5, 6, generator=generator).to(dtype)
    scale, shift = emb.chunk(2, dim=1) if film else (None, None)
    out = norm_act(norm, nn.SiLU(), x, scale, shift)
    out.backward(grad)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)

    leaves = [t.detach().double().requires_grad_() for t in (x, norm.weight, norm.bias, emb)]
    reference_scale, reference_shift = leaves[3].chunk(2, dim=1) if film else (None, None)
    reference = plain_norm_act(leaves[0], leaves[1], leaves[2], 8, reference_scale, reference_shift)
    reference.backward(grad.double())

    def close(actual, expected):
        torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    close(out, reference)
    for actual, leaf in zip((x.grad, norm.weight.grad, norm.bias.grad), leaves):
        close(actual, leaf.grad)
    if film:
        close(emb.grad, leaves[3].grad)


def test_group_norm_detour_matches_torch():
    norm = GroupNorm(8, 32)
    x = torch.randn(2, 32, 7, 9).contiguous(memory_format=torch.channels_last).bfloat16()
    out = norm(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), F.group_norm(x.float(), 8, norm.weight, norm.bias), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("side", [4, 8, 9])             # 16 and 64 positions: plain formula; 81: scaled_dot_product_attention
def test_attention_paths_match_the_formula(side):
    torch.manual_seed(0)
    attention = Attention(16, 2, norm_groups=4, zero_init=False)
    x = torch.randn(2, 16, side, side)
    tokens = attention.norm(x).flatten(2).transpose(1, 2)                      # [B, N, C]
    q, k, v = attention.qkv(tokens).chunk(3, dim=-1)
    heads = lambda t: t.unflatten(-1, (2, 8)).transpose(1, 2)                  # noqa: E731  [B, heads, N, d]
    weights = (heads(q) @ heads(k).transpose(-1, -2) / 8 ** 0.5).softmax(dim=-1)
    out = attention.proj((weights @ heads(v)).transpose(1, 2).flatten(2))
    expected = x + out.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every batched matmul and softmax that reaches the kernels (below autocast)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.bmm.default, torch.ops.aten._softmax.default):
            self.dtypes.append(out.dtype)
        return out


def test_small_map_attention_computes_in_float32_under_cpu_autocast():
    attention = Attention(16, 2, norm_groups=4, zero_init=False)
    x = torch.randn(2, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), _MatmulDtypes() as seen:
        out = attention(x)
    assert seen.dtypes == [torch.float32] * 3        # q k^T, softmax, weights v: as the docstring says
    assert torch.isfinite(out).all()


def test_unet_is_channels_last_inside_and_returns_nchw():
    model = UNet(UNetConfig(in_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4))
    assert model.down[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    out = model(torch.randn(2, 3, 8, 12), 5)
    assert out.is_contiguous() and out.shape == (2, 3, 8, 12)


def test_bf16_training_gradients_point_where_fp32_ones_do():
    torch.manual_seed(0)
    model = UNet(UNetConfig.small28(base_channels=16, norm_groups=4, zero_init=False))
    x, t = torch.randn(8, 1, 28, 28), torch.randint(0, 1000, (8,))
    target = torch.randn_like(x)

    def gradient(bf16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(model(x, t).float(), target)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])
    loss32, grad32 = gradient(False)
    loss16, grad16 = gradient(True)
    assert abs(loss16 - loss32) < 0.02 * loss32
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.99
