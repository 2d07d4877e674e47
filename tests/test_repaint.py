"""RePaint inpainting (samplers.repaint) on closed-form denoisers whose conditionals are known: a correlated
2-pixel Gaussian, independent pixels and a two-mode 2-pixel mixture; then `diffunet inpaint` on a tiny run.

RePaint is an approximation: with an exact denoiser it still does not sample the exact conditional. The
figures below (4,000 samples, NoiseSchedule.linear(1000), 100 steps, seed 0) are what the tolerances guard:

    Gaussian, rho = 0.9, pixel 0 known at a = 1.5   target N(1.070, 0.436^2)
        resamples = 1 (plain replacement)           mean 0.696  std 0.540
        jump_length = 5, resamples = 5              mean 0.997  std 0.421
    mixture 0.5 N((-1,-1), 0.3^2 I) + 0.5 N((1,1), 0.3^2 I), pixel 0 known at 0.5
                                                    target P(pixel 1 in the wrong mode) = 1.5e-5
        resamples = 1                               0.173
        jump_length = 5, resamples = 5              0.023
"""
from __future__ import annotations

import math

import pytest
import torch

from samplers import NoiseSchedule, randn
from samplers.repaint import _alpha_sigma, _jump_schedule, repaint
from diffunet.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

MU, RHO, A = (0.2, -0.1), 0.9, 1.5        # 2-pixel Gaussian N(MU, [[1, RHO], [RHO, 1]]); pixel 0 kept at A
TARGET_MEAN, TARGET_STD = MU[1] + RHO * (A - MU[0]), math.sqrt(1 - RHO**2)   # 1.070, 0.436
NUM = 4000                                 # samples: standard error of the mean 0.007, of the std 0.005


def alpha_bar_like(schedule: NoiseSchedule, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """alpha_bar[t] as [B, 1] in x's dtype."""
    return schedule.alpha_bar[t.cpu()].to(x)[:, None]


def gaussian_2d_oracle(schedule, mu=MU, rho=RHO):
    """Exact eps predictor for x0 ~ N(mu, Sigma), Sigma = [[1, rho], [rho, 1]], over the 2 pixels of x [B, 1, 1, 2]:
    eps* = sigma_t Sigma_t^-1 (x_t - alpha_t mu) with Sigma_t = alpha_t^2 Sigma + sigma_t^2 I."""
    mean = torch.tensor(mu, dtype=torch.float64)
    covariance = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)

    def model(x, t):
        alpha_bar = alpha_bar_like(schedule, t, x)                                    # [B, 1]
        cov_t = alpha_bar[:, :, None] * covariance + (1 - alpha_bar)[:, :, None] * torch.eye(2, dtype=x.dtype)
        residual = x.reshape(len(x), 2) - alpha_bar.sqrt() * mean                       # [B, 2]
        return ((1 - alpha_bar).sqrt() * torch.linalg.solve(cov_t, residual[..., None])[..., 0]).reshape(x.shape)
    return model


def mixture_2d_oracle(schedule, means=((-1.0, -1.0), (1.0, 1.0)), s=0.3, weight=0.5):
    """Exact eps predictor for x0 ~ w N(m0, s^2 I) + (1 - w) N(m1, s^2 I) over the 2 pixels of x [B, 1, 1, 2]:
    responsibilities from N(x_t; alpha_t m_k, (alpha_t^2 s^2 + sigma_t^2) I) times each mode's E[x0 | x_t]."""
    m = torch.tensor(means, dtype=torch.float64)                                      # [2 modes, 2 pixels]

    def model(x, t):
        alpha_bar = alpha_bar_like(schedule, t, x)
        alpha, var = alpha_bar.sqrt(), alpha_bar * s**2 + 1 - alpha_bar                # [B, 1]
        flat = x.reshape(len(x), 1, 2)
        residual = flat - alpha[:, :, None] * m                                        # [B, 2 modes, 2]
        logits = torch.tensor([weight, 1 - weight], dtype=x.dtype).log() - 0.5 * (residual**2).sum(-1) / var
        x0_mode = m + (alpha * s**2 / var)[:, :, None] * residual
        x0 = (logits.softmax(-1)[..., None] * x0_mode).sum(1)                          # [B, 2]
        return ((x.reshape(len(x), 2) - alpha * x0) / (1 - alpha_bar).sqrt()).reshape(x.shape)
    return model


