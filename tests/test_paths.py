"""Every sampler on every path and every prediction, against closed-form denoisers built from
`schedule.alpha_sigma` alone (tests/oracles.py); Euler = DDIM; Heun second order; DPM-Solver++ on the
rectified flow equals its VP run on the same log-SNR grid; the rectified-flow path and its grids."""
from __future__ import annotations

import math

import pytest
import torch
from oracles import MEANS, MU, STDS, WEIGHT, S, gaussian, mixture

from samplers import SAMPLERS, NoiseSchedule, RectifiedFlow, ddim, dpmpp_2m, euler, heun, randn

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

PATHS = {"linear": NoiseSchedule.linear, "cosine": NoiseSchedule.cosine, "flow": NoiseSchedule.rectified_flow,
         "flow_shift3": lambda: NoiseSchedule.rectified_flow(shift=3.0)}
STEPS = {"ddpm": 200, "ddim": 50, "dpmpp_2m": 20, "euler": 50, "heun": 10}
# Allowed |std / S - 1| at STEPS: discretisation error of each solver (measured worst case over the four
# paths: ddpm 3.3%, ddim/euler 5.5%, dpmpp_2m 4.2%, heun 12.8% at 18 model calls) plus ~1% Monte Carlo.
STD_TOLERANCE = {"ddpm": 0.05, "ddim": 0.075, "euler": 0.075, "dpmpp_2m": 0.06, "heun": 0.15}


def draw(method, model, schedule, shape, prediction, seed=0, **options):
    generator = torch.Generator().manual_seed(seed)
    x = randn(shape, generator, dtype=torch.float64)
    return SAMPLERS[method](model, x, schedule, options.pop("steps", STEPS[method]), prediction=prediction,
                            generator=generator, **options)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", list(SAMPLERS))
