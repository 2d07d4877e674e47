"""NoiseSchedule against closed forms: endpoints, cosine/sigmoid formulas, zero terminal SNR,
eps/x0/v round trips, the posterior (Bayes' rule), timestep spacings, respacing, serialisation."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samplers import NoiseSchedule

SCHEDULES = {
    "linear": NoiseSchedule.linear,
    "cosine": NoiseSchedule.cosine,
    "sigmoid": NoiseSchedule.sigmoid,
    "linear_zero_snr": lambda: NoiseSchedule.linear().rescale_zero_terminal_snr(),
    "cosine_zero_snr": lambda: NoiseSchedule.cosine().rescale_zero_terminal_snr(),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_is_monotone_float64_and_in_range(name):
    schedule = SCHEDULES[name]()
    assert schedule.num_timesteps == 1000
    for values in (schedule.betas, schedule.alphas, schedule.alpha_bar, schedule.alpha_bar_prev):
        assert values.dtype == torch.float64 and values.shape == (1000,)
    assert ((schedule.betas > 0) & (schedule.betas <= 1)).all()
    assert (schedule.alpha_bar.diff() < 0).all(), "alpha_bar must fall strictly"
    assert 0.99 < schedule.alpha_bar[0] < 1 and schedule.alpha_bar[-1] < 1e-3
    assert schedule.alpha_bar_prev[0] == 1 and torch.equal(schedule.alpha_bar_prev[1:], schedule.alpha_bar[:-1])
    torch.testing.assert_close(schedule.alpha_bar, torch.cumprod(1 - schedule.betas, 0), rtol=1e-12, atol=0)


def test_linear_endpoints_match_ho_et_al():
    schedule = NoiseSchedule.linear()
    assert schedule.betas[0].item() == pytest.approx(1e-4) and schedule.betas[-1].item() == pytest.approx(0.02)
    assert (schedule.betas.diff() > 0).all()
    assert schedule.alpha_bar[-1].item() == pytest.approx(4.0e-5, rel=0.02)   # 4.036e-5
    assert schedule.alpha_bar[0].item() == pytest.approx(1 - 1e-4)


def test_linear_other_lengths_follow_the_same_curve():
    """Betas scale by 1000 / T, so log(alpha_bar) at the same fraction of the process stays close
    (not equal: the product of (1 - beta) over fewer, larger steps falls a little faster)."""
    long, short = NoiseSchedule.linear(1000), NoiseSchedule.linear(100)
    assert short.alpha_bar[-1].log().item() == pytest.approx(long.alpha_bar[-1].log().item(), rel=0.1)
    assert short.alpha_bar[49].log().item() == pytest.approx(long.alpha_bar[499].log().item(), rel=0.05)
    with pytest.raises(ValueError, match="more timesteps"):
        NoiseSchedule.linear(10)


@pytest.mark.parametrize("num_timesteps, s", [(1000, 0.008), (50, 0.008), (200, 0.0)])
def test_cosine_matches_its_closed_form(num_timesteps, s):
    """Nichol & Dhariwal 2021, eq. 17, index t at u = (t + 1) / T, wherever the 0.999 cap is inactive."""
    schedule = NoiseSchedule.cosine(num_timesteps, s=s)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f((t + 1) / num_timesteps) / f(0) for t in range(num_timesteps)], dtype=torch.float64)
    uncapped = schedule.betas < 0.999
    assert uncapped[: num_timesteps - 1].all() and schedule.betas[-1] == 0.999
    torch.testing.assert_close(schedule.alpha_bar[uncapped], expected[uncapped], rtol=1e-10, atol=0)


def test_sigmoid_matches_its_closed_form():
    """Chen 2023, Algorithm 1 with start=-3, end=3, tau=1:
    alpha_bar(u) = (v_end - sigmoid(6u - 3)) / (v_end - v_start)."""
    schedule = NoiseSchedule.sigmoid(1000)
    sig = lambda z: 1 / (1 + math.exp(-z))
    expected = torch.tensor([(sig(3) - sig(6 * (t + 1) / 1000 - 3)) / (sig(3) - sig(-3)) for t in range(999)],
                            dtype=torch.float64)
    torch.testing.assert_close(schedule.alpha_bar[:999], expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("make", [NoiseSchedule.linear, NoiseSchedule.cosine, NoiseSchedule.sigmoid])
def test_zero_terminal_snr_reaches_pure_noise_and_keeps_the_start(make):
    """Lin et al. 2024, Algorithm 1: alpha_bar[T-1] = 0 exactly, alpha_bar[0] unchanged; idempotent."""
    original = make()
    rescaled = original.rescale_zero_terminal_snr()
    assert rescaled.alpha_bar[-1].item() == 0 and rescaled.betas[-1].item() == 1
    assert rescaled.snr(999).item() == 0
    assert rescaled.alpha_bar[0].item() == pytest.approx(original.alpha_bar[0].item(), rel=1e-12)
    assert (rescaled.alpha_bar.diff() < 0).all()
    # sqrt(alpha_bar) is an affine map of the original one
    ratio = rescaled.alpha_bar[:-1].sqrt() / (original.alpha_bar[:-1].sqrt() - original.alpha_bar[-1].sqrt())
    torch.testing.assert_close(ratio, ratio[:1].expand(999), rtol=1e-9, atol=0)
    twice = rescaled.rescale_zero_terminal_snr()
    torch.testing.assert_close(twice.alpha_bar, rescaled.alpha_bar, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_x0_v_round_trip(prediction, dtype):
    """training_target -> to_eps_x0 gives back the eps and x0 that made x_t, for every parameterisation."""
    schedule = NoiseSchedule.cosine()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 8, 16, generator=generator, dtype=dtype) * 2 - 1
    noise = torch.randn(6, 3, 8, 16, generator=generator, dtype=dtype)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = schedule.add_noise(x0, t, noise)
    eps, x0_back = schedule.to_eps_x0(schedule.training_target(x0, noise, t, prediction), x_t, t, prediction)
    tolerance = {"rtol": 0, "atol": 1e-9 if dtype == torch.float64 else 3e-3}
    assert eps.dtype == x0_back.dtype == x_t.dtype == dtype
    torch.testing.assert_close(x0_back, x0, **tolerance)
    torch.testing.assert_close(eps, noise, **tolerance)


def test_v_target_and_closed_forms():
    """v = alpha eps - sigma x0 (Salimans & Ho 2022); x_t = alpha x0 + sigma eps; python-int t is accepted."""
    schedule = NoiseSchedule.linear()
    x0, noise = torch.randn(4, 1, 2, 3, dtype=torch.float64), torch.randn(4, 1, 2, 3, dtype=torch.float64)
    alpha_bar = schedule.alpha_bar[300].item()
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    torch.testing.assert_close(schedule.add_noise(x0, 300, noise), alpha * x0 + sigma * noise)
    torch.testing.assert_close(schedule.training_target(x0, noise, 300, "v"), alpha * noise - sigma * x0)
    torch.testing.assert_close(schedule.snr(torch.tensor([300])), torch.tensor([alpha_bar / (1 - alpha_bar)],
                                                                               dtype=torch.float64))


def test_zero_terminal_snr_round_trip_and_eps_refusal():
    schedule = NoiseSchedule.linear().rescale_zero_terminal_snr()
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([999, 999, 0])
    x_t = schedule.add_noise(x0, t, noise)
    torch.testing.assert_close(x_t[0], noise[0])                     # pure noise at T-1
    for prediction in ("x0", "v"):
        eps, x0_back = schedule.to_eps_x0(schedule.training_target(x0, noise, t, prediction), x_t, t, prediction)
        torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-4)
        torch.testing.assert_close(eps, noise, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="prediction='v'"):
        schedule.to_eps_x0(noise, x_t, t, "eps")


def test_clip_x0_keeps_eps_consistent_with_x_t():
    schedule = NoiseSchedule.linear()
    x_t, output, t = torch.randn(5, 2, 3, 3) * 3, torch.randn(5, 2, 3, 3) * 3, torch.tensor([10, 200, 500, 800, 999])
    eps, x0 = schedule.to_eps_x0(output, x_t, t, "v", clip_x0=1.0)
    assert x0.abs().max() <= 1.0
    alpha, sigma = schedule._alpha_sigma(t, x_t)
    torch.testing.assert_close(alpha * x0 + sigma * eps, x_t)


@pytest.mark.parametrize("t", [0, 1, 37, 500, 999])
def test_posterior_matches_bayes_rule(t):
    """Ho et al. 2020, eqs. 6-7, checked against the product of q(x_{t-1} | x0) and q(x_t | x_{t-1})."""
    schedule = NoiseSchedule.cosine()
    x0, x_t = torch.randn(2, 1, 3, 5, dtype=torch.float64), torch.randn(2, 1, 3, 5, dtype=torch.float64)
    mean, variance, log_variance = schedule.posterior_mean_variance(x0, x_t, torch.tensor([t, t]))
    beta, alpha_bar_prev = schedule.betas[t].item(), schedule.alpha_bar_at(t - 1)
    if t == 0:
        torch.testing.assert_close(mean, x0, rtol=0, atol=1e-12)
        assert (variance == 0).all() and (log_variance == math.log(1e-20)).all()
        return
    # Gaussian prior N(sqrt(ab_prev) x0, 1 - ab_prev) times likelihood N(x_t; sqrt(1 - beta) x_{t-1}, beta)
    precision = 1 / (1 - alpha_bar_prev) + (1 - beta) / beta
    expected_mean = (math.sqrt(alpha_bar_prev) * x0 / (1 - alpha_bar_prev)
                     + math.sqrt(1 - beta) * x_t / beta) / precision
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)
    expected_variance = torch.full((2,), 1 / precision, dtype=torch.float64)
    torch.testing.assert_close(variance.flatten(), expected_variance, rtol=1e-9, atol=0)
    torch.testing.assert_close(log_variance.exp(), variance, rtol=1e-9, atol=0)
    assert variance.shape == (2, 1, 1, 1)


def test_timestep_spacings_examples():
    schedule = NoiseSchedule.linear()
    assert schedule.timesteps(50).tolist() == list(range(999, 0, -20))            # 999, 979, ..., 19
    assert schedule.timesteps(50, "leading").tolist() == list(range(980, -1, -20))  # 980, ..., 0
    assert schedule.timesteps(5, "linspace").tolist() == [999, 749, 500, 250, 0]
    assert schedule.timesteps(3).tolist() == [999, 666, 332]
    for spacing in ("trailing", "leading", "linspace"):
        assert schedule.timesteps(1000, spacing).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="1..1000"):
        schedule.timesteps(1001)
    with pytest.raises(ValueError, match="1..1000"):
        schedule.timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        schedule.timesteps(10, "uniform")


@settings(max_examples=60, deadline=None)
@given(num_timesteps=st.integers(1, 1200), data=st.data())
def test_timesteps_are_distinct_descending_and_in_range(num_timesteps, data):
    steps = data.draw(st.integers(1, num_timesteps))
    spacing = data.draw(st.sampled_from(["trailing", "leading", "linspace"]))
    timesteps = NoiseSchedule.cosine(num_timesteps).timesteps(steps, spacing)
    assert timesteps.dtype == torch.long and len(timesteps) == steps
    assert (timesteps.diff() < 0).all() and timesteps.min() >= 0 and timesteps.max() <= num_timesteps - 1
    if spacing != "leading":
        assert timesteps[0] == num_timesteps - 1


@pytest.mark.parametrize("name", ["linear", "cosine_zero_snr"])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_respacing_keeps_the_alpha_bar_products(name, spacing):
    schedule = SCHEDULES[name]()
    kept = schedule.timesteps(37, spacing)
    spaced = schedule.respace(kept)
    assert spaced.num_timesteps == 37
    torch.testing.assert_close(spaced.alpha_bar, schedule.alpha_bar[kept.flip(0)], rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.respace(torch.arange(1000)).betas, schedule.betas, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="distinct"):
        schedule.respace(torch.tensor([5, 5, 1]))


@pytest.mark.parametrize("name", SCHEDULES)
def test_to_dict_from_dict_round_trip_through_json(name):
    schedule = SCHEDULES[name]()
    restored = NoiseSchedule.from_dict(json.loads(json.dumps(schedule.to_dict())))
    assert torch.equal(restored.betas, schedule.betas)
    assert repr(restored) == repr(schedule)


def test_from_betas_round_trip_and_validation():
    betas = torch.linspace(1e-3, 0.05, 40, dtype=torch.float64)
    schedule = NoiseSchedule.from_betas(betas.tolist())
    assert torch.equal(schedule.betas, betas) and schedule.to_dict()["kind"] == "betas"
    assert torch.equal(NoiseSchedule.from_dict(json.loads(json.dumps(schedule.to_dict()))).betas, betas)
    zero_snr = schedule.rescale_zero_terminal_snr()
    assert torch.equal(NoiseSchedule.from_dict(zero_snr.to_dict()).betas, zero_snr.betas)
    for bad in ([0.1, -0.1], [0.0, 0.1], [0.1, 1.5], [[0.1]], [], [0.1, 1.0, 0.2], [float("nan")]):
        with pytest.raises(ValueError, match="betas"):
            NoiseSchedule.from_betas(bad)


def test_from_dict_rejects_unknown_kinds_and_keys():
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule.from_dict({"kind": "quadratic", "num_timesteps": 10})
    with pytest.raises(ValueError, match="unknown keys.*beta_max"):
        NoiseSchedule.from_dict({"kind": "linear", "num_timesteps": 1000, "beta_max": 0.02})


def test_inputs_are_cast_to_the_data_dtype_and_t_is_checked():
    schedule = NoiseSchedule.linear()
    x0 = torch.randn(3, 1, 8, 16, dtype=torch.float16)
    assert schedule.add_noise(x0, torch.tensor([0, 5, 999]), torch.randn_like(x0)).dtype == torch.float16
    assert schedule.add_noise(x0, torch.tensor(7), torch.randn_like(x0)).shape == x0.shape    # 0-d t
    for bad_t in (torch.tensor([1000, 0, 0]), -1, torch.tensor([0.5, 1.0, 2.0]), torch.zeros(3, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="t must"):
            schedule.add_noise(x0, bad_t, x0)
    with pytest.raises(ValueError, match="prediction"):
        schedule.training_target(x0, x0, 0, "score")


@pytest.mark.parametrize("path", [NoiseSchedule.linear(1000), NoiseSchedule.cosine(1000).rescale_zero_terminal_snr(),
                                  NoiseSchedule.rectified_flow(3.0)], ids=["linear", "cosine_zsnr", "flow"])
def test_training_math_on_an_accelerator_never_copies_t_to_the_host(path):
    """add_noise and training_target for t on an accelerator look alpha and sigma up on that device, so a
    training step never waits for the GPU: on the meta device (no data, every device-to-host copy raises)
    they run, and the lookup equals the CPU's float64 path cast to the data's dtype."""
    t = torch.tensor([0, 1, 500, 999]) if isinstance(path, NoiseSchedule) else torch.tensor([0.0, 1.5, 500.0, 1000.0])
    x0 = torch.empty(4, 3, 8, 16, device="meta")
    assert path.add_noise(x0, t.to("meta"), x0).shape == x0.shape
    assert path.training_target(x0, x0, t.to("meta"), "v").shape == x0.shape
    with pytest.raises(NotImplementedError, match="meta"):
        t.to("meta").cpu()                                          # what the CPU path would do with it
    for dtype in (torch.float32, torch.bfloat16):
        alpha, sigma = path._alpha_sigma_on_device(t, dtype)        # the device path, run here on CPU tensors
        alpha64, sigma64 = path.alpha_sigma(t)
        assert alpha.dtype == sigma.dtype == dtype
        torch.testing.assert_close(alpha, alpha64.to(dtype), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sigma, sigma64.to(dtype), rtol=1e-6, atol=1e-7)
    bad = torch.tensor([0, 1000]) if isinstance(path, NoiseSchedule) else torch.tensor([0.0, 1001.0])
    with pytest.raises(RuntimeError, match="must lie in"):           # the device assert (at once on the CPU)
        path._alpha_sigma_on_device(bad, torch.float32)
    with pytest.raises(ValueError, match="must"):                    # the CPU path keeps its one-line error
        path.add_noise(torch.zeros(2, 1, 4, 4), bad, torch.zeros(2, 1, 4, 4))
