"""GAN detector with a boundary-seeking generator, scored by its discriminator.

Why not a plain GAN: at the equilibrium of a standard GAN the generator matches the data and the
discriminator outputs 1/2 everywhere on it, so ``D(x)`` says nothing about whether ``x`` is normal.

Design (after FenceGAN, Ngo et al. 2019, and SO-GAAL, Liu et al. 2019):

* The generator ``G`` does not try to match the data. Its loss asks ``D(G(z))`` to equal
  ``boundary`` (1/2: the discriminator's decision boundary) and its samples to spread out
  (a dispersion term, the log of their mean distance from the batch mean): ``G`` learns to place
  samples *around* the normal data, just outside it, everywhere along the boundary.
* The discriminator ``D`` is trained to tell real normal rows (label 1, with a little Gaussian
  noise ``real_noise`` so that it cannot key on the lattice of discrete columns) from three kinds
  of negatives (label 0), with weights that sum to 1:

  1. *generator samples* ``G(z)`` (weight ``gen_weight``): hard negatives on the current
     boundary. Rejecting them pulls the boundary in wherever the data leave room, which noise
     alone does not find (it is isotropic and does not follow the data's shape);
  2. *boundary samples*: normal rows plus Gaussian noise whose scale is drawn per row,
     log-uniformly in ``[noise_min, noise_max]`` (preprocessed, roughly unit-variance units);
  3. *complementary samples*: uniform over the training bounding box inflated by ``box_margin``,
     covering the empty space far from the data.

  The noise negatives keep ``D`` a smooth density-ratio estimate everywhere; the generator
  sharpens it where it matters. ``gen_weight=0`` leaves them alone (``bench/quality.py --ablate``
  measures what the generator adds).

* Score: two parts, each standardised (median and interquartile range) on rows after training,
  then summed; higher is more anomalous, finite for any finite input.

  1. ``-logit D(x)``: the discriminator's log-odds that ``x`` is *not* a normal row;
  2. the log distance from ``x`` to its k-th nearest normal row in D's last hidden layer
     (``feature_reference`` training rows kept, k scaled from ``feature_neighbors`` as in the knn
     member). D's features are what it learned to tell normal rows from the boundary the
     generator found: a row can fall on the normal side of D's one decision surface yet far from
     every normal row in the space D built to draw it. Each part misses what the other sees
     (``bench/quality.py --ablate``, 23 sets, 3 seeds, mean ROC-AUC x100: the logit alone 80.2,
     both parts 82.9, both without the generator 82.3; IForest 80.5).

  The medians and ranges come from the validation rows and the training rows, each training row's
  distance measured with its own copy left out of the reference rows (so it is no closer than a
  new row would be). ``feature_reference=0``, and bundles saved before the second part existed,
  score by the logit alone.

Early stopping watches ``D``'s loss on held-out normal rows against boundary and complementary
negatives drawn the same way at every validation pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomaly.estimator.detectors._base import BaseDetector, adam, mlp
from anomaly.estimator.detectors.neighbours import Neighbours


class _GAN(nn.Module):
    def __init__(
        self, n_features: int, hidden: list[int], latent: int, n_reference: int = 0, k: int = 1
    ) -> None:
        super().__init__()
        self.generator = mlp([latent, *hidden, n_features])
        self.disc_body = nn.Sequential(mlp([n_features, *hidden]), nn.SiLU())
        self.disc_head = nn.Linear(hidden[-1], 1)
        self.latent = latent
        self.neighbours: Neighbours | None = None
        if n_reference:
            self.attach_neighbours(torch.zeros(n_reference, hidden[-1]), k)

    def attach_neighbours(self, reference_features: torch.Tensor, k: int) -> None:
        """Keep D-features of normal rows for the score's distance part; the parts' medians and
        ranges start at 0 and 1 until ``standardise_parts`` sets them."""
        device = reference_features.device
        self.neighbours = Neighbours(*reference_features.shape, k).to(device)
        self.neighbours.reference.copy_(reference_features)
        self.register_buffer("part_center", torch.zeros(2, device=device))
        self.register_buffer("part_scale", torch.ones(2, device=device))

    def drop_neighbours(self) -> None:
        """Back to the logit score: no reference rows, no part medians and ranges."""
        self.neighbours = None
        for name in ("part_center", "part_scale"):
            if name in self._buffers:
                delattr(self, name)

    def disc(self, x: torch.Tensor) -> torch.Tensor:
        """D's logit that ``x`` is a normal row."""
        return self.disc_head(self.disc_body(x)).squeeze(1)

    def score_parts(self, x: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
        """Rows x (-logit, log k-th neighbour distance in D's features), unstandardised;
        ``own`` as in ``Neighbours.distance``."""
        features = self.disc_body(x)
        not_normal = -self.disc_head(features).squeeze(1)
        distance = self.neighbours.distance(features, own)
        return torch.stack([not_normal, distance.clamp_min(1e-6).log()], 1)

    def standardise_parts(self, parts: torch.Tensor) -> None:
        """Median and interquartile range of each part over ``parts`` (rows x 2)."""
        levels = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=parts.device)
        q25, q50, q75 = torch.quantile(parts.double(), levels, dim=0)
        self.part_center.copy_(q50)
        self.part_scale.copy_((q75 - q25).clamp_min(1e-6))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        if self.neighbours is None:
            # Bundles saved before the distance part, and feature_reference=0: the logit alone.
            return -self.disc(x)
        return ((self.score_parts(x) - self.part_center) / self.part_scale).sum(1)


