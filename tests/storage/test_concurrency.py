"""Two real processes writing overlapping batches: no duplicates, exact fenced statistics."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from storage_testlib import range_batch, run_together, table_rows

from storage import AlertStore

END = 300


def _writer(url: str, chunk: int, start: mp.Event, errors: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        with AlertStore(url) as store:
            start.wait(30)
            for first in range(0, END, chunk):
                end = min(first + chunk, END)
                # Partition 0: fenced by the stored offsets.
                store.write_batch(range_batch(first, end, partition=0))
                # Partition 1: no offsets at all, deduplicated by the unique position only.
                unfenced = range_batch(first, end, partition=1)
                unfenced.offsets = []
                unfenced.stats = []
                store.write_batch(unfenced)
    except BaseException as exc:  # report to the parent, which fails the test
        errors.put(f"{type(exc).__name__}: {exc}")
        raise


@pytest.mark.reliability
def test_two_processes_writing_overlapping_batches_do_not_duplicate(db_url: str) -> None:
    with AlertStore(db_url) as store:
        store.upgrade()
    run_together(_writer, [(db_url, 40), (db_url, 70)])

    with AlertStore(db_url) as store:
        expected = range_batch(0, END)
        alerts = store.list_alerts(limit=None)
        positions = [(a["kafka_partition"], a["kafka_offset"]) for a in alerts]
        assert len(positions) == len(set(positions))
        want = {a.kafka_offset for a in expected.alerts}
        assert {o for p, o in positions if p == 0} == want
        assert {o for p, o in positions if p == 1} == want
        dead = table_rows(store, "dead_letters")
        assert len(dead) == 2 * len(expected.dead_letters)
        assert store.load_offsets("cards", "tx") == {0: END}
        # Every record of partition 0 counted once in the statistics, whatever the interleaving.
        ((seen, latency_count),) = (
            store.engine.connect()
            .exec_driver_sql("SELECT records_seen, latency_count FROM stream_stats")
            .all()
        )
        assert (seen, latency_count) == (END, END)
        # Incidents count each alert exactly once.
        per_incident: dict[int, int] = {}
        for a in alerts:
            per_incident[a["incident_id"]] = per_incident.get(a["incident_id"], 0) + 1
        incidents = store.list_incidents(limit=None)
        assert {i["id"]: i["alert_count"] for i in incidents} == per_incident
        assert None not in per_incident
