"""Combining the detectors' calibrated p-values into one score and one p-value.

Rule: the ensemble score of a row is a weighted mean over the detectors of ``-log10(q_d)``, where
``q_d`` is detector ``d``'s tail-extended calibrated p-value (see ``estimator.calibration``). That
is Fisher's combination statistic ``-2 sum ln q_d`` rescaled to "decades of surprise": a score of
3 means the detectors' p-values average 0.001 on a log scale, and one detector that is extremely
sure can carry the row on its own.

Weights (``member_weights``): each *kind* of evidence counts once. The VAE, the flow and the GAN
are one kind, a generative model of the normal rows fit globally by gradient descent, and their
errors are correlated; the nearest-neighbour distance (in the quantile-mapped and in the linear
view, ``knn`` and ``knn_linear``) is another, local and fit-free. With both
kinds present, each kind gets half the weight, shared equally within it; otherwise all members
weigh the same. The weights depend only on which detectors are fit, never on labels, and are
saved in the bundle.

Fisher's statistic is only chi-square distributed for independent p-values, and our detectors are
correlated, so its chi-square p-value would be wrong. Instead the ensemble score is itself
calibrated conformally on the same held-out normal rows: each calibration row's component p-values
are computed leave-one-out (its own score not counted), which makes its ensemble score
exchangeable with a new normal row's, and ``ensemble_p`` is the conformal p-value of the ensemble
score among them. ``predict`` alerts when ``ensemble_p <= target_fpr``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GENERATIVE = ("vae", "flow", "gan")
NEIGHBOURHOOD = ("knn", "knn_linear")


def member_weights(detectors: Sequence[str]) -> list[float]:
    """Weight of each detector in ``detectors`` (summing to 1); see the module docstring."""
    kinds = [[d for d in detectors if d in kind] for kind in (GENERATIVE, NEIGHBOURHOOD)]
    present = [kind for kind in kinds if kind]
    weight = {d: 1.0 / (len(present) * len(kind)) for kind in present for d in kind}
    if set(weight) != set(detectors):
        unknown = sorted(set(detectors) - set(weight))
        raise ValueError(f"no ensemble weight for detector(s) {unknown}")
    return [weight[d] for d in detectors]


def combine(tail_pvalues: list[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of ``-log10(p)`` over detectors (equal weights when ``weights`` is None)."""
    if not tail_pvalues:
        raise ValueError("no detector p-values to combine")
    stacked = np.stack([np.maximum(np.asarray(p, dtype=np.float64), 1e-300) for p in tail_pvalues])
    if weights is None or len(set(weights)) == 1:
        # Equal weights: the plain mean, bit for bit what bundles from before weights computed.
        return -np.log10(stacked).mean(axis=0)
    w = np.asarray(weights, dtype=np.float64)[:, None]
    return -(np.log10(stacked) * w).sum(axis=0) / w.sum()
