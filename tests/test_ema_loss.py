"""EMA math (update formula, warm-up schedule, power-function EMA) and the training loss (draws, targets,
min-SNR weights)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffunet import UNet, UNetConfig
from diffunet.ema import ema_copy, ema_decay, ema_update, power_ema_decay, power_ema_exponent
from diffunet.loss import draw_timesteps, min_snr_weight, training_loss
from samplers import NoiseSchedule


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tiny_unet(in_channels: int = 1, num_classes: int | None = None, seed: int = 0) -> UNet:
    """A two-level UNet with base_channels=8 whose weights are all random (no zero-initialised layers)."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(in_channels=in_channels, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                            attention_levels=(), norm_groups=4, num_classes=num_classes))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.1)
    return model


def betas_by_hand(num_timesteps: int) -> torch.Tensor:
    """The linear betas of Ho et al. 2020 (1e-4 ... 0.02), float64."""
    return torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)


def alpha_bar_by_hand(num_timesteps: int) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, Sec. 2), float64."""
    return torch.cumprod(1 - betas_by_hand(num_timesteps), dim=0)


# ---- EMA ------------------------------------------------------------------------------------

def test_ema_copy_is_a_frozen_independent_copy():
    model = tiny_unet()
    ema = ema_copy(model)
    assert not ema.training and all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    for a, b in zip(ema.parameters(), model.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(ema.parameters()), next(model.parameters()))


def test_ema_update_formula_on_unet():
    ema, model = tiny_unet(seed=1), tiny_unet(seed=2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for old, new, target in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * target, rtol=0, atol=1e-7)
    ema_update(ema, model, 0.0)   # decay 0 copies the model
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))


def test_ema_closed_form_after_n_updates_and_buffers_copied():
    # With the model fixed, n updates give ema_n = model + decay^n * (ema_0 - model).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ema_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(8, 3))  # changes the BatchNorm running statistics (buffers)
    start = [p.detach().clone() for p in ema.parameters()]
    for _ in range(5):
        ema_update(ema, model, 0.8)
    for p0, p, target in zip(start, ema.parameters(), model.parameters()):
        torch.testing.assert_close(p, target + 0.8 ** 5 * (p0 - target), rtol=0, atol=1e-6)
    for a, b in zip(ema.buffers(), model.buffers()):
        assert torch.equal(a, b)   # buffers are copied, not averaged


def test_ema_update_rejects_bad_input():
    model = tiny_unet()
    with pytest.raises(ValueError, match="decay"):
        ema_update(ema_copy(model), model, 1.5)
    with pytest.raises(ValueError, match="ema_copy"):
        ema_update(nn.Linear(2, 2), model, 0.5)


def test_ema_decay_warmup_schedule():
    assert ema_decay(0) == pytest.approx(0.1)
    assert ema_decay(8) == pytest.approx(0.5)
    assert ema_decay(80) == pytest.approx(0.9)
    assert ema_decay(890) == pytest.approx(0.99)
    assert ema_decay(10**9, max_decay=0.999) == 0.999                     # capped at max_decay
    values = [ema_decay(step, 0.9999) for step in range(0, 5000, 7)]
    assert all(a <= b for a, b in zip(values, values[1:]))                 # never decreases
    assert [ema_decay(step, 0.95) for step in (0, 1000)] == [0.1, 0.95]
    assert ema_decay(0, 0.95, warmup=False) == 0.95
    with pytest.raises(ValueError):
        ema_decay(-1)
    with pytest.raises(ValueError):
        ema_decay(0, max_decay=1.0)
    # The cap binds only from step (10 m - 1) / (1 - m): --ema-max-decay 0.999 does nothing in 2000 steps.
    assert ema_decay(1999, 0.999) == pytest.approx(2000 / 2009) and 2000 / 2009 < 0.999
    assert ema_decay(8989, 0.999) < 0.999 and ema_decay(8990, 0.999) == 0.999


def relative_std(gamma: float) -> float:
    """Karras et al. 2024, App. C, eq. 123: sigma_rel of the power-function profile with exponent gamma."""
    return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_power_ema_exponent_solves_the_relative_std_equation(sigma_rel):
    gamma = power_ema_exponent(sigma_rel)
    assert gamma >= 0 and relative_std(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    k = sigma_rel ** -2   # the largest real root of EDM2's cubic (eq. 126, Algorithm 2)
    cubic = [1, 7, 16 - k, 12 - k]
    assert abs(sum(c * gamma ** (3 - i) for i, c in enumerate(cubic))) < 1e-9 * k * (gamma + 1)
    assert all(sum(c * g ** (3 - i) for i, c in enumerate(cubic)) > 0 for g in (gamma + 0.01, gamma + 10))


def test_power_ema_exponent_known_values_and_bad_input():
    assert power_ema_exponent(0.05) == pytest.approx(16.972, abs=1e-3)   # EDM2's values for sigma_rel
    assert power_ema_exponent(0.10) == pytest.approx(6.937, abs=1e-3)
    for bad in (0.0, -0.1, 0.29, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel"):
            power_ema_exponent(bad)


def test_power_ema_decay_closed_form():
    gamma = power_ema_exponent(0.1)
    assert power_ema_decay(0, gamma) == 0.0                                  # the first update copies the model
    assert power_ema_decay(1, gamma) == pytest.approx(0.5 ** (gamma + 1))
    assert power_ema_decay(1999, gamma) == pytest.approx((1999 / 2000) ** 7.937204, rel=1e-9)
    assert power_ema_decay(1999, gamma) == pytest.approx(0.99604, abs=1e-5)  # vs 0.9955 for the exponential one
    values = [power_ema_decay(step, gamma) for step in range(0, 5000, 7)]
    assert all(a < b for a, b in zip(values, values[1:])) and values[-1] < 1
    with pytest.raises(ValueError):
        power_ema_decay(-1, gamma)
    with pytest.raises(ValueError):
        power_ema_decay(3, -0.5)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1])
def test_power_ema_is_the_power_weighted_average_of_the_trajectory(sigma_rel):
    """After n updates along theta_1 ... theta_n the EMA is sum_s w_s theta_s with the discrete power profile
    w_s = (s^(gamma+1) - (s-1)^(gamma+1)) / n^(gamma+1) (Karras et al. 2024, Sec. 3.1), whose standard
    deviation over s / n approaches sigma_rel."""
    gamma, n = power_ema_exponent(sigma_rel), 300
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    ema = ema_copy(model)
    trajectory = [[torch.randn_like(p) for p in model.parameters()] for _ in range(n)]
    for step, weights in enumerate(trajectory):
        with torch.no_grad():
            for parameter, value in zip(model.parameters(), weights):
                parameter.copy_(value)
        ema_update(ema, model, power_ema_decay(step, gamma))
    s = torch.arange(1, n + 1, dtype=torch.float64)
    w = (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / n ** (gamma + 1)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
    for i, parameter in enumerate(ema.parameters()):
        expected = sum(w[k] * trajectory[k][i] for k in range(n))
        torch.testing.assert_close(parameter, expected, rtol=0, atol=1e-12)
    # The profile's width, as a fraction of the run: sigma_rel (to 1 / n discretisation).
    s, n = torch.arange(1, 20_001, dtype=torch.float64), 20_000
    w = (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / n ** (gamma + 1)
    mean = (w * s / n).sum()
    assert ((w * (s / n - mean) ** 2).sum().sqrt().item()) == pytest.approx(sigma_rel, rel=1e-3)


# ---- training loss --------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_shape_and_determinism(prediction, weighting):
    model, schedule = tiny_unet(in_channels=3), NoiseSchedule.linear(100)
    x0 = torch.rand(4, 3, 8, 16) * 2 - 1
    options = dict(prediction=prediction, weighting=weighting)
    loss = training_loss(model, x0, schedule, generator=torch.Generator().manual_seed(0), **options)
    assert loss.shape == (4,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    again = training_loss(model, x0, schedule, generator=torch.Generator().manual_seed(0), **options)
    assert torch.equal(loss, again)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_matches_closed_form(prediction):
    """Draw t then eps from the same generator, build x_t and the target by hand, compare."""
    model, schedule = tiny_unet(), NoiseSchedule.from_betas(betas_by_hand(50))
    x0 = torch.rand(3, 1, 16, 24) * 2 - 1
    loss = training_loss(model, x0, schedule, prediction=prediction, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    t = torch.randint(0, 50, (3,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    alpha_bar = alpha_bar_by_hand(50)[t].float()[:, None, None, None]
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps                       # Ho et al. eq. 4
    target = {"eps": eps, "x0": x0, "v": alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0}[prediction]
    with torch.no_grad():
        expected = ((model(x_t, t) - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_zero_model_predicting_x0_has_loss_mean_x0_squared():
    x0 = torch.rand(5, 1, 8, 16) * 2 - 1
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    loss = training_loss(zero, x0, NoiseSchedule.cosine(100), prediction="x0")
    torch.testing.assert_close(loss, (x0 ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weighting_against_hand_computed_snr(prediction):
    model, schedule, gamma = tiny_unet(), NoiseSchedule.from_betas(betas_by_hand(1000)), 5.0
    x0 = torch.rand(6, 1, 8, 16) * 2 - 1
    plain = training_loss(model, x0, schedule, prediction=prediction, generator=torch.Generator().manual_seed(3))
    weighted = training_loss(model, x0, schedule, prediction=prediction, weighting="min_snr",
                             min_snr_gamma=gamma, generator=torch.Generator().manual_seed(3))
    t = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(3))
    alpha_bar = alpha_bar_by_hand(1000)[t]
    snr = alpha_bar / (1 - alpha_bar)
    weight = {"eps": torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr,
              "x0": torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)),
              "v": torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (snr + 1)}[prediction]
    torch.testing.assert_close(weighted.detach(), plain.detach() * weight.float(), rtol=1e-5, atol=1e-7)


def test_min_snr_weight_values():
    snr = torch.tensor([0.0, 0.5, 5.0, 20.0, 1e4], dtype=torch.float64)
    x0, eps, v = (min_snr_weight(snr, p, 5.0) for p in ("x0", "eps", "v"))
    torch.testing.assert_close(x0, torch.tensor([0.0, 0.5, 5.0, 5.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 1.0, 0.25, 5e-4], dtype=torch.float64))
    torch.testing.assert_close(v, torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 21, 5 / 10001], dtype=torch.float64))
    # All three are one weighting of the x0 error: |eps err|^2 = SNR |x0 err|^2, |v err|^2 = (SNR+1) |x0 err|^2.
    torch.testing.assert_close((eps * snr)[1:], x0[1:])
    torch.testing.assert_close(v * (snr + 1), x0)


@pytest.mark.parametrize("schedule", [NoiseSchedule.cosine(100), NoiseSchedule.rectified_flow()], ids=["vp", "flow"])
def test_snr_beside_a_tensor_matches_the_float64_table(schedule):
    """`snr(t, like=loss)` (what min-SNR uses, so that on a GPU t is not copied to the host) equals snr(t)."""
    t = schedule.timesteps(7, "trailing")
    t = t.long() if isinstance(schedule, NoiseSchedule) else t
    like = torch.zeros(len(t))
    beside = schedule.snr(t, like=like)
    assert beside.dtype == torch.float32 and beside.shape == like.shape
    torch.testing.assert_close(beside, schedule.snr(t).float(), rtol=1e-5, atol=0)


def test_min_snr_weight_keeps_the_dtype_and_takes_infinite_snr():
    snr = torch.tensor([0.0, 4.0, float("inf")])
    for prediction, expected in [("x0", [0.0, 4.0, 5.0]), ("eps", [1.0, 1.0, 0.0]), ("v", [0.0, 0.8, 0.0]),
                                 ("flow", [0.0, 4 / 9, 0.0])]:
        weight = min_snr_weight(snr, prediction, 5.0)
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, torch.tensor(expected))


def test_labels_reach_the_model_and_bad_options_raise():
    model, schedule = tiny_unet(num_classes=3), NoiseSchedule.cosine(20)
    x0 = torch.zeros(4, 1, 8, 16)
    y = torch.tensor([0, 2, -1, 1])
    assert training_loss(model, x0, schedule, y=y).shape == (4,)
    seen = {}

    def spy(x_t, t, y=None):
        seen.update(t=t, y=y)
        return torch.zeros_like(x_t)

    training_loss(spy, x0, schedule, y=y)
    assert torch.equal(seen["y"], y) and seen["t"].dtype == torch.long and seen["t"].shape == (4,)
    assert int(seen["t"].min()) >= 0 and int(seen["t"].max()) < 20
    for bad in (dict(prediction="noise"), dict(weighting="snr"), dict(weighting="min_snr", min_snr_gamma=0),
                dict(timestep_sampling="beta"), dict(timestep_sampling="lognormal", logsnr_std=0.0),
                dict(timestep_sampling="lognormal", logsnr_mean=float("nan"))):
        with pytest.raises(ValueError):
            training_loss(model, x0, schedule, **bad)


# ---- training noise levels ------------------------------------------------------------------

def test_uniform_timesteps_are_the_plain_randint_draw():
    schedule = NoiseSchedule.linear(1000)
    drawn = draw_timesteps(schedule, 64, "uniform", generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(5)))


def test_lognormal_timesteps_follow_the_log_snr_normal():
    """lambda ~ N(m, s^2) mapped to the nearest step: the drawn steps' log-SNR has mean m and std s
    (the linear schedule's log-SNR grid is fine, < 0.05 apart, where N(1, 1.5^2) has its mass)."""
    schedule = NoiseSchedule.linear(1000)
    t = draw_timesteps(schedule, 40_000, "lognormal", 1.0, 1.5, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    logsnr = schedule.snr(t).log()
    assert abs(logsnr.mean().item() - 1.0) < 0.03 and abs(logsnr.std().item() - 1.5) < 0.03
    # Fraction below one standard deviation: Phi(-1) = 0.1587.
    assert abs((logsnr < 1.0 - 1.5).double().mean().item() - 0.1587) < 0.01


def test_lognormal_timesteps_pick_the_nearest_step_and_clamp_to_the_ends():
    schedule = NoiseSchedule.linear(1000)
    logsnr = schedule.snr(torch.arange(1000)).log()
    for k in (0, 1, 250, 998, 999):
        drawn = draw_timesteps(schedule, 8, "lognormal", logsnr[k].item(), 1e-12, torch.Generator().manual_seed(k))
        assert drawn.tolist() == [k] * 8
    high = draw_timesteps(schedule, 8, "lognormal", logsnr[0].item() + 30, 1.0, torch.Generator().manual_seed(1))
    low = draw_timesteps(schedule, 8, "lognormal", logsnr[-1].item() - 30, 1.0, torch.Generator().manual_seed(1))
    assert high.tolist() == [0] * 8 and low.tolist() == [999] * 8
    terminal = NoiseSchedule.linear(1000).rescale_zero_terminal_snr()        # log-SNR -inf at T-1
    assert draw_timesteps(terminal, 8, "lognormal", -200.0, 1.0, torch.Generator().manual_seed(2)).tolist() == [998] * 8
