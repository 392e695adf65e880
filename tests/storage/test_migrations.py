"""Migrations up and down on both dialects, matching the SQLAlchemy metadata exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from storage import AlertStore
from storage.migrate import head_revision
from storage.schema import TABLES, metadata

TABLE_NAMES = {t.name for t in TABLES}


def _tables(store: AlertStore) -> set[str]:
    return set(inspect(store.engine).get_table_names()) - {"alembic_version"}


def test_upgrade_creates_the_schema_and_downgrade_removes_it(db_url: str) -> None:
    with AlertStore(db_url) as store:
        assert store.current_revision() is None
        store.upgrade()
        assert store.current_revision() == head_revision()
        assert _tables(store) == TABLE_NAMES
        with store.engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), metadata
            )
        assert diff == [], f"migrations and storage/schema.py differ: {diff}"
        indexes = {ix["name"] for ix in inspect(store.engine).get_indexes("alerts")}
        assert {"ix_alerts_pipeline_ingest_time", "ix_alerts_entity"} <= indexes

        store.upgrade()  # idempotent
        assert store.current_revision() == head_revision()

        store.downgrade("base")
        assert store.current_revision() is None
        assert _tables(store) == set()

        store.upgrade()  # and back up again after a full downgrade
        assert _tables(store) == TABLE_NAMES


@pytest.mark.postgres
def test_timestamps_are_timestamptz_and_json_is_jsonb(pg_url: str) -> None:
    with AlertStore(pg_url) as store:
        store.upgrade()
        cols = {c["name"]: c["type"] for c in inspect(store.engine).get_columns("alerts")}
        assert cols["ingest_time"].timezone is True
        assert type(cols["record"]).__name__ == "JSONB"


def test_cli_upgrade_works_from_any_directory(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from anomaly.cli import main

    monkeypatch.chdir(tmp_path)  # no alembic.ini here
    assert main(["db", "upgrade", "--db", db_url]) == 0
    assert f"at revision {head_revision()}" in capsys.readouterr().out
    assert main(["db", "current", "--db", db_url]) == 0
    assert capsys.readouterr().out.strip() == head_revision()
    assert main(["db", "downgrade", "--db", db_url, "--to", "base"]) == 0
    with AlertStore(db_url) as store:
        assert _tables(store) == set()
