"""Evaluation against closed forms: Gaussian KL, the discretized decoder, the prior, the whole bound with
an exact denoiser vs. Monte Carlo over forward trajectories; the Fréchet distance of known Gaussians;
class entropy, memorisation, the cached classifier; `diffunet eval` on a tiny run."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from diffunet.cli import main
from diffunet.data import BUILTIN_FILE
from diffunet.evaluate import MAX_REFERENCES, eval_data, format_table, split_real
from diffunet.features import (ClassifierConfig, cached_classifier, class_entropy, classify, frechet_distance,
                               frechet_distance_from_stats, memorisation_rate, nearest_distances, sqrtm_psd,
                               train_classifier)
from diffunet.likelihood import (discretized_gaussian_log_likelihood, model_log_variance, nll_bits_per_dim,
                                 normal_kl, prior_kl, stratified_timesteps)
from samplers import NoiseSchedule

BUILTIN = np.load(BUILTIN_FILE)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["--model-base-channels", "8", "--model-channel-mults", "1,2", "--model-num-res-blocks", "1",
        "--model-attention-levels", "", "--model-norm-groups", "4", "--model-head-channels", "8",
        "--batch-size", "8", "--num-samples", "4", "--sample-steps", "2", "--quiet"]
POINTS = torch.tensor([[[[0, 255, 40]]], [[[128, 30, 255]]], [[[255, 255, 0]]]], dtype=torch.uint8)  # 3 x [1, 1, 3]


def point_oracle(points: torch.Tensor, schedule: NoiseSchedule, prediction: str = "x0"):
    """E[x0 | x_t] for data uniform on a few images: softmax(-||x_t - alpha x_k||^2 / 2 sigma^2) weights, float64."""
    x0_points = points.double() / 127.5 - 1                                       # [K, C, H, W]

    def model(x, t):
        x = x.double()
        alpha_bar = schedule.alpha_bar[t.cpu()].reshape(-1, 1, 1, 1)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        squared = ((x[:, None] - alpha[:, None] * x0_points[None]) ** 2).flatten(2).sum(2)   # [B, K]
        weights = torch.softmax(-squared / (2 * sigma.reshape(-1, 1) ** 2), dim=1)
        x0 = torch.einsum("bk,kchw->bchw", weights, x0_points)
        eps = (x - alpha * x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]
    return model


def gaussian_log_density(x, mean, variance):
    return -0.5 * torch.log(2 * math.pi * variance) - (x - mean) ** 2 / (2 * variance)


def trajectory_bound(model, images: torch.Tensor, schedule: NoiseSchedule, seed: int = 0) -> torch.Tensor:
    """Brute force: E[log q(x_{0:T-1} | x0) - log p(x0, x_{0:T-1})] along sampled forward chains, bits/dim [R].
    Raw log densities step by step (Ho et al. 2020, eq. 3), no KL terms, no posterior q(x_{t-1} | x_t, x0)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = images.double() / 127.5 - 1
    betas, alpha_bar = schedule.betas, schedule.alpha_bar
    beta_tilde = [(1 - alpha_bar[i - 1]) / (1 - alpha_bar[i]) * betas[i] for i in range(1, len(betas))]
    chain, log_q, previous = [], torch.zeros_like(x0), x0
    for i, beta in enumerate(betas):                                            # q(x_i | x_{i-1})
        mean = (1 - beta).sqrt() * previous
        x = mean + beta.sqrt() * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        log_q += gaussian_log_density(x, mean, beta)
        chain.append(x)
        previous = x
    log_p = gaussian_log_density(chain[-1], 0.0, torch.tensor(1.0))            # p(x_{T-1}) = N(0, I)
    for i in range(len(betas) - 1, -1, -1):
        t = torch.full((len(x0),), i)
        _, x0_model = schedule.to_eps_x0(model(chain[i], t), chain[i], t, "x0", clip_x0=1.0)
        mean = schedule.posterior_mean_variance(x0_model, chain[i], t)[0]
        if i > 0:
            log_p += gaussian_log_density(chain[i - 1], mean, beta_tilde[i - 1])
        else:
            log_p += discretized_gaussian_log_likelihood(x0, mean, 0.5 * beta_tilde[0].log())
    return (log_q - log_p).flatten(1).sum(1) / (x0[0].numel() * math.log(2))


# ---- the bound's pieces against closed forms ---------------------------------------------------

