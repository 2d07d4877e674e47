"""The backbone in other people's code: diffusers pipelines and schedulers on our UNet, our samplers on
diffusers' UNet2DModel, k-diffusion's D(x, sigma), and ONNX / torch.export. Parity figures are printed
(`pytest -s`) and asserted against stated tolerances."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import samplers
from diffunet import UNet, UNetConfig
from diffunet.checkpoint import save_model
from diffunet.interop import diffusers_scheduler, from_diffusers, karras_denoiser, to_diffusers
from samplers import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(), norm_groups=4)
T = 50            # NoiseSchedule.linear(50): betas 0.005 ... 0.4, alpha_bar[T-1] ~ 4e-5 like T = 1000
SHAPE = (1, 8, 16)
TOLERANCE = 1e-4  # float32 throughout; diffusers keeps alphas_cumprod in float32, we in float64


def tiny_unet(seed: int = 0, scale: float = 0.1, **overrides) -> UNet:
    """A tiny UNet with every weight random (zero-initialised convs would make the output 0)."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(**{"in_channels": 1, **TINY, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * scale)
    return model.eval()


def noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


def report(what: str, diff: float) -> None:
    print(f"\n{what}: max abs diff {diff:.2e}")


# ---- our UNet under diffusers --------------------------------------------------------------------

@pytest.mark.parametrize("timestep", [7, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 7, 7])])
def test_to_diffusers_follows_unet2d_calling_convention(timestep):
    model = tiny_unet(num_classes=3)
    wrapped = to_diffusers(model, sample_size=(8, 16), prediction="v")
    x, labels = noise(3), torch.tensor([0, -1, 2])
    expected = model(x, torch.full((3,), 7), y=labels)
    out = wrapped(x, timestep, class_labels=labels)
    assert torch.equal(out.sample, expected) and torch.equal(out[0], expected)
    assert torch.equal(wrapped(x, timestep, labels, return_dict=False)[0], expected)
    assert wrapped.config.sample_size == (8, 16) and wrapped.config["in_channels"] == 1
    assert wrapped.config.out_channels == 1 and wrapped.config.prediction_type == "v_prediction"
    assert wrapped.dtype == torch.float32 and wrapped.device.type == "cpu"
    with pytest.raises(ValueError, match="one value or one per image"):
        wrapped(x, torch.tensor([1, 2]))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_diffusers_ddim_scheduler_loop_matches_our_ddim(prediction):
    pytest.importorskip("diffusers")
    model, schedule, steps = tiny_unet(), NoiseSchedule.linear(T), 10
    wrapped, scheduler = to_diffusers(model, sample_size=SHAPE[1:]), diffusers_scheduler(schedule, prediction)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == schedule.timesteps(steps).tolist()
    x = noise(2)
    with torch.no_grad():
        ours = samplers.ddim(model, x, schedule, steps, prediction=prediction)
        theirs = x
        for t in scheduler.timesteps:
            theirs = scheduler.step(wrapped(theirs, t).sample, t, theirs).prev_sample
    diff = (ours - theirs).abs().max().item()
    report(f"DDIMScheduler loop vs samplers.ddim ({prediction}, {steps} steps; |x| <= {ours.abs().max():.1f})", diff)
    assert diff < TOLERANCE * max(1.0, ours.abs().max().item())


def test_ddim_pipeline_end_to_end_matches_our_ddim():
    diffusers = pytest.importorskip("diffusers")
    model, schedule, steps = tiny_unet(num_classes=None), NoiseSchedule.linear(T), 10
    pipe = diffusers.DDIMPipeline(unet=to_diffusers(model, sample_size=SHAPE[1:], prediction="x0"),
                                  scheduler=diffusers_scheduler(schedule, "x0"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=steps,
                  eta=0.0, output_type="np").images                                 # [B, H, W, C] in [0, 1]
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(5))          # the pipeline's own draw
    ours = (samplers.ddim(model, x, schedule, steps, prediction="x0") / 2 + 0.5).clamp(0, 1)
    ours = ours.permute(0, 2, 3, 1).numpy()
    assert images.shape == ours.shape == (3, 8, 16, 1)
    assert 0.05 < ((images > 0) & (images < 1)).mean()            # not all pixels clipped: a real comparison
    diff = float(np.abs(images - ours).max())
    report("DDIMPipeline (output_type='np') vs samplers.ddim, x0-prediction", diff)
    assert diff < TOLERANCE


