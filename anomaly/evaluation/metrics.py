"""Detection quality: metrics of detector scores against 0/1 labels, and the one-class split.

Everything here works on plain arrays and the ``score_detectors`` DataFrame (columns ``vae``,
``flow``, ``gan``, ``ensemble`` and their ``*_p`` conformal p-values), so it can be checked without
a trained model. A row is an alert for a detector when its p-value is at most the target
false-positive rate, exactly as ``AnomalyModel.predict`` decides for the ensemble.

Labels: 1 = anomaly, 0 = normal. AUROC and AUPRC (average precision) are threshold-free; precision,
recall, F1 and the observed false-positive rate are at the calibrated threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from anomaly.errors import DataError
from anomaly.estimator.calibration import score_threshold

# Order in which detectors appear in tables and plots; others follow alphabetically.
DETECTOR_ORDER = ("vae", "flow", "gan", "knn", "knn_linear", "ensemble")


class LabelError(DataError):
    """Labels that cannot be used for evaluation (missing column, not 0/1, a single class)."""


@dataclass
class DetectorMetrics:
    """Quality of one detector's scores on one labeled data set."""

    detector: str
    auroc: float
    auprc: float
    # At the calibrated threshold (p-value <= target_fpr).
    target_fpr: float
    threshold: float | None
    precision: float
    recall: float
    f1: float
    observed_fpr: float
    fpr_ratio: float  # observed / target
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int

    @property
    def alerts(self) -> int:
        return self.true_positives + self.false_positives


@dataclass
class EvaluationResult:
    """Metrics for every detector plus what the data looked like."""

    target_fpr: float
    n_rows: int
    n_anomalies: int
    n_normals: int
    detectors: dict[str, DetectorMetrics] = field(default_factory=dict)

    @property
    def anomaly_rate(self) -> float:
        return self.n_anomalies / self.n_rows if self.n_rows else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        detectors = data.pop("detectors")
        for name, m in self.detectors.items():
            detectors[name]["alerts"] = m.alerts
        return {**data, "anomaly_rate": self.anomaly_rate, "detectors": detectors}


@dataclass
class TopRow:
    """One of the highest-scoring rows with the features that drove its score."""

    row: int  # position in the evaluated data (0-based)
    label: int
    score: float
    p_value: float | None
    features: list[dict[str, Any]] = field(default_factory=list)  # {feature, value, contribution}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["top_features"] = data.pop("features")
        return data


def validate_labels(labels: Any, name: str = "label") -> np.ndarray:
    """Return labels as an int8 array of 0/1, or raise ``LabelError`` naming the bad rows.

    Accepts booleans, numbers equal to 0 or 1 (``1.0`` is fine) and the strings "0"/"1" (a CSV
    column read as text). Missing values, other numbers and other strings are errors, as is data
    with a single class: AUROC needs both normal and anomalous rows.
    """
    series = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels))
    if series.empty:
        raise LabelError(f"label column '{name}' is empty: no rows to evaluate")
    missing = series.isna().to_numpy()
    if missing.any():
        rows = np.flatnonzero(missing)
        raise LabelError(
            f"label column '{name}' has {len(rows)} missing value(s), first at row(s) "
            f"{_rows(rows)}; every row needs a label 0 (normal) or 1 (anomaly)"
        )
    if series.dtype == object or pd.api.types.is_string_dtype(series):
        # Text (a CSV column with a stray word) or mixed objects: numbers, then true/false.
        words = series.astype(str).str.strip().str.lower()
        numeric = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
        numeric = np.where(words == "true", 1.0, np.where(words == "false", 0.0, numeric))
    elif pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
        numeric = series.to_numpy(dtype=np.float64)
    else:
        raise LabelError(f"label column '{name}' must be 0/1, got values of type {series.dtype}")
    bad = np.flatnonzero((numeric != 0.0) & (numeric != 1.0))
    if len(bad):
        examples = sorted({repr(v) for v in series.iloc[bad[:20]].tolist()})[:5]
        raise LabelError(
            f"label column '{name}' must hold 0 (normal) or 1 (anomaly); {len(bad)} row(s) hold "
            f"other values ({', '.join(examples)}), first at row(s) {_rows(bad)}"
        )
    values = numeric.astype(np.int8)
    n_anomalies = int(values.sum())
    if n_anomalies == 0:
        raise LabelError(
            f"label column '{name}' has no anomalies (no 1s) among {len(values)} rows: "
            "AUROC, AUPRC and recall need at least one anomalous row"
        )
    if n_anomalies == len(values):
        raise LabelError(
            f"label column '{name}' has no normal rows (no 0s) among {len(values)} rows: "
            "AUROC and the false-positive rate need at least one normal row"
        )
    return values


