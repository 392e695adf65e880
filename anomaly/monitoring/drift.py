"""Drift detection on the live stream: per window, three signals from what scoring already has.

``DriftMonitor`` is fed each scored batch (``observe``): it keeps counts only (bounded memory,
whatever the window's size), and when a window closes it emits a ``DriftReport``.

1. **Alert rate** against the model's rate. An alert is ``ensemble_p <= target_fpr``; with ``n``
   calibration rows that is ``p <= k / (n + 1)``, ``k = floor(target_fpr * (n + 1))``. Given the
   one calibration set the model has, a normal row's alert probability is not exactly
   ``k / (n + 1)`` but Beta(k, n + 1 - k) distributed (conformal p-values are uniform only
   averaged over calibration sets), so the window's alert count is tested two-sided against a
   beta-binomial(N, k, n + 1 - k): the binomial test, widened by the calibration set's own
   sampling noise (it tends to the binomial as n grows). Without that widening a window much
   larger than the calibration set "drifts" from the calibration set's noise alone.
2. **Uniformity of the ensemble p-values** (model-free: on normal traffic they are uniform by
   construction). Conformal p-values take the ``n + 1`` values ``j / (n + 1)``, so the KS
   statistic is taken at those levels only, against the discrete uniform (not U(0, 1), which
   would add a spurious gap of up to ``1 / (n + 1)``). For the same reason as above its null is
   the two-sample one: the stream's p-value is its rank among the calibration scores, so ``D`` is
   the two-sample KS statistic of stream versus calibration scores, with the effective size
   ``N n / (N + n)`` (``scipy.stats.kstwo``; conservative for discrete data).
3. **Feature shift**: PSI per numeric feature over its training deciles, read from the fitted
   ``Preprocessor`` (quantile transform: ``numeric_params_[name].knots`` are the distinct
   training quantiles, ``ndtr(normal)`` the middle of the CDF span each covers; ``knot_spans``
   recovers ``P(X <= knot)`` from those). Discrete columns and point masses (a count, a distance
   that is often 0) get fewer, unequal bins, each with its own expected share. Skipped, and
   listed in ``skipped``: numeric columns fit with the robust or signed-log transform (only a
   median and a scale are stored), indicator columns (no knots stored), categorical columns (the
   bundle keeps only the vocabulary, no training frequencies) and ``drift.ignore_features``
   (features that move by design, such as the hour of day). Missing values are not counted.

Thresholds (``anomaly.config.DriftConfig``), from principle, never tuned on labels: each of the
two tests is run at ``alpha = daily_alpha / (2 * windows per day)`` (Bonferroni over the tests and
the day's windows: at the default 0.05 and hourly windows ``alpha = 0.00104``, at most one false
alarm per ~20 days from these tests on stable traffic). PSI > ``psi_threshold`` (0.2, the common
rule of thumb: "significant shift"); on stable traffic PSI over 10 bins is about chi2(9) / N,
~0.01 at N = 1000, so ``min_records`` (1000) keeps the rule far above sampling noise.

A window is ``drifted`` when either test rejects or some feature's PSI exceeds the threshold.
The first two signals also rise on a burst of genuine anomalies (they see the p-values, not
why they are low); the PSI names which features moved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from scipy.special import ndtr
from scipy.stats import betabinom, kstwo

from anomaly.config import DriftConfig
from anomaly.estimator.calibration import alert_rank

N_BINS = 10  # training deciles


@dataclass
class DriftReport:
    pipeline: str
    model_version: str | None
    window_start: datetime
    window_end: datetime
    records: int
    alerts: int
    expected_alert_rate: float
    alert_rate_p: float | None  # None: fewer than min_records (no tests)
    ks_stat: float | None
    ks_p: float | None
    # Highest PSI first: [{"feature": name, "psi": value}], at most top_features.
    features: list[dict[str, Any]]
    drifted: bool
    reasons: list[str] = field(default_factory=list)
    alpha: float = 0.0
    psi_threshold: float = 0.2

    @property
    def moved(self) -> list[str]:
        """The features whose PSI is above the threshold."""
        return [f["feature"] for f in self.features if f["psi"] > self.psi_threshold]


def knot_spans(params: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """A quantile-transformed column's distinct training knots and, for each, the training CDF
    just above it (``P(X <= knot)``), or None when no knots are stored.

    ``fit_numeric_params`` stores that CDF (``cdf``). Bundles saved before have only the knots'
    normal images, from which it is recovered as follows, exactly on a continuous column but not
    on one of a few levels, where the knots ``np.quantile`` interpolates between two levels make
    the grid step below come out too large (a three-level column drifted on its own training
    distribution, PSI 1.7). ``fit_numeric_params`` keeps each distinct knot with the middle of
    the grid probabilities it covers (a value with mass covers many grid points); walking up
    from 0, each span's upper end is ``2 * middle - lower end`` and the next span starts one grid
    step higher."""
    knots = np.asarray(getattr(params, "knots", []), dtype=np.float64)
    if len(knots) < 2:
        return None
    if getattr(params, "cdf", None) is not None:  # stored at fit (bundles from 2026-12-06 on)
        return knots, np.asarray(params.cdf, dtype=np.float64)
    mids = ndtr(np.asarray(params.normal, dtype=np.float64))
    steps = np.diff(mids)
    step = float(steps.min()) if len(steps) else 0.0
    upper = np.empty_like(mids)
    low = 0.0
    for i, m in enumerate(mids):
        upper[i] = min(1.0, max(low, 2.0 * m - low))
        low = upper[i] + step
    upper[-1] = 1.0
    return knots, np.maximum.accumulate(upper)


def decile_bins(params: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Bin edges at the training deciles (distinct values; bin ``i`` is ``(e[i-1], e[i]]``)
    and each bin's expected share, or None when the column is not tracked."""
    spans = knot_spans(params)
    if spans is None:
        return None
    knots, upper = spans
    at = np.searchsorted(upper, np.arange(1, N_BINS) / N_BINS - 1e-9, side="left")
    at = np.unique(np.minimum(at, len(knots) - 2))
    if len(at) == 0:
        return None
    cdf = np.r_[0.0, upper[at], 1.0]
    return knots[at], np.diff(cdf)


