"""Drift detection (anomaly.monitoring.drift): the statistics, and the monitor fed through the
real scorer of a small trained model on stable and on shifted traffic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from anomaly.config import DriftConfig, config_from_dict
from anomaly.errors import ConfigError
from anomaly.features.numeric import fit_numeric_params
from anomaly.monitoring.drift import (
    DriftMonitor,
    alert_rate_pvalue,
    decile_bins,
    knot_spans,
    ks_uniform_discrete,
    psi,
    window_alpha,
)

LABELS = ["is_anomaly", "anomaly_kind"]
T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = 500  # records per hourly window in these tests
HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def fraud():
    """A small kNN model (the fastest detector; the monitor reads only the ensemble's p-values)
    and a stream of normal records from the same generated population, shuffled: i.i.d."""
    import torch

    from anomaly.estimator.model import AnomalyModel
    from anomaly.scoring.scorer import BatchScorer
    from anomaly.synthetic.datasets import generate_fraud

    torch.set_num_threads(1)
    example = Path(__file__).resolve().parents[2] / "examples" / "fraud.yaml"
    schema = yaml.safe_load(example.read_text())["schema"]
    cfg = config_from_dict({"name": "drift-test", "schema": schema}, environ={})
    rows = generate_fraud(3000 + 205 * WINDOW, anomaly_fraction=0.0, seed=11)
    rows = rows.drop(columns=LABELS).sample(frac=1.0, random_state=0).reset_index(drop=True)
    model = AnomalyModel.from_config(
        cfg, target_fpr=0.01, detectors=["knn"], progress=False, threads=1
    )
    model.fit(rows.iloc[:3000])
    return model, BatchScorer(model), rows.iloc[3000:].reset_index(drop=True)


def _feed(monitor, scorer, frame: pd.DataFrame, when: datetime):
    scored = scorer.score(frame)
    return monitor.observe(frame, scored.columns["ensemble_p"], when)


# -- the statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize("stored_cdf", [True, False], ids=["cdf", "bundle-before-cdf"])
def test_knot_spans_recover_the_training_cdf_of_a_discrete_column(stored_cdf: bool):
    rng = np.random.default_rng(0)
    values = rng.poisson(1.5, 20000).astype(float)
    params = fit_numeric_params("v", values, "quantile", 1000)
    if not stored_cdf:
        params.cdf = None  # recovered from the knots' normal images
    knots, upper = knot_spans(params)
    for k, u in zip(knots, upper, strict=True):
        assert u == pytest.approx(np.mean(values <= k), abs=0.003)
    edges, expected = decile_bins(params)
    assert np.all(np.diff(edges) > 0)
    assert expected.sum() == pytest.approx(1.0)
    counts = np.bincount(np.searchsorted(edges, values), minlength=len(edges) + 1)
    np.testing.assert_allclose(counts / len(values), expected, atol=0.003)


@pytest.mark.parametrize("n_train", [1000, 2500, 20000])
def test_a_column_of_a_few_levels_gets_its_true_shares(n_train: int):
    """Knots that np.quantile puts between two levels hold no training row: the bins' expected
    shares must still be the levels' own (they were not: a three-level column 'drifted' on its
    own training distribution, PSI 1.7)."""
    rng = np.random.default_rng(n_train)
    for levels, probs in (
        ([0, 1, 2], [0.5, 0.3, 0.2]),
        ([1, 2, 3, 4, 5], [0.4, 0.25, 0.15, 0.12, 0.08]),
    ):
        train = rng.choice(levels, n_train, p=probs).astype(float)
        edges, expected = decile_bins(fit_numeric_params("v", train, "quantile", 1000))
        own = np.bincount(np.searchsorted(edges, train), minlength=len(edges) + 1)
        np.testing.assert_allclose(own / n_train, expected, atol=1e-6)
        live = rng.choice(levels, 100_000, p=probs).astype(float)
        counts = np.bincount(np.searchsorted(edges, live), minlength=len(edges) + 1)
        assert psi(counts, expected) < 0.01  # a far cry from the 0.2 that marks a shift


def test_continuous_deciles_are_equal_shares():
    values = np.random.default_rng(1).lognormal(size=5000)
    edges, expected = decile_bins(fit_numeric_params("x", values, "quantile", 1000))
    assert len(edges) == 9
    np.testing.assert_allclose(expected, 0.1, atol=0.002)


def test_psi_rule_of_thumb():
    expected = np.full(10, 0.1)
    assert psi(np.full(10, 100), expected) == pytest.approx(0.0, abs=1e-12)
    shifted = np.array([0, 0, 0, 50, 100, 150, 200, 200, 150, 150])
    assert psi(shifted, expected) > 0.2


def test_ks_on_the_lattice_is_exactly_zero_for_uniform_levels():
    n_cal = 99
    counts = np.r_[0, np.full(n_cal + 1, 7)]
    d, p = ks_uniform_discrete(counts, n_cal)
    assert d == pytest.approx(0.0, abs=1e-12) and p == pytest.approx(1.0)
    low = counts.copy()
    low[1:11] *= 5  # p-values piling up at the bottom
    d, p = ks_uniform_discrete(low, n_cal)
    assert d > 0.2 and p < 1e-4


def test_alert_rate_test_is_two_sided_and_widened_by_the_calibration_set():
    # 7 alert levels out of 751: expected 0.93%.
    assert alert_rate_pvalue(9, 1000, 7, 750) > 0.5
    assert alert_rate_pvalue(60, 1000, 7, 750) < 1e-6
    assert alert_rate_pvalue(0, 3000, 7, 750) < 0.05
    # No reachable alert level: nothing to test.
    assert alert_rate_pvalue(0, 1000, 0, 50) == 1.0


def test_window_alpha_is_bonferroni_over_tests_and_windows_of_a_day():
    assert window_alpha(DriftConfig()) == pytest.approx(0.05 / 48)
    assert window_alpha(DriftConfig(window_s=86400 * 7)) == pytest.approx(0.025)


def test_drift_config_section_and_its_checks():
    base = {"name": "d", "schema": {"numeric": ["a"]}}
    cfg = config_from_dict({**base, "drift": {"window_s": 600}}, environ={})
    assert cfg.drift.window_s == 600 and cfg.drift.psi_threshold == 0.2
    cfg = config_from_dict(base, environ={"ANOMALY_DRIFT_MIN_RECORDS": "50"})
    assert cfg.drift.min_records == 50
    with pytest.raises(ConfigError, match="drift"):
        config_from_dict({**base, "drift": {"window_s": 0}}, environ={})


# -- the monitor on a small trained model ----------------------------------------------------------


def test_what_is_tracked_and_what_is_skipped(fraud):
    model, _, _ = fraud
    monitor = DriftMonitor(model, DriftConfig(ignore_features=["hour"]), "p")
    assert "amount" in monitor.features and "velocity_1h" in monitor.features
    assert monitor.skipped["hour"] == "listed in drift.ignore_features"
    assert "categorical" in monitor.skipped["merchant_category"]


def test_stable_traffic_stays_quiet(fraud):
    """200 hourly windows of normal traffic: the false drift-alarm rate is measured and must be
    below 1.5% (the tests' Bonferroni level gives <= 2 * 0.00104 per window; PSI noise is
    ~chi2(9)/500 = 0.018 against a threshold of 0.2)."""
    model, scorer, stream = fraud
    monitor = DriftMonitor(model, DriftConfig(min_records=WINDOW), "p")
    reports = []
    for w in range(200):
        frame = stream.iloc[w * WINDOW : (w + 1) * WINDOW]
        reports += _feed(monitor, scorer, frame, T0 + w * HOUR)
    reports += monitor.tick(T0 + 200 * HOUR)
    assert len(reports) == 200
    assert all(r.records == WINDOW and r.ks_p is not None for r in reports)
    false_alarms = sum(r.drifted for r in reports)
    rate = false_alarms / len(reports)
    print(f"false drift alarms on stable traffic: {false_alarms}/200 = {rate:.3%}")
    print(f"max PSI {max(r.features[0]['psi'] for r in reports):.3f}")
    assert rate <= 0.015


def test_a_shifted_feature_is_detected_within_two_windows_and_named(fraud):
    model, scorer, stream = fraud
    monitor = DriftMonitor(model, DriftConfig(min_records=WINDOW), "p")
    reports = []
    for w in range(6):
        frame = stream.iloc[w * WINDOW : (w + 1) * WINDOW].copy()
        if w >= 3:  # from the fourth window on, amounts are 2.5 times larger
            frame["amount"] *= 2.5
        reports += _feed(monitor, scorer, frame, T0 + w * HOUR)
    reports += monitor.tick(T0 + 6 * HOUR)
    assert [r.drifted for r in reports[:3]] == [False, False, False]
    first = next(i for i, r in enumerate(reports) if r.drifted)
    assert first - 3 < 2, f"detected only in window {first}"
    assert reports[first].features[0]["feature"] == "amount"
    assert reports[first].moved[0] == "amount"
    print(f"shift detected in window {first - 3 + 1} after it began: {reports[first].reasons}")


def test_windows_close_on_the_clock_and_small_windows_are_not_tested(fraud):
    model, scorer, stream = fraud
    monitor = DriftMonitor(model, DriftConfig(window_s=600, min_records=WINDOW), "p", "v1")
    start = T0 + timedelta(seconds=30)
    assert _feed(monitor, scorer, stream.iloc[:100], start) == []
    assert monitor.tick(start + timedelta(seconds=500)) == []
    (report,) = monitor.tick(start + timedelta(seconds=600))
    assert report.window_start == T0 and report.window_end == T0 + timedelta(seconds=600)
    assert report.records == 100 and report.model_version == "v1"
    assert report.alert_rate_p is None and report.ks_p is None and not report.drifted
    assert monitor.tick(start + timedelta(hours=5)) == []  # nothing observed: no window


@pytest.mark.parametrize("device_steps", [False, True], ids=["host-steps", "device-steps"])
def test_scored_batch_carries_the_numeric_block_the_drift_monitor_would_extract(
    fitted_model, frame_problem, device_steps
):
    """serve counts drift from the scorer's numeric block instead of extracting it again: it must
    hold the same values as the monitor's own extraction (NaN where missing, before imputation),
    so both give the same window."""
    from anomaly.scoring.scorer import BatchScorer

    _, normal, anomalous = frame_problem
    rows = pd.concat([normal.head(300), anomalous.head(30)], ignore_index=True)
    rows.loc[[3, 17], "amount"] = np.nan
    result = BatchScorer(fitted_model, device="cpu", device_steps=device_steps).score(rows)
    pre = fitted_model.preprocessor_
    expected = pre.checked_numeric(pre.checked_frame(rows))
    np.testing.assert_array_equal(np.asarray(result.numeric, dtype=np.float64), expected)
    assert np.isnan(expected[[3, 17], pre.numeric_.index("amount")]).all()
    now = datetime(2026, 1, 1, tzinfo=UTC)
    cfg = DriftConfig(enabled=True)
    by_frame = DriftMonitor(fitted_model, cfg, "p", "v")
    by_block = DriftMonitor(fitted_model, cfg, "p", "v")
    by_frame.observe(rows, result.columns["ensemble_p"], now)
    by_block.observe_values(result.numeric, result.columns["ensemble_p"], now)
    assert by_frame.report() == by_block.report()
