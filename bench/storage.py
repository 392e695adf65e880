"""Alert batch writes per second on PostgreSQL: binary COPY vs Core executemany.

Both run in the same process against the same server, in alternating rounds (so a busy machine
slows both alike), through the real ``AlertStore.write_batch``: one transaction per batch with
offset fencing, idempotent alert inserts (positions already stored are skipped; executemany also
says ``ON CONFLICT DO NOTHING``, a COPY that loses a race to a concurrent writer is retried),
statistics and offset upserts.

Scenarios, each measured for both insert strategies:
- ``new``: batches of new alerts (no entity, so no incident work): the raw insert path.
- ``incidents``: new alerts over 500 entities, so every batch also groups incidents.
- ``replay``: the ``new`` batches written again without offsets (every position already stored):
  the cost of idempotence when a batch is redelivered. write_batch finds the stored positions
  with one index range scan per partition and inserts nothing, so both strategies run the same
  code here; it is shown for the rows/s of a replay, not to compare them.
- ``small``: 50 batches of 10 new alerts (the service's usual case: few alerts per micro-batch),
  where the fixed cost of a batch (offsets, statistics, round trips, commit) dominates; also
  printed as milliseconds per batch.

    python bench/storage.py                       # default: 5000-row batches, 4 rounds
    python bench/storage.py --batch 2000 --rounds 6 --pg-url postgresql+psycopg://u@h/db

A scratch database is created next to the one in --pg-url and dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text

from storage import AlertStore
from storage.records import AlertRecord, OffsetRecord, SinkBatch, StreamStatRecord

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SMALL_BATCH, SMALL_BATCHES = 10, 50  # the "small" scenario
METHODS = ("executemany", "copy")


def make_batch(pipeline: str, first: int, n: int, entities: int | None, offsets: bool) -> SinkBatch:
    alerts = [
        AlertRecord(
            pipeline=pipeline,
            record_id=f"tx-{o}",
            entity=None if entities is None else f"card-{o % entities}",
            event_time=T0 + timedelta(milliseconds=10 * o),
            ingest_time=T0 + timedelta(milliseconds=10 * o + 40),
            kafka_topic="transactions",
            kafka_partition=0,
            kafka_offset=o,
            model_version="3f9c2a1b",
            ensemble_score=7.5 + (o % 13) * 0.1,
            ensemble_p=0.0004,
            severity=("low", "medium", "high", "critical")[o % 4],
            vae_score=3.1,
            vae_p=0.0008,
            flow_score=41.2,
            flow_p=0.0002,
            gan_score=0.93,
            gan_p=0.004,
            fired_detectors=["vae", "flow"],
            top_features=[
                {"feature": "amount", "value": 1830.5, "contribution": 0.61},
                {"feature": "merchant_risk", "value": 0.92, "contribution": 0.22},
                {"feature": "hour", "value": 3.0, "contribution": 0.09},
            ],
            record={
                "id": f"tx-{o}",
                "event_time": "2026-01-01T00:00:00Z",
                "card": f"card-{o % 500}",
                "amount": 1830.5,
                "merchant_risk": 0.92,
                "hour": 3,
                "country": "DE",
                "channel": "online",
            },
        )
        for o in range(first, first + n)
    ]
    batch = SinkBatch(pipeline, alerts=alerts)
    if offsets:
        batch.stats = [StreamStatRecord(pipeline, T0, records_seen=n, records_scored=n)]
        batch.offsets = [OffsetRecord(pipeline, "transactions", 0, first + n, first_offset=first)]
    return batch


def _backend_cpu_s(admin, dbname: str) -> float | None:  # type: ignore[no-untyped-def]
    """CPU seconds used so far by the server processes serving ``dbname`` (local server only)."""
    with admin.connect() as conn:
        pids = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = :d"), {"d": dbname}
        ).scalars()
        total = 0.0
        try:
            for pid in pids:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return None  # a remote server: wall-clock figures only
    return total


def run(
    url: str, batch_size: int, rounds: int, batches_per_round: int, admin=None
) -> tuple[dict[str, dict], dict[str, list[float]]]:  # type: ignore[no-untyped-def]
    stores = {m: AlertStore(url, alert_insert=m) for m in METHODS}  # type: ignore[arg-type]
    stores["copy"].upgrade()
    dbname = url.rsplit("/", 1)[1]
    results: dict[str, dict[str, list[float]]] = {
        s: {m: [] for m in METHODS} for s in ("new", "incidents", "replay", "small")
    }
    # Rows per CPU second (this process + its server backends) for "new": what the wall-clock
    # figure would be on an idle machine, where client and server take turns per batch.
    per_cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    next_offset = dict.fromkeys(METHODS, 0)
    # Warm-up: connections, caches.
    for m in METHODS:
        stores[m].write_batch(make_batch(f"warm-{m}", 0, 200, None, True))
    for r in range(rounds):
        order = METHODS if r % 2 == 0 else METHODS[::-1]
        for scenario in ("new", "incidents", "small"):
            size, count = (
                (SMALL_BATCH, SMALL_BATCHES)
                if scenario == "small"
                else (batch_size, batches_per_round)
            )
            for m in order:
                pipeline = f"{scenario}-{m}"
                batches = []
                for _ in range(count):
                    batches.append(
                        make_batch(
                            pipeline,
                            next_offset[m],
                            size,
                            500 if scenario == "incidents" else None,
                            True,
                        )
                    )
                    next_offset[m] += size
                server0 = _backend_cpu_s(admin, dbname) if admin is not None else None
                cpu0 = time.process_time()
                start = time.perf_counter()
                for b in batches:
                    res = stores[m].write_batch(b)
                    assert res.alerts_written == size, res
                elapsed = time.perf_counter() - start
                cpu = time.process_time() - cpu0
                results[scenario][m].append(size * count / elapsed)
                server1 = _backend_cpu_s(admin, dbname) if server0 is not None else None
                if scenario == "new" and server1 is not None and server0 is not None:
                    per_cpu[m].append(batch_size * batches_per_round / (cpu + server1 - server0))
                if scenario == "new":
                    # Replay the same batches, as after a lost Kafka commit without stored
                    # offsets: every position is stored already.
                    for b in batches:
                        b.offsets, b.stats = [], []
                    start = time.perf_counter()
                    for b in batches:
                        assert stores[m].write_batch(b).alerts_written == 0
                    elapsed = time.perf_counter() - start
                    results["replay"][m].append(batch_size * batches_per_round / elapsed)
    for s in stores.values():
        s.close()
    return results, per_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pg-url",
        default=os.environ.get(
            "ANOMALY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
        help="an existing database on the server; a scratch database is created beside it",
    )
    parser.add_argument("--batch", type=int, default=5000, help="alerts per write_batch call")
    parser.add_argument("--batches", type=int, default=4, help="batches per timed run")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per method")
    args = parser.parse_args(argv)

    admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
    name = f"am_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        version = conn.execute(text("SHOW server_version")).scalar()
    url = f"{args.pg_url.rsplit('/', 1)[0]}/{name}"
    try:
        results, per_cpu = run(url, args.batch, args.rounds, args.batches, admin)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    print(
        f"PostgreSQL {version}, {os.cpu_count()} CPUs, batches of {args.batch} alerts, "
        f"{args.batches} batches x {args.rounds} rounds per method; median rows/s "
        "(copy: slowest-fastest round)"
    )
    print(f"{'scenario':<10} {'executemany':>12} {'copy':>12} {'copy/executemany':>17}  copy range")
    for scenario, per_method in results.items():
        em = statistics.median(per_method["executemany"])
        cp = statistics.median(per_method["copy"])
        spread = f"{min(per_method['copy']):,.0f}-{max(per_method['copy']):,.0f}"
        print(f"{scenario:<10} {em:>12,.0f} {cp:>12,.0f} {cp / em:>16.2f}x  {spread}")
    if all(per_cpu.values()):
        em = statistics.median(per_cpu["executemany"])
        cp = statistics.median(per_cpu["copy"])
        print(
            f"{'new/cpu-s':<10} {em:>12,.0f} {cp:>12,.0f} {cp / em:>16.2f}x"
            "   (rows per CPU second of client + server backends)"
        )
    em, cp = (statistics.median(results["small"][m]) for m in METHODS)
    print(
        f"small: {SMALL_BATCHES} batches of {SMALL_BATCH} alerts per round, ms per batch: "
        f"executemany {1000 * SMALL_BATCH / em:.2f}, copy {1000 * SMALL_BATCH / cp:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
