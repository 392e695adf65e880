"""The evaluation report's plots, drawn with matplotlib's Agg backend and returned as base64 PNGs
(embedded in the HTML, so the report needs nothing but itself)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from anomaly.evaluation.metrics import EvaluationResult, TopRow

COLORS = {
    "vae": "#1f77b4",
    "flow": "#2ca02c",
    "gan": "#9467bd",
    "knn": "#ff7f0e",
    "knn_linear": "#8c564b",
    "ensemble": "#d62728",
}


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


def plot_curves(result: EvaluationResult, scores: pd.DataFrame, y: np.ndarray) -> tuple[str, str]:
    """ROC and precision-recall curves of every detector, as base64 PNGs."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _figure()
    # Alerts live at small false-positive rates: the right panel shows them on a log axis.
    roc_fig, (roc_ax, roc_log) = plt.subplots(1, 2, figsize=(10.4, 4.4))
    pr_fig, pr_ax = plt.subplots(figsize=(5.2, 4.4))
    for i, (name, m) in enumerate(result.detectors.items()):
        s = scores[name].to_numpy(dtype=np.float64)
        color = COLORS.get(name, f"C{i % 10}")
        width = 2.4 if name == "ensemble" else 1.4
        fpr, tpr, _ = roc_curve(y, s)
        roc_ax.plot(fpr, tpr, color=color, lw=width, label=f"{name} (AUC {m.auroc:.3f})")
        roc_log.plot(fpr, tpr, color=color, lw=width, label=name)
        roc_log.plot([max(m.observed_fpr, 1e-5)], [m.recall], "o", color=color, ms=5, mec="black")
        roc_ax.plot([m.observed_fpr], [m.recall], "o", color=color, ms=5, mec="black", mew=0.5)
        precision, recall, _ = precision_recall_curve(y, s)
        label = f"{name} (AP {m.auprc:.3f})"
        pr_ax.step(recall, precision, where="post", color=color, lw=width, label=label)
        pr_ax.plot([m.recall], [m.precision], "o", color=color, ms=5, mec="black", mew=0.5)
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
