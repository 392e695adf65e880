"""Each detector, trained for real on a small generated problem, separates known anomalies."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from anomaly.detectors.flow import FlowDetector
from anomaly.detectors.gan import GANDetector
from anomaly.detectors.vae import VAEDetector
from anomaly.errors import DataError, NotFittedError

from .conftest import SMALL, SMALL_PARAMS

CASES = [("vae", VAEDetector), ("flow", FlowDetector), ("gan", GANDetector)]


def make(name, cls, **kw):
    return cls(seed=0, threads=1, **SMALL, **SMALL_PARAMS[name], **kw)


@pytest.fixture(scope="module")
def fitted(array_problem):
    train, _, _ = array_problem
    return {name: make(name, cls).fit(train) for name, cls in CASES}


@pytest.mark.parametrize("name", ["vae", "flow", "gan"])
def test_auroc_above_0_9(fitted, array_problem, name):
    _, x_eval, y_eval = array_problem
    scores = fitted[name].decision_function(x_eval)
    assert scores.shape == (len(x_eval),) and scores.dtype == np.float64
    auroc = roc_auc_score(y_eval, scores)
    assert auroc > 0.9, f"{name} AUROC {auroc:.3f}"


def test_gan_sign_anomalies_score_higher(fitted, array_problem):
    """The GAN's discriminator score must rise with abnormality, not fall (the sign test)."""
    _, x_eval, y_eval = array_problem
    scores = fitted["gan"].decision_function(x_eval)
    assert np.median(scores[y_eval == 1]) > np.quantile(scores[y_eval == 0], 0.9)
    # Moving a normal row further and further out makes it more anomalous, monotonically enough.
    row = x_eval[:1]
    ladder = np.vstack([row + k * np.ones_like(row) for k in (0, 2, 4, 8)])
    s = fitted["gan"].decision_function(ladder)
    assert s[0] < s[1] < s[2] < s[3]


@pytest.mark.parametrize("name", ["vae", "flow", "gan"])
def test_deterministic_on_cpu_and_learned_attributes(array_problem, fitted, name):
    train, x_eval, _ = array_problem
    cls = dict(CASES)[name]
    again = make(name, cls).fit(train)
    np.testing.assert_array_equal(
        again.decision_function(x_eval), fitted[name].decision_function(x_eval)
    )
    assert again.n_features_in_ == train.shape[1]
    assert again.n_epochs_ >= 1 and again.stop_reason_ in {"max_epochs", "early_stopping"}
    assert len(again.history_) == again.n_epochs_
    different = cls(seed=1, threads=1, **SMALL, **SMALL_PARAMS[name]).fit(train)
    assert not np.array_equal(
        different.decision_function(x_eval), fitted[name].decision_function(x_eval)
    )


@pytest.mark.parametrize("name", ["vae", "flow", "gan"])
def test_scores_finite_for_rows_far_outside_training(fitted, name):
    far = np.array([[1e6] * 6, [-1e30] * 6, [3e38] * 6, [0.0] * 6], dtype=np.float32)
    scores = fitted[name].decision_function(far)
    assert np.all(np.isfinite(scores))
    assert scores[0] > scores[3] and scores[2] > scores[3]


def test_vae_feature_errors_sum_to_score_and_point_at_the_broken_feature(fitted, array_problem):
    _, x_eval, _ = array_problem
    vae = fitted["vae"]
    rows = x_eval[:5].copy()
    errors = vae.feature_errors(rows)
    np.testing.assert_allclose(errors.sum(1), vae.decision_function(rows), rtol=1e-4)
    rows[:, 3] += 6.0
    assert np.all(vae.feature_errors(rows).argmax(1) == 3)


def test_early_stopping_and_epoch_budget(array_problem):
    train, _, _ = array_problem
    det = VAEDetector(
        seed=0, max_epochs=200, max_steps=None, patience=2, batch_size=512, hidden=(16,)
    )
    det.fit(train[:400])
    assert det.stop_reason_ == "early_stopping" and det.n_epochs_ < 200
    capped = FlowDetector(
        seed=0, max_epochs=3, max_steps=None, min_steps=0, hidden=(16,), transforms=2
    ).fit(train[:400])
    assert capped.n_epochs_ == 3 and capped.stop_reason_ == "max_epochs"
    timed = GANDetector(
        seed=0, max_epochs=10_000, max_steps=None, time_budget_s=0.5, patience=10_000, hidden=(16,)
    )
    timed.fit(train[:400])
    assert timed.stop_reason_ == "time_budget"


def test_bad_input_and_unfitted_errors(array_problem):
    train, _, _ = array_problem
    with pytest.raises(NotFittedError):
        VAEDetector().decision_function(train)
    bad = train[:50].copy()
    bad[17, 2] = np.nan
    with pytest.raises(DataError, match="row 17, feature f2"):
        VAEDetector(max_epochs=1, min_steps=0).fit(bad)
    with pytest.raises(DataError, match="need >= 10"):
        FlowDetector(max_epochs=1).fit(train[:5])
    det = GANDetector(max_epochs=1, min_steps=0, hidden=(8,)).fit(train[:100])
    with pytest.raises(DataError, match="fit on 6"):
        det.decision_function(train[:10, :3])


@pytest.mark.parametrize(
    "module", ["anomaly.detectors.vae", "anomaly.detectors.flow", "anomaly.detectors.gan"]
)
def test_each_detector_imports_alone(module):
    code = (
        f"import sys, {module}; others = {{'anomaly.detectors.vae', 'anomaly.detectors.flow', "
        f"'anomaly.detectors.gan'}} - {{'{module}'}}; assert not others & set(sys.modules), others"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert importlib.import_module(module)
