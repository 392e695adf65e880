"""Conformal calibration: raw detector scores -> p-values, thresholds and severities.

A ``Calibrator`` holds the scores of held-out *normal* rows (never rows the detector was trained
on). For a new score ``s`` the conformal p-value is

    p(s) = (1 + #{calibration scores >= s}) / (n + 1)

which, for a normal row exchangeable with the calibration rows, satisfies ``P(p <= a) <= a``: an
alert rule ``p <= target_fpr`` has a false-positive rate of at most ``target_fpr`` (and close to it
when ``n + 1 >= 1 / target_fpr``). The smallest reachable p-value is ``1 / (n + 1)``.

Tail extension (used for severities and for the ensemble's statistic, never for the alert decision
itself): above the ``m``-th largest calibration score ``u`` (``m = clip(n // 10, 10, 200)``) the
p-value continues as ``(m / (n + 1)) * exp(-(s - u) / beta)``, an exponential tail whose scale
``beta`` is the mean excess of the top ``m`` scores over ``u`` (the maximum-likelihood fit of an
exponential tail). This ranks rows beyond the largest calibration score instead of giving them all
``1 / (n + 1)``.

Severity rule (``severity``), for alert rows (``p <= target_fpr``), from the tail-extended p-value
``q`` and ``a = target_fpr``: ``critical`` if ``q <= a / 1000``, ``high`` if ``q <= a / 100``,
``medium`` if ``q <= a / 10``, otherwise ``low``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from anomaly.features.knot_lookup import SortedSearch

SEVERITIES = ("low", "medium", "high", "critical")


def alert_rank(n_calibration: int, target_fpr: float) -> int:
    """``k = floor(target_fpr * (n + 1))``: a score alerts when at most ``k - 1`` of the ``n``
    calibration scores are at or above it (``p = (1 + #{cal >= s}) / (n + 1) <= target_fpr``);
    0 when ``target_fpr`` is out of reach of ``n`` rows. The 1e-9 keeps an exact product (0.01 x
    100) from rounding down."""
    return int(np.floor(target_fpr * (n_calibration + 1) + 1e-9))


def score_threshold(sorted_scores: np.ndarray, target_fpr: float) -> float:
    """Smallest score value strictly above which ``p <= target_fpr`` among ``sorted_scores``
    (calibration scores, ascending); inf if unreachable."""
    n = len(sorted_scores)
    k = alert_rank(n, target_fpr) - 1  # most calibration scores >= s
    return float("inf") if k < 0 else float(sorted_scores[n - 1 - k])


class CalibrationWarning(UserWarning):
    """Too few calibration rows to ever reach the requested false-positive rate."""


class Calibrator:
    def __init__(self, target_fpr: float = 0.001) -> None:
        if not 0.0 < target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
        self.target_fpr = target_fpr

    def fit(self, scores: np.ndarray, name: str = "score") -> Calibrator:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 1 or len(scores) == 0:
            raise ValueError("calibration needs a non-empty 1-D array of scores")
        if not np.isfinite(scores).all():
            raise ValueError("calibration scores must be finite")
        self.scores_ = np.sort(scores)
        # Derived from the scores, never saved: a loaded calibrator (from_scores) builds it too.
        self._search = SortedSearch(self.scores_, "left", float(np.median(self.scores_)), 1.0)
        n = len(scores)
        self.n_ = n
        if 1.0 / (n + 1) > self.target_fpr:
            warnings.warn(
                f"{name}: {n} calibration rows cannot reach target_fpr={self.target_fpr} "
                f"(smallest p-value is 1/{n + 1}); no row will alert. Train on at least "
                f"{int(np.ceil((1 / self.target_fpr - 1) / 0.25))} normal rows with the default "
                "calibration_fraction of 0.25.",
                CalibrationWarning,
                stacklevel=2,
            )
        m = int(np.clip(n // 10, 10, 200))
        m = min(m, n)
        top = self.scores_[n - m :]
        self.tail_m_ = m
        self.tail_u_ = float(top[0])
        self.tail_beta_ = float(max(np.mean(top - top[0]), 1e-12 * max(1.0, abs(top[0])), 1e-300))
        self.threshold_ = score_threshold(self.scores_, self.target_fpr)
        return self

    def pvalues(self, scores: np.ndarray, *, calibration_rows: bool = False) -> np.ndarray:
        """Conformal p-values. ``calibration_rows=True`` for the calibration scores themselves:
        each row's own score is then not counted twice (leave-one-out)."""
        s = np.asarray(scores, dtype=np.float64)
        count_ge = self.n_ - self._search(s)
        extra = 0 if calibration_rows else 1
        return (count_ge + extra) / (self.n_ + 1.0)

    def tail_pvalues(
        self,
        scores: np.ndarray,
        *,
        calibration_rows: bool = False,
        pvalues: np.ndarray | None = None,
    ) -> np.ndarray:
        """Tail-extended p-values; ``pvalues`` (from ``pvalues(scores)``) saves a second search."""
        s = np.asarray(scores, dtype=np.float64)
        if pvalues is None:
            p = self.pvalues(s, calibration_rows=calibration_rows)
        else:
            p = np.array(pvalues, dtype=np.float64)
        over = s > self.tail_u_
        if over.any():
            tail = (self.tail_m_ / (self.n_ + 1.0)) * np.exp(
                -(s[over] - self.tail_u_) / self.tail_beta_
            )
            p[over] = np.minimum(p[over], tail)
        return np.maximum(p, 1e-300)

    def severity(self, tail_p: np.ndarray, is_alert: np.ndarray) -> np.ndarray:
        """Severity per row (``None`` where not an alert); see the module docstring."""
        a = self.target_fpr
        q = np.asarray(tail_p)
        level = np.select([q <= a / 1000, q <= a / 100, q <= a / 10], [3, 2, 1], default=0)
        out = np.array(SEVERITIES, dtype=object)[level]
        out[~np.asarray(is_alert, dtype=bool)] = None
        return out

    def quantiles(self) -> dict[str, float]:
        q = np.quantile(self.scores_, [0.5, 0.9, 0.99, 0.999])
        return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "p999": float(q[3])}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (the scores themselves go to the bundle's tensor file)."""
        return {
            "target_fpr": self.target_fpr,
            "n": self.n_,
            "threshold": self.threshold_ if np.isfinite(self.threshold_) else None,
            "tail_m": self.tail_m_,
            "tail_u": self.tail_u_,
            "tail_beta": self.tail_beta_,
            "quantiles": self.quantiles(),
        }

    @classmethod
    def from_scores(cls, target_fpr: float, scores: np.ndarray) -> Calibrator:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            return cls(target_fpr).fit(scores)