def test_ddpm_pipeline_end_to_end_matches_our_ddpm():
    diffusers = pytest.importorskip("diffusers")
    model, schedule = tiny_unet(seed=1), NoiseSchedule.linear(T)
    pipe = diffusers.DDPMPipeline(unet=to_diffusers(model, sample_size=SHAPE[1:], prediction="v"),
                                  scheduler=diffusers_scheduler(schedule, "v", kind="ddpm"))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    images = pipe(batch_size=2, generator=generator, num_inference_steps=T, output_type="pt").images
    generator = torch.Generator().manual_seed(3)   # same stream: starting noise, then one draw per step
    x = samplers.randn((2, *SHAPE), generator)
    ours = (samplers.ddpm(model, x, schedule, T, prediction="v", generator=generator) / 2 + 0.5).clamp(0, 1)
    diff = (images - ours).abs().max().item()
    report(f"DDPMPipeline ({T} ancestral steps) vs samplers.ddpm, v-prediction", diff)
    assert diff < TOLERANCE


# ---- diffusers' UNet2DModel under our samplers -----------------------------------------------------

def test_our_ddim_drives_a_diffusers_unet2d():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=SHAPE[1:], in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()
    schedule, steps, x = NoiseSchedule.linear(T), 10, noise(2, seed=1)
    scheduler = diffusers_scheduler(schedule, "eps")
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        ours = samplers.ddim(from_diffusers(unet), x, schedule, steps, prediction="eps")
        theirs = x
        for t in scheduler.timesteps:
            theirs = scheduler.step(unet(theirs, t).sample, t, theirs).prev_sample
    diff = (ours - theirs).abs().max().item()
    report(f"samplers.ddim on UNet2DModel vs DDIMScheduler loop (|x| <= {ours.abs().max():.1f})", diff)
    assert diff < TOLERANCE * max(1.0, ours.abs().max().item())


# ---- k-diffusion's D(x, sigma) ---------------------------------------------------------------------

MU, S = 0.3, 0.5   # the data: N(MU, S^2) per pixel


