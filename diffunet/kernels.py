"""The CPU fast path for GroupNorm (Wu & He 2018) followed by FiLM and SiLU, and the layout detour.

Two measured wins on the CPU (benchmarks/README.md, "What each change gave"):
- `norm_act` runs GroupNorm -> FiLM -> SiLU as one autograd node (`_GroupNormFiLMSiLU`) that keeps
  only x and the group statistics for backward and recomputes the rest: small28 training memory
  -27% in fp32, -22% in bf16, at about the same speed.
- `GroupNorm` is nn.GroupNorm with a detour around torch's slow channels_last kernel for bf16/fp16
  maps with few channels per group (`_slow_channels_last`): they are normalised on an NCHW copy,
  without which channels_last would lose in bf16 (176 -> 144 images/s; with it 144 -> 203).

Both give the plain ops' results (tests/test_fast_paths.py) and step aside under torch.compile and
ONNX export (`_tracing`). layers.py builds its blocks from these; imports only torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (Wu & He 2018): the same parameters and output, with a detour around a slow kernel
    (see `_slow_channels_last`)."""

    def forward(self, x: Tensor) -> Tensor:
        if _slow_channels_last(x, self.num_groups) and not _tracing():
            return _GroupNormFiLMSiLU.apply(x, self.weight, self.bias, None, None, self.num_groups, self.eps, False)
        return super().forward(x)


def _tracing() -> bool:
    """True under torch.compile or ONNX export, which need the plain ops (the fused node has no ONNX symbolic)."""
    return torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def norm_act(norm: nn.Module, act: nn.Module, x: Tensor, scale: Tensor | None = None,
             shift: Tensor | None = None) -> Tensor:
    """act(norm(x) * (1 + scale) + shift), or act(norm(x)) without scale and shift. [B, C, H, W] -> same.

    GroupNorm followed by SiLU on the CPU runs as one autograd node that keeps only x and the group
    statistics for backward (`_GroupNormFiLMSiLU`), instead of four full-size intermediates.
    """
    fusable = isinstance(norm, GroupNorm) and isinstance(act, nn.SiLU) and x.device.type == "cpu" and x.dim() == 4
    if fusable and not _tracing():   # torch.compile fuses the plain ops better itself; ONNX needs plain ops
        return _GroupNormFiLMSiLU.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, True)
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale) + shift
    return act(h)


def _slow_channels_last(x: Tensor, groups: int) -> bool:
    """torch's channels_last group_norm kernel is slow for bf16/fp16 maps with fewer than 16 channels per
    group (one AVX-512 vector): 25.6 against 10.1 ms forward + backward for [64, 32, 28, 28], 8 groups,
    through an NCHW copy. True where the NCHW copy pays."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.bfloat16, torch.float16)
            and x.shape[1] // groups < 16 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


class _GroupNormFiLMSiLU(torch.autograd.Function):
    """y = silu(group_norm(x) * (1 + scale) + shift), with FiLM and SiLU each optional, as one node.

    Backward recomputes group_norm(x) from the saved x instead of keeping the normalised, modulated
    and activated maps: a ResBlock then keeps 4 full-size maps for backward instead of 7. Maps where
    the channels_last kernel is slow (`_slow_channels_last`) are normalised on an NCHW copy; the
    output and the input gradient are channels_last again, so neighbours stay in one layout.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups: int, eps: float, silu: bool):
        detour = _slow_channels_last(x, groups)
        x = x.contiguous(memory_format=torch.contiguous_format if detour else _layout(x))
        y, mean, rstd = _native_group_norm(x, weight, bias, groups, eps)
        if scale is not None:
            y = y.mul_(1 + scale).add_(shift)                            # FiLM (Perez et al. 2018)
        if silu:
            y = F.silu(y, inplace=True)
        ctx.save_for_backward(x, weight, bias, mean, rstd, scale, shift)
        ctx.groups, ctx.silu, ctx.detour = groups, silu, detour
        return y.contiguous(memory_format=torch.channels_last) if detour else y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd, scale, shift = ctx.saved_tensors
        grad = grad.contiguous(memory_format=_layout(x))                 # everything below in x's layout
        batch, channels, positions = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
        # group_norm(x) = x * a + b per sample and channel, from the saved statistics
        a = rstd.repeat_interleave(channels // ctx.groups, dim=1)       # [B, C], float32
        a = a * weight if weight is not None else a
        b = -mean.repeat_interleave(channels // ctx.groups, dim=1) * a
        b = b + bias if bias is not None else b
        gain = 1 + scale.reshape(batch, channels).float() if scale is not None else None
        if ctx.silu:                                                     # SiLU's input, recomputed in one affine
            a_z, b_z = (a * gain, b * gain + shift.reshape(batch, channels)) if scale is not None else (a, b)
            grad = torch.ops.aten.silu_backward(grad, _affine(x, a_z, b_z))
        grad_scale = grad_shift = None
        if scale is not None:
            grad_shift = grad.sum((2, 3), keepdim=True).float()          # [B, C, 1, 1]
            # sum(grad * group_norm(x)) = a * sum(grad * x) + b * sum(grad), without group_norm(x)
            grad_x_sum = (grad * x).sum((2, 3), keepdim=True).float()
            grad_scale = a[:, :, None, None] * grad_x_sum + b[:, :, None, None] * grad_shift
            grad_scale, grad_shift = grad_scale.to(scale.dtype), grad_shift.to(shift.dtype)
            grad = grad * gain[:, :, None, None].to(grad.dtype)
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(memory_format=_layout(x)), x, mean, rstd, weight, batch, channels, positions,
            ctx.groups, mask)
        if ctx.detour and grad_x is not None:
            grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        return grad_x, grad_weight, grad_bias, grad_scale, grad_shift, None, None, None


def _affine(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x * a + b with per-sample, per-channel a and b [B, C], in x's dtype and layout. One pass
    (addcmul) for channels_last; addcmul broadcasting over NCHW bf16 is 3x slower than mul + add."""
    a, b = a[:, :, None, None].to(x.dtype), b[:, :, None, None].to(x.dtype)
    return torch.addcmul(b, x, a) if _layout(x) == torch.channels_last else (x * a).add_(b)


def _layout(x: Tensor) -> torch.memory_format:
    """x's memory format as torch's kernels read it: channels_last or contiguous (NCHW)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _native_group_norm(x: Tensor, weight, bias, groups: int, eps: float):
    """torch's group_norm kernel: (y, mean [B, G], rstd [B, G])."""
    return torch.ops.aten.native_group_norm(x, weight, bias, x.shape[0], x.shape[1], x.shape[2] * x.shape[3],
                                            groups, eps)
