"""prune removes what is older than the cutoff and nothing else."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import create_engine, text
from storage_testlib import alert, dead_letter, reservoir_counts, reservoir_row, table_rows

from storage import AlertStore
from storage.records import (
    ModelVersionRecord,
    OffsetRecord,
    ReservoirRecord,
    SinkBatch,
    StreamStatRecord,
)

NOW = datetime.now(UTC).replace(microsecond=0)
OLD = NOW - timedelta(days=40)
NEW = NOW - timedelta(days=2)


def _batch(pipeline: str, when: datetime, first: int, entity: str) -> SinkBatch:
    alerts = [
        alert(first + i, pipeline=pipeline, entity=entity, event_time=when + timedelta(seconds=i))
        for i in range(3)
    ]
    dl = dead_letter(first + 3, pipeline=pipeline)
    dl.created_at = when
    return SinkBatch(
        pipeline,
        alerts=alerts,
        dead_letters=[dl],
        stats=[StreamStatRecord(pipeline, when, records_seen=4)],
        offsets=[OffsetRecord(pipeline, "tx", 0, first + 4)],
    )


def test_prune_removes_only_old_rows(store: AlertStore) -> None:
    store.register_model_version(
        ModelVersionRecord("cards", "v0", "/m/v0", "a" * 64, created_at=OLD - timedelta(days=9))
    )
    for pipeline in ("cards", "machines"):
        store.write_batch(_batch(pipeline, OLD, 0, "old-entity"))
        store.write_batch(_batch(pipeline, NEW, 10, "new-entity"))
    # A late record: old event time, recent ingest. Its alert stays, and so does its incident
    # (last seen long ago) because the alert still refers to it.
    late = alert(20, entity="late", event_time=OLD, ingest_time=NEW)
    store.write_batch(SinkBatch("cards", alerts=[late]))
    before = {n: len(table_rows(store, n)) for n in ("alerts", "incidents", "dead_letters")}

    result = store.prune(timedelta(days=30), pipeline="cards")
    assert (result.alerts, result.dead_letters, result.stream_stats) == (3, 1, 1)
    assert result.incidents == 1  # cards/old-entity; "late" is still referred to
    cards = store.list_alerts(pipeline="cards", limit=None)
    assert cards and all(a["ingest_time"] >= NOW - timedelta(days=30) for a in cards)
    assert len(store.list_alerts(pipeline="machines", limit=None)) == 6  # other pipeline kept

    result = store.prune(NOW - timedelta(days=30))  # a datetime cutoff, all pipelines
    assert (result.alerts, result.dead_letters, result.stream_stats, result.incidents) == (
        3,
        1,
        1,
        1,
    )
    after = {n: len(table_rows(store, n)) for n in ("alerts", "incidents", "dead_letters")}
    assert after == {
        "alerts": before["alerts"] - 6,
        "incidents": before["incidents"] - 2,
        "dead_letters": before["dead_letters"] - 2,
    }
    assert all(i["last_seen"] >= NEW or i["entity"] == "late" for i in store.list_incidents())
    # Offsets and model versions are never pruned.
    assert store.load_offsets("cards", "tx") == {0: 14}
    assert [v.version for v in store.list_model_versions("cards")] == ["v0"]
    assert store.prune(timedelta(days=30)).alerts == 0


def test_prune_removes_old_drift_windows_and_reservoir_records(store: AlertStore) -> None:
    from sqlalchemy import insert

    from anomaly.monitoring.drift import DriftReport
    from storage import schema as s

    for pipeline in ("cards", "machines"):
        for when in (OLD, NEW):
            store.write_drift_window(
                DriftReport(
                    pipeline=pipeline, model_version="v1", window_start=when - timedelta(hours=1),
                    window_end=when, records=10, alerts=0, expected_alert_rate=0.01,
                    alert_rate_p=None, ks_stat=None, ks_p=None, features=[], drifted=False,
                )
            )  # fmt: skip
    with store.engine.begin() as conn:
        conn.execute(
            insert(s.reservoir),
            [
                reservoir_row(pipeline, offset, when)
                for offset, (pipeline, when) in enumerate(
                    [("cards", OLD), ("cards", NEW), ("machines", OLD), ("machines", NEW)]
                )
            ],
        )  # fmt: skip

    result = store.prune(timedelta(days=30), pipeline="cards")
    assert (result.drift_windows, result.reservoir) == (1, 1)
    result = store.prune(timedelta(days=30))
    assert (result.drift_windows, result.reservoir) == (1, 1)  # the other pipeline's old rows
    assert [w["window_end"] for w in store.list_drift_windows()] == [NEW, NEW]
    with store.engine.connect() as conn:
        kept = conn.execute(s.reservoir.select().order_by(s.reservoir.c.id)).mappings().all()
    assert [(r["pipeline"], r["sampled_at"]) for r in kept] == [("cards", NEW), ("machines", NEW)]
    # The rows above were inserted by hand, past the reservoir's count: prune counts them.
    assert reservoir_counts(store) == {"cards": 1, "machines": 1}


def _lock_waiters(engine: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        ).scalar_one()


def _wait_for_lock_waiters(engine: Any, n: int) -> None:
    deadline = time.monotonic() + 20
    while _lock_waiters(engine) < n:
        assert time.monotonic() < deadline, f"fewer than {n} sessions ever waited on a lock"
        time.sleep(0.05)


def test_prune_never_takes_an_incident_a_batch_is_joining(pg_url: str) -> None:
    """A late event's alert joins an open incident last seen before the cutoff (joinable by
    event time, its old alerts pruned). Prune runs while that batch is between its alert insert
    and its commit: the incident must keep its new alert, not vanish under it."""
    with AlertStore(pg_url, incident_window_s=600) as store:
        store.upgrade()
        old_alert = alert(0, entity="card-9", event_time=OLD, ingest_time=OLD)
        store.write_batch(SinkBatch("cards", alerts=[old_alert]))
        engine = create_engine(pg_url)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO reservoir_counts VALUES ('cards', 0)"))
        # The batch stops before its commit on this lock (its reservoir count), after its alert
        # and incident writes.
        blocker = engine.connect()
        blocker.execute(text("SELECT * FROM reservoir_counts FOR UPDATE"))
        late = alert(1, entity="card-9", event_time=OLD + timedelta(seconds=60), ingest_time=NOW)
        sampled = ReservoirRecord(
            "cards", "tx", 0, 1, priority=0.5, alerted=True, model_version="v1",
            sampled_at=NOW, record={"id": "rec-1"},
        )  # fmt: skip
        batch = SinkBatch("cards", alerts=[late], reservoir=[sampled], reservoir_size=100)
        outcome: dict[str, Any] = {}

        def run(name: str, fn: Any) -> threading.Thread:
            def target() -> None:
                try:
                    outcome[name] = fn()
                except Exception as exc:  # asserted below
                    outcome[name] = exc

            thread = threading.Thread(target=target)
            thread.start()
            return thread

        writer = run("batch", lambda: store.write_batch(batch))
        _wait_for_lock_waiters(engine, 1)
        pruner = run("prune", lambda: store.prune(timedelta(days=30)))
        _wait_for_lock_waiters(engine, 2)
        blocker.rollback()
        blocker.close()
        writer.join(30)
        pruner.join(30)
        engine.dispose()
        assert outcome["batch"].alerts_written == 1, outcome
        assert (outcome["prune"].alerts, outcome["prune"].incidents) == (1, 0), outcome
        [stored] = store.list_alerts(limit=None)
        incidents = store.list_incidents(limit=None)
        assert stored["incident_id"] is not None
        assert [(i["id"], i["alert_count"]) for i in incidents] == [(stored["incident_id"], 2)]
