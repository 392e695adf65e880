"""Combining the detectors' calibrated p-values into one score and one p-value.

Rule: the ensemble score of a row is the mean over the detectors of ``-log10(q_d)``, where ``q_d``
is detector ``d``'s tail-extended calibrated p-value (see ``anomaly.calibration``). That is
Fisher's combination statistic ``-2 sum ln q_d`` rescaled to "decades of surprise": a score of 3
means the detectors' p-values average 0.001 on a log scale, and one detector that is extremely sure
can carry the row on its own.

Fisher's statistic is only chi-square distributed for independent p-values, and our detectors are
correlated, so its chi-square p-value would be wrong. Instead the ensemble score is itself
calibrated conformally on the same held-out normal rows: each calibration row's component p-values
are computed leave-one-out (its own score not counted), which makes its ensemble score
exchangeable with a new normal row's, and ``ensemble_p`` is the conformal p-value of the ensemble
score among them. ``predict`` alerts when ``ensemble_p <= target_fpr``.
"""

from __future__ import annotations

import numpy as np


def combine(tail_pvalues: list[np.ndarray]) -> np.ndarray:
    """Mean of ``-log10(p)`` over detectors (rows with no detectors get 0)."""
    if not tail_pvalues:
        raise ValueError("no detector p-values to combine")
    stacked = np.stack([np.maximum(np.asarray(p, dtype=np.float64), 1e-300) for p in tail_pvalues])
    return -np.log10(stacked).mean(axis=0)
