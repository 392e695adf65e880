"""Nearest-neighbour distance detector, the ensemble's non-generative member.

Score: the mean Euclidean distance from a row to its k nearest *reference* rows, in the
preprocessed feature space (``method="mean"``, PyOD's name; ``"largest"``, the distance to the
k-th nearest alone, is what bundles saved before 2026-12-06 score). The reference rows are the
detector's training rows, or a seeded uniform random subset of at most ``max_reference`` of them,
which bounds scoring cost and the bundle's size. ``n_neighbors`` counts neighbours among *all*
training rows: a uniform subsample holding a fraction ``f`` of them has ``f`` times the density
everywhere, so the same neighbourhood holds about ``f * n_neighbors`` reference rows, and k is
scaled to that (at least 1). With 5,000 training rows and 4,096 reference rows, k = 4; from about
14,000 training rows on, k = 1: the nearest reference row, whose distance is also the cheapest to
find (a minimum instead of a top-k selection), and where the two methods are the same score.

Why the mean: the k-th distance alone is a density estimate from one order statistic; the mean of
the k nearest distances reads the same neighbourhood from all k of them, a steadier estimate at
no extra search (the k nearest are found either way). ``bench/quality.py``'s dev suite (23 sets,
seeds 0-2, the same fits; members' scores recombined, docs/benchmarks.md), mean ROC-AUC / PR-AUC
x100, k-th against mean: this member 87.4 / 67.9 against 87.8 / 68.8, ``knn_linear`` 86.9 / 66.2
against 87.2 / 66.9, the ensemble 87.9 / 68.3 against 88.2 / 68.9; the mean was ahead wherever
both were measured (k = 5 among 2,048 reference rows without scaling: ensemble 87.7 against
88.1; all rows, k = 5: 88.0 against 88.4).

Why 4,096 reference rows: a subsample thins every neighbourhood, and the distance to a few
neighbours among fewer rows is a noisier density estimate. The dev suite of ``bench/quality.py``
(23 sets, at most 5,000 training rows; kNN in our preprocessed space, k scaled as above, the k-th
distance, seeds 0-1), mean ROC-AUC / PR-AUC x100: all training rows and k = 5 87.2 / 66.8; 1,024
reference rows 86.3 / 64.9; 2,048 86.9 / 66.4; 3,072 87.2 / 66.8. With the mean (seeds 0-2, the
same fits): this member 87.8 at 2,048 rows, 88.1 at 4,096, 88.1 with all rows; ``knn_linear``
87.2, 87.4, 87.4; the ensemble 88.2, 88.4, 88.4. 4,096 rows take nearly all of what the full
set gives at a bounded cost: twice the 2,048-row search per scored row (docs/benchmarks.md,
"Detection quality", has the scoring rate before and after).

Calibration rows are reference rows too (``uses_calibration_rows``): the detector trains
nothing, so holding a quarter of the normal rows out of its reference set would only thin the
neighbourhoods it measures (internetads, 600 training rows: KNN loses 7 points of ROC-AUC on 75% of
them). ``AnomalyModel`` fits it on the training and calibration rows together and calibrates it
on ``leave_one_out_scores`` of the calibration rows: each row's distance with its own copy in the
reference set left out, the jackknife form of conformal calibration. A calibration row then
measures its neighbourhood among one reference row fewer than a new row does, so its score is, if
anything, a little larger, and the p-values stay valid (slightly conservative).

Two views, two members: ``knn`` measures distances in the preprocessed (quantile-mapped) space,
``knn_linear`` in the linear view, where numeric columns are plain z-scores
(``Preprocessor.linear_view``). The quantile map keeps a heavy-tailed column from dominating the
distance but squeezes a column's clusters together and stretches the gaps between them by rank;
the z-score keeps a column's geometry and lets its tails count. Each is right on some data
(``bench/quality.py``'s dev suite, scikit-learn kNN, k = 5 on up to 2,048 reference rows, seeds
0-1, ROC-AUC x100: satellite 74.6 quantile / 87.5 linear, skin 93.8 / 97.6, annthyroid 87.7 /
93.4; SKAB 81.5 / 59.9, aloi 70.6 / 60.6, backdoor 96.3 / 90.2), neither can be picked from the
training rows alone, and their p-values combined rank better than either (mean over 23 sets
87.0 quantile, 86.2 linear, 87.5 both, Fisher-style as the ensemble combines them). Both are
the ensemble's neighbourhood kind (``anomaly.estimator.ensemble``).

Why it is in the ensemble: k-th neighbour distance is the strongest plain one-class baseline in
the literature (ADBench, DTE) and in ``bench/quality.py``, and it fails in other places than the
deep detectors (it needs no training, cannot overfit a few hundred rows, and sees local density
rather than a global fit), so its calibrated p-value adds information to theirs.

Computation: ``|x|^2 - 2 x.r + |r|^2`` as one matrix product per batch, then the k smallest per
row (``neighbours.k_smallest``: a minimum for k = 1, else a selection that works on the minima of
groups of reference rows); the same code runs on the CPU and on CUDA, and the reference rows are
a buffer of the module, so they travel with ``.to(device)`` and are saved with the other tensors.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from anomaly.estimator.detectors._base import BaseDetector, check_array, torch_threads
from anomaly.estimator.detectors.neighbours import METHODS, Neighbours


class KNNDetector(BaseDetector):
    """Mean distance to the k nearest training rows (scikit-learn style).

    Parameters (beyond the shared ones, of which only ``seed``, ``threads``, ``device`` and
    ``score_batch_size`` apply: nothing is trained): ``n_neighbors`` (k, default 5 as in PyOD and
    ADBench; neighbours among all training rows, see the module docstring), ``method`` (``"mean"``
    of the k nearest distances or the k-th, ``"largest"``) and ``max_reference`` (rows kept; a
    seeded random subset when there are more). Learned: ``k_``, the k used among
    the reference rows, and ``reference_of_row_``, each fit row's index among them (-1: not
    kept), which ``leave_one_out_scores`` needs; it is not saved in the bundle.
    """

    name = "knn"
    # Fit on the training and calibration rows, calibrated leave-one-out (module docstring).
    uses_calibration_rows = True

    def __init__(
        self, n_neighbors: int = 5, max_reference: int = 4096, method: str = "mean", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.n_neighbors = n_neighbors
        self.max_reference = max_reference
        self.method = method

    def architecture(self) -> dict[str, Any]:
        return {"n_neighbors": self.n_neighbors, **self.extra_state()}

    def extra_state(self) -> dict[str, Any]:
        return {
            "k": self.k_,
            "n_reference": int(self.module_.reference.shape[0]),
            "method": self.module_.method,
        }

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        for key in ("k", "n_reference"):
            value = extra.get(key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"extra state '{key}' must be a positive integer, got {value!r}")
        # Bundles saved before the mean was the default score by the k-th distance and do not
        # name their method; what was calibrated is what is scored (``_build`` refuses an
        # unknown method).
        self.k_, self._n_reference = extra["k"], extra["n_reference"]
        self.method = extra.get("method", "largest")

    def _build(self, n_features: int) -> nn.Module:
        """An empty module of the saved size, for ``from_state`` to load the rows into."""
        return Neighbours(self._n_reference, n_features, self.k_, self.method)

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
        keep = np.arange(n)
        if n > self.max_reference:
            keep = np.sort(np.random.default_rng(self.seed).choice(n, self.max_reference, False))
            arr = arr[keep]
        # Reference index of every fit row (-1: not kept), for leave_one_out_scores.
        self.reference_of_row_ = np.full(n, -1, dtype=np.int64)
        self.reference_of_row_[keep] = np.arange(len(keep))
        # k among the reference rows for n_neighbors among all training rows (module docstring).
        self.k_ = max(1, round(self.n_neighbors * arr.shape[0] / n))
        self.n_features_in_ = arr.shape[1]
        module = Neighbours(arr.shape[0], arr.shape[1], self.k_, self.method)
        module.reference.copy_(torch.from_numpy(arr))
        self.module_ = module.to(self.device).eval()
        # What AnomalyModel.training_ reports for every detector.
        self.history_: list[dict[str, float]] = []
        self.stop_reason_ = "no_training"
        self.best_val_loss_ = float("nan")
        self.n_steps_ = self.n_epochs_ = self.best_step_ = 0
        self.fit_seconds_ = time.monotonic() - started
        return self

    def leave_one_out_scores(self, X: Any, rows: np.ndarray) -> np.ndarray:
        """Scores of the fit rows at positions ``rows`` (``X`` holds those rows, in that order),
        each with its own reference copy left out: calibration scores exchangeable with a new
        row's (module docstring)."""
        self._check_fitted()
        arr = check_array(X, self.n_features_in_)
        own_all = torch.from_numpy(self.reference_of_row_[np.asarray(rows)])
        device = self.module_.reference.device
        out = []
        with torch_threads(self.threads), torch.inference_mode():
            for start in range(0, len(arr), self.score_batch_size):
                stop = start + self.score_batch_size
                x = torch.from_numpy(arr[start:stop]).to(device)
                own = own_all[start:stop].to(device)
                out.append(self.module_.distance(x, own).double().cpu().numpy())
        return np.concatenate(out)

    def _score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return self.module_.distance(x)

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


class KNNLinearDetector(KNNDetector):
    """``KNNDetector`` in the linear view (module docstring): ``AnomalyModel`` hands it
    ``Preprocessor.linear_view`` of the rows instead of the preprocessed rows."""

    name = "knn_linear"
    view = "linear"