def inpaint_pixel1(model, schedule, kept, steps=100, seed=0, num=NUM, **options):
    """Keep pixel 0 at `kept`, fill in pixel 1; returns pixel 1 of every sample [num]."""
    generator = torch.Generator().manual_seed(seed)
    x = randn((num, 1, 1, 2), generator, dtype=torch.float64)
    known = torch.tensor([kept, 0.0], dtype=torch.float64).expand(num, 1, 1, 2)
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    out = repaint(model, x, schedule, known, mask, steps, generator=generator, **options)
    assert (out[:, 0, 0, 0] == kept).all()
    return out[:, 0, 0, 1]


# ---- closed-form conditionals -----------------------------------------------------------------------

def test_resampling_brings_the_correlated_gaussian_close_to_its_conditional():
    schedule = NoiseSchedule.linear(1000)
    model = gaussian_2d_oracle(schedule)
    plain = inpaint_pixel1(model, schedule, A, resamples=1)
    resampled = inpaint_pixel1(model, schedule, A, jump_length=5, resamples=5)
    # resampled: mean 0.997 (bias -0.073 from the 100-step grid and RePaint's approximation), std 0.421
    assert abs(resampled.mean() - TARGET_MEAN) < 0.1
    assert abs(resampled.std() - TARGET_STD) < 0.04
    # plain replacement ignores most of the correlation: mean 0.696, std 0.540
    assert abs(plain.mean() - TARGET_MEAN) > 3 * abs(resampled.mean() - TARGET_MEAN)
    assert abs(plain.std() - TARGET_STD) > abs(resampled.std() - TARGET_STD)


@pytest.mark.parametrize("resamples", [1, 3])
def test_independent_pixels_keep_their_marginal_whatever_is_known(resamples):
    """x0 ~ N(0.3, 0.5^2) per pixel: the filled-in pixels ignore the known ones. 100-step DDPM itself gives std
    0.466 on this oracle (the plug-in posterior loses variance); each resampling pass loses a little more."""
    schedule, mu, s = NoiseSchedule.linear(1000), 0.3, 0.5

    def model(x, t):
        alpha_bar = schedule.alpha_bar[t.cpu()].to(x).reshape(-1, 1, 1, 1)
        return (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * mu) / (alpha_bar * s**2 + 1 - alpha_bar)
    generator = torch.Generator().manual_seed(0)
    x = randn((2000, 1, 2, 2), generator, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).reshape(1, 1, 2, 2)
    out = repaint(model, x, schedule, torch.full_like(x, 1.7), mask, 100, jump_length=5, resamples=resamples,
                  generator=generator)
    filled = out[:, 0, [0, 1], [1, 0]].flatten()                                       # 4000 pixels
    assert abs(filled.mean() - mu) < 0.03                                             # 4 standard errors
    assert abs(filled.std() / s - 1) < 0.12                                           # 0.938 (R=1), 0.918 (R=3)


def test_resampling_picks_the_mode_the_known_pixel_implies():
    """Pixel 0 known at 0.5 makes mode (1, 1) certain (posterior odds e^11); plain replacement commits to a
    mode before the known pixel is legible and lands 17% of the samples in the wrong one, RePaint 2%."""
    schedule = NoiseSchedule.linear(1000)
    model = mixture_2d_oracle(schedule)
    wrong_plain = (inpaint_pixel1(model, schedule, 0.5, resamples=1) < 0).double().mean()
    wrong_resampled = (inpaint_pixel1(model, schedule, 0.5, jump_length=5, resamples=5) < 0).double().mean()
    assert wrong_resampled < 0.05
    assert wrong_plain > 3 * wrong_resampled


# ---- the contract -------------------------------------------------------------------------------------

