"""The fixed cost of one small service batch's write: ms per ``AlertStore.write_batch``.

At 1,000 records/s the service writes batches of ~15 records that raise no alert, so what a
batch costs is its round trips: offsets of every partition in the batch, statistics, and while
a fresh service's retraining reservoir fills, the sampled records. Each batch here holds the
offsets of 4 partitions and one statistics row, and with ``--reservoir`` 14 reservoir records
(reservoir of 20,000, retention 7 days), as ``bench/stream.py --rate 1000`` writes them.

    python bench/small_writes.py --db-url postgresql+psycopg://postgres@127.0.0.1:5432/test
    python bench/small_writes.py --reservoir                     # SQLite, a temporary file

For a before/after, run it in both trees (a ``git worktree`` of the previous revision with
``PYTHONPATH`` set to it), alternating; the machine's load moves both alike only then.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage import AlertStore
from storage.records import OffsetRecord, ReservoirRecord, SinkBatch, StreamStatRecord

PARTITIONS, RECORDS = 4, 14


def make_batch(pipeline: str, i: int, reservoir: bool, now: datetime) -> SinkBatch:
    batch = SinkBatch(pipeline)
    minute = now.replace(second=0, microsecond=0)
    batch.stats = [StreamStatRecord(pipeline, minute, records_seen=RECORDS, records_scored=RECORDS)]
    batch.offsets = [
        OffsetRecord(pipeline, "t", p, PARTITIONS * (i + 1), first_offset=PARTITIONS * i)
        for p in range(PARTITIONS)
    ]
    if reservoir:
        batch.reservoir = [
            ReservoirRecord(
                pipeline,
                "t",
                k % PARTITIONS,
                PARTITIONS * i + k // PARTITIONS,
                priority=float(i * RECORDS + k),
                alerted=False,
                model_version="v1",
                sampled_at=now,
                event_time=now + timedelta(milliseconds=i),
                record={"id": f"r{i}-{k}", "amount": 12.5, "merchant": "m1", "hour": 3},
            )
            for k in range(RECORDS)
        ]
        batch.reservoir_size, batch.reservoir_retention_s = 20_000, 7 * 86_400
    return batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db-url", help="default: a temporary SQLite file")
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--reservoir", action="store_true", help="14 reservoir records a batch")
    args = parser.parse_args()
    url = args.db_url or f"sqlite:///{tempfile.mkdtemp(prefix='bench-small-writes-')}/b.db"
    store = AlertStore(url)
    store.upgrade()
    pipeline, now = f"small-{uuid.uuid4().hex[:6]}", datetime.now(UTC)
    for i in range(50):  # warm-up: the connection, the statement caches, the rows
        store.write_batch(make_batch(pipeline, i, args.reservoir, now))
    start = time.perf_counter()
    for i in range(50, 50 + args.batches):
        store.write_batch(make_batch(pipeline, i, args.reservoir, now))
    ms = (time.perf_counter() - start) / args.batches * 1e3
    print(f"{ms:.2f} ms per batch ({store.dialect}, reservoir {'on' if args.reservoir else 'off'})")
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
