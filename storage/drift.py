"""Drift windows (anomaly.monitoring.drift): one row per closed window, and the CLI's query.

Written outside the batch transaction, once per window: a drift row is a summary for people, not
part of the exactly-once accounting (a window open when the service stops is not stored).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select

from storage import schema as s
from storage.engine import Database, utc
from storage.queries import matching
from storage.sanitize import clean_text


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def write_window(db: Database, report: Any) -> None:
    """Insert one ``DriftReport``."""
    row = {
        "pipeline": report.pipeline,
        "model_version": (
            clean_text(report.model_version, s.MODEL_VERSION_LEN)
            if report.model_version is not None
            else None
        ),
        "window_start": utc(report.window_start),
        "window_end": utc(report.window_end),
        "records": int(report.records),
        "alerts": int(report.alerts),
        "expected_alert_rate": _finite(report.expected_alert_rate),
        "alert_rate_p": _finite(report.alert_rate_p),
        "ks_stat": _finite(report.ks_stat),
        "ks_p": _finite(report.ks_p),
        "top_features": list(report.features),
        "drifted": bool(report.drifted),
        "reasons": list(report.reasons),
    }
    with db.transaction("writing a drift window") as conn:
        conn.execute(insert(s.drift_windows), [row])


def list_windows(
    db: Database, pipeline: str | None, since: datetime | None, limit: int | None
) -> list[dict[str, Any]]:
    """Drift windows, oldest first, that started at or after ``since``."""
    t = s.drift_windows
    query = matching(select(t), t, pipeline=pipeline).order_by(t.c.window_start, t.c.id)
    if since is not None:
        query = query.where(t.c.window_start >= utc(since))
    return db.rows("listing drift windows", query.limit(limit))
