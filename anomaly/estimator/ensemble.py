"""Combining the detectors' calibrated p-values into one score and one p-value.

Rule: the ensemble score of a row is a weighted mean over the detectors of ``-log10(q_d)``, where
``q_d`` is detector ``d``'s tail-extended calibrated p-value (see ``estimator.calibration``). That
is Fisher's combination statistic ``-2 sum ln q_d`` rescaled to "decades of surprise": a score of
3 means the detectors' p-values average 0.001 on a log scale, and one detector that is extremely
sure can carry the row on its own.

Weights (``member_weights``): each independent piece of evidence counts once, nested two ways.
First by *view* of the features: the quantile-mapped columns (what the VAE, the flow, the GAN and
``knn`` read) and the linear view of plain z-scores (``knn_linear``). Each view is right on some
data, and which one cannot be told from the training rows alone (``detectors.knn``), so each view
present gets an equal share. Within a view, by *kind*: the VAE, the flow and the GAN are one kind,
a generative model of the normal rows fit globally by gradient descent, whose errors are
correlated; the nearest-neighbour distance is another, local and fit-free. Each kind present
shares its view's weight equally, and its members share the kind's. With all five members: 1/12
for each generative member, 1/4 for ``knn``, 1/2 for ``knn_linear``. Before the views were
counted, the quantile view held 3/4 of the weight and the ensemble fell well below ``knn_linear``
wherever the linear view was the right one (``docs/benchmarks.md``; in ``bench/quality.py
--ablate``, ``ens-kind-weights`` is the rule before). The weights depend only on which detectors
are fit, never on labels, and are saved in the bundle (bundles keep the weights they were saved
with).

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
# View of the features -> the kinds of evidence read from it (module docstring).
VIEWS = {
    "quantile": (GENERATIVE, ("knn",)),
    "linear": (("knn_linear",),),
}


def member_weights(detectors: Sequence[str]) -> list[float]:
    """Weight of each detector in ``detectors`` (summing to 1); see the module docstring."""
    views = []
    for kinds in VIEWS.values():
        present = [[d for d in detectors if d in kind] for kind in kinds]
        present = [kind for kind in present if kind]
        if present:
            views.append(present)
    weight = {
        d: 1.0 / (len(views) * len(kinds) * len(kind))
        for kinds in views
        for kind in kinds
        for d in kind
    }
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
