"""Parts of the training loop: the optimizer and its fallback on an older torch, autocast around the forward
pass only, and what a multi-process run agrees on."""
from __future__ import annotations

import copy

import pytest
import torch

import diffunet.training as training
from diffunet.training import TrainConfig, load_optimizer_state, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _old_torch_adamw(monkeypatch):
    """Make torch.optim.AdamW refuse fused=True as torch < 2.4 does for CPU parameters (when it is built)."""
    real = torch.optim.AdamW

    def adamw(params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices: ['cuda', 'xpu', 'privateuseone'].")
        return real(params, *args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)


def _steps(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor], gradients: list[list[torch.Tensor]]):
    for step_gradients in gradients:
        for parameter, gradient in zip(parameters, step_gradients):
            parameter.grad = gradient.clone()
        optimizer.step()


def test_adamw_falls_back_to_the_same_update_without_a_fused_cpu_kernel(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in ((16, 8), (8,), (4, 4, 3, 3))]
    gradients = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(5)]
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, adam_beta2=0.99)
    fused_parameters = [p.clone().requires_grad_() for p in start]
    fused = make_optimizer(fused_parameters, cfg, torch.device("cpu"))
    assert fused.param_groups[0]["fused"]            # torch 2.4+: the fused CPU kernel
    _old_torch_adamw(monkeypatch)
    plain_parameters = [p.clone().requires_grad_() for p in start]
    plain = make_optimizer(plain_parameters, cfg, torch.device("cpu"))
    assert not plain.param_groups[0]["fused"]
    _steps(fused, fused_parameters, gradients[:3])
    _steps(plain, plain_parameters, gradients[:3])
    for a, b in zip(fused_parameters, plain_parameters):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)   # same update up to float rounding
    assert all(not torch.equal(a, s) for a, s in zip(plain_parameters, start))

    # A state saved by the fused optimizer resumes on the old torch, which keeps its own (plain) kernel.
    resumed_parameters = [p.detach().clone().requires_grad_() for p in fused_parameters]
    resumed = make_optimizer(resumed_parameters, cfg, torch.device("cpu"))
    load_optimizer_state(resumed, copy.deepcopy(fused.state_dict()))  # as read from a file: no shared moments
    assert not resumed.param_groups[0]["fused"]          # a torch < 2.4 would fail its first step on fused=True
    _steps(fused, fused_parameters, gradients[3:])
    _steps(resumed, resumed_parameters, gradients[3:])
    for a, b in zip(fused_parameters, resumed_parameters):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