def test_normal_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mean1, mean2 = torch.randn(2, 50, generator=generator, dtype=torch.float64)
    log_var1, log_var2 = torch.randn(2, 50, generator=generator, dtype=torch.float64) * 2
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean1, (0.5 * log_var1).exp()),
                                                 torch.distributions.Normal(mean2, (0.5 * log_var2).exp()))
    torch.testing.assert_close(normal_kl(mean1, log_var1, mean2, log_var2), expected, rtol=1e-12, atol=1e-12)
    assert normal_kl(mean1, log_var1, mean1, log_var1).abs().max() < 1e-12


@pytest.mark.parametrize("mean, scale", [(0.0, 1.0), (0.3, 0.01), (-0.97, 0.003), (0.999, 1e-4), (2.5, 0.2),
                                         (-1.2, 5.0), (0.5, 1e-6)])
def test_discretized_gaussian_is_a_distribution_over_256_bins(mean, scale):
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    log_p = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean),
                                                torch.full_like(bins, math.log(scale)))
    assert torch.isfinite(log_p).all() or scale < 1e-5       # far bins of a needle may underflow to -inf
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    normal = torch.distributions.Normal(*torch.tensor([mean, scale], dtype=torch.float64))
    expected = normal.cdf(bins + 1 / 255) - normal.cdf(bins - 1 / 255)           # Ho et al. 2020, eq. 13
    expected[0], expected[-1] = normal.cdf(bins[0] + 1 / 255), 1 - normal.cdf(bins[-1] - 1 / 255)
    torch.testing.assert_close(log_p.exp(), expected, rtol=1e-6, atol=1e-12)


def test_discretized_gaussian_keeps_precision_in_the_tails():
    """A bin 8 std above the mean: Phi(b) - Phi(a) cancels to 0 in float64; the symmetric form does not."""
    x0, scale = torch.tensor([0.6], dtype=torch.float64), 0.01
    mean = x0 - 1 / 255 - 8 * scale                                             # lower edge 8 std up
    log_p = discretized_gaussian_log_likelihood(x0, mean, torch.tensor([math.log(scale)], dtype=torch.float64))
    upper = 8 + 2 / 255 / scale
    expected = math.log(0.5 * (math.erfc(8 / math.sqrt(2)) - math.erfc(upper / math.sqrt(2))))
    assert log_p.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("schedule", [NoiseSchedule.linear(100), NoiseSchedule.cosine(50),
                                      NoiseSchedule.from_betas(torch.linspace(0.02, 0.25, 8))])
def test_prior_term_matches_the_hand_formula(schedule):
    x0 = POINTS.double() / 127.5 - 1
    a = schedule.alpha_bar[-1].item()
    expected = (0.5 * (a * x0 ** 2 + (1 - a) - 1 - math.log(1 - a))).flatten(1).sum(1)
    torch.testing.assert_close(prior_kl(x0, schedule), expected, rtol=1e-10, atol=1e-14)
    assert prior_kl(x0, schedule.rescale_zero_terminal_snr()).abs().max() < 1e-12


def test_model_variance_is_the_posterior_variance_clipped_at_t0():
    schedule = NoiseSchedule.cosine(30)
    t = torch.arange(30)
    zeros = torch.zeros(30, dtype=torch.float64)
    _, variance, _ = schedule.posterior_mean_variance(zeros, zeros, t)
    torch.testing.assert_close(model_log_variance(schedule, t)[1:], variance[1:].log())
    assert model_log_variance(schedule, t)[0] == variance[1].log()


def test_stratified_timesteps_cover_each_stratum_once_and_grow_geometrically():
    generator = torch.Generator().manual_seed(0)
    for T, count in [(1000, 2), (1000, 11), (100, 37), (10, 10)]:
        t, weights = stratified_timesteps(T, count, generator)
        assert t[0] == 0 and weights[0] == 1 and weights.sum() == T and len(t) == count
        edges = torch.cat([torch.tensor([1]), 1 + torch.cumsum(weights[1:], 0)])
        assert ((t[1:] >= edges[:-1]) & (t[1:] < edges[1:])).all()
    assert torch.equal(stratified_timesteps(10, 10, generator)[0], torch.arange(10))
    t, weights = stratified_timesteps(1000, 100, generator)
    assert torch.equal(t[:11], torch.arange(11)) and weights[-1] > 10 * weights[1:11].max()   # exact where it matters


