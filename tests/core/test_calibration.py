"""Conformal p-values and the observed false-positive rate on held-out normal rows."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly import AnomalyModel
from anomaly.estimator.calibration import CalibrationWarning, Calibrator
from anomaly.estimator.ensemble import combine

from .conftest import SMALL, SMALL_PARAMS, manifold_rows


def test_conformal_pvalues_and_threshold():
    cal = Calibrator(target_fpr=0.1).fit(np.arange(1.0, 20.0))  # 19 scores: 1..19
    np.testing.assert_allclose(cal.pvalues([0.0, 19.0, 19.5, 10.0]), [1.0, 2 / 20, 1 / 20, 11 / 20])
    # p <= 0.1 needs at most one calibration score >= s: s > 18.
    assert cal.threshold_ == 18.0
    assert cal.pvalues([18.0])[0] > 0.1 >= cal.pvalues([18.5])[0]
    # Leave-one-out for calibration rows: the row's own score is not counted twice.
    np.testing.assert_allclose(cal.pvalues([19.0], calibration_rows=True), [1 / 20])


def test_tail_extension_keeps_ranking_beyond_the_largest_score():
    rng = np.random.default_rng(0)
    cal = Calibrator(0.01).fit(rng.exponential(size=2000))
    p = cal.tail_pvalues(np.array([5.0, 10.0, 20.0, 40.0]))
    assert np.all(np.diff(p) < 0) and p[-1] > 0
    # Below the tail start, the tail-extended p is the conformal one.
    np.testing.assert_allclose(cal.tail_pvalues([0.5]), cal.pvalues([0.5]))
    sev = cal.severity(
        np.array([0.009, 0.0009, 0.00009, 0.000009, 0.5]), np.array([1, 1, 1, 1, 0], bool)
    )
    assert list(sev) == ["low", "medium", "high", "critical", None]


def test_unreachable_target_warns():
    with pytest.warns(CalibrationWarning, match="cannot reach target_fpr"):
        cal = Calibrator(0.001).fit(np.arange(100.0))
    assert cal.threshold_ == np.inf


def test_ensemble_rule_is_mean_minus_log10():
    out = combine([np.array([0.1, 1.0]), np.array([0.001, 1.0])])
    np.testing.assert_allclose(out, [2.0, 0.0])


def test_observed_fpr_on_held_out_normal_rows_matches_target():
    """target_fpr=0.01 with 3000 calibration rows; 20000 fresh normal rows must alert at a rate
    within 0.5x-1.5x of it (at that size the binomial noise alone is about +-7%)."""
    rng = np.random.default_rng(11)
    train = manifold_rows(6000, rng)
    held_out = manifold_rows(20_000, rng)
    model = AnomalyModel(
        target_fpr=0.01,
        seed=0,
        device="cpu",
        calibration_fraction=0.5,
        detector_params=SMALL_PARAMS,
        **SMALL,
    ).fit(train)
    table = model.score_detectors(held_out)
    for column in ("ensemble_p", "vae_p", "flow_p", "gan_p"):
        fpr = float(np.mean(table[column] <= 0.01))
        assert 0.005 <= fpr <= 0.015, f"{column}: observed FPR {fpr:.4f}"
    assert float(model.predict(held_out).mean()) == pytest.approx(
        np.mean(table["ensemble_p"] <= 0.01)
    )
    # The score threshold agrees with the p-value rule.
    alerts = table["ensemble_p"].to_numpy() <= 0.01
    np.testing.assert_array_equal(alerts, table["ensemble"].to_numpy() > model.threshold_)
