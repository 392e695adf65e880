"""Metrics, label checks and the one-class split, on small arrays (no model needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly.errors import DataError, UserFacingError
from anomaly.evaluation.metrics import (
    LabelError,
    enough_to_tell,
    evaluate_scores,
    fpr_interval,
    one_class_split,
    validate_labels,
)


def _scores(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(int)
    y[:2] = [0, 1]
    cal = rng.normal(size=500)
    frame = {}
    for i, name in enumerate(["vae", "flow", "gan", "ensemble"]):
        s = rng.normal(size=n) + (1.0 + i) * y
        frame[name] = s
        frame[f"{name}_p"] = (1 + (cal[None, :] >= s[:, None]).sum(1)) / (len(cal) + 1)
    return pd.DataFrame(frame), y


def test_metrics_match_sklearn_and_counts() -> None:
    scores, y = _scores()
    result = evaluate_scores(scores, y, target_fpr=0.05)
    assert list(result.detectors) == ["vae", "flow", "gan", "ensemble"]
    for name, m in result.detectors.items():
        assert m.auroc == pytest.approx(roc_auc_score(y, scores[name]))
        assert m.auprc == pytest.approx(average_precision_score(y, scores[name]))
        alert = scores[f"{name}_p"].to_numpy() <= 0.05
        assert m.true_positives == int((alert & (y == 1)).sum())
        assert m.false_positives == int((alert & (y == 0)).sum())
        assert m.observed_fpr == pytest.approx(m.false_positives / (y == 0).sum())
        # Without a model, the threshold is the lowest alerted score.
        assert m.threshold == pytest.approx(scores[name][alert].min())
    # Better-separated detectors score higher: the metrics follow the data, not a constant.
    assert result.detectors["ensemble"].auroc > result.detectors["vae"].auroc


def test_disabled_detector_columns_are_skipped_and_bad_scores_rejected() -> None:
    scores, y = _scores()
    scores["gan"] = np.nan
    scores["gan_p"] = np.nan
    assert "gan" not in evaluate_scores(scores, y, 0.01).detectors
    scores.loc[5, "vae"] = np.inf
    with pytest.raises(DataError, match="detector 'vae' gave non-finite scores at row"):
        evaluate_scores(scores, y, 0.01)


@pytest.mark.parametrize(
    "labels",
    [
        [0, 1, 1, 0],
        [False, True, True, False],
        [0.0, 1.0, 1.0, 0.0],
        ["0", "1", "1", "0"],
        pd.Series([0, 1, 1, 0], dtype="Int64"),
    ],
)
def test_validate_labels_accepts_binary_forms(labels) -> None:
    assert validate_labels(labels).tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 1, 2, 0], "must hold 0 (normal) or 1 (anomaly); 1 row(s) hold other values (2)"),
        ([0, 1, 0.5], "first at row(s) 2"),
        (["0", "yes", "1"], "'yes'"),
        ([0, None, 1], "1 missing value(s), first at row(s) 1"),
        ([0, 0, 0], "no anomalies"),
        ([1, 1], "no normal rows"),
        ([], "is empty"),
    ],
)
def test_validate_labels_rejects_with_clear_message(labels, message) -> None:
    with pytest.raises(LabelError) as info:
        validate_labels(pd.Series(labels, dtype=object if labels else float), name="y")
    assert message in str(info.value)
    assert "'y'" in str(info.value)
    assert isinstance(info.value, UserFacingError)


def test_one_class_split_protocol() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 3)).astype(np.float32)
    y = (rng.random(1000) < 0.1).astype(np.int8)
    x[10] = x[11]  # an exact duplicate row (with the same label) is dropped
    y[10] = y[11]
    split = one_class_split(x, y, seed=3)
    assert split.n_duplicates_dropped == 1
    n_normal = int((y == 0).sum()) - (1 if y[10] == 0 else 0)
    n_anom = int(y.sum()) - (1 if y[10] == 1 else 0)
    assert len(split.x_train) == n_normal // 2
    assert int(split.y_test.sum()) == n_anom  # every anomaly is a test row
    assert int((split.y_test == 0).sum()) == n_normal - n_normal // 2
    train = {r.tobytes() for r in split.x_train}
    assert not any(r.tobytes() in train for r in split.x_test)
    anomalies = {r.tobytes() for r in x[y == 1]}
    assert not any(r.tobytes() in anomalies for r in split.x_train)
    # Seeded: the same seed gives the same split, another seed another one.
    again = one_class_split(x, y, seed=3)
    assert np.array_equal(again.x_train, split.x_train)
    assert not np.array_equal(one_class_split(x, y, seed=4).x_train, split.x_train)
    # The cap shrinks training only.
    capped = one_class_split(x, y, seed=3, max_train=50)
    assert len(capped.x_train) == 50
    assert capped.n_train_available == len(split.x_train)
    assert np.array_equal(capped.x_test, split.x_test)


def test_one_class_split_halves_are_exchangeable_when_rows_repeat() -> None:
    """Half the normal rows are copies of 20 common rows, half are unique. After deduplication
    the 20 common rows must split between training and test like any others (a split by the
    position of each row's first copy gives nearly all of them to training)."""
    rng = np.random.default_rng(2)
    common = rng.normal(size=(20, 3)).astype(np.float32)
    unique = rng.normal(size=(2000, 3)).astype(np.float32)
    x = np.vstack([common[rng.integers(0, 20, 2000)], unique])
    y = np.zeros(len(x), np.int8)
    common_keys = {r.tobytes() for r in common}
    in_train = []
    for seed in range(10):
        split = one_class_split(x, y, seed=seed)
        in_train.append(sum(r.tobytes() in common_keys for r in split.x_train))
    # 20 of 2,020 distinct rows; a random half holds 10 of them on average.
    assert 7 <= np.mean(in_train) <= 13


def test_one_class_split_train_pool_and_test_copies_of_training_rows() -> None:
    # SKAB-like: recording 0 is the anomaly-free pool; another recording repeats some of its rows.
    rng = np.random.default_rng(1)
    pool_rows = rng.normal(size=(200, 2)).astype(np.float32)
    other = np.vstack([rng.normal(size=(100, 2)).astype(np.float32), pool_rows[:30]])
    x = np.vstack([pool_rows, other])
    y = np.r_[np.zeros(200), (rng.random(130) < 0.5)].astype(np.int8)
    y[-30:] = 1  # the repeated rows are labeled anomalous in the other recording
    pool = np.r_[np.ones(200, bool), np.zeros(130, bool)]
    split = one_class_split(x, y, seed=0, train_pool=pool)
    assert len(split.x_train) == 100
    train = {r.tobytes() for r in split.x_train}
    pool_set = {r.tobytes() for r in pool_rows}
    assert all(r.tobytes() in pool_set for r in split.x_train)
    assert not any(r.tobytes() in train for r in split.x_test)
    assert split.n_test_dropped_as_train_duplicates > 0


def test_fpr_helpers() -> None:
    assert enough_to_tell(1000, 0.01) and not enough_to_tell(999, 0.01)
    lo, hi = fpr_interval(10, 1000)
    assert lo < 0.01 < hi
    assert fpr_interval(0, 100)[0] == 0.0
