"""Closed-form optimal denoisers on any Gaussian path, built from `schedule.alpha_sigma(t)` alone."""
from __future__ import annotations

import math

import torch

MU, S = 0.3, 0.5                                      # Gaussian data x0 ~ N(MU, S^2) per pixel
WEIGHT, MEANS, STDS = 0.3, (-0.8, 0.6), (0.1, 0.2)    # mixture: 0.3 N(-0.8, 0.1^2) + 0.7 N(0.6, 0.2^2)


def coefficients(schedule, t, x):
    """alpha_t, sigma_t as [B, 1, ..., 1] in x's dtype."""
    alpha, sigma = schedule.alpha_sigma(t.cpu())
    shape = (-1, *([1] * (x.dim() - 1)))
    return alpha.to(x).reshape(shape), sigma.to(x).reshape(shape)


def express(alpha, sigma, eps, x0, prediction):
    """The output of an eps-, x0-, v- or flow-predictor with the given eps and x0 estimates."""
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "flow": eps - x0}[prediction]


def gaussian(schedule, prediction="x0", mu=MU, s=S):
    """E[eps | x_t], E[x0 | x_t] for x0 ~ N(mu, s^2): with var_t = alpha^2 s^2 + sigma^2,
    x0* = mu + alpha s^2 (x_t - alpha mu) / var_t and eps* = sigma (x_t - alpha mu) / var_t."""
    def model(x, t):
        alpha, sigma = coefficients(schedule, t, x)
        residual = (x - alpha * mu) / (alpha**2 * s**2 + sigma**2)
        return express(alpha, sigma, sigma * residual, mu + alpha * s**2 * residual, prediction)
    return model


def mixture(schedule, prediction="x0", weight=WEIGHT, means=MEANS, stds=STDS):
    """E[x0 | x_t] for x0 ~ w N(m0, s0^2) + (1 - w) N(m1, s1^2): responsibilities times per-mode posterior means."""
    (m0, m1), (s0, s1) = means, stds

    def model(x, t):
        alpha, sigma = coefficients(schedule, t, x)
        var0, var1 = alpha**2 * s0**2 + sigma**2, alpha**2 * s1**2 + sigma**2     # Var(x_t | mode)
        logit = (math.log(weight / (1 - weight)) - 0.5 * (var0 / var1).log()
                 - 0.5 * (x - alpha * m0) ** 2 / var0 + 0.5 * (x - alpha * m1) ** 2 / var1)
        first = torch.sigmoid(logit)                                                # P(mode 0 | x_t)
        x0 = (first * (m0 + alpha * s0**2 * (x - alpha * m0) / var0)
              + (1 - first) * (m1 + alpha * s1**2 * (x - alpha * m1) / var1))
        eps = (first * sigma * (x - alpha * m0) / var0 + (1 - first) * sigma * (x - alpha * m1) / var1)
        return express(alpha, sigma, eps, x0, prediction)
    return model
