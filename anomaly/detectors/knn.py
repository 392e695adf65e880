"""Nearest-neighbour distance detector, the ensemble's non-generative member.

Score: the Euclidean distance from a row to its ``n_neighbors``-th nearest *reference* row, in the
preprocessed feature space. The reference rows are the detector's training rows (a seeded random
subset of at most ``max_reference`` of them, which bounds scoring cost and the bundle's size).

Why it is in the ensemble: k-th neighbour distance is the strongest plain one-class baseline in
the literature (ADBench, DTE) and in ``bench/quality.py``, and it fails in other places than the
deep detectors (it needs no training, cannot overfit a few hundred rows, and sees local density
rather than a global fit), so its calibrated p-value adds information to theirs.

Computation: ``|x|^2 - 2 x.r + |r|^2`` as one matrix product per batch, then the k smallest per row
(``torch.topk``); the same code runs on the CPU and on CUDA, and the reference rows are a buffer of
the module, so they travel with ``.to(device)`` and are saved with the other tensors.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from anomaly.detectors._base import BaseDetector, check_array, torch_threads


class _Neighbours(nn.Module):
    def __init__(self, n_reference: int, n_features: int, k: int) -> None:
        super().__init__()
        self.register_buffer("reference", torch.zeros(n_reference, n_features))
        self.k = k

    def squared_distances(self, x: torch.Tensor) -> torch.Tensor:
        ref = self.reference.to(x.dtype)
        ref_sq = (ref * ref).sum(1)
        x_sq = (x * x).sum(1, keepdim=True)
        # Rounding can make a tiny squared distance negative: clamp before the square root.
        return torch.addmm(ref_sq, x, ref.T, alpha=-2.0).add_(x_sq).clamp_min_(0.0)

    def kth_distance(self, x: torch.Tensor) -> torch.Tensor:
        d2 = self.squared_distances(x.float())
        k = min(self.k, d2.shape[1])
        return torch.topk(d2, k, dim=1, largest=False, sorted=True).values[:, -1].sqrt()


class KNNDetector(BaseDetector):
    """k-th nearest-neighbour distance to the training rows (scikit-learn style).

    Parameters (beyond the shared ones, of which only ``seed``, ``threads``, ``device`` and
    ``score_batch_size`` apply: nothing is trained): ``n_neighbors`` (k, default 5 as in PyOD and
    ADBench) and ``max_reference`` (rows kept; a seeded random subset when there are more).
    """

    name = "knn"

    def __init__(self, n_neighbors: int = 5, max_reference: int = 2048, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
        self.n_neighbors = n_neighbors
        self.max_reference = max_reference

    def architecture(self) -> dict[str, Any]:
        return {
            "n_neighbors": self.n_neighbors,
            "n_reference": int(self.module_.reference.shape[0]),
        }

    def fit(self, X: Any, y: Any = None) -> KNNDetector:
        """Keep (a seeded subset of) the normal rows as the reference set."""
        started = time.monotonic()
        arr = check_array(X)
        n = arr.shape[0]
        if n <= self.n_neighbors:
            raise ValueError(
                f"only {n} rows to fit the knn detector; need more than "
                f"n_neighbors={self.n_neighbors}"
            )
        if n > self.max_reference:
            keep = np.sort(np.random.default_rng(self.seed).choice(n, self.max_reference, False))
            arr = arr[keep]
        self.n_features_in_ = arr.shape[1]
        module = _Neighbours(arr.shape[0], arr.shape[1], self.n_neighbors)
        module.reference.copy_(torch.from_numpy(arr))
        self.module_ = module.to(self.device).eval()
        # What AnomalyModel.training_ reports for every detector.
        self.history_: list[dict[str, float]] = []
        self.stop_reason_ = "no_training"
        self.best_val_loss_ = float("nan")
        self.n_steps_ = self.n_epochs_ = self.best_step_ = 0
        self.fit_seconds_ = time.monotonic() - started
        return self

    def _score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self.module_.kth_distance(x)

    def feature_errors(self, X: Any) -> np.ndarray:
        """Per-feature squared differences to the nearest reference row (rows sum to the squared
        nearest-neighbour distance): which features put the row away from its neighbours."""
        self._check_fitted()
        arr = check_array(X, self.n_features_in_)
        with torch_threads(self.threads), torch.inference_mode():
            x = torch.from_numpy(arr).to(self.module_.reference.device)
            nearest = self.module_.squared_distances(x).argmin(1)
            diff = x - self.module_.reference[nearest]
            return (diff * diff).double().cpu().numpy()

    @classmethod
    def from_state(
        cls,
        params: dict[str, Any],
        n_features: int,
        tensors: dict[str, torch.Tensor],
        extra: dict[str, Any] | None = None,
    ) -> KNNDetector:
        det = cls(**params)
        ref = tensors.get("reference")
        if set(tensors) != {"reference"} or ref is None:
            raise ValueError(f"tensor names differ: expected ['reference'], got {sorted(tensors)}")
        if ref.ndim != 2 or ref.shape[1] != n_features or ref.dtype != torch.float32:
            raise ValueError(
                f"tensor 'reference' has shape {tuple(ref.shape)} {ref.dtype}, "
                f"expected (rows, {n_features}) torch.float32"
            )
        module = _Neighbours(ref.shape[0], n_features, det.n_neighbors)
        module.load_state_dict(tensors, strict=True)
        det.n_features_in_ = n_features
        det.module_ = module.eval()
        return det