# ---- the whole bound -------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_bound_with_exact_denoiser_matches_monte_carlo_over_trajectories(prediction):
    """The Rao-Blackwellised sum of KL terms (likelihood.py) and the raw ELBO along 20,000 sampled forward
    chains per image estimate the same number; and it lies above the data entropy log2(3) / D, as any
    NLL bound must. Every prediction kind gives the same bound (the oracle is converted exactly)."""
    schedule = NoiseSchedule.from_betas(torch.linspace(0.02, 0.25, 8))        # alpha_bar_T ~ 0.3: prior matters
    images = POINTS.repeat(2000, 1, 1, 1)                                       # 6,000 images, 3 distinct
    result = nll_bits_per_dim(point_oracle(POINTS, schedule, prediction), images, schedule, prediction, seed=1)
    brute = trajectory_bound(point_oracle(POINTS, schedule), POINTS.repeat(20_000, 1, 1, 1), schedule)
    for ours, theirs in zip(result.per_image.reshape(-1, 3).T, brute.reshape(-1, 3).T):   # image by image
        stderr = math.hypot(ours.std().item() / math.sqrt(len(ours)), theirs.std().item() / math.sqrt(len(theirs)))
        assert ours.mean().item() == pytest.approx(theirs.mean().item(), abs=4 * stderr)
        assert stderr < 0.01 * theirs.mean().item()                             # a check with teeth
    assert result.bits_per_dim > math.log2(3) / 3 and result.prior_bits_per_dim > 0.05
    zero_model = lambda x, t: torch.zeros_like(x)                               # a bad x0-predictor
    worse = nll_bits_per_dim(zero_model, POINTS.repeat(50, 1, 1, 1), schedule, "x0")
    assert worse.bits_per_dim > result.bits_per_dim + 10 * worse.stderr


def test_subsampled_timesteps_are_unbiased_and_batch_size_free():
    schedule = NoiseSchedule.cosine(100)
    model, images = point_oracle(POINTS, schedule), POINTS.repeat(300, 1, 1, 1)
    full = nll_bits_per_dim(model, images, schedule, "x0", seed=0)
    sampled = nll_bits_per_dim(model, images, schedule, "x0", timesteps_per_image=5, seed=1)
    assert full.timesteps_per_image == 100 and sampled.timesteps_per_image == 5
    assert sampled.bits_per_dim == pytest.approx(full.bits_per_dim, abs=4 * math.hypot(full.stderr, sampled.stderr))
    small = nll_bits_per_dim(model, POINTS, schedule, "x0", timesteps_per_image=5, seed=1, batch_size=3)
    torch.testing.assert_close(small.per_image, sampled.per_image[:3], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="timesteps_per_image"):
        nll_bits_per_dim(model, POINTS, schedule, "x0", timesteps_per_image=1)
    with pytest.raises(ValueError, match="uint8"):
        nll_bits_per_dim(model, POINTS.float(), schedule, "x0")


# ---- the Fréchet distance ----------------------------------------------------------------------------

def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = torch.tensor([[0.0, 1.0, -2.0], [0.5, 1.0, 0.0]], dtype=torch.float64)
    var1, var2 = torch.tensor([[1.0, 4.0, 0.25], [2.0, 1.0, 0.25]], dtype=torch.float64)
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * (var1 * var2).sqrt()).sum()
    assert frechet_distance_from_stats(mu1, var1.diag(), mu2, var2.diag()) == pytest.approx(expected.item(), rel=1e-12)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    rotated = [rotation @ v.diag() @ rotation.T for v in (var1, var2)]  # the distance is rotation-invariant
    assert frechet_distance_from_stats(mu1, rotated[0], mu2, rotated[1]) == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_distance_general_covariances_and_samples():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 20, 20, generator=generator, dtype=torch.float64)
    cov1, cov2 = a @ a.T / 20, b @ b.T / 20 + torch.eye(20, dtype=torch.float64)
    cov1[:, 0], cov1[0, :] = 0, 0                                                # singular: a dead feature
    mu = torch.zeros(20, dtype=torch.float64)
    # tr sqrt(cov1 cov2) from the eigenvalues of the non-symmetric product, computed independently
    cross = np.sqrt(np.clip(np.linalg.eigvals(cov1.numpy() @ cov2.numpy()).real, 0, None)).sum()
    expected = cov1.trace().item() + cov2.trace().item() - 2 * cross
    assert frechet_distance_from_stats(mu, cov1, mu, cov2) == pytest.approx(expected, rel=1e-9)
    root = sqrtm_psd(cov1)
    torch.testing.assert_close(root @ root, cov1, rtol=0, atol=1e-10)
    features = torch.randn(500, 8, generator=generator, dtype=torch.float64)
    assert frechet_distance(features, features) < 1e-9
    assert frechet_distance(features, features + 2.0) == pytest.approx(8 * 4.0, rel=1e-9)   # ||shift||^2
    many = torch.randn(2, 20_000, 4, generator=generator, dtype=torch.float64)
    scaled = frechet_distance(many[0], many[1] * 3 + 1)                         # N(0, I) vs N(1, 9 I)
    assert scaled == pytest.approx(4 * 1 + 4 * (1 + 9 - 2 * 3), rel=0.05)


