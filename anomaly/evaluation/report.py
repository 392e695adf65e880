"""The evaluation report: one self-contained HTML file with embedded PNG plots, and JSON.

The HTML needs nothing but itself (plots are base64 PNGs drawn with matplotlib's Agg backend, the
style is inline), so it can be mailed, attached to a ticket or opened from an artifact store.
``report.json`` carries the same numbers for machines.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from anomaly.estimator.calibration import alert_rank
from anomaly.estimator.explain import json_safe
from anomaly.evaluation import plots
from anomaly.evaluation.metrics import EvaluationResult, TopRow

HTML_NAME = "report.html"
JSON_NAME = "report.json"


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
    json_path.write_text(json.dumps(json_safe(payload), indent=2) + "\n", encoding="utf-8")
    html_path = out / HTML_NAME
    html_path.write_text(
        render_html(result, scores, np.asarray(labels), top_rows, meta), encoding="utf-8"
    )
    return html_path, json_path


# The HTML is ``report.html.j2`` beside this module; the filters below format its numbers.
TEMPLATE = "report.html.j2"
META_KEYS = (
    "model",
    "model_version",
    "calibration_rows",
    "data",
    "label_column",
    "ignored_columns",
    "created_at",
)


def render_html(
    result: EvaluationResult,
    scores: pd.DataFrame,
    y: np.ndarray,
    top_rows: Sequence[TopRow],
    meta: dict[str, Any],
) -> str:
    roc_png, pr_png = plots.plot_curves(result, scores, y)
    n_cal = meta.get("calibration_rows")
    return _template().render(
        result=result,
        meta=meta,
        meta_keys=META_KEYS,
        top_rows=top_rows,
        roc_png=roc_png,
        pr_png=pr_png,
        hist_png=plots.plot_histograms(result, scores, y),
        feat_png=plots.plot_top_features(top_rows),
        # The smallest p-value calibration on n_cal rows can give, 1/(n_cal+1), is above target.
        unreachable=n_cal is not None and alert_rank(n_cal, result.target_fpr) < 1,
        few_normals=result.n_normals * result.target_fpr < 10,
        json_name=JSON_NAME,
    )


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(fixed=_f, fmt=format, meta_text=_meta_text, feature_value=_value)
    source = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    return env.from_string(source)


def _f(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def _meta_text(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