def exact_model(schedule, prediction: str, seen: list):
    """The exact eps / x0 / v predictor for N(MU, S^2) data on the VP path; fractional t reads alpha_bar
    by linear interpolation of log(sigma/alpha), the rule karras_denoiser inverts."""
    table = 0.5 * ((1 - schedule.alpha_bar).log() - schedule.alpha_bar.log())      # [T] log sigma_tilde

    def model(x_t, t):
        seen.append(t.clone())
        low = t.double().floor().long().clamp(max=len(table) - 2)
        log_sigma_tilde = table[low] + (t.double() - low) * (table[low + 1] - table[low])
        alpha = (1 + (2 * log_sigma_tilde).exp()).rsqrt()[:, None, None, None]
        sigma = (1 - alpha**2).sqrt()
        x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x_t.double() - alpha * MU)   # E[x0 | x_t]
        eps = (x_t.double() - alpha * x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction].to(x_t.dtype)

    return model


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_karras_denoiser_is_the_closed_form_gaussian_denoiser(prediction, kind):
    schedule = getattr(NoiseSchedule, kind)(1000)
    table = (((1 - schedule.alpha_bar) / schedule.alpha_bar).sqrt())
    on_grid = [table[t].item() for t in (0, 10, 500, 999)]                            # integer timesteps
    sigmas = on_grid + [0.05, 0.7, 1.0, 3.3, 17.0]                                     # fractional ones
    seen: list = []
    denoiser = karras_denoiser(exact_model(schedule, prediction, seen), schedule, prediction)
    x = MU + torch.randn(4, 1, 6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    worst = 0.0
    for sigma in sigmas:
        expected = MU + S**2 / (S**2 + sigma**2) * (x - MU)                            # exact D(x, sigma)
        worst = max(worst, (denoiser(x, sigma) - expected).abs().max().item())
    report(f"karras_denoiser vs closed form ({kind}, {prediction}, sigma {min(sigmas):.3g}..{max(sigmas):.3g})", worst)
    assert worst < 1e-5
    for t, sigma in zip((0, 10, 500, 999), on_grid):                                  # grid sigmas hit grid t
        assert torch.allclose(seen[sigmas.index(sigma)].double(), torch.tensor(float(t), dtype=torch.float64),
                              atol=1e-3)
    t_one = seen[sigmas.index(1.0)][0].item()                                          # a fractional t
    assert 0 < t_one < 999 and t_one % 1 != 0


def test_karras_denoiser_takes_per_image_sigmas_and_a_real_unet():
    model, schedule = tiny_unet(), NoiseSchedule.linear(T)
    denoiser = karras_denoiser(model, schedule, "eps")
    x, sigma = noise(3) * 5, torch.tensor([0.0, 1.5, 40.0])
    out = denoiser(x, sigma)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(out[0], x[0])   # sigma = 0: D = x
    one = denoiser(x[1:2], 1.5)
    assert torch.allclose(one, out[1:2], atol=1e-6)
    with pytest.raises(ValueError, match="prediction"):
        karras_denoiser(model, schedule, "flow")


# ---- ONNX and torch.export -------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [None, 3])
def test_onnx_export_matches_eager(tmp_path, num_classes):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from diffunet.export import export_onnx
    model = tiny_unet(num_classes=num_classes)
    path = export_onnx(model, tmp_path / "model.onnx", SHAPE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == (["x", "t", "y"] if num_classes else ["x", "t"])
    for batch in (1, 3):
        x, t = noise(batch, seed=batch), torch.rand(batch, generator=torch.Generator().manual_seed(batch)) * (T - 1)
        feeds = {"x": x.numpy(), "t": t.numpy()}
        y = torch.tensor([2, -1, 0][:batch]) if num_classes else None
        if num_classes:
            feeds["y"] = y.numpy()
        with torch.no_grad():
            expected = model(x, t, y=y).numpy()
        diff = float(np.abs(session.run(None, feeds)[0] - expected).max())
        report(f"ONNX Runtime vs eager (num_classes={num_classes}, batch {batch})", diff)
        assert diff < 1e-4


@pytest.mark.parametrize("num_classes", [None, 3])
def test_export_program_matches_eager(num_classes):
    from diffunet.export import export_program
    model = tiny_unet(num_classes=num_classes)
    program = export_program(model, SHAPE)
    for batch in (1, 5):
        x, t = noise(batch), torch.linspace(0, T - 1, batch)
        y = (torch.arange(batch) % 4 - 1) if num_classes else None
        with torch.no_grad():
            out = program.module()(x, t, y) if num_classes else program.module()(x, t)
            assert (out - model(x, t, y=y)).abs().max().item() < 1e-5


def test_cli_export_writes_an_onnx_file(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = tiny_unet(num_classes=2)
    save_model(tmp_path / "run", model, {"schedule": NoiseSchedule.linear(T).to_dict(), "prediction": "eps",
                                         "image_shape": list(SHAPE)})
    out = tmp_path / "exported" / "model.onnx"
    done = subprocess.run([sys.executable, "-m", "diffunet.cli", "export", "--checkpoint", str(tmp_path / "run"),
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["x", "t", "y"]
    assert not list(out.parent.glob(".*.tmp"))                                    # atomic: no temp file left


@pytest.mark.parametrize("case, message", [("missing", "does not exist"), ("suffix", "end in .onnx")])
def test_cli_export_bad_input_is_one_line(tmp_path, case, message):
    run = tmp_path / "run"
    if case == "suffix":
        save_model(run, tiny_unet(), {"image_shape": list(SHAPE)})
    args = ["export", "--checkpoint", str(run if case == "suffix" else tmp_path / "nope"),
            "--out", str(tmp_path / ("model.txt" if case == "suffix" else "model.onnx"))]
    done = subprocess.run([sys.executable, "-m", "diffunet.cli", *args], capture_output=True, text=True)
    assert done.returncode != 0 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("diffunet export: error:")
