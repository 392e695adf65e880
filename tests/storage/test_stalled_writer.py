"""A writer stalled in the middle of its batch's transaction (a paused VM, SIGSTOP) must not stall
the other writers of the pipeline: PostgreSQL ends its session after
``stalled_transaction_timeout_s`` and its locks go with it."""

from __future__ import annotations

import threading
import time

from sqlalchemy import text
from storage_testlib import range_batch

from anomaly.config import config_from_dict
from storage import AlertStore
from storage.engine import Database
from storage.errors import RetryableStorageError


def _stall(db: Database, locked: threading.Event, outcome: list) -> None:
    """A transaction that takes the lock on the pipeline's statistics minute, as every batch's
    write does, then sits idle for 4 s before its next statement."""
    try:
        with db.transaction("a stalled batch") as conn:
            conn.execute(text("SELECT records_seen FROM stream_stats FOR UPDATE")).all()
            locked.set()
            time.sleep(4.0)
            conn.execute(text("SELECT 1"))
        outcome.append("committed")
    except Exception as exc:  # the test asserts what it was
        outcome.append(exc)
    finally:
        locked.set()


def test_a_stalled_writer_does_not_hold_the_pipelines_locks(pg_url: str) -> None:
    with AlertStore(pg_url, stalled_transaction_timeout_s=1.0) as store:
        store.upgrade()
        store.write_batch(range_batch(0, 10))  # the statistics row of minute T0 exists
        stalled = Database(pg_url, stalled_transaction_timeout_s=1.0)
        locked, outcome = threading.Event(), []
        thread = threading.Thread(target=_stall, args=(stalled, locked, outcome))
        thread.start()
        try:
            assert locked.wait(30)
            start = time.monotonic()
            store.write_batch(range_batch(10, 20))  # the same minute: waits on that lock
            waited = time.monotonic() - start
        finally:
            thread.join(30)
            stalled.close()
        # Without the timeout the write waits for the stalled transaction's 4 s to pass.
        assert waited < 3.0, waited
        [error] = outcome
        assert isinstance(error, RetryableStorageError), error
        assert "idle-in-transaction timeout" in str(error)
        assert store.load_offsets("cards", "tx") == {0: 20}


def test_the_timeout_is_the_pipeline_configs(pg_url: str) -> None:
    def session_timeout(database: dict) -> str:
        cfg = config_from_dict(
            {"name": "p", "schema": {"numeric": ["x"]}, "database": {"url": pg_url, **database}},
            environ={},
        )
        with AlertStore.from_config(cfg) as store, store.engine.connect() as conn:
            return conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar()

    assert session_timeout({}) == "10s"
    assert session_timeout({"stalled_transaction_timeout_s": 2.5}) == "2500ms"
    # 0 leaves the server's own setting (PostgreSQL's default: none).
    assert session_timeout({"stalled_transaction_timeout_s": 0}) == "0"
