"""Soak: N records through ``anomaly serve``; resident memory and throughput sampled over time.

    python tests/reliability/soak.py --records 1000000 --out soak-1m.json

It starts the embedded broker (or uses ``--bootstrap``), creates a fresh PostgreSQL database from
``ANOMALY_TEST_PG`` (or uses ``--db``), trains the small fraud model the tests use (or loads
``--bundle``), then produces generated fraud records (2% injected anomalies, unique ids) while one
``anomaly serve`` process scores them, keeping at most ``--max-lag`` records waiting so that the
broker's memory (Tansu keeps everything in memory) does not dominate. Every ``--interval`` seconds
it records the service's RSS and the records written so far; at the end it checks the accounting
(every record seen once, offsets at the topic's end, alert positions unique) and prints the memory
curve, the throughput per interval, the RSS growth over the second half and the throughput of the
last third against the first (medians of the intervals, after the first 10% of the records).

tests/reliability/test_soak.py runs the same ``run`` with a few thousand records in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass
class SoakResult:
    records: int
    seconds: float
    samples: list[dict] = field(default_factory=list)  # t, rss_mb, written, rate
    alerts: int = 0
    dead_letters: int = 0
    rss_start_mb: float = 0.0  # after warm-up (first 10% of the records)
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth_second_half_mb: float = 0.0
    throughput_first_third: float = 0.0  # median records/s of the intervals, after warm-up
    throughput_last_third: float = 0.0
    throughput_overall: float = 0.0

    @property
    def throughput_ratio(self) -> float:
        if not self.throughput_first_third:
            return float("nan")
        return self.throughput_last_third / self.throughput_first_third


def chunk_values(start: int, n: int, seed: int) -> list[bytes]:
    from anomaly.synthetic.datasets import generate_fraud
    from streams.replay import encode_rows

    frame = generate_fraud(n, anomaly_fraction=0.02, seed=seed).drop(
        columns=["is_anomaly", "anomaly_kind"]
    )
    frame["id"] = [f"soak-{start + i}" for i in range(n)]
    return encode_rows(frame)


def run(
    *,
    records: int,
    bootstrap: str,
    db_url: str,
    bundle: Path,
    workdir: Path,
    interval: float = 5.0,
    max_lag: int = 100_000,
    batch_size: int = 1000,
    partitions: int = 2,
    chunk: int = 20_000,
    log=print,
) -> SoakResult:
    import yaml
    from confluent_kafka import Producer
    from harness import Ledger, RssSampler, ServeProcess, dispose_engines, end_offsets, records_seen

    from streams.broker import create_topic

    topic = f"soak-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic, partitions=partitions)
    schema = yaml.safe_load((HERE.parents[1] / "examples" / "fraud.yaml").read_text())["schema"]
    pipeline = f"soak-{topic}"
    config = workdir / "soak.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": pipeline,
                "schema": schema,
                "kafka": {
                    "bootstrap_servers": bootstrap,
                    "topic": topic,
                    "batch_size": batch_size,
                    "max_wait_s": 0.2,
                },
                "database": {"url": db_url},
                "serve": {
                    "metrics_port": None,
                    "model_dir": str(bundle),
                    "threads": 1,
                    "device": "cpu",
                },
            }
        )
    )
    failures: list[str] = []
    produced = 0

    def produce() -> None:
        nonlocal produced
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})

        def delivered(err, _msg) -> None:
            if err is not None:
                failures.append(str(err))

        for start in range(0, records, chunk):
            n = min(chunk, records - start)
            values = chunk_values(start, n, seed=1000 + start // chunk)
            while produced - max(records_seen(db_url, pipeline), 0) > max_lag:
                time.sleep(0.2)
            for value in values:
                while True:
                    try:
                        producer.produce(topic, value=value, on_delivery=delivered)
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.poll(0)
            produced = start + n
        if producer.flush(120):
            failures.append("undelivered records")

    serve = ServeProcess(config, workdir / "serve.log")
    sampler = RssSampler(serve, every=interval, progress=lambda: records_seen(db_url, pipeline))
    t0 = time.monotonic()
    producer_thread = threading.Thread(target=produce, daemon=True)
    try:
        sampler.start()
        producer_thread.start()
        last_report = 0.0
        while True:
            written = records_seen(db_url, pipeline)
            if written >= records:
                break
            assert serve.alive(), serve.log_text()[-3000:]
            assert not failures, failures[:3]
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                log(f"  {written:>9,} / {records:,} written, RSS {serve.rss_mb():.0f} MB")
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        time.sleep(min(interval, 2.0))
        samples = sampler.stop()
        producer_thread.join(60)
        assert serve.stop(120) == 0, serve.log_text()[-3000:]
    finally:
        sampler.stop()
        if serve.alive():
            serve.kill()
        dispose_engines()

    ledger = Ledger.read(db_url, pipeline, topic)
    assert ledger.seen == records, (ledger.seen, records)
    assert len(set(ledger.alert_positions)) == len(ledger.alert_positions)
    assert ledger.alerted == len(ledger.alert_ids)
    assert ledger.dead_lettered == 0
    ends = end_offsets(bootstrap, topic, records) if records <= 200_000 else None
    if ends is not None:  # reading a whole 1M-record topic back would take minutes
        assert ledger.offsets == ends, (ledger.offsets, ends)
    else:
        assert sum(ledger.offsets.values()) == records, ledger.offsets

    rows = []
    prev_t, prev_w = 0.0, 0
    for t, rss, written in samples:
        w = max(written or 0, 0)
        rate = (w - prev_w) / (t - prev_t) if t > prev_t else 0.0
        rows.append({"t": t, "rss_mb": rss, "written": w, "rate": round(rate, 1)})
        prev_t, prev_w = t, w
    result = SoakResult(records=records, seconds=round(seconds, 1), samples=rows)
    result.alerts = len(ledger.alert_ids)
    result.throughput_overall = round(records / seconds, 1)
    warm = [r for r in rows if r["written"] >= records * 0.1]
    if warm:
        result.rss_start_mb = warm[0]["rss_mb"]
        result.rss_peak_mb = max(r["rss_mb"] for r in rows)
        result.rss_end_mb = warm[-1]["rss_mb"]
        half = [r for r in warm if r["written"] >= records * 0.5]
        if half:
            result.rss_growth_second_half_mb = round(half[-1]["rss_mb"] - half[0]["rss_mb"], 1)
        moving = [r for r in warm if r["written"] < records and r["rate"] > 0]
        third = max(1, len(moving) // 3)
        if moving:
            first = moving[:third]
            last = moving[-third:]
            result.throughput_first_third = _median([r["rate"] for r in first])
            result.throughput_last_third = _median([r["rate"] for r in last])
    return result


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return round(ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2, 1)


def train_bundle(path: Path) -> Path:
    """The small fraud model of the tests (tests/streams/conftest.py: 3000 rows, 300 steps)."""
    import torch
    import yaml

    from anomaly.config import config_from_dict
    from anomaly.estimator.model import AnomalyModel
    from anomaly.synthetic.datasets import generate_fraud

    torch.set_num_threads(1)
    schema = yaml.safe_load((HERE.parents[1] / "examples" / "fraud.yaml").read_text())["schema"]
    cfg = config_from_dict({"name": "soak", "schema": schema}, environ={})
    train = generate_fraud(3000, anomaly_fraction=0.0, seed=11).drop(
        columns=["is_anomaly", "anomaly_kind"]
    )
    model = AnomalyModel.from_config(
        cfg, target_fpr=0.01, max_epochs=3, max_steps=300, progress=False, threads=1
    )
    model.fit(train)
    model.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--max-lag", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: embedded broker)")
    parser.add_argument("--db", help="database URL (default: a fresh PostgreSQL database)")
    parser.add_argument("--bundle", type=Path, help="model bundle (default: train a small one)")
    parser.add_argument("--out", type=Path, help="write the result (samples included) as JSON")
    args = parser.parse_args(argv)

    from sqlalchemy import create_engine, text

    from streams.broker import EmbeddedBroker

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    broker = None
    admin = None
    db_name = None
    try:
        bootstrap = args.bootstrap
        if not bootstrap:
            broker = EmbeddedBroker(log_path=work / "tansu.log").start()
            bootstrap = broker.bootstrap_servers
        db_url = args.db
        if not db_url:
            base = os.environ.get(
                "ANOMALY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
            )
            db_name = f"am_soak_{uuid.uuid4().hex[:8]}"
            admin = create_engine(base, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{db_name}"'))
            db_url = f"{base.rsplit('/', 1)[0]}/{db_name}"
        bundle = args.bundle or train_bundle(work / "bundle")
        print(f"soak: {args.records:,} records, broker {bootstrap}, work dir {work}")
        result = run(
            records=args.records,
            bootstrap=bootstrap,
            db_url=db_url,
            bundle=bundle,
            workdir=work,
            interval=args.interval,
            max_lag=args.max_lag,
            batch_size=args.batch_size,
            partitions=args.partitions,
        )
    finally:
        if broker is not None:
            broker.stop()
        if admin is not None and db_name:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            admin.dispose()
    print(f"{'t (s)':>8} {'RSS (MB)':>9} {'written':>10} {'records/s':>10}")
    for r in result.samples:
        print(f"{r['t']:>8.1f} {r['rss_mb']:>9.1f} {r['written']:>10,} {r['rate']:>10,.0f}")
    summary = {k: v for k, v in asdict(result).items() if k != "samples"}
    summary["throughput_ratio_last_vs_first_third"] = round(result.throughput_ratio, 3)
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(asdict(result) | summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
