"""The retraining reservoir's added cost per record: the service's sampling plus the reservoir
rows in the batch transaction (streams.reservoir, storage.reservoir).

A stream of generated records goes through ``ReservoirSampler.fill`` and ``AlertStore.write_batch``
twice, batch by batch in alternation: once for a pipeline with the reservoir, once for one with
``retraining.enabled: false`` (same batches, same offsets and statistics rows); the difference
per record is the reservoir's cost. Printed per phase: while the reservoir fills (every record a
candidate) and over the last quarter of the stream (full: only records above the threshold).

    python bench/reservoir.py                    # SQLite and PostgreSQL, 200k records
    python bench/reservoir.py --records 400000 --size 20000 --batch 2000 --rate 1000

Once full, the expected rows per batch are ``batch * size / seen`` with a uniform sample
(``--half-life 0``) and at least ``batch * size / (rate * half_life / ln 2)`` with a half-life
(printed for the configured rate: a bench stream spans minutes, far less than a half-life, so it
shows the uniform regime, the more expensive one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from sqlalchemy import create_engine, text

from anomaly.config import config_from_dict
from storage import AlertStore
from storage.records import OffsetRecord, SinkBatch, StreamStatRecord
from streams.batch import Message
from streams.reservoir import ReservoirSampler

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def run(url: str, args: argparse.Namespace) -> dict[str, float]:
    store = AlertStore(url)
    store.upgrade()
    samplers = {}
    for name, enabled in (("with", True), ("without", False)):
        cfg = config_from_dict(
            {
                "name": name,
                "schema": {"numeric": ["amount"], "time_field": None},
                "retraining": {
                    "enabled": enabled,
                    "reservoir_size": args.size,
                    "half_life_s": args.half_life,
                },
            },
            environ={},
        )
        samplers[name] = ReservoirSampler(cfg)
    rng = np.random.default_rng(0)
    n_batches = args.records // args.batch
    times: dict[str, list[float]] = {"with": [], "without": []}
    rows: list[int] = []
    fill_s: list[float] = []
    for b in range(n_batches):
        start = b * args.batch
        ingest = T0 + timedelta(seconds=start / args.rate)
        values = [
            json.dumps({"id": f"r{start + i}", "amount": float(a), "merchant": "m42"}).encode()
            for i, a in enumerate(rng.lognormal(size=args.batch))
        ]
        messages = [
            Message("in", 0, start + i, v, int((T0.timestamp() + (start + i) / args.rate) * 1000))
            for i, v in enumerate(values)
        ]
        decoded = SimpleNamespace(index=np.arange(args.batch), frame=pd.DataFrame())
        result = SimpleNamespace(is_alert=rng.random(args.batch) < 0.001)
        for name in ("without", "with") if b % 2 else ("with", "without"):
            batch = SinkBatch(
                pipeline=name,
                offsets=[OffsetRecord(name, "in", 0, start + args.batch, first_offset=start)],
                stats=[
                    StreamStatRecord(name, ingest.replace(second=0), args.batch, args.batch, 0, 0)
                ],
            )
            t0 = time.perf_counter()
            samplers[name].fill(batch, messages, decoded, result, "v1", ingest, json.loads, None)
            t1 = time.perf_counter()
            samplers[name].written(batch, store.write_batch(batch))
            times[name].append(time.perf_counter() - t0)
            if name == "with":
                rows.append(len(batch.reservoir))
                fill_s.append(t1 - t0)
    full_at = next(
        (i for i in range(n_batches) if (i + 1) * args.batch >= args.size), n_batches - 1
    )
    last = slice(n_batches * 3 // 4, n_batches)
    first = slice(0, full_at + 1)

    def added_us(part: slice) -> float:
        diffs = [w - o for w, o in zip(times["with"][part], times["without"][part], strict=True)]
        return statistics.median(diffs) / args.batch * 1e6

    out = {
        "fill_added_us_per_record": added_us(first),
        "fill_rows_per_batch": statistics.mean(rows[first]),
        "full_added_us_per_record": added_us(last),
        "full_rows_per_batch": statistics.mean(rows[last]),
        "full_sampling_us_per_record": statistics.median(fill_s[last]) / args.batch * 1e6,
        "base_us_per_record": statistics.median(times["without"][last]) / args.batch * 1e6,
        "full_us_per_row": added_us(last) * args.batch / max(statistics.mean(rows[last]), 1e-9),
        "kept": store.reservoir_count("with"),
    }
    store.close()
    return out


def sampling_only(args: argparse.Namespace) -> float:
    """us per record of ``fill`` when no record beats the threshold (the usual batch once full):
    the priorities of the batch and the comparison."""
    cfg = config_from_dict(
        {"name": "p", "schema": {"numeric": ["x"], "time_field": None}}, environ={}
    )
    sampler = ReservoirSampler(cfg)
    sampler.threshold = math.inf
    n = args.batch
    ms = int(T0.timestamp() * 1000)
    messages = [Message("in", 0, i, b'{"x": 1}', ms + i) for i in range(n)]
    decoded = SimpleNamespace(index=np.arange(n), frame=pd.DataFrame())
    result = SimpleNamespace(is_alert=np.zeros(n, dtype=bool))
    runs = []
    for _ in range(50):
        t0 = time.perf_counter()
        sampler.fill(SinkBatch("p"), messages, decoded, result, "v1", T0, json.loads, None)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pg-url",
        default=os.environ.get(
            "ANOMALY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="records/s of the stream")
    parser.add_argument("--half-life", type=float, default=86400.0)
    args = parser.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = run(f"sqlite:///{tmp}/bench.db", args)
    if not args.no_pg:
        admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
        name = f"am_bench_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            results["postgresql"] = run(f"{args.pg_url.rsplit('/', 1)[0]}/{name}", args)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    print(
        f"{args.records} records in batches of {args.batch}, reservoir {args.size}, "
        f"{os.cpu_count()} CPUs; medians of per-batch differences (with - without)"
    )
    for db, r in results.items():
        print(
            f"{db:<10} filling: {r['fill_rows_per_batch']:7.0f} rows/batch "
            f"+{r['fill_added_us_per_record']:6.2f} us/record | full (last quarter): "
            f"{r['full_rows_per_batch']:6.1f} rows/batch +{r['full_added_us_per_record']:6.2f} "
            f"us/record (sampling alone {r['full_sampling_us_per_record']:.2f}; batch write "
            f"without reservoir {r['base_us_per_record']:.2f} us/record); kept {r['kept']}"
        )
        print(f"{'':<10} full: ~{r['full_us_per_row']:.0f} us per reservoir row written")
    idle = sampling_only(args)
    print(f"sampling a batch with no candidate: {idle:.2f} us/record")
    if args.half_life > 0:
        lifetime = args.rate * args.half_life / math.log(2)
        print(
            f"steady state at {args.rate:g} records/s, half-life {args.half_life:g} s: "
            f"<= {args.batch * args.size / lifetime:.2f} rows per batch"
        )
        for db, r in results.items():
            per_record = idle + r["full_us_per_row"] * args.size / lifetime
            print(f"{db:<10} steady state: ~{per_record:.2f} us/record added")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
