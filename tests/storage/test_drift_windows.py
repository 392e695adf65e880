"""Drift windows in SQL (migration 0004), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from anomaly.monitoring.drift import DriftReport
from storage import AlertStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def report(hour: int, drifted: bool = False, **kw) -> DriftReport:
    values = {
        "pipeline": "p",
        "model_version": "v1",
        "window_start": T0 + timedelta(hours=hour),
        "window_end": T0 + timedelta(hours=hour + 1),
        "records": 1000,
        "alerts": 12,
        "expected_alert_rate": 0.01,
        "alert_rate_p": 0.4,
        "ks_stat": 0.02,
        "ks_p": 0.7,
        "features": [{"feature": "amount", "psi": 0.31 if drifted else 0.01}],
        "drifted": drifted,
        "reasons": ["amount: PSI 0.310"] if drifted else [],
    }
    return DriftReport(**{**values, **kw})


def test_windows_are_written_and_listed(store: AlertStore) -> None:
    store.write_drift_window(report(0))
    store.write_drift_window(report(1, drifted=True))
    store.write_drift_window(report(2, pipeline="other"))
    # A small window: no tests, NULLs.
    store.write_drift_window(report(3, alert_rate_p=None, ks_stat=None, ks_p=None, records=5))
    rows = store.list_drift_windows("p")
    assert [r["window_start"] for r in rows] == [
        T0,
        T0 + timedelta(hours=1),
        T0 + timedelta(hours=3),
    ]
    assert rows[1]["drifted"] is True and rows[1]["top_features"][0]["feature"] == "amount"
    assert rows[1]["reasons"] == ["amount: PSI 0.310"]
    assert rows[2]["ks_p"] is None and rows[2]["records"] == 5
    assert len(store.list_drift_windows("p", since=T0 + timedelta(minutes=30))) == 2
    assert len(store.list_drift_windows()) == 4