def window_alpha(cfg: DriftConfig) -> float:
    """Per test and window: the daily budget over two tests and the windows of a day."""
    windows_per_day = max(1.0, 86400.0 / cfg.window_s)
    return cfg.daily_alpha / (2.0 * windows_per_day)


def psi(counts: np.ndarray, expected: np.ndarray) -> float:
    """PSI of binned counts against the expected shares (0.5 added to every bin's count, the
    expected shares floored at 1e-4, so an empty or new bin costs a finite amount)."""
    counts = np.asarray(counts, dtype=np.float64)
    actual = (counts + 0.5) / (counts.sum() + 0.5 * len(counts))
    expected = np.maximum(np.asarray(expected, dtype=np.float64), 1e-4)
    expected = expected / expected.sum()
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def alert_rate_pvalue(alerts: int, records: int, k: int, n_cal: int) -> float:
    """Two-sided beta-binomial test of ``alerts`` out of ``records`` (module docstring, 1)."""
    if k <= 0 or records <= 0:
        return 1.0
    dist = betabinom(records, k, n_cal + 1 - k)
    low, high = float(dist.cdf(alerts)), float(dist.sf(alerts - 1))
    return min(1.0, 2.0 * min(low, high))


def ks_uniform_discrete(counts: np.ndarray, n_cal: int) -> tuple[float, float]:
    """(D, p) of p-value counts per level ``j / (n_cal + 1)`` (``counts[j]``, j = 1..n_cal+1)
    against the discrete uniform, with the two-sample null (module docstring, 2)."""
    total = int(counts.sum())
    if total == 0:
        return 0.0, 1.0
    ecdf = np.cumsum(counts[1:]) / total
    levels = np.arange(1, n_cal + 2) / (n_cal + 1.0)
    d = float(np.max(np.abs(ecdf - levels)))
    n_eff = max(1, round(total * n_cal / (total + n_cal)))
    return d, float(kstwo.sf(d, n_eff))


