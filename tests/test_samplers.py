"""Samplers fed closed-form optimal denoisers: Gaussian data N(mu, s^2) and a two-component Gaussian
mixture, as eps-, x0- and v-predictors; DDIM(eta=1) vs DDPM; seeds, per-image generators, guidance."""
from __future__ import annotations

import math

import pytest
import torch

import samplers
from samplers import SAMPLERS, NoiseSchedule, ddim, ddpm, dpmpp_2m, guided, randn, sample

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpmpp_2m": 20}
MU, S = 0.3, 0.5                              # Gaussian data x0 ~ N(MU, S^2) per pixel
WEIGHT, MEANS, STDS = 0.3, (-0.8, 0.6), (0.1, 0.2)   # mixture: 0.3 N(-0.8, 0.1^2) + 0.7 N(0.6, 0.2^2)
SPLIT = -0.1                                  # between the two modes
METHODS = ["ddpm", "ddim", "dpmpp_2m"]        # on VP schedules; every sampler on every path: tests/test_paths.py


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# ---- closed-form optimal denoisers --------------------------------------------------------------

def alpha_bar_like(schedule: NoiseSchedule, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """alpha_bar[t] as [B, 1, ..., 1] in x's dtype."""
    return schedule.alpha_bar[t.cpu()].to(x).reshape(-1, *([1] * (x.dim() - 1)))


def express(alpha_bar, eps, x0, prediction):
    """The output of an eps-, x0- or v-predictor with the given eps and x0 estimates."""
    return {"eps": eps, "x0": x0, "v": alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0}[prediction]


def gaussian_oracle(schedule, mu=MU, s=S, prediction="eps"):
    """E[eps | x_t] and E[x0 | x_t] for x0 ~ N(mu, s^2): with var_t = ab s^2 + 1 - ab,
    eps* = sqrt(1 - ab) (x_t - sqrt(ab) mu) / var_t,  x0* = mu + sqrt(ab) s^2 (x_t - sqrt(ab) mu) / var_t."""
    def model(x, t):
        alpha_bar = alpha_bar_like(schedule, t, x)
        residual = (x - alpha_bar.sqrt() * mu) / (alpha_bar * s**2 + 1 - alpha_bar)
        eps, x0 = (1 - alpha_bar).sqrt() * residual, mu + alpha_bar.sqrt() * s**2 * residual
        return express(alpha_bar, eps, x0, prediction)
    return model


def mixture_oracle(schedule, prediction="x0", weight=WEIGHT, means=MEANS, stds=STDS):
    """E[x0 | x_t] for x0 ~ w N(m0, s0^2) + (1 - w) N(m1, s1^2): responsibilities times per-mode posterior means."""
    (m0, m1), (s0, s1) = means, stds

    def model(x, t):
        alpha_bar = alpha_bar_like(schedule, t, x)
        alpha, sigma2 = alpha_bar.sqrt(), 1 - alpha_bar
        var0, var1 = alpha_bar * s0**2 + sigma2, alpha_bar * s1**2 + sigma2          # Var(x_t | mode)
        logit = (math.log(weight / (1 - weight)) - 0.5 * (var0 / var1).log()
                 - 0.5 * (x - alpha * m0) ** 2 / var0 + 0.5 * (x - alpha * m1) ** 2 / var1)
        first = torch.sigmoid(logit)                                                 # P(mode 0 | x_t)
        x0 = (first * (m0 + alpha * s0**2 * (x - alpha * m0) / var0)
              + (1 - first) * (m1 + alpha * s1**2 * (x - alpha * m1) / var1))
        eps = (x - alpha * x0) / sigma2.sqrt()
        return express(alpha_bar, eps, x0, prediction)
    return model


def draw(method, model, schedule, shape, seed=0, dtype=torch.float64, **options):
    """Seeded starting noise + sampler run; options override the sampler's defaults."""
    generator = torch.Generator().manual_seed(seed)
    x = randn(shape, generator, dtype=dtype)
    return sample(model, x, schedule, method=method, generator=generator, **options)


# ---- Gaussian data: mean and std recovered --------------------------------------------------------

# Allowed |std / S - 1| at the default steps. DDPM's 1000 steps leave only Monte-Carlo error (~0.7%
# for 10,000 pixels); DDIM(50) and DPM-Solver++(20) also lose variance to discretisation, which on
# the linear schedule is 5.7% and 4.4% (computed exactly for this Gaussian: the map is affine).
STD_TOLERANCE = {("linear", "ddpm"): 0.025, ("linear", "ddim"): 0.075, ("linear", "dpmpp_2m"): 0.06,
                 ("cosine", "ddpm"): 0.025, ("cosine", "ddim"): 0.045, ("cosine", "dpmpp_2m"): 0.025}
MEAN_TOLERANCE = 0.02                          # 4 standard errors of the mean for 10,000 pixels


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("method", METHODS)
def test_gaussian_oracle_recovers_mean_and_std(method, schedule_name):
    schedule = getattr(NoiseSchedule, schedule_name)()
    out = {prediction: draw(method, gaussian_oracle(schedule, prediction=prediction), schedule, (1000, 1, 2, 5),
                            prediction=prediction) for prediction in ("eps", "x0", "v")}
    assert out["eps"].shape == (1000, 1, 2, 5) and torch.isfinite(out["eps"]).all()
    assert abs(out["eps"].mean().item() - MU) < MEAN_TOLERANCE
    assert abs(out["eps"].std().item() / S - 1) < STD_TOLERANCE[schedule_name, method]
    # the same oracle as an x0- or v-predictor gives the same samples (same seed, same draws)
    torch.testing.assert_close(out["x0"], out["eps"], rtol=0, atol=1e-8)
    torch.testing.assert_close(out["v"], out["eps"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("method", METHODS)
def test_zero_terminal_snr_schedule_samples_from_pure_noise(method, prediction):
    """Lin et al. 2024: alpha_bar[T-1] = 0, so lambda = -inf at the first step; all samplers cope."""
    schedule = NoiseSchedule.cosine().rescale_zero_terminal_snr()
    model = gaussian_oracle(schedule, prediction=prediction)
    out = draw(method, model, schedule, (1000, 1, 2, 5), prediction=prediction)
    assert torch.isfinite(out).all()
    assert abs(out.mean().item() - MU) < MEAN_TOLERANCE
    assert abs(out.std().item() / S - 1) < STD_TOLERANCE["cosine", method]
    with pytest.raises(ValueError, match="zero terminal SNR"):
        draw(method, gaussian_oracle(schedule), schedule, (4, 1, 1, 1), prediction="eps")


# Exact std ratios of respaced ancestral sampling for this Gaussian (variance propagated step by
# step): the posterior ("small") variance loses spread when steps are few, beta ("large") adds a little.
@pytest.mark.parametrize("steps, variance, expected_ratio", [(100, "small", 0.936), (100, "large", 1.013),
                                                             (1000, "large", 1.002)])
def test_ddpm_respaced_and_large_variance(steps, variance, expected_ratio):
    schedule = NoiseSchedule.linear()
    out = draw("ddpm", gaussian_oracle(schedule), schedule, (1000, 1, 2, 5), steps=steps, variance=variance)
    assert abs(out.mean().item() - MU) < MEAN_TOLERANCE
    assert abs(out.std().item() / S - expected_ratio) < 0.025


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_ddim_is_first_order_and_dpmpp_2m_second_order(schedule_name):
    """With Gaussian data the ODE samplers are affine maps x_T -> a x_T + b; the exact flow has
    a = S / sqrt(Var(x_T)). Doubling the steps halves DDIM's error in a and cuts DPM-Solver++'s 4x or more."""
    schedule = getattr(NoiseSchedule, schedule_name)()
    alpha_bar = schedule.alpha_bar[-1].item()
    exact = S / math.sqrt(alpha_bar * S**2 + 1 - alpha_bar)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(2, 1, 1, 1)

    def error(method, steps):
        out = SAMPLERS[method](gaussian_oracle(schedule), x, schedule, steps).flatten()
        return abs((out[1] - out[0]).item() / exact - 1)

    assert 1.8 < error("ddim", 20) / error("ddim", 40) < 2.2
    assert error("dpmpp_2m", 10) / error("dpmpp_2m", 20) > 4
    assert error("dpmpp_2m", 20) < error("ddim", 20) / 3


# ---- a two-mode mixture keeps its mode weights ------------------------------------------------------

# Allowed relative error of each mode's std. DPM-Solver++(2M) at 20 steps ends with a first-order jump
# from sigma ~ 0.09 to 0, which shrinks the narrow (std 0.1) mode by ~25%: see benchmarks/sampler_error.py.
MODE_STD_TOLERANCE = {"ddpm": 0.1, "ddim": 0.1, "dpmpp_2m": 0.3}


@pytest.mark.parametrize("method", METHODS)
def test_mixture_oracle_keeps_mode_weights(method):
    schedule = NoiseSchedule.cosine()
    out = draw(method, mixture_oracle(schedule), schedule, (2000, 1, 2, 5), prediction="x0").flatten()
    low, high = out[out < SPLIT], out[out >= SPLIT]
    assert abs(len(low) / len(out) - WEIGHT) < 0.02        # standard error 0.005
    assert abs(low.mean().item() - MEANS[0]) < 0.03 and abs(high.mean().item() - MEANS[1]) < 0.03
    tolerance = MODE_STD_TOLERANCE[method]
    assert abs(low.std().item() / STDS[0] - 1) < tolerance and abs(high.std().item() / STDS[1] - 1) < tolerance


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpmpp_2m_stays_stable_when_the_timesteps_reach_index_zero(spacing):
    """Regression: with linspace/leading spacing the second-to-last step lands on t = 0, a large jump in
    lambda; a second-order step there overshot the modes (mean -1.29 instead of -0.8 at 10 steps)."""
    schedule = NoiseSchedule.linear()
    out = draw("dpmpp_2m", mixture_oracle(schedule), schedule, (400, 1, 1, 5), prediction="x0", steps=10,
               spacing=spacing).flatten()
    assert abs(out[out < SPLIT].mean().item() - MEANS[0]) < 0.15
    assert abs(out[out >= SPLIT].mean().item() - MEANS[1]) < 0.1


def test_ddim_eta_one_over_all_steps_is_ddpm_with_posterior_variance():
    """Song et al. 2021, eq. 16: eta = 1 gives sigma_t^2 = beta_tilde_t, so with the same noise draws the
    two chains coincide; with independent draws their sample distributions agree."""
    schedule = NoiseSchedule.linear()
    model, shape = mixture_oracle(schedule, "eps"), (4000, 1, 1, 1)
    from_ddpm = draw("ddpm", model, schedule, shape, seed=1)
    torch.testing.assert_close(draw("ddim", model, schedule, shape, seed=1, steps=1000, eta=1.0), from_ddpm,
                               rtol=0, atol=1e-8)
    from_ddim = draw("ddim", model, schedule, shape, seed=2, steps=1000, eta=1.0)
    assert abs(from_ddim.mean().item() - from_ddpm.mean().item()) < 0.05       # ~3 standard errors
    assert abs(from_ddim.std().item() / from_ddpm.std().item() - 1) < 0.05
    assert abs((from_ddim < SPLIT).double().mean().item() - (from_ddpm < SPLIT).double().mean().item()) < 0.03


# ---- randomness: seeds, per-image generators ---------------------------------------------------------

STOCHASTIC = [("ddpm", {}), ("ddpm", {"variance": "large", "steps": 50}), ("ddim", {"eta": 1.0}),
              ("ddim", {}), ("dpmpp_2m", {})]


@pytest.mark.parametrize("method, options", STOCHASTIC)
def test_seeded_runs_repeat_exactly(method, options):
    schedule = NoiseSchedule.cosine()
    model = mixture_oracle(schedule)
    first, again = (draw(method, model, schedule, (8, 1, 4, 6), seed=5, prediction="x0", **options) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, draw(method, model, schedule, (8, 1, 4, 6), seed=6, prediction="x0", **options))


@pytest.mark.parametrize("method, options", STOCHASTIC)
def test_per_image_generators_make_images_independent_of_batch_size(method, options):
    schedule = NoiseSchedule.cosine()
    model = gaussian_oracle(schedule)

    def batch(size):
        generators = [torch.Generator().manual_seed(100 + i) for i in range(size)]
        x = randn((size, 2, 3, 4), generators, dtype=torch.float32)
        return SAMPLERS[method](model, x, schedule, generator=generators, **options)

    one, seven, many = batch(1), batch(7), batch(64)
    assert torch.equal(one[0], seven[0]) and torch.equal(one[0], many[0]) and torch.equal(seven, many[:7])
    assert not torch.equal(many[0], many[1])


def test_randn_draws_each_image_from_its_own_generator():
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    noise = randn((3, 2, 5), generators, dtype=torch.float64)
    for i in range(3):
        assert torch.equal(noise[i], torch.randn(2, 5, generator=torch.Generator().manual_seed(i)).double())
    single = randn((4, 3), torch.Generator().manual_seed(9))
    assert torch.equal(single, torch.randn(4, 3, generator=torch.Generator().manual_seed(9)))
    assert randn((2, 3)).dtype == torch.float32 and randn((2, 3)).device.type == "cpu"
    with pytest.raises(ValueError, match="one per image"):
        randn((2, 3), generators)


# ---- contract: shapes, dtypes, the model call, the final step --------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_model_contract_dtype_and_shape(method):
    schedule = NoiseSchedule.linear()
    calls = []

    def model(x, t):
        assert x.dtype == torch.float32 and t.dtype == torch.long and t.shape == (len(x),)
        calls.append(t[0].item())
        return gaussian_oracle(schedule)(x, t)

    out = SAMPLERS[method](model, torch.randn(3, 2, 8, 16), schedule, 10)
    assert out.shape == (3, 2, 8, 16) and out.dtype == torch.float32
    assert calls == schedule.timesteps(10).tolist()                 # one evaluation per step, T-1 first


@pytest.mark.parametrize("method, options", STOCHASTIC)
def test_last_step_returns_the_denoised_estimate_without_noise(method, options):
    """A model that always predicts x0 = 0.25 must give exactly 0.25: nothing is added after the last step."""
    out = draw(method, lambda x, t: torch.full_like(x, 0.25), NoiseSchedule.cosine(), (4, 1, 3, 3), prediction="x0",
               **options)
    torch.testing.assert_close(out, torch.full_like(out, 0.25), rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_clip_x0_bounds_the_result(method):
    schedule = NoiseSchedule.cosine()
    out = draw(method, gaussian_oracle(schedule, mu=3.0), schedule, (50, 1, 2, 2), clip_x0=1.0, steps=10)
    assert out.max().item() <= 1.0 + 1e-9 and out.min().item() >= -1.0 - 1e-9


def test_progress_bar_goes_to_stderr(capsys):
    schedule = NoiseSchedule.linear()
    ddim(gaussian_oracle(schedule), torch.randn(2, 1, 2, 2), schedule, 5, progress=True)
    assert "ddim" in capsys.readouterr().err


def test_sample_dispatches_and_rejects_bad_options():
    schedule = NoiseSchedule.linear()
    model, x = gaussian_oracle(schedule), torch.randn(2, 1, 2, 2)
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m", "euler", "heun"} and samplers.SAMPLERS["ddim"] is ddim
    torch.testing.assert_close(sample(model, x, schedule, method="ddim", steps=7), ddim(model, x, schedule, 7))
    torch.testing.assert_close(sample(model, x, schedule, steps=7), dpmpp_2m(model, x, schedule, 7))
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp_2m"):
        sample(model, x, schedule, method="lms")
    with pytest.raises(ValueError, match="steps"):
        ddpm(model, x, schedule, steps=0)
    with pytest.raises(ValueError, match="variance"):
        ddpm(model, x, schedule, variance="fixed")
    with pytest.raises(ValueError, match="eta"):
        ddim(model, x, schedule, eta=-1.0)
    with pytest.raises(ValueError, match="steps"):
        dpmpp_2m(model, x, schedule, steps=2000)
    with pytest.raises(ValueError, match="prediction"):
        ddim(model, x, schedule, prediction="score")


# ---- classifier-free guidance ---------------------------------------------------------------------

def test_guided_runs_one_batched_forward_and_mixes_the_branches():
    calls = []

    def model(x, t, y=None):
        calls.append((x.shape[0], t.clone(), y.clone()))
        return x * (y[:, None, None, None] + 2).float() + t[:, None, None, None]   # label-dependent output

    x, t, y = torch.randn(3, 1, 4, 4), torch.tensor([7, 7, 7]), torch.tensor([0, 4, 9])
    out = guided(model, y, scale=3.0)(x, t)
    assert len(calls) == 1 and calls[0][0] == 6
    assert torch.equal(calls[0][1], torch.tensor([7] * 6))
    assert torch.equal(calls[0][2], torch.tensor([0, 4, 9, -1, -1, -1]))
    cond, uncond = model(x, t, y=y), model(x, t, y=torch.full_like(y, -1))
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(guided(model, y, 1.0, null_label=10)(x, 7), cond)  # scale 1 = conditional; int t
    assert torch.equal(calls[-1][2][3:], torch.tensor([10, 10, 10]))
    with pytest.raises(ValueError, match="one label per image"):
        guided(model, y[:2], 2.0)(x, t)


@pytest.mark.parametrize("method", sorted(SAMPLERS))
@pytest.mark.parametrize("schedule_name", ["linear", "rectified_flow"])
def test_model_calls_counts_what_each_sampler_makes(method, schedule_name):
    schedule = NoiseSchedule.linear(1000) if schedule_name == "linear" else NoiseSchedule.rectified_flow()
    calls = []

    def model(x, t):
        calls.append(len(x))
        return torch.zeros_like(x)

    for steps in (1, 4, 7):
        calls.clear()
        sample(model, torch.randn(3, 1, 4, 4), schedule, method=method, steps=steps,
               prediction="flow" if schedule_name == "rectified_flow" else "eps")
        assert len(calls) == samplers.model_calls(method, schedule, steps)
    assert samplers.model_calls("heun", schedule, 10) == 18    # the first step starts at (near-)pure noise
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.model_calls("plms", schedule, 10)
