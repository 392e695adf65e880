"""A connection lost in the middle of a batch: nothing half-written, a retryable error."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import create_engine, text
from storage_testlib import T0, range_batch, table_rows

from storage import AlertStore
from storage.errors import RetryableStorageError
from storage.records import SinkBatch, StreamStatRecord

COUNT_TABLES = ("alerts", "incidents", "dead_letters", "consumer_offsets")


def _counts(store: AlertStore) -> dict[str, int]:
    return {name: len(table_rows(store, name)) for name in COUNT_TABLES}


@pytest.mark.postgres
@pytest.mark.reliability
@pytest.mark.parametrize("alert_insert", ["copy", "executemany"])
def test_connection_killed_mid_batch_leaves_nothing_half_written(
    pg_url: str, alert_insert: str
) -> None:
    store = AlertStore(pg_url, alert_insert=alert_insert)  # type: ignore[arg-type]
    store.upgrade()
    store.write_batch(SinkBatch("cards", stats=[StreamStatRecord("cards", T0, records_seen=1)]))
    stats_before = table_rows(store, "stream_stats")
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    blocker = create_engine(pg_url).connect()
    try:
        # Hold the statistics row: write_batch gets past the offsets, alerts, incidents and dead
        # letters, then waits on this lock, where the test kills its connection.
        blocker_pid = blocker.execute(text("SELECT pg_backend_pid()")).scalar()
        blocker.execute(text("SELECT * FROM stream_stats FOR UPDATE"))
        batch = range_batch(0, 3000)
        outcome: list[BaseException | object] = []

        def write() -> None:
            try:
                outcome.append(store.write_batch(batch))
            except BaseException as exc:
                outcome.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        victim = None
        deadline = time.monotonic() + 30
        with admin.connect() as conn:
            while victim is None and time.monotonic() < deadline:
                victim = conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND pid <> :blocker"
                    ),
                    {"blocker": blocker_pid},
                ).scalar()
                time.sleep(0.02)
            assert victim is not None, "write_batch never reached the statistics upsert"
            # It has written alerts, incidents and dead letters (uncommitted) by now.
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": victim}).scalar()
        writer.join(30)
        blocker.rollback()
    finally:
        blocker.close()
        admin.dispose()

    (error,) = outcome
    assert isinstance(error, RetryableStorageError), repr(error)
    assert "rolled back" in str(error) and "retry" in str(error)
    assert _counts(store) == {name: 0 for name in COUNT_TABLES}
    assert table_rows(store, "stream_stats") == stats_before

    # The same store recovers on the next call and the retried batch lands whole.
    result = store.write_batch(batch)
    assert result.alerts_written == len(batch.alerts)
    assert _counts(store)["dead_letters"] == len(batch.dead_letters)
    assert store.load_offsets("cards", "tx") == {0: 3000}
    store.close()


def test_unreachable_database_is_a_retryable_error() -> None:
    store = AlertStore("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(RetryableStorageError, match="nothing was written"):
        store.write_batch(range_batch(0, 10))
    store.close()


@pytest.mark.postgres
@pytest.mark.reliability
def test_a_concurrent_insert_of_the_same_position_is_retried_not_double_counted(
    pg_url: str,
) -> None:
    from storage_testlib import alert

    from storage.records import SinkBatch

    store = AlertStore(pg_url)
    store.upgrade()
    other = create_engine(pg_url).connect()
    try:
        # Another writer has inserted offset 1 (not committed yet) when our batch, which has no
        # offsets to fence on, checks which positions are new.
        other.execute(
            text(
                "INSERT INTO alerts (pipeline, record_id, entity, ingest_time, kafka_topic, "
                "kafka_partition, kafka_offset, model_version, ensemble_score, ensemble_p, "
                "severity, fired_detectors, top_features, record) VALUES ('cards', 'r', NULL, "
                "now(), 'tx', 0, 1, 'v1', 1, 0.001, 'low', '[]', '[]', '{}')"
            )
        )
        other_pid = other.execute(text("SELECT pg_backend_pid()")).scalar()
        batch = SinkBatch("cards", alerts=[alert(o, entity="m1") for o in (0, 1, 2)])
        outcome: list = []
        writer = threading.Thread(target=lambda: outcome.append(store.write_batch(batch)))
        writer.start()
        with create_engine(pg_url).connect() as watch:
            for _ in range(1500):  # until our insert waits for the other transaction
                if watch.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND pid <> :pid"
                    ),
                    {"pid": other_pid},
                ).scalar():
                    break
                time.sleep(0.02)
            else:
                pytest.fail("write_batch never waited for the concurrent insert")
        other.commit()
        writer.join(30)
    finally:
        other.close()
    (result,) = outcome
    assert result.alerts_written == 2
    (incident,) = store.list_incidents()
    assert incident["alert_count"] == 2  # offsets 0 and 2; offset 1 belongs to the other writer
    ids = {a["kafka_offset"]: a["incident_id"] for a in store.list_alerts()}
    assert ids == {0: incident["id"], 1: None, 2: incident["id"]}
    store.close()


@pytest.mark.postgres
@pytest.mark.reliability
def test_connection_lost_at_commit_says_the_outcome_is_unknown_and_the_retry_is_exact(
    pg_url: str,
) -> None:
    from sqlalchemy import event

    store = AlertStore(pg_url)
    store.upgrade()
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    fired: list[int] = []

    def kill_before_commit(conn) -> None:  # SQLAlchemy "commit" event: before the DBAPI commit
        if fired:
            return
        pid = conn.connection.driver_connection.info.backend_pid
        fired.append(pid)
        with admin.connect() as c:
            assert c.execute(
                text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}
            ).scalar()

    event.listen(store.engine, "commit", kill_before_commit)
    batch = range_batch(0, 500)
    try:
        with pytest.raises(RetryableStorageError, match="while committing") as info:
            store.write_batch(batch)
        assert "may or may not" in str(info.value) and "nothing was written" not in str(info.value)
    finally:
        event.remove(store.engine, "commit", kill_before_commit)
        admin.dispose()
    assert fired
    # Retried as the message says: the batch lands exactly once, whatever the server had done.
    store.write_batch(batch)
    store.write_batch(batch)
    assert _counts(store)["alerts"] == len(batch.alerts)
    assert store.load_offsets("cards", "tx") == {0: 500}
    store.close()


@pytest.mark.postgres
def test_an_error_of_the_raw_driver_connection_is_a_storage_error(pg_url: str) -> None:
    """The COPY path writes through psycopg's own connection, whose errors SQLAlchemy never
    wraps: they too must come out as a StorageError naming what was being done."""
    from storage.engine import Database
    from storage.errors import StorageError

    db = Database(pg_url)
    try:
        with (
            pytest.raises(StorageError, match=r"a raw statement .* DivisionByZero"),
            db.transaction("a raw statement") as conn,
            conn.connection.driver_connection.cursor() as cur,
        ):
            cur.execute("SELECT 1 / 0")
    finally:
        db.close()


def test_a_sqlite_file_that_cannot_be_opened_is_not_retried(tmp_path) -> None:
    from storage.errors import DatabaseAccessError

    store = AlertStore(f"sqlite:///{tmp_path}/no-such-folder/alerts.db")
    with pytest.raises(DatabaseAccessError, match=r"unable to open database file .*folder exists"):
        store.write_batch(range_batch(0, 10))
    store.close()