def _rows(rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (", ..." if len(rows) > limit else "")


def detector_names(scores: pd.DataFrame) -> list[str]:
    """Score columns of a ``score_detectors`` frame (every column but the ``*_p`` ones)."""
    # A detector the model was built without has an all-NaN column: leave it out.
    names = [c for c in scores.columns if not str(c).endswith("_p") and not scores[c].isna().all()]
    known = [d for d in DETECTOR_ORDER if d in names]
    return known + sorted(set(names) - set(known))


def evaluate_scores(
    scores: pd.DataFrame,
    labels: Any,
    target_fpr: float,
    thresholds: Mapping[str, float] | None = None,
    detectors: Sequence[str] | None = None,
) -> EvaluationResult:
    """Metrics of every detector column in ``scores`` against ``labels``.

    A row is an alert for detector ``d`` when ``scores[d + "_p"] <= target_fpr``; when that column
    is absent, when ``scores[d] >= thresholds[d]``. ``thresholds`` (score units) is also what the
    report draws; without it the threshold is read off the data as the lowest alerted score.
    """
    if not 0.0 < target_fpr < 1.0:
        raise DataError(f"target false-positive rate must be in (0, 1), got {target_fpr}")
    y = validate_labels(labels)
    if len(y) != len(scores):
        raise DataError(f"{len(scores)} score rows but {len(y)} labels")
    thresholds = dict(thresholds or {})
    names = list(detectors) if detectors is not None else detector_names(scores)
    result = EvaluationResult(
        target_fpr=float(target_fpr),
        n_rows=len(y),
        n_anomalies=int(y.sum()),
        n_normals=int(len(y) - y.sum()),
    )
    for name in names:
        if name not in scores.columns:
            raise DataError(f"no score column '{name}' (have: {', '.join(map(str, scores))})")
        s = scores[name].to_numpy(dtype=np.float64)
        if not np.isfinite(s).all():
            bad = np.flatnonzero(~np.isfinite(s))
            raise DataError(f"detector '{name}' gave non-finite scores at row(s) {_rows(bad)}")
        alert = alerts_for(scores, name, target_fpr, thresholds.get(name))
        threshold = thresholds.get(name)
        if threshold is None and alert.any():
            threshold = float(s[alert].min())
        result.detectors[name] = _metrics(name, y, s, alert, target_fpr, threshold)
    return result


def alerts_for(
    scores: pd.DataFrame, name: str, target_fpr: float, threshold: float | None = None
) -> np.ndarray:
    """Boolean alert mask of one detector: p-value <= target, else score >= threshold."""
    p_col = f"{name}_p"
    if p_col in scores.columns:
        return scores[p_col].to_numpy(dtype=np.float64) <= target_fpr
    if threshold is None:
        raise DataError(f"detector '{name}' has neither a '{p_col}' column nor a threshold")
    return scores[name].to_numpy(dtype=np.float64) >= threshold


def _metrics(name, y, s, alert, target_fpr, threshold) -> DetectorMetrics:
    from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

    tn, fp, fn, tp = map(int, confusion_matrix(y, alert, labels=[0, 1]).ravel())
    precision = tp / (tp + fp) if tp + fp else 0.0  # sklearn's zero_division=0
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    observed_fpr = fp / (fp + tn)
    return DetectorMetrics(
        detector=name,
        auroc=float(roc_auc_score(y, s)),
        auprc=float(average_precision_score(y, s)),
        target_fpr=float(target_fpr),
        threshold=None if threshold is None else float(threshold),
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        observed_fpr=float(observed_fpr),
        fpr_ratio=float(observed_fpr / target_fpr),
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
        true_negatives=tn,
    )


def enough_to_tell(n_normals: int, target_fpr: float, min_expected: float = 10.0) -> bool:
    """Whether ``n_normals`` normal rows can tell a rate of ``target_fpr`` from 0.5x or 1.5x of it.

    With ``n * target`` expected false positives the binomial standard deviation is about
    ``sqrt(n * target)``; at 10 expected ones, 0.5x and 1.5x are 1.6 standard deviations away.
    Below that, an observed rate says little and the benchmark reports "n/a".
    """
    return n_normals * target_fpr >= min_expected


def fpr_interval(false_positives: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of the rate ``false_positives / n`` (for honest small-count
    reporting; any other count out of ``n`` too, such as confirmed alerts among reviewed ones)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = false_positives / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class OneClassSplit:
    """Train on normal rows only; test on held-out normal rows plus every anomaly."""

    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_duplicates_dropped: int
    n_test_dropped_as_train_duplicates: int
    n_train_available: int  # training rows before max_train


def one_class_split(
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    train_pool: np.ndarray | None = None,
    max_train: int | None = None,
) -> OneClassSplit:
    """The one-class protocol of GOAD, NeuTraL AD, ICL and DTE.

    Shuffle with ``seed``, drop exact duplicate rows (features and label), train on a random half
    of the normal rows, test on the other half plus all anomalies. ``train_pool`` (a boolean mask)
    restricts the rows the training half is drawn from (SKAB: the anomaly-free recording); normal
    rows outside it go to the test set. Test rows equal to a training row are dropped, so no
    test row was seen in training. ``max_train`` caps the training rows (random subset) for run
    time; the rows left out are not used at all, so the test set does not change with the cap.
    """
    x = np.asarray(x)
    y = np.asarray(y).astype(np.int8)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    pool = np.ones(len(x), bool) if train_pool is None else np.asarray(train_pool, bool)[order]
    keep = np.flatnonzero(~pd.DataFrame(np.column_stack([x, y])).duplicated().to_numpy())
    n_dup = len(x) - len(keep)
    # Shuffled again after the deduplication: the copy kept is each row's first in the shuffled
    # order, so a row with many copies sits early far more often than a unique one, and a split
    # by position would give training the common rows and test the rare ones. Test normals then
    # are not exchangeable with calibration rows (celeba, knn member, seed 1: 2.9x the target
    # false-positive rate at 0.01 by position, 1.2x after this shuffle).
    keep = keep[rng.permutation(len(keep))]
    x, y, pool = x[keep], y[keep], pool[keep]

    candidates = np.flatnonzero((y == 0) & pool)
    n_train = len(candidates) // 2
    train_idx = candidates[:n_train]  # already shuffled
    is_train = np.zeros(len(x), bool)
    is_train[train_idx] = True
    test = ~is_train
    # Test rows whose features equal a training row (possible with a label conflict or a train
    # pool) would be scored on memorised data: drop them.
    train_keys = {row.tobytes() for row in x[is_train].astype(np.float64)}
    seen = np.array([row.tobytes() in train_keys for row in x[test].astype(np.float64)], bool)
    test_idx = np.flatnonzero(test)[~seen]
    n_available = len(train_idx)
    if max_train is not None and len(train_idx) > max_train:
        train_idx = train_idx[:max_train]
    return OneClassSplit(
        x_train=x[train_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
        n_duplicates_dropped=int(n_dup),
        n_test_dropped_as_train_duplicates=int(seen.sum()),
        n_train_available=n_available,
    )


# --------------------------------------------------------------------------------------------
# `anomaly evaluate`: a saved model, a labeled file -> report.html and report.json


def read_labeled(path: str, label: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a labeled CSV or Parquet file; return the records (label column removed) and labels."""
    from pathlib import Path

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"--data must be a .csv or .parquet file, got {p.name!r}")
    if not p.is_file():
        raise DataError(f"labeled data file not found: {p}")
    try:
        frame = pd.read_csv(p) if suffix == ".csv" else pd.read_parquet(p)
    except Exception as exc:  # parser errors differ by engine; all mean "unreadable file"
        raise DataError(f"cannot read {p}: {exc}") from exc
    if label not in frame.columns:
        shown = ", ".join(map(str, list(frame.columns)[:20]))
        raise LabelError(f"label column '{label}' is not in {p.name} (columns: {shown})")
    labels = validate_labels(frame[label].reset_index(drop=True), label)
    return frame.drop(columns=[label]).reset_index(drop=True), labels


def model_thresholds(model: Any, target_fpr: float) -> dict[str, float]:
    """Each detector's and the ensemble's alert threshold in score units at ``target_fpr``, from
    the model's calibrators (their ``scores_`` are sorted); one no score reaches is left out, and
    ``evaluate_scores`` reads it off the data."""
    thresholds = {
        name: score_threshold(cal.scores_, target_fpr) for name, cal in model.calibrators_.items()
    }
    return {name: t for name, t in thresholds.items() if np.isfinite(t)}
