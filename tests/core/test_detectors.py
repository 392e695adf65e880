"""Each detector, trained for real on a small generated problem, separates known anomalies."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from anomaly.errors import DataError, NotFittedError
from anomaly.estimator.detectors.flow import FlowDetector
from anomaly.estimator.detectors.gan import GANDetector
from anomaly.estimator.detectors.knn import KNNDetector
from anomaly.estimator.detectors.vae import VAEDetector

from .conftest import SMALL, SMALL_PARAMS

CASES = [
    ("vae", VAEDetector),
    ("flow", FlowDetector),
    ("gan", GANDetector),
    ("knn", KNNDetector),
]
TRAINED = ["vae", "flow", "gan"]


def make(name, cls, **kw):
    return cls(seed=0, threads=1, **SMALL, **SMALL_PARAMS[name], **kw)


@pytest.fixture(scope="module")
def fitted(array_problem):
    train, _, _ = array_problem
    return {name: make(name, cls).fit(train) for name, cls in CASES}


@pytest.mark.parametrize("name", [name for name, _ in CASES])
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


@pytest.mark.parametrize("name", [name for name, _ in CASES])
def test_deterministic_on_cpu_and_learned_attributes(array_problem, fitted, name):
    train, x_eval, _ = array_problem
    cls = dict(CASES)[name]
    again = make(name, cls).fit(train)
    np.testing.assert_array_equal(
        again.decision_function(x_eval), fitted[name].decision_function(x_eval)
    )
    assert again.n_features_in_ == train.shape[1]
    if name in TRAINED:
        assert again.n_steps_ >= 1 and again.stop_reason_ in {"max_steps", "early_stopping"}
        assert again.history_[-1]["step"] == again.n_steps_
        assert 1 <= again.best_step_ <= again.n_steps_
    else:
        assert again.n_steps_ == 0 and again.stop_reason_ == "no_training"
    different = cls(seed=1, threads=1, **SMALL, **SMALL_PARAMS[name]).fit(train)
    if name == "knn":  # every training row is a reference row: the seed changes nothing
        return
    assert not np.array_equal(
        different.decision_function(x_eval), fitted[name].decision_function(x_eval)
    )


@pytest.mark.parametrize("name", [name for name, _ in CASES])
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


def test_budgets_and_patience_count_optimiser_steps(array_problem):
    train, _, _ = array_problem
    # 100 rows are one batch: an epoch is one step. A flow overfits them within a few hundred
    # steps at this learning rate, so its validation loss turns and early stopping ends training.
    steps = {"max_epochs": 10**6, "max_steps": 3000, "validate_every": 10, "lr": 1e-2}
    det = FlowDetector(seed=0, min_steps=0, patience=50, **steps).fit(train[:100])
    assert det.stop_reason_ == "early_stopping" and det.n_steps_ < 3000
    assert det.n_steps_ - det.best_step_ >= 50
    held = FlowDetector(seed=0, min_steps=1500, patience=1, **steps).fit(train[:100])
    assert held.stop_reason_ == "early_stopping" and held.n_steps_ >= 1500
    assert held.best_step_ < 1500  # the best weights of the whole run are restored
    capped = FlowDetector(
        seed=0, max_epochs=3, max_steps=None, min_steps=0, hidden=(16,), transforms=2
    ).fit(train[:400])  # 360 training rows: two steps an epoch
    assert capped.n_steps_ == 6 and capped.stop_reason_ == "max_steps"
    assert capped.planned_steps(2000) == 3 * 8  # 2,000 rows in batches of 256
    timed = GANDetector(
        seed=0, max_epochs=10**6, max_steps=None, time_budget_s=0.5, patience=10**6, hidden=(16,)
    )
    timed.fit(train[:400])
    assert timed.stop_reason_ == "time_budget"


def test_default_budget_is_steps_and_the_validation_loss_decides():
    """By default no cap on passes: every data size gets the same step budget (small data no
    fewer steps, large data no more), and early stopping ends it once ``min_steps`` are done."""
    default = FlowDetector()
    assert default.max_epochs is None
    assert {default.planned_steps(n) for n in (30, 300, 5_000, 100_000)} == {default.max_steps}
    assert default.min_steps < default.max_steps  # room for early stopping to act
    # A cap on passes still holds, but never below min_steps.
    assert FlowDetector(max_epochs=60).planned_steps(3_000) == 1_000  # 60 x 12 steps < min_steps
    assert FlowDetector(max_epochs=40).planned_steps(100_000) == 40 * 98  # batches of 1,024
    with pytest.raises(ValueError, match="cannot both be None"):
        FlowDetector(max_steps=None).planned_steps(1_000)


@pytest.mark.parametrize("name", TRAINED)
def test_validation_loss_is_deterministic(array_problem, fitted, name):
    """Early stopping compares validation losses: each must be the same number every pass
    (the VAE's sampled latent and the GAN's negatives come from a seeded generator)."""
    _, x_eval, _ = array_problem
    det = fitted[name]
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(x_eval[:200])
    with torch.no_grad():
        assert det._val_loss(det.module_, x) == det._val_loss(det.module_, x)


def test_small_data_trains_the_full_step_budget():
    """300 normal rows (one or two optimiser steps an epoch): training runs at least min_steps
    (1000) steps and the VAE learns the manifold, not just the marginals."""
    from .conftest import anomaly_rows, manifold_rows, standardise

    rng = np.random.default_rng(5)
    train, normal, anomalous = standardise(
        manifold_rows(300, rng), manifold_rows(600, rng), anomaly_rows(150, rng)
    )
    det = VAEDetector(seed=0, threads=1).fit(train)
    assert det.n_steps_ >= 1000
    scores = det.decision_function(np.vstack([normal, anomalous]))
    assert roc_auc_score(np.r_[np.zeros(600), np.ones(150)], scores) > 0.95


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


MODULES = [f"anomaly.estimator.detectors.{name}" for name, _ in CASES]


@pytest.mark.parametrize("module", MODULES)
def test_each_detector_imports_alone(module):
    code = (
        f"import sys, {module}; others = {set(MODULES)!r} - {{'{module}'}}; "
        "assert not others & set(sys.modules), others"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert importlib.import_module(module)


def test_gan_generator_shapes_the_discriminator(fitted, array_problem):
    """The generator is trained onto D's boundary, just outside the normal rows, and its samples
    change what D learns: the same GAN without them scores rows differently."""
    import torch

    train, x_eval, y_eval = array_problem
    gan = fitted["gan"]
    with torch.no_grad():
        z = torch.randn(1000, gan.latent_dim, generator=torch.Generator().manual_seed(0))
        fake = gan.module_.generator(z)
        fake_scores = -gan.module_.disc(fake).numpy()
        normal_scores = -gan.module_.disc(torch.from_numpy(x_eval[y_eval == 0])).numpy()
    # On the boundary (D near 1/2, score = -logit near 0), not on the data, not far out.
    assert abs(np.median(fake_scores)) < 2.0
    assert np.median(fake_scores) > np.quantile(normal_scores, 0.75)
    without = make("gan", GANDetector, gen_weight=0.0).fit(train)
    assert not np.allclose(without.decision_function(x_eval), gan.decision_function(x_eval))


def test_gan_score_sums_its_two_parts_standardised_on_rows_it_did_not_see(fitted, array_problem):
    """Score = robust z of -logit D(x) + robust z of the log k-th neighbour distance among kept
    normal rows in D's last hidden layer; each part is centred so that new normal rows sit near
    0 (a training row's distance to its own copy, 0, must not set the scale)."""
    import torch

    _, x_eval, y_eval = array_problem
    gan = fitted["gan"]
    module = gan.module_
    n_train = 2000 - round(2000 * gan.validation_fraction)
    n_reference = min(n_train, gan.feature_reference)
    assert module.neighbours.reference.shape == (n_reference, gan.hidden[-1])
    assert module.neighbours.k == max(1, round(5 * gan.feature_reference / n_train))
    with torch.no_grad():
        x = torch.from_numpy(x_eval)
        logit = module.disc(x).numpy()
        features = module.disc_body(x).numpy()
    reference = module.neighbours.reference.numpy()
    distances = np.sqrt(((features[:, None, :] - reference[None]) ** 2).sum(2))
    kth = np.sort(distances, axis=1)[:, module.neighbours.k - 1]
    parts = np.stack([-logit, np.log(kth)], 1)
    z = (parts - module.part_center.numpy()) / module.part_scale.numpy()
    np.testing.assert_allclose(gan.decision_function(x_eval), z.sum(1), rtol=1e-3, atol=1e-3)
    normal_medians = np.median(z[y_eval == 0], axis=0)
    assert np.all(np.abs(normal_medians) < 1.0), normal_medians
    # Each part ranks the anomalies on its own.
    assert roc_auc_score(y_eval, z[:, 1]) > 0.9

    # Off, or a bundle saved before the distance part: the logit alone, and it still loads.
    logit_only = make("gan", GANDetector, feature_reference=0).fit(array_problem[0])
    assert logit_only.module_.neighbours is None and logit_only.extra_state() == {}
    old = GANDetector.from_state(
        logit_only.get_params() | {"feature_reference": 512}, 6, logit_only.state_tensors(), {}
    )
    expected = -logit_only.module_.disc(torch.from_numpy(x_eval)).detach().numpy()
    np.testing.assert_allclose(old.decision_function(x_eval), expected, rtol=1e-5)


def test_gan_loaded_then_refit_without_the_distance_part_saves_and_loads(fitted, array_problem):
    """A detector loaded from a bundle builds its network with the saved reference rows; a refit
    with the distance part off must not keep their medians and ranges in its saved tensors."""
    train, x_eval, _ = array_problem
    gan = fitted["gan"]
    loaded = GANDetector.from_state(
        gan.get_params(), gan.n_features_in_, gan.state_tensors(), gan.extra_state()
    )
    loaded.feature_reference = 0
    loaded.fit(train)
    again = GANDetector.from_state(
        loaded.get_params(), loaded.n_features_in_, loaded.state_tensors(), loaded.extra_state()
    )
    np.testing.assert_allclose(again.decision_function(x_eval), loaded.decision_function(x_eval))


@pytest.mark.parametrize("n_rows", [300, 3000], ids=["all-rows-kept", "subsampled"])
def test_knn_leave_one_out_scores_leave_out_exactly_the_rows_own_copy(n_rows):
    """Each fit row's score is its mean distance to the k nearest of the *other* reference rows
    (brute force in float64), and rows that are not reference rows score as a new row would."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n_rows, 4)).astype(np.float32)
    det = KNNDetector(n_neighbors=5, max_reference=1000, seed=0).fit(x)
    rows = np.arange(0, n_rows, 7)
    got = det.leave_one_out_scores(x[rows], rows)
    reference = det.module_.reference.numpy().astype(np.float64)
    d = np.sqrt(((x[rows, None, :].astype(np.float64) - reference[None]) ** 2).sum(-1))
    own = det.reference_of_row_[rows]
    d[own >= 0, own[own >= 0]] = np.inf
    assert det.k_ > 1  # a mean over more than one neighbour
    want = np.sort(d, axis=1)[:, : det.k_].mean(1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    outside = own < 0
    assert outside.any() == (n_rows > 1000)
    if outside.any():
        new_row = det.decision_function(x[rows][outside])
        np.testing.assert_allclose(got[outside], new_row, rtol=1e-6)


def test_knn_calibrated_leave_one_out_keeps_its_false_positive_rate():
    """The knn member keeps the calibration rows as reference rows and calibrates on their
    leave-one-out scores: new normal rows must still alert at the target rate (on average over
    fits; one fit's rate swings with its 500 calibration rows)."""
    from anomaly import AnomalyModel

    rates = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        mixing = rng.normal(size=(6, 6))
        train = (rng.normal(size=(2000, 6)) @ mixing).astype(np.float32)
        fresh = (rng.normal(size=(20000, 6)) @ mixing).astype(np.float32)
        model = AnomalyModel(target_fpr=0.01, seed=seed, device="cpu", detectors=["knn"])
        p = model.fit(train).score_detectors(fresh)["knn_p"].to_numpy()
        rates.append(np.mean(p <= 0.01))
    # Expected floor(0.01 * 501) / 501 = 0.00998; the mean of 8 fits has a spread of ~0.0016.
    assert 0.006 <= np.mean(rates) <= 0.014, rates


def test_knn_linear_sees_a_gap_between_a_columns_modes_that_the_quantile_map_closes():
    """Normal rows sit in two tight modes of one column; anomalies lie in the empty gap between
    them. The quantile map sends the gap to the middle of its normal quantiles, next to both
    modes' inner edges, so the knn member in that view barely sees them; the linear view keeps
    the gap, and knn_linear ranks them high. Both are in the default ensemble."""
    import pandas as pd

    from anomaly import AnomalyModel

    rng = np.random.default_rng(0)
    n = 1200
    mode = rng.choice([-5.0, 5.0], n)
    train = np.c_[mode + rng.normal(0, 0.3, n), rng.normal(0, 1, n)].astype(np.float32)
    normal = np.c_[rng.choice([-5.0, 5.0], 200) + rng.normal(0, 0.3, 200), rng.normal(0, 1, 200)]
    gap = np.c_[rng.uniform(-1.5, 1.5, 40), rng.normal(0, 1, 40)]
    rows = pd.DataFrame(np.r_[normal, gap].astype(np.float32), columns=["f0", "f1"])
    y = np.r_[np.zeros(200), np.ones(40)]
    model = AnomalyModel(seed=0, device="cpu", detectors=["knn", "knn_linear"]).fit(train)
    table = model.score_detectors(rows)
    assert roc_auc_score(y, table["knn_linear"]) > 0.95
    assert roc_auc_score(y, table["knn"]) < roc_auc_score(y, table["knn_linear"]) - 0.1