def test_jump_schedule_matches_the_papers_appendix():
    # get_schedule_jump(t_T=7, jump_length=2, jump_n_sample=3): jumps back at 4, 2, 0, twice each
    assert _jump_schedule(7, 2, 3) == [6, 5, 4, 6, 5, 4, 6, 5, 4, 3, 2, 4, 3, 2, 4, 3, 2, 1, 0, 2, 1, 0, 2, 1, 0, -1]
    assert _jump_schedule(4, 10, 10) == [3, 2, 1, 0, -1]                              # shorter than one jump
    assert _jump_schedule(5, 2, 1) == [4, 3, 2, 1, 0, -1]                             # resamples=1: no jumps


def test_alpha_sigma_falls_back_to_alpha_bar_for_schedules_without_it():
    schedule = NoiseSchedule.cosine(100)
    older = type("OlderSchedule", (), {"alpha_bar": schedule.alpha_bar})()             # no alpha_sigma method
    for t in (0, 37, 99):
        assert _alpha_sigma(older, torch.tensor(t)) == pytest.approx(_alpha_sigma(schedule, torch.tensor(t)), abs=1e-15)
    assert _alpha_sigma(schedule, None) == (1.0, 0.0)                                   # the clean data


@pytest.mark.parametrize("mask_shape", [(2, 1, 8, 12), (1, 1, 8, 12), (2, 3, 8, 12)])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_known_region_is_kept_exactly_and_seeded_runs_repeat(mask_shape, prediction):
    schedule = NoiseSchedule.cosine(100)
    model = lambda x, t: torch.tanh(x) * 0.5                                          # any denoiser will do
    known = torch.rand(2, 3, 8, 12) * 2 - 1
    mask = (torch.rand(mask_shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return repaint(model, randn(known.shape, generator), schedule, known, mask, 10, jump_length=2,
                       resamples=3, prediction=prediction, clip_x0=1.0, generator=generator)
    out = run(0)
    assert out.shape == known.shape and out.dtype == known.dtype and torch.isfinite(out).all()
    keep = mask.expand_as(known) == 1
    assert torch.equal(out[keep], known[keep])
    assert torch.equal(out, run(0))
    assert not torch.equal(out[~keep], run(1)[~keep])


def test_per_image_generators_make_each_image_independent_of_the_batch():
    schedule = NoiseSchedule.linear(100)
    model = gaussian_2d_oracle(schedule)
    known, mask = torch.tensor([A, 0.0]).expand(3, 1, 1, 2), torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)

    def batch(size):
        generators = [torch.Generator().manual_seed(i) for i in range(size)]
        return repaint(model, randn((size, 1, 1, 2), generators), schedule, known[:size], mask, 10,
                       jump_length=3, resamples=2, generator=generators)
    assert torch.allclose(batch(3)[:1], batch(1), atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"known": torch.zeros(2, 1, 4, 4)}, "known must have x's shape"),
    ({"mask": torch.ones(1, 1, 3, 5)}, "does not broadcast"),
    ({"mask": torch.ones(2, 1, 1, 4, 5)}, "does not broadcast"),
    ({"mask": torch.full((1, 1, 4, 5), 255.0)}, r"\[0, 1\]"),
    ({"mask": torch.full((1, 1, 4, 5), float("nan"))}, r"\[0, 1\]"),
    ({"jump_length": 0}, "jump_length must be an integer >= 1"),
    ({"resamples": 0}, "resamples must be an integer >= 1"),
    ({"resamples": 2.5}, "resamples must be an integer >= 1"),
])
def test_bad_inputs_raise_one_line_value_errors(change, message):
    schedule = NoiseSchedule.linear(100)
    args = {"known": torch.zeros(2, 1, 4, 5), "mask": torch.ones(1, 1, 4, 5), "jump_length": 2, "resamples": 2}
    args.update(change)
    calls = []
    with pytest.raises(ValueError, match=message) as error:
        repaint(lambda x, t: calls.append(t) or x, torch.zeros(2, 1, 4, 5), schedule, args["known"], args["mask"],
                5, jump_length=args["jump_length"], resamples=args["resamples"])
    assert "\n" not in str(error.value) and not calls                                   # checked before any step


