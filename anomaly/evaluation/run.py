"""``anomaly evaluate``: load a model, score labelled data, measure, explain the top rows and
write the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomaly.errors import DataError
from anomaly.estimator.model import AnomalyModel
from anomaly.evaluation.metrics import (
    EvaluationResult,
    TopRow,
    evaluate_scores,
    model_thresholds,
    read_labeled,
)
from anomaly.evaluation.report import write_report


def run_evaluation(
    model_dir: str,
    data_path: str,
    label: str,
    report_dir: str,
    target_fpr: float | None = None,
    top_rows: int = 10,
    device: str = "auto",
) -> tuple[EvaluationResult, Path, Path]:
    """What ``anomaly evaluate`` does: load, score, measure, explain the top rows, write."""
    if target_fpr is not None and not 0.0 < target_fpr < 1.0:
        raise DataError(f"--target-fpr must be in (0, 1), got {target_fpr}")
    if top_rows < 0:
        raise DataError(f"--top-rows must be >= 0, got {top_rows}")
    if not Path(model_dir).exists():
        raise DataError(f"model directory not found: {model_dir}")
    frame, labels = read_labeled(data_path, label)
    model = AnomalyModel.load(model_dir, device=device)
    frame, ignored = _model_columns(model, frame)
    if ignored:
        logging.getLogger(__name__).info(
            "ignoring column(s) not in the model's schema: %s", ", ".join(ignored)
        )
    target = float(target_fpr if target_fpr is not None else model.target_fpr)
    scores = model.score_detectors(frame)
    result = evaluate_scores(scores, labels, target, thresholds=model_thresholds(model, target))

    # The highest-scoring rows, ties in the data's order.
    ensemble = scores["ensemble"].to_numpy(dtype=np.float64)
    idx = np.argsort(-ensemble, kind="stable")[:top_rows].tolist()
    explanations = model.explain(frame.iloc[idx], top=3) if idx else []
    tops = [
        TopRow(
            row=i,
            label=int(labels[i]),
            score=float(scores["ensemble"].iloc[i]),
            p_value=float(scores["ensemble_p"].iloc[i]),
            features=feats,  # explain gives plain, JSON-safe values
        )
        for i, feats in zip(idx, explanations, strict=True)
    ]
    meta = {
        "model": str(model_dir),
        "model_version": getattr(model, "version", None),
        "data": str(data_path),
        "label_column": label,
        "ignored_columns": ignored,
        "calibration_rows": model.calibrators_["ensemble"].n_,
    }
    html_path, json_path = write_report(report_dir, result, scores, labels, tops, meta)
    return result, html_path, json_path


def _model_columns(model: Any, frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep the columns the model's schema knows; labeled files often carry extra ones (the kind
    of anomaly, a comment) that the model must not see. A missing feature is left for the
    model's own check, which names it."""
    schema = getattr(model, "schema", None)
    if schema is None or not getattr(schema, "features", None):
        return frame, []
    known = [*schema.features, schema.id_field, schema.time_field, schema.entity_field]
    keep = [c for c in frame.columns if c in known]
    ignored = [str(c) for c in frame.columns if c not in known]
    return frame[keep], ignored
