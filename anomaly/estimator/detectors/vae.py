"""Variational autoencoder detector.

A Gaussian encoder ``q(z|x) = N(mu(x), diag(sigma(x)^2))`` with the KL term to ``N(0, I)`` active
(weight ``beta``), and a Gaussian decoder ``p(x|z) = N(g(z), diag(s^2))`` whose per-feature scale
``s`` is learned (one value per feature, not per row). Training maximises the ELBO with one
reparameterised sample.

Score: the decoder is run on the *posterior mean* ``mu(x)`` (no sampling), so the same row always
gets the same score. The score is ``sum_j 0.5 * ((x_j - g(mu(x))_j) / s_j)^2``: the squared
reconstruction error of each feature in units of that feature's learned noise scale. The per-feature
terms (``feature_errors``) are what ``AnomalyModel.explain`` reports.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from anomaly.estimator.detectors._base import (
    BaseDetector,
    check_array,
    finite_scores,
    mlp,
    module_device,
    torch_threads,
)


class _VAE(nn.Module):
    def __init__(self, n_features: int, hidden: list[int], latent: int, min_scale: float) -> None:
        super().__init__()
        self.encoder = mlp([n_features, *hidden, 2 * latent])
        self.decoder = mlp([latent, *reversed(hidden), n_features])
        self.log_scale = nn.Parameter(torch.zeros(n_features))
        self.latent = latent
        self.log_min_scale = math.log(min_scale)

    def scale_log(self) -> torch.Tensor:
        """Per-feature log noise scale, floored: a feature the decoder learns to copy almost
        exactly would otherwise get a vanishing scale and dominate every score (the first thing
        a VAE overfits on a few hundred rows)."""
        return self.log_scale.clamp_min(self.log_min_scale)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        mu, logvar = h[:, : self.latent], h[:, self.latent :].clamp(-10.0, 10.0)
        return mu, logvar

    def feature_errors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-feature score terms, decoding the posterior mean."""
        mu, _ = self.encode(x)
        recon = self.decoder(mu)
        return 0.5 * ((x - recon) * torch.exp(-self.scale_log())) ** 2


class VAEDetector(BaseDetector):
    """VAE anomaly detector (scikit-learn style); see the module docstring for the score.

    Parameters (beyond the shared training ones in ``BaseDetector``): ``hidden`` layer widths,
    ``latent_dim`` (``None``: ``clip(n_features // 3, 2, 16)``), ``beta`` (KL weight) and
    ``noise_std`` (Gaussian input noise during training, a denoising regulariser).
    """

    name = "vae"

    def __init__(
        self,
        hidden: tuple[int, ...] = (64, 32),
        latent_dim: int | None = None,
        beta: float = 1.0,
        noise_std: float = 0.05,
        min_scale: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden = tuple(hidden)
        self.latent_dim = latent_dim
        self.beta = beta
        self.noise_std = noise_std
        self.min_scale = min_scale

    def _latent(self, n_features: int) -> int:
        if self.latent_dim is not None:
            return int(self.latent_dim)
        return int(min(16, max(2, n_features // 3)))

    def architecture(self) -> dict[str, Any]:
        return {"hidden": list(self.hidden), "latent": self._latent(self.n_features_in_)}

    def _build(self, n_features: int) -> nn.Module:
        return _VAE(n_features, list(self.hidden), self._latent(n_features), self.min_scale)

    def _elbo_loss(
        self, module: _VAE, x: torch.Tensor, noise: torch.Tensor | None, gen: torch.Generator
    ) -> torch.Tensor:
        """The mean negative ELBO (``beta``-weighted KL) of the rows ``x``, encoded with ``noise``
        added, reconstructed from one reparameterised sample."""
        mu, logvar = module.encode(x if noise is None else x + noise)
        eps = torch.randn(mu.shape, generator=gen).to(mu.device)
        z = mu + eps * torch.exp(0.5 * logvar)
        recon = module.decoder(z)
        log_scale = module.scale_log()
        nll = (0.5 * ((x - recon) * torch.exp(-log_scale)) ** 2 + log_scale).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return (nll + self.beta * kl).mean()

    def _loss(self, module: nn.Module, xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = None
        if self.noise_std > 0:
            noise = torch.randn(xb.shape, generator=gen).to(xb.device) * self.noise_std
        return self._elbo_loss(module, xb, noise, gen)

    def _val_loss(self, module: nn.Module, xv: torch.Tensor) -> float:
        return float(self._elbo_loss(module, xv, None, self._validation_generator()))

    def _score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self.module_.feature_errors(x).sum(1)

    def score_with_errors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and per-feature error terms in one pass (used by the batch scorer)."""
        errors = self.module_.feature_errors(x)
        return finite_scores(errors.sum(1)), errors

    def feature_errors(self, X: Any) -> np.ndarray:
        """Per-feature terms of the score, shape ``(n_rows, n_features)``; rows sum to the score."""
        self._check_fitted()
        arr = check_array(X, self.n_features_in_)
        device = module_device(self.module_)
        with torch_threads(self.threads), torch.inference_mode():
            x = torch.from_numpy(arr).to(device)
            return self.module_.feature_errors(x).double().cpu().numpy()