def test_progress_bar_goes_to_stderr(capsys):
    schedule = NoiseSchedule.linear(100)
    x = torch.zeros(1, 1, 2, 2)
    repaint(lambda x, t: x, x, schedule, x, torch.ones(1, 1, 2, 2), 4, jump_length=2, resamples=2, progress=True)
    assert "repaint" in capsys.readouterr().err


# ---- diffunet inpaint ----------------------------------------------------------------------------------

HEIGHT, WIDTH, K = 8, 12, 3


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two random tiny runs saved as `diffunet train` would: unconditional and 2-class; an image; a mask."""
    from PIL import Image

    from diffunet import UNet, UNetConfig
    from diffunet.checkpoint import save_model

    root = tmp_path_factory.mktemp("inpaint")
    runs = {}
    for name, num_classes, label_dropout in (("plain", None, 0.0), ("labelled", 2, 0.0), ("dropout", 2, 0.1)):
        torch.manual_seed(0)
        model = UNet(UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                norm_groups=4, mid_attention=False, zero_init=False, num_classes=num_classes))
        runs[name] = root / name
        save_model(runs[name], model, extra_config={"schedule": NoiseSchedule.linear(100).to_dict(),
                                                    "prediction": "eps", "image_shape": [1, HEIGHT, WIDTH],
                                                    "train": {"label_dropout": label_dropout}})
    pixels = torch.randint(0, 256, (HEIGHT, WIDTH), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(root / "image.png")
    keep = torch.zeros(HEIGHT, WIDTH, dtype=torch.uint8)
    keep[:, : WIDTH // 2] = 255                                                       # white = keep the left half
    Image.fromarray(keep.numpy()).save(root / "mask.png")
    Image.fromarray(keep.numpy()[:, :-2]).save(root / "small_mask.png")
    Image.fromarray(pixels.numpy()[:-2]).save(root / "small_image.png")
    return runs, root, pixels, keep


def read_tiles(path, count):
    """The `count` tiles [count, H, W] of a one-row grid PNG (2-pixel padding)."""
    from PIL import Image

    grid = torch.from_numpy(__import__("numpy").asarray(Image.open(path)).copy())
    assert grid.shape == (HEIGHT + 4, count * (WIDTH + 2) + 2)
    return torch.stack([grid[2:2 + HEIGHT, 2 + i * (WIDTH + 2):2 + i * (WIDTH + 2) + WIDTH] for i in range(count)])


def inpaint(run, root, out, *extra):
    from diffunet.cli import main

    return main(["inpaint", "--checkpoint", str(run), "--image", str(root / "image.png"), "--mask",
                 str(root / "mask.png"), "--out", str(out), "--num", str(K), "--steps", "6", "--jump-length", "2",
                 "--resamples", "2", "--device", "cpu", "--no-progress", *extra])


def test_inpaint_cli_writes_original_mask_and_completions_that_keep_the_white_part(tiny_runs, tmp_path):
    runs, root, pixels, keep = tiny_runs
    assert inpaint(runs["plain"], root, tmp_path / "a.png", "--seed", "3") == 0
    tiles = read_tiles(tmp_path / "a.png", K + 2)
    assert torch.equal(tiles[0], pixels) and torch.equal(tiles[1], keep)
    kept = keep == 255
    for completion in tiles[2:]:
        assert torch.equal(completion[kept], pixels[kept])                            # exactly the original
    assert not torch.equal(tiles[2][~kept], tiles[3][~kept])                          # K different fill-ins
    assert inpaint(runs["plain"], root, tmp_path / "b.png", "--seed", "3") == 0
    assert torch.equal(read_tiles(tmp_path / "b.png", K + 2), tiles)                 # seeded: repeats exactly


def test_inpaint_cli_binds_label_and_guidance(tiny_runs, tmp_path, capsys):
    runs, root, _, _ = tiny_runs
    assert inpaint(runs["labelled"], root, tmp_path / "a.png", "--label", "1", "--guidance", "2") == 0
    assert inpaint(runs["labelled"], root, tmp_path / "b.png", "--label", "0", "--guidance", "2") == 0
    assert not torch.equal(read_tiles(tmp_path / "a.png", K + 2), read_tiles(tmp_path / "b.png", K + 2))
    assert inpaint(runs["plain"], root, tmp_path / "c.png", "--label", "1") == 1
    assert "unconditional" in capsys.readouterr().err


def test_inpaint_cli_without_label_completes_with_the_no_label_branch(tiny_runs, tmp_path, capsys):
    runs, root, _, _ = tiny_runs
    assert inpaint(runs["dropout"], root, tmp_path / "none.png") == 0             # y = -1: the image decides
    none = read_tiles(tmp_path / "none.png", K + 2)
    for label in ("0", "1"):
        assert inpaint(runs["dropout"], root, tmp_path / f"{label}.png", "--label", label) == 0
        assert not torch.equal(read_tiles(tmp_path / f"{label}.png", K + 2), none)
    capsys.readouterr()
    assert inpaint(runs["labelled"], root, tmp_path / "x.png") == 1              # no trained no-label branch
    assert "trained without label dropout" in capsys.readouterr().err
    assert inpaint(runs["dropout"], root, tmp_path / "y.png", "--guidance", "2") == 1
    assert "needs a label (--label)" in capsys.readouterr().err


@pytest.mark.parametrize("flag, file, message", [
    ("--mask", "small_mask.png", "--mask .*small_mask.png is 10x8 but the model makes 12x8 images; resize or crop"),
    ("--image", "small_image.png", "--image .*small_image.png is 12x6 but the model makes 12x8 images"),
    ("--mask", "missing.png", "does not exist"),
    ("--resamples", "0", "--resamples must be a positive integer"),
])
def test_inpaint_cli_refuses_bad_input_in_one_line(tiny_runs, tmp_path, capsys, flag, file, message):
    runs, root, _, _ = tiny_runs
    value = file if file[0].isdigit() else str(root / file)
    assert inpaint(runs["plain"], root, tmp_path / "out.png", flag, value) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffunet inpaint: error: ")
    assert __import__("re").search(message, err)
    assert not (tmp_path / "out.png").exists()


def test_inpaint_help_states_the_mask_convention(capsys):
    from diffunet.cli import main

    with pytest.raises(SystemExit):
        main(["inpaint", "--help"])
    assert "WHITE = KEEP" in capsys.readouterr().out


def test_run_inpaint_is_the_cli_completion_and_does_not_depend_on_the_batch_size(tiny_runs, tmp_path):
    from diffunet import load_run
    from diffunet.images import to_uint8

    runs, root, pixels, keep = tiny_runs
    run = load_run(runs["plain"])
    image, kept = pixels[None, None], (keep == 255)[None, None]
    options = dict(seed=3, steps=6, jump_length=2, resamples=2)
    whole = run.inpaint(image, kept, K, batch_size=K, **options)                     # [K, 1, H, W] in [-1, 1]
    assert whole.shape == (K, 1, HEIGHT, WIDTH)
    assert torch.allclose(run.inpaint(image, kept, K, batch_size=2, **options), whole, atol=1e-4)  # (seed, i) only
    assert inpaint(runs["plain"], root, tmp_path / "a.png", "--seed", "3") == 0
    assert torch.equal(read_tiles(tmp_path / "a.png", K + 2)[2:], to_uint8(whole)[:, 0])
    several = torch.stack([pixels, pixels.flip(1)])[:, None]                          # one completion per image
    filled = to_uint8(run.inpaint(several, kept, **options))
    assert torch.equal(filled[1, 0][kept[0, 0]], pixels.flip(1)[kept[0, 0]])
    with pytest.raises(UserError, match="masks"):
        run.inpaint(image, kept[..., :-1], K)


def test_run_no_labels_is_the_trained_no_label_branch_or_a_one_line_refusal(tiny_runs):
    from diffunet import load_run

    runs = tiny_runs[0]
    assert load_run(runs["plain"]).no_labels(3) is None
    assert torch.equal(load_run(runs["dropout"]).no_labels(3), torch.full((3,), -1))
    with pytest.raises(UserError, match="without label dropout"):
        load_run(runs["labelled"]).no_labels(3)
    with pytest.raises(UserError, match="needs a label"):
        load_run(runs["dropout"]).no_labels(3, guidance=2.0)