# ---- entropy, memorisation, the classifier ----------------------------------------------------------

def test_class_entropy_and_memorisation():
    assert class_entropy(torch.arange(1000) % 10, 10) == pytest.approx(math.log2(10))
    assert class_entropy(torch.full((50,), 3), 10) == 0
    assert class_entropy(torch.tensor([0, 1, 0, 1]), 10) == pytest.approx(1.0)
    train, test = torch.from_numpy(BUILTIN["images"][:1000, None]), torch.from_numpy(BUILTIN["images"][1000:1300, None])
    distances = nearest_distances(test, train, batch_size=64)
    expected = torch.cdist(test.double().flatten(1) / 255, train.double().flatten(1) / 255).min(1).values
    torch.testing.assert_close(distances, expected, rtol=1e-9, atol=0)
    copies = nearest_distances(train[:40], train)
    assert copies.max() == 0
    rate, threshold = memorisation_rate(copies, distances)
    assert rate == 1.0 and threshold > 0.5
    assert memorisation_rate(distances, distances)[0] <= 0.01


def test_classifier_learns_is_reproducible_and_cached(tmp_path):
    """On 14x14 digits (any size works) with a narrow net, to stay fast."""
    digits = torch.from_numpy(BUILTIN["images"][:3000, None]).float()
    images = torch.nn.functional.avg_pool2d(digits, 2).round().to(torch.uint8)     # [3000, 1, 14, 14]
    labels = torch.from_numpy(BUILTIN["labels"][:3000]).long()
    config = ClassifierConfig(steps=150, batch_size=32, width=8, feature_dim=32, lr=3e-3)
    model, path, trained = cached_classifier(images[:2000], labels[:2000], 10, "digits/x", config, cache_dir=tmp_path)
    assert trained and path.parent == tmp_path / "classifiers" and path.name.startswith("digits_x_")
    features, predicted = classify(model, images[2000:])
    assert features.shape == (1000, 32) and (predicted == labels[2000:]).double().mean() > 0.8
    again, same_path, trained_again = cached_classifier(images[:2000], labels[:2000], 10, "digits/x", config,
                                                        cache_dir=tmp_path)
    assert same_path == path and not trained_again
    torch.testing.assert_close(classify(again, images[2000:])[0], features, rtol=0, atol=0)
    retrained = train_classifier(images[:2000], labels[:2000], 10, config)     # same seed, same weights
    for key, value in retrained.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], rtol=0, atol=0)
    quick = replace(config, steps=1)                                            # another config, another file
    _, quick_path, _ = cached_classifier(images[:2000], labels[:2000], 10, "digits/x", quick, cache_dir=tmp_path)
    assert quick_path != path
    quick_path.write_bytes(b"truncated")                                        # a damaged cache is replaced
    assert cached_classifier(images[:2000], labels[:2000], 10, "digits/x", quick, cache_dir=tmp_path)[2]