def test_every_sampler_on_every_path_recovers_gaussian_data(method, path):
    schedule = PATHS[path]()
    predictions = ("eps", "x0", "v", "flow") if isinstance(schedule, NoiseSchedule) else ("x0", "v", "flow")
    out = {p: draw(method, gaussian(schedule, p), schedule, (1000, 1, 2, 5), p) for p in predictions}
    assert abs(out["x0"].mean().item() - MU) < 0.02                    # 4 standard errors for 10,000 pixels
    assert abs(out["x0"].std().item() / S - 1) < STD_TOLERANCE[method]
    for p in predictions:                                              # one oracle, four parameterisations
        torch.testing.assert_close(out[p], out["x0"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", list(SAMPLERS))
def test_every_sampler_on_every_path_keeps_the_mixture_weights(method, path):
    schedule = PATHS[path]()
    steps = 20 if method == "heun" else STEPS[method]                  # heun: 39 calls for the narrow mode
    out = draw(method, mixture(schedule, "flow"), schedule, (2000, 1, 2, 5), "flow", steps=steps).flatten()
    low, high = out[out < -0.1], out[out >= -0.1]
    assert abs(len(low) / len(out) - WEIGHT) < 0.02                    # standard error 0.005
    assert abs(low.mean().item() - MEANS[0]) < 0.03 and abs(high.mean().item() - MEANS[1]) < 0.03
    # the narrow mode (std 0.1) loses spread in the last, first-order jump to sigma = 0: up to 36% with the
    # shifted grid, whose last point sits at a higher noise level (see benchmarks/sampler_error.py)
    assert abs(low.std().item() / STDS[0] - 1) < 0.4 and abs(high.std().item() / STDS[1] - 1) < 0.35


def test_eps_prediction_is_refused_at_pure_noise():
    schedule = NoiseSchedule.rectified_flow()
    with pytest.raises(ValueError, match="alpha = 0"):
        draw("ddim", gaussian(schedule, "eps"), schedule, (4, 1, 1, 1), "eps")


@pytest.mark.parametrize("path", list(PATHS))
def test_euler_is_ddim_path_by_path(path):
    """Same integrator: on the rectified flow x_s = x_t + (tau_s - tau_t) u is alpha_s x0 + sigma_s eps."""
    schedule = PATHS[path]()
    x = randn((64, 1, 2, 3), torch.Generator().manual_seed(1), dtype=torch.float64)
    model = mixture(schedule, "flow")
    torch.testing.assert_close(euler(model, x, schedule, 13, prediction="flow"),
                               ddim(model, x, schedule, 13, prediction="flow"), rtol=0, atol=1e-10)


def test_euler_on_the_rectified_flow_is_the_textbook_step():
    schedule = NoiseSchedule.rectified_flow()
    model, x = mixture(schedule, "flow"), randn((16, 1, 2, 2), torch.Generator().manual_seed(2), dtype=torch.float64)
    expected, times = x.clone(), schedule.timesteps(8).tolist() + [0.0]
    for t, t_next in zip(times, times[1:]):
        expected = expected + (t_next - t) / 1000 * model(expected, torch.full((16,), t))
    torch.testing.assert_close(euler(model, x, schedule, 8, prediction="flow"), expected, rtol=0, atol=1e-12)


def affine_error(method, schedule, steps, spacing):
    """Gaussian data make every ODE sampler affine, x -> a x + b; the exact flow from the first time has
    a = S / sqrt(alpha^2 S^2 + sigma^2). Returns |a_sampler / a_exact - 1|."""
    alpha, sigma = schedule.alpha_sigma(schedule.timesteps(steps, spacing)[0])
    exact = S / math.sqrt(alpha.item() ** 2 * S**2 + sigma.item() ** 2)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    out = SAMPLERS[method](gaussian(schedule, "x0"), x, schedule, steps, prediction="x0", spacing=spacing).flatten()
    return abs((out[1] - out[0]).item() / exact - 1)


@pytest.mark.parametrize("path", ["flow", "linear"])
def test_heun_error_falls_at_least_four_times_when_its_steps_double(path):
    """Karras et al. 2022, Algorithm 1 is second order: measured 5.0x and 4.5x (flow), 5.0x and 4.6x (linear)."""
    schedule = PATHS[path]()
    errors = [affine_error("heun", schedule, steps, "karras") for steps in (10, 20, 40)]
    assert errors[0] / errors[1] > 4 and errors[1] / errors[2] > 4
    assert errors[2] < affine_error("euler", schedule, 40, "karras") / 5


class _FlowOnGrid(RectifiedFlow):
    """A rectified flow sampled at given model times (a test seam: same path, other grid)."""

    def timesteps(self, steps, spacing="trailing"):
        return self.grid


def test_dpmpp_2m_on_the_flow_matches_its_vp_run_on_the_same_log_snr_grid():
    """DPM-Solver++ depends on the path only through lambda (Lu et al. 2022): at equal lambda the flow's
    x_t is the VP x_t times sigma_flow / sigma_vp, so the runs agree once the start is scaled."""
    vp = NoiseSchedule.linear()
    times = vp.timesteps(15)
    sigma_tilde = (-vp.log_snr(times) / 2).exp()                       # sigma / alpha on the VP grid
    flow = _FlowOnGrid()
    object.__setattr__(flow, "grid", flow.time_from_sigma_tilde(sigma_tilde))
    torch.testing.assert_close(flow.log_snr(flow.grid), vp.log_snr(times), rtol=1e-9, atol=1e-9)
    x = randn((256, 1, 2, 2), torch.Generator().manual_seed(3), dtype=torch.float64)
    scale = flow.alpha_sigma(flow.grid[0])[1] / vp.alpha_sigma(times[0])[1]
    out_vp = dpmpp_2m(mixture(vp, "v"), x, vp, 15, prediction="v")
    out_flow = dpmpp_2m(mixture(flow, "flow"), x * scale.item(), flow, 15, prediction="flow")
    # 1e-6, not 1e-12: the model receives float times as a float32 [B] tensor, as a network would
    torch.testing.assert_close(out_flow, out_vp, rtol=0, atol=1e-6)


# ---- the rectified-flow path ------------------------------------------------------------------------

def test_rectified_flow_alpha_sigma_grids_and_round_trip():
    flow = NoiseSchedule.rectified_flow()
    alpha, sigma = flow.alpha_sigma(torch.tensor([0.0, 250.0, 1000.0]))
    assert alpha.tolist() == [1.0, 0.75, 0.0] and sigma.tolist() == [0.0, 0.25, 1.0]
    assert flow.timesteps(4).tolist() == [1000.0, 750.0, 500.0, 250.0]
    shifted = NoiseSchedule.rectified_flow(shift=3.0).timesteps(4) / 1000
    torch.testing.assert_close(shifted, torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64))   # 3t/(1+2t)
    karras = flow.timesteps(5, "karras")
    assert karras[0].item() == pytest.approx(1000 * 80 / 81) and karras[-1].item() == pytest.approx(1000 * 0.002 / 1.002)
    assert (karras.diff() < 0).all()
    assert NoiseSchedule.from_dict(NoiseSchedule.rectified_flow(shift=2.0).to_dict()) == RectifiedFlow(2.0)
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([10.0, 500.0, 990.0])
    x_t = flow.add_noise(x0, t, noise)
    for prediction in ("eps", "x0", "v", "flow"):
        eps, x0_back = flow.to_eps_x0(flow.training_target(x0, noise, t, prediction), x_t, t, prediction)
        torch.testing.assert_close(x0_back, x0, atol=2e-4, rtol=0)
        torch.testing.assert_close(eps, noise, atol=2e-4, rtol=0)


def test_vp_karras_grid_is_quantised_to_distinct_indices():
    schedule = NoiseSchedule.linear()
    grid = schedule.timesteps(20, "karras")
    assert grid.dtype == torch.long and grid[0] < 1000 and (grid.diff() < 0).all()
    sigma_tilde = (-schedule.log_snr(grid) / 2).exp()
    assert sigma_tilde[0].item() == pytest.approx(80, rel=0.02) and sigma_tilde[-1].item() == pytest.approx(0.01, rel=0.01)


@pytest.mark.parametrize("bad", [dict(shift=0.0), dict(shift=float("nan"))])
def test_rectified_flow_rejects_bad_shift(bad):
    with pytest.raises(ValueError, match="shift"):
        NoiseSchedule.rectified_flow(**bad)


def test_rectified_flow_rejects_bad_times_and_spacing():
    flow = NoiseSchedule.rectified_flow()
    with pytest.raises(ValueError, match="0..1000"):
        flow.alpha_sigma(torch.tensor([1200.0]))
    with pytest.raises(ValueError, match="spacing"):
        flow.timesteps(10, "leading")
    with pytest.raises(ValueError, match="unknown keys"):
        NoiseSchedule.from_dict({"kind": "rectified_flow", "sigma_max": 3})
    with pytest.raises(ValueError, match="heun|steps"):
        heun(gaussian(flow), torch.zeros(1, 1, 1, 1), flow, 0)


# ---- training and sampling a flow run through the package ---------------------------------------------

def test_flow_losses_draw_continuous_times_and_reach_the_flow_target():
    from diffunet.loss import draw_timesteps, min_snr_weight, training_loss
    flow, generator = NoiseSchedule.rectified_flow(), torch.Generator().manual_seed(0)
    for distribution in ("uniform", "logit_normal", "lognormal"):
        t = draw_timesteps(flow, 4000, distribution, generator=generator)
        assert t.is_floating_point() and 0 <= t.min() and t.max() <= 1000
    tau = draw_timesteps(flow, 20000, "logit_normal", generator=generator).double() / 1000
    logit = (tau / (1 - tau)).log()
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03     # SD3's lognorm(0, 1)
    # x0 ~ N(0, 1) with its exact velocity: E[loss | tau] = Var(u | x_tau) = 1 / ((1 - tau)^2 + tau^2),
    # whose mean over tau ~ U(0, 1) is pi / 2 (predicting u = 0 would give 2)
    x0 = torch.randn(8192, 1, 2, 2, dtype=torch.float64, generator=generator)
    exact = gaussian(flow, "flow", mu=0.0, s=1.0)
    loss = training_loss(lambda x, t: exact(x.double(), t), x0, flow, prediction="flow", generator=generator)
    assert loss.shape == (8192,) and abs(loss.mean().item() - math.pi / 2) < 0.04
    snr = torch.tensor([0.0, 1.0, 100.0], dtype=torch.float64)
    torch.testing.assert_close(min_snr_weight(snr, "flow", 5.0), torch.tensor([0.0, 0.25, 5 / 121], dtype=torch.float64))


def test_flow_run_trains_and_samples_from_the_cli(tmp_path, tiny_npz, capsys):
    from helpers import FAST, TINY

    from diffunet.cli import main
    run = tmp_path / "flow"
    assert main(["train", "--data", str(tiny_npz), *TINY, *FAST, "--steps", "3", "--out", str(run), "--schedule", "rectified_flow", "--prediction", "flow",
                 "--timestep-sampling", "logit_normal", "--sampler", "heun", "--sample-steps", "4"]) == 0
    config = (run / "config.json").read_text()
    assert '"rectified_flow"' in config and '"flow"' in config
    for sampler in ("euler", "heun", "dpmpp_2m", "ddpm", "ddim"):
        assert main(["sample", "--checkpoint", str(run), "--num", "4", "--sampler", sampler, "--steps", "3",
                     "--out", str(tmp_path / f"{sampler}.png")]) == 0
    assert main(["train", "--data", str(tiny_npz), *TINY, "--out", str(tmp_path / "bad"), "--schedule", "rectified_flow",
                 "--prediction", "eps"]) != 0
    assert "rectified_flow" in capsys.readouterr().err
