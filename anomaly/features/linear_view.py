"""The linear view of preprocessed rows: the preprocessor's matrix with every quantile-mapped
numeric column replaced by its plain z-score, ``(x - mean) / std`` of the training values
(missing values at the training median, clipped as the rest). Indicator, constant and one-hot
columns are the same in both views.

Why a second view: the quantile map equalises each column's marginal, which keeps heavy tails
and skew from dominating distances, but it also squeezes a column's clusters together and
stretches the gaps between them by their rank, not their size; the z-score keeps the column's
geometry. Neighbour distances in the two views fail on different data
(``anomaly.estimator.detectors.knn``), so the ensemble has a neighbour detector in each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomaly.errors import DataError
from anomaly.features.numeric import NumericParams


@dataclass(frozen=True)
class LinearPlan:
    """The output columns the view replaces (numeric columns come first, so these are also
    their positions in the numeric block) and, for each, the imputation value, the training
    mean and the standard deviation."""

    columns: np.ndarray
    median: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_params(cls, params: list[NumericParams], quantile: bool) -> LinearPlan:
        """From the numeric columns' parameters, in column order; ``quantile``: whether the
        preprocessor maps columns onto normal quantiles (else the view changes nothing). A
        DataError for parameters saved before the view (no training mean and std)."""
        mapped = [(i, p) for i, p in enumerate(params) if quantile and len(p.knots) > 1]
        if any(p.mean is None or p.std is None for _, p in mapped):
            raise DataError("these preprocessing parameters predate the linear view")
        return cls(
            columns=np.asarray([i for i, _ in mapped], dtype=np.intp),
            median=np.asarray([p.median for _, p in mapped], dtype=np.float64),
            mean=np.asarray([p.mean for _, p in mapped], dtype=np.float64),
            std=np.asarray([p.std for _, p in mapped], dtype=np.float64),
        )

    def apply(self, xp: np.ndarray, numeric: np.ndarray, clip: float) -> np.ndarray:
        """``xp`` with the planned columns replaced, from ``numeric``, the checked numeric block
        of the same rows (NaN where missing)."""
        if not len(self.columns):
            return xp
        values = np.asarray(numeric, dtype=np.float64)[:, self.columns]
        values = np.where(np.isnan(values), self.median, values)
        out = xp.copy()
        out[:, self.columns] = np.clip((values - self.mean) / self.std, -clip, clip)
        return out
