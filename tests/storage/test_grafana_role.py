"""The read-only role for Grafana can SELECT the tables and change nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, exc, text
from sqlalchemy.engine import make_url
from storage_testlib import range_batch

from anomaly.cli import main
from storage import AlertStore

ROLE = "anomaly_grafana_test"


@pytest.mark.postgres
def test_grafana_role_reads_but_cannot_write(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    with AlertStore(pg_url) as store:
        store.upgrade()
        store.write_batch(range_batch(0, 30))
    monkeypatch.setenv("GRAFANA_DB_PASSWORD", "s3cret'quote")
    args = ["db", "grafana-role", "--db", pg_url, "--role", ROLE]
    assert main([*args, "--password-env", "GRAFANA_DB_PASSWORD"]) == 0
    assert main(args) == 0  # idempotent
    assert f"role {ROLE} can read" in capsys.readouterr().out

    url = make_url(pg_url).set(username=ROLE, password="s3cret'quote")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            for table in ("alerts", "incidents", "stream_stats", "consumer_offsets"):
                assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() > 0
        with pytest.raises(exc.DBAPIError), engine.begin() as conn:
            conn.execute(text("UPDATE alerts SET status = 'resolved'"))
        with pytest.raises(exc.DBAPIError), engine.begin() as conn:
            conn.execute(text("DELETE FROM consumer_offsets"))
    finally:
        engine.dispose()

    assert main([*args[:-2], "--role", "Robert'); DROP TABLE alerts;--"]) == 2
    assert "role name" in capsys.readouterr().err


def test_grafana_role_needs_postgresql(sqlite_url: str, capsys) -> None:
    assert main(["db", "grafana-role", "--db", sqlite_url]) == 2
    assert "needs PostgreSQL" in capsys.readouterr().err
