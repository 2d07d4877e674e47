"""Parts of the training loop: the optimizer and its fallback on an older torch, autocast around the forward
pass only, and the power-function EMA through train() and resume. (Multi-process runs: test_training.py.)"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import diffunet.training as training
from diffunet.ema import power_ema_decay, power_ema_exponent
from diffunet.training import TrainConfig, load_optimizer_state, make_optimizer, resume_config

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


TINY_MODEL = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), norm_groups=4,
                  head_channels=8, zero_init=False)  # no zero-initialised layers: every weight gets a gradient


def _first_step_gradients(tmp_path, monkeypatch, precision: str) -> tuple[torch.Tensor, list[bool]]:
    """Train one step; returns the flattened gradients that reach the clip and, for each backward() call,
    whether CPU autocast was on."""
    seen, autocast_at_backward = {}, []
    real_backward, real_clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_

    def backward(self, *args, **kwargs):
        autocast_at_backward.append(torch.is_autocast_enabled("cpu"))
        return real_backward(self, *args, **kwargs)

    def clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        seen.setdefault("gradients", torch.cat([p.grad.flatten().float() for p in parameters]))
        return real_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    training.train(TrainConfig(out=str(tmp_path / precision), steps=1, batch_size=8, precision=precision,
                               device="cpu", num_samples=2, sample_steps=1, quiet=True), TINY_MODEL)
    monkeypatch.undo()
    return seen["gradients"], autocast_at_backward


def test_backward_runs_outside_autocast_and_bf16_gradients_follow_fp32(tmp_path, monkeypatch):
    bf16, autocast_at_backward = _first_step_gradients(tmp_path, monkeypatch, "bf16")
    fp32, _ = _first_step_gradients(tmp_path, monkeypatch, "fp32")
    assert autocast_at_backward == [False]         # the forward and the loss ran under autocast, backward not
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=0).item()
    print(f"bf16 vs fp32 first-step gradients: cosine {cosine:.6f}")   # 0.99999 for this model
    assert cosine > 0.999


def test_host_reads_do_not_grow_with_micro_batches(tmp_path, monkeypatch):
    """Issue 15: the step's loss is summed on the device over micro-batches and read once per optimizer step
    (the divergence check), so --grad-accum adds no host syncs; on a GPU each .item() waits for the device."""
    real_item = torch.Tensor.item

    def item_calls(grad_accum: int) -> int:
        calls = []

        def item(self):
            calls.append(1)
            return real_item(self)

        monkeypatch.setattr(torch.Tensor, "item", item)
        training.train(TrainConfig(out=str(tmp_path / str(grad_accum)), steps=3, batch_size=4, grad_accum=grad_accum,
                                   device="cpu", num_samples=2, sample_steps=1, quiet=True), TINY_MODEL)
        monkeypatch.undo()
        return len(calls)

    assert item_calls(4) == item_calls(1)


def test_power_ema_run_resumes_exactly_and_old_runs_keep_the_exponential_ema(tmp_path, monkeypatch):
    options = dict(steps=4, batch_size=8, ema="power", ema_std=0.1, save_every=2, sample_every=100, device="cpu",
                   num_samples=2, sample_steps=1, quiet=True, precision="fp32")
    training.train(TrainConfig(out=str(tmp_path / "straight"), **options), TINY_MODEL)
    real_update, calls = training.ema_update, []

    def crash_on_third(ema, model, decay):
        calls.append(decay)
        real_update(ema, model, decay)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(training, "ema_update", crash_on_third)
    with pytest.raises(RuntimeError):
        training.train(TrainConfig(out=str(tmp_path / "resumed"), **options), TINY_MODEL)
    gamma = power_ema_exponent(0.1)
    assert calls == [power_ema_decay(step, gamma) for step in range(3)]      # 0, 0.5^(gamma+1), ...
    monkeypatch.setattr(training, "ema_update", real_update)
    training.train(resume_config(tmp_path / "resumed"))
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    # A run saved before the power EMA existed has no "ema" / "ema_std" in its config: it resumes exponential.
    config_path = tmp_path / "resumed" / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("ema", "ema_std"):
        del config["train"][key]
    config_path.write_text(json.dumps(config))
    old = resume_config(tmp_path / "resumed", steps=5)
    assert old.ema == "exponential" and old.ema_std == TrainConfig().ema_std
    training.train(old)
    assert json.loads(config_path.read_text())["step"] == 5


@pytest.mark.parametrize("fields, words", [
    (dict(lr=float("inf")), "lr (--lr) must be a finite number; got inf"),
    (dict(steps=0), "steps (--steps) must be positive; got 0"),
    (dict(prediction="noise"), "prediction (--prediction) must be one of eps, x0, v, flow; got 'noise'"),
    (dict(ema="karras"), "ema (--ema) must be one of exponential, power"),
    (dict(ema_std=0.3), "ema_std (--ema-std) must be in (0, 0.2887)"),
    (dict(ema_max_decay=1.0), "ema_max_decay (--ema-max-decay) and label_dropout (--label-dropout) in [0, 1); got"),
    (dict(schedule="rectified_flow", prediction="eps"), "use prediction (--prediction) flow, v or x0"),
    (dict(sample_steps=2000), "sample_steps (--sample-steps) must be at most num_timesteps (--num-timesteps) (1000)"),
])
def test_config_errors_name_the_field_and_its_flag(fields, words):
    """TrainConfig is built from Python as often as from the command line: its errors name the field first."""
    with pytest.raises(ValueError) as error:
        TrainConfig(**fields)
    assert words in str(error.value) and not str(error.value).startswith("--"), str(error.value)