def test_random_shifts_move_each_image_by_its_own_offset_within_the_limit():
    from diffunet.features import random_shifts

    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1                                                                  # one bright centre pixel
    moved = random_shifts(x, 2, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape
    rows, columns = (moved[:, 0] == 1).nonzero()[:, 1:].T                             # one bright pixel each
    assert len(rows) == 64 and rows.sub(4).abs().max() == 2 and columns.sub(4).abs().max() == 2
    assert len(set(zip(rows.tolist(), columns.tolist()))) > 10                         # offsets differ per image
    assert torch.equal(random_shifts(x, 2, torch.Generator().manual_seed(0)), moved)  # seeded


def test_lenet_classifier_with_shifts_learns_digits_and_is_cached_apart():
    """The strict feature space's architecture and augmentation, at a tiny width to stay fast."""
    images = torch.from_numpy(BUILTIN["images"][:2500, None])                          # [2500, 1, 28, 28]
    labels = torch.from_numpy(BUILTIN["labels"][:2500]).long()
    config = ClassifierConfig(steps=200, batch_size=32, width=8, feature_dim=32, lr=3e-3, architecture="lenet",
                              shift=2, seed=1)
    model = train_classifier(images[:2000], labels[:2000], 10, config)
    features, predicted = classify(model, images[2000:])
    assert features.shape == (500, 32) and (predicted == labels[2000:]).double().mean() > 0.8
    assert {"hidden.weight", "conv1.weight"} <= set(model.state_dict())
    assert model.conv1.kernel_size == (5, 5)
    with pytest.raises(ValueError, match="architecture"):
        ClassifierConfig(architecture="resnet")


# ---- `diffunet eval` --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step VP run (it has a likelihood bound: bits/dim) on a small .npz with a test split (28x28 digits)."""
    folder = tmp_path_factory.mktemp("eval")
    x, y = BUILTIN["images"], BUILTIN["labels"]
    np.savez(folder / "digits.npz", x_train=x[:600], y_train=y[:600], x_test=x[600:800], y_test=y[600:800])
    assert main(["train", "--data", str(folder / "digits.npz"), "--out", str(folder / "run"), "--steps", "2",
                 "--schedule", "linear", "--prediction", "v", *TINY]) == 0
    return folder


def test_eval_cli_prints_table_and_writes_json(tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUNET_DATA", str(tiny_run / "cache"))
    argv = ["eval", "--checkpoint", str(tiny_run / "run"), "--num", "30", "--nll-images", "3", "--nll-timesteps",
            "50", "--classifier-steps", "20", "--strict-classifier-steps", "20", "--steps", "2", "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads((tiny_run / "run" / "eval.json").read_text())
    assert report["reference"] == "digits test split" and report["step"] == 2
    nll = report["nll"]
    assert 0 < nll["bits_per_dim"] <= 8 + 1 and nll["stderr"] > 0 and nll["timesteps_per_image"] == 50
    assert report["fd"]["num"] == 30 and report["fd"]["value"] > 0 and report["fd"]["floor"] > 0
    fd = report["fd"]
    assert fd["floor_sets"] == "30 other random test images vs 4 reference set(s) of 30 random test images"
    assert len(fd["values"]) == len(fd["floors"]) == MAX_REFERENCES == 4
    assert fd["value"] == pytest.approx(sum(fd["values"]) / 4) and fd["floor"] == pytest.approx(sum(fd["floors"]) / 4)
    assert 0 <= report["entropy"]["samples_bits"] <= math.log2(10) and report["classifier"]["trained_now"]
    assert 0 <= report["memorisation"]["rate"] <= 1 and report["memorisation"]["train_images"] == 600
    strict = report["fd_strict"]                                               # the second feature space
    assert strict["floor_sets"] == fd["floor_sets"] and strict["value"] > 0 and strict["value"] != fd["value"]
    assert report["classifier_strict"]["architecture"] == "lenet" and report["classifier_strict"]["shift"] == 2
    assert report["classifier_strict"]["path"] != report["classifier"]["path"]
    for words in ("bits/dim", "FD (floor)", "FD strict (floor)", "class entropy", "memorisation", "N = 30"):
        assert words in table
    assert format_table(report) in table
    assert main([*argv, "--nll-images", "0", "--out", str(tiny_run / "again.json")]) == 0
    again = json.loads((tiny_run / "again.json").read_text())
    assert "nll" not in again and not again["classifier"]["trained_now"]     # the cached classifier is reused
    assert again["fd"] == report["fd"]                                         # same seed, same samples
    # Room for one set of N only: the floor's stand-in is the last N training images.
    assert main([*argv, "--num", "150", "--nll-images", "0", "--out", str(tiny_run / "wide.json")]) == 0
    wide = json.loads((tiny_run / "wide.json").read_text())["fd"]
    assert wide["floor_sets"] == "the last 150 training images vs 1 reference set(s) of 150 random test images"
    assert len(wide["values"]) == 1 and wide["value"] == wide["values"][0]


def test_real_sets_are_disjoint_random_draws_not_blocks():
    """The MNIST test set is ordered (cleaner writers first), so FD sets must be random draws."""
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    sets = split_real(order, 30)
    assert len(sets) == MAX_REFERENCES + 1 and all(len(index) == 30 for index in sets)
    together = torch.cat(sets)
    assert len(together.unique()) == len(together)                            # disjoint
    assert not torch.equal(sets[0].sort().values, torch.arange(30))            # not the first block
    assert len(split_real(order, 100)) == 2 and len(split_real(order, 101)) == 1


def test_eval_cli_errors_are_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUNET_DATA", str(tmp_path))
    run = ["eval", "--checkpoint", str(tiny_run / "run"), "--no-progress", "--num", "4", "--nll-images", "0"]
    for argv, words in [(["eval", "--checkpoint", str(tmp_path / "missing")], "does not exist"),
                        ([*run, "--num", "500"], "num (--num) must be in 2..200"),
                        ([*run, "--sampler", "lms", "--nll-images", "5"], "sampler (--sampler) must be one of"),
                        ([*run, "--nll-timesteps", "1"], "nll_timesteps (--nll-timesteps) must be in 2..1000"),
                        ([*run, "--classifier-steps", "0"], "classifier steps must be a positive"),
                        ([*run, "--strict-classifier-steps", "-1"], "classifier steps must be a positive")]:
        assert main(argv) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("diffunet eval: error:") and words in lines[0], lines


def test_eval_data_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUNET_DATA", str(tmp_path))                       # no full MNIST here
    held = eval_data("builtin", {})
    assert len(held.test.images) == 2000 and len(held.train.images) == 8000 and "held out" in held.reference
    # a seeded random fifth, disjoint from the rest, with every class in it (a folder's tail is one class)
    chosen = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))[-2000:].sort().values
    assert torch.equal(held.test.images[0], torch.from_numpy(BUILTIN["images"][chosen[0].item()])[None])
    assert len(set(held.test.labels.tolist())) == 10
    assert torch.equal(eval_data("builtin", {}).test.images, held.test.images)                  # deterministic
    if (SHARED_DATA / "mnist.npz").is_file():
        monkeypatch.setenv("DIFFUNET_DATA", str(SHARED_DATA))
        real = eval_data("builtin", {})
        assert len(real.test.images) == 10_000 and len(real.labelled.images) == 60_000
        assert len(real.train.images) == 10_000 and real.reference.startswith("MNIST test set")


def test_eval_on_a_flow_run_says_why_it_has_no_bits_per_dim(tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUNET_DATA", str(tiny_run / "cache"))
    run = tiny_run / "flow_run"
    assert main(["train", "--data", str(tiny_run / "digits.npz"), "--out", str(run), "--steps", "2", *TINY,
                 "--schedule", "rectified_flow", "--prediction", "flow", "--sampler", "euler", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--num", "30", "--nll-images", "3", "--classifier-steps", "20",
                 "--strict-classifier-steps", "0", "--steps", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    assert "nll" not in report and "rectified_flow" in report["nll_unavailable"]
    assert "no bits/dim" in table and report["fd"]["value"] > 0 and report["samples"]["sampler"] == "euler"


def test_eval_on_unlabelled_data_says_which_figures_it_cannot_give(tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUNET_DATA", str(tiny_run / "cache"))
    np.savez(tiny_run / "plain.npz", images=BUILTIN["images"][:300])                  # no labels at all
    run = tiny_run / "plain_run"
    assert main(["train", "--data", str(tiny_run / "plain.npz"), "--out", str(run), "--steps", "2", *TINY,
                 "--schedule", "linear", "--prediction", "v", "--quiet"]) == 0   # VP: bits/dim is one of "the rest"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--num", "20", "--nll-images", "2", "--nll-timesteps", "10",
                 "--strict-classifier-steps", "0", "--steps", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    assert "fd" not in report and "has no labels" in report["fd_unavailable"] and "FD (floor)" in table
    assert report["nll"]["bits_per_dim"] > 0 and 0 <= report["memorisation"]["rate"] <= 1   # the rest is given
    assert "held out at random" in report["reference"]
