"""The evaluation report: one self-contained HTML file with embedded PNG plots, and JSON.

The HTML needs nothing but itself (plots are base64 PNGs drawn with matplotlib's Agg backend, the
style is inline), so it can be mailed, attached to a ticket or opened from an artifact store.
``report.json`` carries the same numbers for machines.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomaly.evaluation.metrics import EvaluationResult

HTML_NAME = "report.html"
JSON_NAME = "report.json"
COLORS = {
    "vae": "#1f77b4",
    "flow": "#2ca02c",
    "gan": "#9467bd",
    "knn": "#ff7f0e",
    "ensemble": "#d62728",
}


@dataclass
class TopRow:
    """One of the highest-scoring rows with the features that drove its score."""

    row: int  # position in the evaluated data (0-based)
    label: int
    score: float
    p_value: float | None
    features: list[dict[str, Any]] = field(default_factory=list)  # {feature, value, contribution}

    def to_dict(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "label": self.label,
            "score": self.score,
            "p_value": self.p_value,
            "top_features": self.features,
        }


def write_report(
    out_dir: str | Path,
    result: EvaluationResult,
    scores: pd.DataFrame,
    labels: np.ndarray,
    top_rows: Sequence[TopRow] = (),
    meta: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **(meta or {})}
    payload = {
        "meta": meta,
        **result.to_dict(),
        "top_rows": [t.to_dict() for t in top_rows],
    }
    json_path = out / JSON_NAME
    json_path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n", encoding="utf-8")
    html_path = out / HTML_NAME
    html_path.write_text(
        render_html(result, scores, np.asarray(labels), top_rows, meta), encoding="utf-8"
    )
    return html_path, json_path


def _jsonable(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Plots


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _figure().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _color(name: str, i: int) -> str:
    return COLORS.get(name, f"C{i % 10}")


def plot_curves(result: EvaluationResult, scores: pd.DataFrame, y: np.ndarray) -> tuple[str, str]:
    """ROC and precision-recall curves of every detector, as base64 PNGs."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _figure()
    # Alerts live at small false-positive rates: the right panel shows them on a log axis.
    roc_fig, (roc_ax, roc_log) = plt.subplots(1, 2, figsize=(10.4, 4.4))
    pr_fig, pr_ax = plt.subplots(figsize=(5.2, 4.4))
    for i, (name, m) in enumerate(result.detectors.items()):
        s = scores[name].to_numpy(dtype=np.float64)
        width = 2.4 if name == "ensemble" else 1.4
        fpr, tpr, _ = roc_curve(y, s)
        roc_ax.plot(fpr, tpr, color=_color(name, i), lw=width, label=f"{name} (AUC {m.auroc:.3f})")
        roc_log.plot(fpr, tpr, color=_color(name, i), lw=width, label=name)
        roc_log.plot(
            [max(m.observed_fpr, 1e-5)], [m.recall], "o", color=_color(name, i), ms=5, mec="black"
        )
        roc_ax.plot(
            [m.observed_fpr], [m.recall], "o", color=_color(name, i), ms=5, mec="black", mew=0.5
        )
        precision, recall, _ = precision_recall_curve(y, s)
        pr_ax.step(
            recall,
            precision,
            where="post",
            color=_color(name, i),
            lw=width,
            label=f"{name} (AP {m.auprc:.3f})",
        )
        pr_ax.plot(
            [m.recall], [m.precision], "o", color=_color(name, i), ms=5, mec="black", mew=0.5
        )
    roc_ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    roc_ax.set(
        xlabel="false-positive rate",
        ylabel="true-positive rate (recall)",
        title="ROC (dots: calibrated threshold)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    roc_ax.legend(loc="lower right", fontsize=8)
    roc_log.axvline(result.target_fpr, color="black", ls="--", lw=1, label="target FPR")
    roc_log.set(
        xscale="log",
        xlim=(max(1e-5, 0.5 / max(result.n_normals, 1)), 1),
        ylim=(0, 1.01),
        xlabel="false-positive rate (log)",
        ylabel="true-positive rate (recall)",
        title="ROC at low false-positive rates",
    )
    roc_log.legend(loc="upper left", fontsize=8)
    rate = result.anomaly_rate
    pr_ax.axhline(rate, ls=":", color="grey", lw=1, label=f"anomaly rate {rate:.3f}")
    pr_ax.set(
        xlabel="recall",
        ylabel="precision",
        title="Precision-recall (dots: calibrated threshold)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    pr_ax.legend(loc="lower left", fontsize=8)
    return _png(roc_fig), _png(pr_fig)


def _heavy_tailed(s: np.ndarray) -> bool:
    lo, q50, q99, hi = np.percentile(s, [0, 50, 99, 100])
    core = max(q99 - lo, 1e-12)
    return (hi - q50) > 20 * core or (q50 - lo) > 20 * core


def _signed_log(s: np.ndarray) -> np.ndarray:
    return np.sign(s) * np.log1p(np.abs(s))


def plot_histograms(result: EvaluationResult, scores: pd.DataFrame, y: np.ndarray) -> str:
    """Score histograms of normal vs anomalous rows per detector, with the threshold line."""
    plt = _figure()
    names = list(result.detectors)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        m = result.detectors[name]
        s = scores[name].to_numpy(dtype=np.float64)
        threshold = m.threshold
        # Scores such as a flow's negative log-likelihood can span many orders of magnitude on
        # anomalies; a signed log keeps both the normal bulk and the tail readable.
        log = _heavy_tailed(s)
        t = _signed_log(s) if log else s
        bins = np.histogram_bin_edges(t, bins=50)
        ax.hist(t[y == 0], bins=bins, density=True, alpha=0.55, color="#4c72b0", label="normal")
        ax.hist(t[y == 1], bins=bins, density=True, alpha=0.55, color="#dd8452", label="anomalous")
        if threshold is not None:
            tx = float(_signed_log(np.array([threshold]))[0]) if log else threshold
            ax.axvline(tx, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
        ax.set_title(f"{name}: {m.alerts} alerts, recall {m.recall:.2f}, FPR {m.observed_fpr:.4f}")
        ax.set_xlabel("sign(score)·log(1+|score|)" if log else "score")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_top_features(top_rows: Sequence[TopRow]) -> str | None:
    """Total contribution of each feature over the highest-scoring rows."""
    totals: dict[str, float] = {}
    for row in top_rows:
        for f in row.features:
            totals[f["feature"]] = totals.get(f["feature"], 0.0) + abs(float(f["contribution"]))
    if not totals:
        return None
    plt = _figure()
    items = sorted(totals.items(), key=lambda kv: kv[1])[-15:]
    fig, ax = plt.subplots(figsize=(6.0, 0.35 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#d62728")
    ax.set_xlabel("summed |contribution| over the top rows")
    ax.set_title(f"Features behind the {len(top_rows)} highest-scoring rows")
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------------------------
# HTML

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1150px;color:#222;padding:0 1rem}
h1{font-size:1.6rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:0.5rem 0;font-size:0.9rem}
th,td{border:1px solid #ddd;padding:0.3rem 0.6rem;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left}
.bad{color:#b00020;font-weight:600} .ok{color:#1b7f3b}
.plots img{max-width:100%;margin:0.3rem} .muted{color:#666;font-size:0.85rem}
"""


def _f(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def render_html(
    result: EvaluationResult,
    scores: pd.DataFrame,
    y: np.ndarray,
    top_rows: Sequence[TopRow],
    meta: dict[str, Any],
) -> str:
    esc = html.escape
    roc_png, pr_png = plot_curves(result, scores, y)
    hist_png = plot_histograms(result, scores, y)
    feat_png = plot_top_features(top_rows)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Anomaly model evaluation — {esc(str(meta.get('model', '')))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Anomaly model evaluation</h1>",
        "<table>",
    ]
    keys = ("model", "model_version", "calibration_rows", "data", "label_column", "ignored_columns")
    for key in (*keys, "created_at"):
        if meta.get(key):
            value = esc(_meta_text(meta[key]))
            parts.append(f'<tr><th class="l">{esc(key)}</th><td class="l">{value}</td></tr>')
    parts += [
        f'<tr><th class="l">rows</th><td class="l">{result.n_rows} '
        f"({result.n_anomalies} anomalous, {result.n_normals} normal; anomaly rate "
        f"{result.anomaly_rate:.4f})</td></tr>",
        f'<tr><th class="l">target false-positive rate</th><td class="l">'
        f'<span id="target-fpr">{result.target_fpr:g}</span></td></tr>',
        "</table>",
        "<h2>Metrics</h2>",
        '<p class="muted">AUROC and AUPRC (average precision) use the raw scores; precision, '
        "recall, F1 and the observed false-positive rate use the calibrated threshold (a row is "
        "an alert when its conformal p-value is at most the target). The observed rate counts "
        "alerts among the normal rows; 0.5x–1.5x of the target is marked as expected.</p>",
        '<table id="metrics"><tr><th class="l">detector</th><th>AUROC</th><th>AUPRC</th>'
        "<th>threshold</th><th>alerts</th><th>precision</th><th>recall</th><th>F1</th>"
        "<th>observed FPR</th><th>observed / target</th><th>TP</th><th>FP</th><th>FN</th>"
        "<th>TN</th></tr>",
    ]
    for name, m in result.detectors.items():
        cls = "ok" if 0.5 <= m.fpr_ratio <= 1.5 else "bad"
        parts.append(
            f'<tr data-detector="{esc(name)}"><td class="l">{esc(name)}</td>'
            f"<td>{_f(m.auroc)}</td><td>{_f(m.auprc)}</td>"
            f'<td class="threshold">{_f(m.threshold, 6) if m.threshold is not None else "–"}</td>'
            f"<td>{m.alerts}</td><td>{_f(m.precision)}</td><td>{_f(m.recall)}</td>"
            f"<td>{_f(m.f1)}</td><td>{_f(m.observed_fpr, 5)}</td>"
            f'<td class="{cls}">{m.fpr_ratio:.2f}x</td><td>{m.true_positives}</td>'
            f"<td>{m.false_positives}</td><td>{m.false_negatives}</td>"
            f"<td>{m.true_negatives}</td></tr>"
        )
    parts.append("</table>")
    n_cal = meta.get("calibration_rows")
    if n_cal is not None and np.floor(result.target_fpr * (n_cal + 1) + 1e-9) < 1:
        parts.append(
            f'<p class="bad" id="unreachable">The model was calibrated on {n_cal} normal rows: '
            f"its smallest p-value is 1/{n_cal + 1}, above the target {result.target_fpr:g}, so "
            "no row can alert. Train on more normal rows (about 4/target) for this target.</p>"
        )
    if result.n_normals * result.target_fpr < 10:
        parts.append(
            f'<p class="muted">Only {result.n_normals} normal rows: at a target of '
            f"{result.target_fpr:g} fewer than 10 false positives are expected, so the observed "
            "rate is a rough indication only.</p>"
        )
    parts += [
        "<h2>ROC and precision-recall curves</h2>",
        f'<div class="plots">{_img(roc_png, "ROC curves")}{_img(pr_png, "PR curves")}</div>',
        "<h2>Score distributions</h2>",
        f'<div class="plots">{_img(hist_png, "score histograms with threshold")}</div>',
    ]
    if top_rows:
        parts.append(f"<h2>The {len(top_rows)} highest-scoring rows</h2>")
        if feat_png:
            parts.append(f'<div class="plots">{_img(feat_png, "top features")}</div>')
        parts.append(
            '<table id="top-rows"><tr><th>row</th><th>label</th><th>ensemble score</th>'
            '<th>p-value</th><th class="l">top features (value, contribution)</th></tr>'
        )
        for t in top_rows:
            feats = "; ".join(
                f"{esc(str(f['feature']))} = {_value(f.get('value'))} "
                f"({float(f['contribution']):.3g})"
                for f in t.features
            )
            parts.append(
                f"<tr><td>{t.row}</td><td>{t.label}</td><td>{_f(t.score)}</td>"
                f'<td>{_f(t.p_value, 6)}</td><td class="l">{feats}</td></tr>'
            )
        parts.append("</table>")
    parts.append(
        '<p class="muted">Generated by <code>anomaly evaluate</code>; the same numbers are in '
        f"{JSON_NAME}.</p></body></html>"
    )
    return "\n".join(parts)


def _meta_text(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def top_scoring_rows(
    scores: pd.DataFrame, labels: np.ndarray, n: int, detector: str = "ensemble"
) -> list[int]:
    """Positions of the ``n`` highest-scoring rows (ties keep the data order)."""
    s = scores[detector].to_numpy(dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    return [int(i) for i in order[: max(0, n)]]


__all__ = [
    "HTML_NAME",
    "JSON_NAME",
    "TopRow",
    "render_html",
    "top_scoring_rows",
    "write_report",
]