class DriftMonitor:
    """Counts of one window at a time; ``observe`` per scored batch, reports when windows close.

    ``model`` is a fitted ``AnomalyModel`` (its preprocessor, ensemble calibrator, target_fpr).
    """

    def __init__(
        self, model: Any, cfg: DriftConfig, pipeline: str, model_version: str | None = None
    ) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.model_version = model_version
        self.alpha = window_alpha(cfg)
        self.model = model
        pre = self._pre = model.preprocessor_
        self.n_cal = int(model.calibrators_["ensemble"].n_)
        self.target_fpr = float(model.target_fpr)
        self.k_alert = alert_rank(self.n_cal, self.target_fpr)
        self.features: list[str] = []
        self._columns: list[int] = []
        self._edges: list[np.ndarray] = []
        self._expected: list[np.ndarray] = []
        self.skipped: dict[str, str] = {}
        ignored = set(cfg.ignore_features)
        for i, name in enumerate(pre.numeric_):
            if name in ignored:
                self.skipped[name] = "listed in drift.ignore_features"
                continue
            bins = decile_bins(pre.numeric_params_[name])
            if bins is None:
                self.skipped[name] = (
                    "indicator or constant column: no training quantiles kept"
                    if pre.numeric_transform == "quantile"
                    else f"{pre.numeric_transform} transform keeps no training quantiles"
                )
                continue
            self.features.append(name)
            self._columns.append(i)
            self._edges.append(bins[0])
            self._expected.append(bins[1])
        for name in pre.categorical_:
            self.skipped[name] = "categorical: the bundle keeps no training frequencies"
        self._start: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.records = 0
        self.alerts = 0
        self._p_counts = np.zeros(self.n_cal + 2, dtype=np.int64)
        self._bins = [np.zeros(len(e) + 1, dtype=np.int64) for e in self._edges]

    def observe(self, frame: Any, ensemble_p: np.ndarray, now: datetime) -> list[DriftReport]:
        """Count one scored batch (``frame``: its valid records, ``ensemble_p`` their p-values)
        at time ``now``; returns the report of the window this closed, if any."""
        values = self._pre.checked_numeric(self._pre.checked_frame(frame))
        return self.observe_values(values, ensemble_p, now)

    def observe_values(
        self, numeric: np.ndarray, ensemble_p: np.ndarray, now: datetime
    ) -> list[DriftReport]:
        """``observe`` with the numeric block already extracted (rows x ``numeric_`` columns,
        NaN where missing; the scorer's block, float, integer or bool)."""
        reports = self.tick(now)
        if self._start is None:  # windows start at multiples of window_s since the epoch
            window = self.cfg.window_s
            self._start = math.floor(now.timestamp() / window) * window
        p = np.asarray(ensemble_p, dtype=np.float64)
        self.records += len(p)
        self.alerts += int(np.count_nonzero(p <= self.target_fpr))
        levels = np.rint(p * (self.n_cal + 1)).astype(np.int64)
        np.clip(levels, 1, self.n_cal + 1, out=levels)
        self._p_counts += np.bincount(levels, minlength=self.n_cal + 2)
        for j, (column, edges) in enumerate(zip(self._columns, self._edges, strict=True)):
            x = numeric[:, column]
            if x.dtype.kind == "f":  # (integer and bool columns hold no missing values)
                x = x[~np.isnan(x)]
            self._bins[j] += np.bincount(np.searchsorted(edges, x), minlength=len(edges) + 1)
        return reports

    def tick(self, now: datetime) -> list[DriftReport]:
        """Close the window if ``now`` is past its end (call when idle too)."""
        if self._start is None or now.timestamp() < self._start + self.cfg.window_s:
            return []
        report = self.report()
        self._start = None
        self._reset()
        return [report]

    def report(self) -> DriftReport:
        """The current window's report (closed or not)."""
        start = self._start if self._start is not None else 0.0
        cfg = self.cfg
        psis = [
            (name, psi(self._bins[j], self._expected[j])) for j, name in enumerate(self.features)
        ]
        psis.sort(key=lambda kv: -kv[1])
        top = [{"feature": k, "psi": round(v, 6)} for k, v in psis[: cfg.top_features]]
        expected = self.k_alert / (self.n_cal + 1.0)
        rate_p = ks_d = ks_p = None
        reasons: list[str] = []
        if self.records >= cfg.min_records:
            rate_p = alert_rate_pvalue(self.alerts, self.records, self.k_alert, self.n_cal)
            ks_d, ks_p = ks_uniform_discrete(self._p_counts, self.n_cal)
            if rate_p < self.alpha:
                reasons.append(
                    f"alert rate {self.alerts / self.records:.4g} vs {expected:.4g} "
                    f"(p={rate_p:.3g})"
                )
            if ks_p < self.alpha:
                reasons.append(f"ensemble p-values not uniform (KS {ks_d:.3f}, p={ks_p:.3g})")
            reasons += [f"{k}: PSI {v:.3f}" for k, v in psis if v > cfg.psi_threshold]
        return DriftReport(
            pipeline=self.pipeline,
            model_version=self.model_version,
            window_start=datetime.fromtimestamp(start, UTC),
            window_end=datetime.fromtimestamp(start + cfg.window_s, UTC),
            records=self.records,
            alerts=self.alerts,
            expected_alert_rate=expected,
            alert_rate_p=rate_p,
            ks_stat=ks_d,
            ks_p=ks_p,
            features=top,
            drifted=bool(reasons),
            reasons=reasons,
            alpha=self.alpha,
            psi_threshold=cfg.psi_threshold,
        )
