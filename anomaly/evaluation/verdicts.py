"""``anomaly evaluate --from-db``: what analysts' verdicts on alerts can and cannot tell.

The labels are verdicts on *alerts* (``anomaly alerts ack ID --verdict ...``): every labeled row
is a record some model version alerted on, and nothing is known about the records that raised no
alert. So this report measures

- precision as alerted: among the reviewed alerts, the share analysts confirmed, per model
  version, with a 95% (Wilson) interval and the share of alerts that were reviewed;
- with ``--model``, the reviewed alerts re-scored by that model: how many confirmed and how many
  rejected alerts it would still flag at its threshold (precision among those), and how well its
  score ranks confirmed above rejected alerts (AUROC among reviewed alerts);

and says plainly what it cannot: recall (missed anomalies raised no alert, so none were
reviewed), the false-positive rate on traffic (normal records that raised no alert are not in
the data), and AUROC/AUPRC over all records. It is deliberately not the labeled-data report of
``anomaly evaluate --data``, whose recall and false-positive columns would be computed here over
alerts only and read as something they are not.

The database part lives in ``storage`` (which builds ``VerdictData``); this module sees no SQL.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomaly.errors import DataError
from anomaly.evaluation.metrics import alerts_for, fpr_interval, model_thresholds

JSON_NAME = "report.json"
HTML_NAME = "report.html"

CANNOT_MEASURE = {
    "recall": "anomalies that raised no alert were never reviewed, so how many were missed is "
    "unknown; review a random sample of non-alerted records to measure it",
    "false_positive_rate": "normal records that raised no alert are not in the data: the rate "
    "of false alerts among all normal traffic needs them (the Alerts dashboard's alert rate "
    "against the target is the live proxy)",
    "auroc_auprc_over_all_records": "the score's ranking is only seen among alerts, all of which "
    "scored above some model's threshold",
}


@dataclass(slots=True)
class VerdictData:
    """Reviewed alerts as a labeled frame: ``frame`` holds the stored records (one row per
    reviewed alert, the fields the model scored), ``labels`` 1 for true_positive and 0 for
    false_positive, ``model_versions`` the version that raised each alert, ``alerts`` the number
    of alerts (reviewed or not) per model version in the same scope, ``scope`` what was selected
    (pipeline, time range, database)."""

    frame: pd.DataFrame
    labels: np.ndarray
    model_versions: list[str]
    alerts: dict[str, int]
    scope: dict[str, Any] = field(default_factory=dict)


def _precision_row(version: str, alerts: int, y: np.ndarray) -> dict[str, Any]:
    reviewed, tp = len(y), int(y.sum())
    return {
        "model_version": version,
        "alerts": alerts,
        "reviewed": reviewed,
        "review_coverage": reviewed / alerts if alerts else None,
        "true_positives": tp,
        "false_positives": reviewed - tp,
        "precision": tp / reviewed if reviewed else None,
        "precision_95ci": fpr_interval(tp, reviewed) if reviewed else None,
    }


def as_alerted(data: VerdictData) -> list[dict[str, Any]]:
    """Precision as alerted per model version, then ``all`` versions together."""
    versions = np.asarray(data.model_versions, dtype=object)
    rows = [
        _precision_row(v, data.alerts.get(v, 0), data.labels[versions == v])
        for v in sorted(set(data.alerts) | set(data.model_versions))
    ]
    rows.append(_precision_row("all", sum(data.alerts.values()), data.labels))
    return rows


def rescored(data: VerdictData, model_dir: str, target_fpr: float | None, device: str) -> dict:
    """The reviewed alerts scored by the model in ``model_dir``: what it would still flag."""
    from anomaly.estimator.model import AnomalyModel
    from anomaly.evaluation.run import _model_columns

    if not Path(model_dir).exists():
        raise DataError(f"model directory not found: {model_dir}")
    model = AnomalyModel.load(model_dir, device=device)
    frame, ignored = _model_columns(model, data.frame)
    target = float(target_fpr if target_fpr is not None else model.target_fpr)
    scores = model.score_detectors(frame)
    threshold = model_thresholds(model, target).get("ensemble")
    flagged = alerts_for(scores, "ensemble", target, threshold)
    y = data.labels.astype(bool)
    tp, fp = int(np.sum(flagged & y)), int(np.sum(flagged & ~y))
    auroc = None
    if y.any() and (~y).any():
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(y, scores["ensemble"].to_numpy(dtype=np.float64)))
    return {
        "model": str(model_dir),
        "model_version": getattr(model, "version", None),
        "target_fpr": target,
        "threshold": threshold,
        "ignored_columns": ignored,
        "flagged": int(flagged.sum()),
        "flagged_true_positives": tp,
        "flagged_false_positives": fp,
        "precision_among_flagged": tp / (tp + fp) if tp + fp else None,
        "confirmed_still_flagged": tp / int(y.sum()) if y.any() else None,
        "rejected_still_flagged": fp / int((~y).sum()) if (~y).any() else None,
        "auroc_among_reviewed_alerts": auroc,
    }


def run_verdict_evaluation(
    data: VerdictData,
    report_dir: str,
    model_dir: str | None = None,
    target_fpr: float | None = None,
    device: str = "auto",
) -> tuple[dict[str, Any], Path, Path]:
    """Measure what the verdicts can tell; write DIR/report.json and DIR/report.html."""
    if target_fpr is not None and not 0.0 < target_fpr < 1.0:
        raise DataError(f"--target-fpr must be in (0, 1), got {target_fpr}")
    if len(data.labels) == 0:
        raise DataError(
            "no reviewed alerts in scope: record verdicts with "
            "`anomaly alerts ack ID --verdict true_positive|false_positive`"
        )
    report = {
        "kind": "verdicts",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scope": data.scope,
        "labels": "analyst verdicts on alerts (true_positive = 1, false_positive = 0); "
        "reviewed alerts only",
        "measures": "precision among reviewed alerts; with a model, which reviewed alerts it "
        "would still flag and how well its score separates confirmed from rejected alerts",
        "cannot_measure": CANNOT_MEASURE,
        "as_alerted": as_alerted(data),
        "rescored": rescored(data, model_dir, target_fpr, device) if model_dir else None,
    }
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / JSON_NAME, out / HTML_NAME
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return report, html_path, json_path


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, tuple | list):
        numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in value)
        if len(value) == 2 and numbers:  # a confidence interval
            return f"{value[0]:.3f}–{value[1]:.3f}"
        return html.escape(", ".join(map(str, value)))  # e.g. the rescored section's columns
    return html.escape(str(value))


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    scope = "".join(
        f"<tr><th class='l'>{e(str(k))}</th><td class='l'>{_fmt(v)}</td></tr>"
        for k, v in report["scope"].items()
        if v is not None
    )
    cols = list(report["as_alerted"][0])  # _precision_row's fields (there is always the "all" row)
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r[c])}</td>" for c in cols) + "</tr>"
        for r in report["as_alerted"]
    )
    cannot = "".join(
        f"<li><b>{e(k.replace('_', ' '))}</b>: {e(v)}</li>"
        for k, v in report["cannot_measure"].items()
    )
    rescore = ""
    if report["rescored"]:
        r = report["rescored"]
        rescore = (
            "<h2>Reviewed alerts re-scored by the model</h2>"
            "<p class='muted'>Among reviewed alerts only: the share of confirmed alerts the model "
            "still flags is not recall, and the share of rejected alerts it still flags is not "
            "a false-positive rate.</p><table id='rescored'>"
            + "".join(
                f"<tr><th class='l'>{e(k)}</th><td class='l'>{_fmt(v)}</td></tr>"
                for k, v in r.items()
            )
            + "</table>"
        )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>Analyst verdicts: precision among reviewed alerts</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1000px;color:#222}"
        "table{border-collapse:collapse;margin:0.5rem 0;font-size:0.9rem}"
        "th,td{border:1px solid #ddd;padding:0.3rem 0.6rem;text-align:right}"
        "th{background:#f4f4f4} .l{text-align:left} .muted{color:#666}"
        ".scope{border-left:4px solid #b00020;padding:0.5rem 1rem;background:#fff4f4}"
        "</style></head><body><h1>Analyst verdicts: precision among reviewed alerts</h1>"
        "<div class='scope' id='scope-note'><p>The labels are analysts' verdicts on alerts. "
        "Every labeled record raised an alert, so this report measures <b>precision among "
        "reviewed alerts</b> and nothing about the records that raised none. It cannot "
        f"measure:</p><ul>{cannot}</ul></div>"
        f"<table>{scope}</table>"
        "<h2>Precision as alerted</h2><p class='muted'>Per model version that raised the "
        "alerts: true positives / reviewed, with a 95% Wilson interval. Reviewed alerts may not "
        "be a random sample of all alerts (review coverage shows how many were).</p>"
        f"<table id='as-alerted'><tr>{head}</tr>{body}</table>{rescore}"
        f"<p class='muted'>Generated by <code>anomaly evaluate --from-db</code>; the same "
        f"numbers are in {JSON_NAME}.</p></body></html>\n"
    )