class GANDetector(BaseDetector):
    """GAN anomaly detector scored by its discriminator; see the module docstring for the design.

    Parameters (beyond the shared training ones): ``hidden`` widths (both networks),
    ``latent_dim`` of the generator, ``noise_min`` / ``noise_max`` (boundary-sample noise scales),
    ``box_margin`` (inflation of the bounding box for complementary samples), ``gen_weight``,
    ``feature_neighbors`` and ``feature_reference`` (the score's distance part; 0 turns it off).
    """

    name = "gan"

    def __init__(
        self,
        hidden: tuple[int, ...] = (128, 128),
        latent_dim: int = 16,
        noise_min: float = 0.1,
        noise_max: float = 3.0,
        box_margin: float = 0.5,
        gen_weight: float = 0.1,
        boundary: float = 0.5,
        dispersion: float = 0.1,
        real_noise: float = 0.05,
        feature_neighbors: int = 5,
        feature_reference: int = 512,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("lr", 5e-4)
        super().__init__(**kwargs)
        if not 0.0 <= gen_weight < 1.0:
            raise ValueError(f"gen_weight must be in [0, 1), got {gen_weight}")
        if not 0.0 < boundary < 1.0:
            raise ValueError(f"boundary must be in (0, 1), got {boundary}")
        self.hidden = tuple(hidden)
        self.latent_dim = latent_dim
        self.noise_min = noise_min
        self.noise_max = noise_max
        self.box_margin = box_margin
        self.gen_weight = gen_weight
        self.boundary = boundary
        self.dispersion = dispersion
        self.real_noise = real_noise
        if feature_neighbors < 1:
            raise ValueError(f"feature_neighbors must be >= 1, got {feature_neighbors}")
        self.feature_neighbors = feature_neighbors
        self.feature_reference = feature_reference

    def architecture(self) -> dict[str, Any]:
        return {"hidden": list(self.hidden), "latent": self.latent_dim, **self.extra_state()}

    def extra_state(self) -> dict[str, Any]:
        neighbours = self.module_.neighbours
        if neighbours is None:
            return {}
        return {"n_reference": int(neighbours.reference.shape[0]), "k": neighbours.k}

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        # No entries: a bundle saved before the distance part (or with it off).
        self._n_reference, self._k = extra.get("n_reference", 0), extra.get("k", 1)
        for key, value in (("n_reference", self._n_reference), ("k", self._k)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"extra state '{key}' must be an integer >= 0, got {value!r}")

    def _build(self, n_features: int) -> nn.Module:
        # Fit builds without reference rows (_after_training adds them); from_state with the
        # saved number.
        n_reference, k = getattr(self, "_n_reference", 0), getattr(self, "_k", 1)
        return _GAN(n_features, list(self.hidden), self.latent_dim, n_reference, k)

    def _before_training(self, x_train: torch.Tensor, gen: torch.Generator) -> None:
        lo = x_train.min(0).values
        hi = x_train.max(0).values
        span = (hi - lo).clamp_min(1.0)
        self._box_lo = lo - self.box_margin * span
        self._box_hi = hi + self.box_margin * span

    def _negatives(
        self, x: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, d = x.shape
        log_lo, log_hi = math.log(self.noise_min), math.log(self.noise_max)
        scale = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, 1, generator=gen))
        boundary = x + torch.randn(n, d, generator=gen).to(x.device) * scale.to(x.device)
        u = torch.rand(n, d, generator=gen).to(x.device)
        box = self._box_lo + u * (self._box_hi - self._box_lo)
        return boundary, box

    def _optimizers(self, module: nn.Module) -> list[torch.optim.Optimizer]:
        d_params = [*module.disc_body.parameters(), *module.disc_head.parameters()]
        return [
            adam(d_params, lr=self.lr, betas=(0.5, 0.999)),
            adam(module.generator.parameters(), lr=self.lr, betas=(0.5, 0.999)),
        ]

    def _disc_loss(
        self, module: _GAN, x: torch.Tensor, negs: list[torch.Tensor], weights: list[float]
    ) -> torch.Tensor:
        real_logit = module.disc(x)
        loss = F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
        for neg, w in zip(negs, weights, strict=True):
            logit = module.disc(neg)
            loss = loss + w * F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit))
        return loss

    def _step(self, module: nn.Module, opts: list, xb: torch.Tensor, gen) -> float:
        d_opt, g_opt = opts
        n = xb.shape[0]
        if self.real_noise > 0:
            # Dequantise: otherwise D can learn the lattice of discrete columns, not the density.
            xb = xb + torch.randn(xb.shape, generator=gen).to(xb.device) * self.real_noise
        boundary, box = self._negatives(xb, gen)
        z = torch.randn(n, module.latent, generator=gen).to(xb.device)
        fake = module.generator(z)
        # Discriminator step: real rows against the noise negatives and the generator's samples.
        rest = 1.0 - self.gen_weight
        d_opt.zero_grad(set_to_none=True)
        d_loss = self._disc_loss(
            module, xb, [boundary, box, fake.detach()], [0.7 * rest, 0.3 * rest, self.gen_weight]
        )
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(d_opt.param_groups[0]["params"], 10.0)
        d_opt.step()
        if self.gen_weight > 0:
            self._generator_step(module, g_opt, fake)
        return float(d_loss.detach())

    def _generator_step(self, module: _GAN, g_opt: torch.optim.Optimizer, fake: torch.Tensor):
        """Move the samples onto D's boundary (encirclement) and apart (dispersion)."""
        g_opt.zero_grad(set_to_none=True)
        logit = module.disc(fake)
        target = torch.full_like(logit, self.boundary)
        encircle = F.binary_cross_entropy_with_logits(logit, target)
        spread = (fake - fake.mean(0, keepdim=True)).norm(dim=1).mean()
        loss = encircle - self.dispersion * torch.log(spread + 1e-6)
        loss.backward()
        # Only G's gradients are clipped and applied: D's, set by this backward pass, are
        # cleared by its own zero_grad before its next step.
        torch.nn.utils.clip_grad_norm_(g_opt.param_groups[0]["params"], 10.0)
        g_opt.step()

    def _val_loss(self, module: nn.Module, xv: torch.Tensor) -> float:
        negatives = self._negatives(xv, self._validation_generator())
        loss = self._disc_loss(module, xv, list(negatives), [0.7, 0.3])
        return float(loss)

    def _after_training(self, x_train: torch.Tensor, x_val: torch.Tensor) -> None:
        """The distance part: reference rows (a seeded subset of the training rows), k, and both
        parts' medians and ranges over the validation rows and the training rows, these with
        their own reference copy left out."""
        module: _GAN = self.module_
        # A refit of a detector loaded from a bundle was built with the saved reference size.
        module.drop_neighbours()
        n = len(x_train)
        if not self.feature_reference:
            return
        count = min(n, self.feature_reference)
        gen = torch.Generator().manual_seed(self.seed + 2)
        keep = torch.randperm(n, generator=gen)[:count].sort().values
        own = torch.full((n,), -1, dtype=torch.long)
        own[keep] = torch.arange(count)
        # k among the kept rows for feature_neighbors among all training rows, as in knn.
        k = max(1, round(self.feature_neighbors * count / n))
        device = x_train.device
        module.attach_neighbours(module.disc_body(x_train[keep.to(device)]), k)
        parts = torch.cat([module.score_parts(x_val), module.score_parts(x_train, own.to(device))])
        module.standardise_parts(parts)

    def _score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self.module_.score(x)
