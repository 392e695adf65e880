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


def _column_types(store: AlertStore, table: str) -> dict[str, str]:
    return {c["name"]: type(c["type"]).__name__ for c in inspect(store.engine).get_columns(table)}


@pytest.mark.postgres
def test_timestamps_are_timestamptz_and_alert_json_is_stored_as_text(pg_url: str) -> None:
    with AlertStore(pg_url) as store:
        store.upgrade()
        cols = {c["name"]: c["type"] for c in inspect(store.engine).get_columns("alerts")}
        assert cols["ingest_time"].timezone is True
        # The alert hot path stores its JSON verbatim (json); model metrics stay jsonb.
        types = _column_types(store, "alerts")
        assert [types[c] for c in ("fired_detectors", "top_features", "record")] == ["JSON"] * 3
        assert _column_types(store, "model_versions")["metrics"] == "JSONB"


def test_alert_json_migration_goes_down_and_up_keeping_the_rows(db_url: str) -> None:
    from storage_testlib import range_batch

    with AlertStore(db_url) as store:
        store.upgrade()
        batch = range_batch(0, 20)
        store.write_batch(batch)
        before = sorted(store.list_alerts(limit=None), key=lambda a: a["id"])
        assert before and before[0]["top_features"] and before[0]["record"]

        store.downgrade("0001")
        assert store.current_revision() == "0001"
        if store.dialect == "postgresql":
            assert _column_types(store, "alerts")["record"] == "JSONB"
        assert sorted(store.list_alerts(limit=None), key=lambda a: a["id"]) == before

        store.upgrade()
        assert store.current_revision() == head_revision()
        assert sorted(store.list_alerts(limit=None), key=lambda a: a["id"]) == before
        # Still idempotent on the new column types.
        assert store.write_batch(batch).alerts_written == 0


def test_entity_and_incident_lookups_use_the_partial_indexes(db_url: str) -> None:
    """ix_alerts_entity and ix_alerts_incident_id leave out NULLs (migration 0002); the equality
    lookups of the CLI, the prune and the foreign key's ON DELETE SET NULL must still use them."""
    from storage_testlib import range_batch

    with AlertStore(db_url) as store:
        store.upgrade()
        store.write_batch(range_batch(0, 300))
        with store.engine.connect() as conn:
            if store.dialect == "postgresql":
                conn.exec_driver_sql("SET enable_seqscan = off")
                conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
                conn.exec_driver_sql(
                    "PREPARE by_entity(text) AS SELECT id FROM alerts WHERE entity = $1"
                )
                # The statement PostgreSQL's foreign key runs when an incident is deleted.
                conn.exec_driver_sql(
                    "PREPARE set_null(bigint) AS UPDATE ONLY alerts SET incident_id = NULL "
                    "WHERE $1 OPERATOR(pg_catalog.=) incident_id"
                )
                plans = {
                    q: "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN EXECUTE {q}"))
                    for q in ("by_entity('card-1')", "set_null(1)")
                }
                predicates = dict(
                    conn.exec_driver_sql(
                        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'alerts'"
                    ).all()
                )
            else:
                plans = {
                    q: "\n".join(r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {q}"))
                    for q in (
                        "SELECT id FROM alerts WHERE entity = 'card-1'",
                        "SELECT id FROM alerts WHERE incident_id = 1",
                    )
                }
                predicates = dict(
                    conn.exec_driver_sql(
                        "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'alerts'"
                        " AND type = 'index' AND sql IS NOT NULL"
                    ).all()
                )
    entity_plan, incident_plan = plans.values()
    assert "ix_alerts_entity" in entity_plan, entity_plan
    assert "ix_alerts_incident_id" in incident_plan, incident_plan
    assert "entity IS NOT NULL" in predicates["ix_alerts_entity"]
    assert "incident_id IS NOT NULL" in predicates["ix_alerts_incident_id"]


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


def test_verdicts_migration_goes_down_and_up_leaving_the_alerts_alone(db_url: str) -> None:
    """0003 adds the verdicts table only; its downgrade drops it (and the verdicts) and keeps
    every alert; pruning an alert deletes its verdict (ON DELETE CASCADE on both dialects)."""
    from datetime import timedelta

    from sqlalchemy import insert
    from storage_testlib import range_batch

    from storage import schema as s

    with AlertStore(db_url) as store:
        store.upgrade()
        assert "verdicts" in _tables(store)
        store.write_batch(range_batch(0, 5))
        before = sorted(store.list_alerts(limit=None), key=lambda a: a["id"])
        first = before[0]
        with store.engine.begin() as conn:
            conn.execute(
                insert(s.verdicts),
                dict(
                    alert_id=first["id"],
                    verdict="true_positive",
                    verdict_by="ana",
                    verdict_at=first["ingest_time"],
                ),
            )
        store.downgrade("0002")
        assert "verdicts" not in _tables(store)
        assert sorted(store.list_alerts(limit=None), key=lambda a: a["id"]) == before
        store.upgrade()
        assert store.current_revision() == head_revision()
        with store.engine.begin() as conn:
            conn.execute(
                insert(s.verdicts),
                dict(
                    alert_id=first["id"],
                    verdict="false_positive",
                    verdict_by="ana",
                    verdict_at=first["ingest_time"],
                ),
            )
        store.prune(first["ingest_time"] + timedelta(days=3650))
        assert store.list_alerts(limit=None) == []
        with store.engine.connect() as conn:
            assert conn.execute(s.verdicts.select()).all() == []
