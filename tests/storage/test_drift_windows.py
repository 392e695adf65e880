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


def test_drift_command_names_the_features_that_moved(
    store: AlertStore, db_url: str, tmp_path, capsys
) -> None:
    import json

    import yaml

    from anomaly.cli import main

    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    hour = timedelta(hours=1)
    for i, drifted in enumerate([False, True, True]):
        start = now - (3 - i) * hour
        store.write_drift_window(
            report(0, drifted=drifted, window_start=start, window_end=start + hour)
        )
    old = now - timedelta(days=3)
    store.write_drift_window(report(0, True, window_start=old, window_end=old + hour))

    config = tmp_path / "p.yaml"
    config.write_text(
        yaml.safe_dump(
            {"name": "p", "schema": {"numeric": ["amount"]}, "database": {"url": db_url}}
        )
    )
    assert main(["drift", "--config", str(config), "--since", "24h"]) == 0
    out = capsys.readouterr().out
    assert "pipeline p: 3 windows" in out and "2 drifted" in out
    assert "features that moved (PSI > 0.2):" in out
    assert "amount: 2 window(s), max PSI 0.310" in out

    assert main(["drift", "--db", db_url, "--pipeline", "p", "--since", "7d", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4

    assert main(["drift", "--db", db_url, "--pipeline", "nobody"]) == 0
    assert "no drift windows for pipeline nobody" in capsys.readouterr().out

    assert main(["drift", "--config", str(config), "--since", "yesterday"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--since 'yesterday'" in err[0]
