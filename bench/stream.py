"""Streaming throughput and latency of ``anomaly serve`` on the embedded broker, in one run.

1. Raw consume: the same consumer settings as the service, reading the records and doing
   nothing else (the baseline).
2. End to end: ``ScoringService`` over the same records: decode, validate, score, write alerts,
   dead letters, statistics and offsets to the database, commit. Rate from the first batch to the
   last commit. The ratio end-to-end / raw is the figure of merit (goal >= 0.5).
3. Latency: ``anomaly replay --rate`` at half the measured end-to-end rate in a subprocess while
   the service runs; latency per record = commit done - the record's Kafka CreateTime (set when
   the producer was handed the record); p50 / p99.

    python bench/stream.py [--records 100000] [--db-url sqlite:///...] [--threads 1] [--device cuda]
    python bench/stream.py --format avro        # Avro values (examples/fraud.avsc)
    python bench/stream.py --scale-out 2 --db-url postgresql+psycopg://postgres@127.0.0.1:5432/test

4. Scale-out (``--scale-out N``): ``serve`` processes in one consumer group share the partitions,
   as in production. The same records go to a fresh topic once the group has settled (every
   member holds partitions), first with one process and then with N; each process reports when
   its first batch started and its last commit ended, and the rate is all records over the span
   from the earliest start to the latest end. Use PostgreSQL: SQLite takes one writer at a time.

5. Fixed rate (``--rate N --seconds S``, nothing else runs): the default configuration at N
   records/s for S seconds from a paced producer process that is already connected; p50, p95
   and p99 for the records of the first 2 s after the service holds its partitions and for the
   rest, the group join time on its own, and the mean time of each stage per batch. Beside each
   latency line, the part before the service's loop took the record's batch (producer linger,
   broker, fetch, and the wait for the loop to come round): what the loop itself adds is the
   rest.
   ``--kafka KEY=VALUE`` changes a kafka setting or a librdkafka one for this run.

2b. Second pass (``--second-pass``): after the above, the same records on a fresh topic through
   the same pipeline. A fresh service's retraining reservoir (``retraining.reservoir_size``,
   20,000) takes nearly every record until it is full and ~20,000 x (1 + ln(n / 20,000)) of the
   first n, so step 2 measures mostly that fill; the second pass is the same service with a full
   reservoir that has seen 100,000 records (sampling ~10-20% of them instead of ~50%).

``--baseline REV`` first runs the same command on git revision REV from a temporary worktree: a
before/after in one run (``python bench/stream.py --rate 1000 --baseline main``).

Everything runs with the default configuration (``--batch-size`` sets ``kafka.batch_size``).

With ``--device cuda`` the service scores on the GPU (preprocessing, networks and p-values there,
see ``anomaly.scoring.device_scoring``); ``bench/scoring_step.py`` gives the scoring step's own
rate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

# Run as a script, bench/ is first on sys.path and bench/storage.py would shadow the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="kafka.batch_size (default: the config's)"
    )
    parser.add_argument("--db-url", default=None, help="default: a temporary SQLite file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the scorer")
    parser.add_argument("--device", default="cpu", help="scoring device: cpu, cuda or auto")
    parser.add_argument(
        "--format",
        choices=["json", "avro"],
        default="json",
        help="record values: JSON, or Avro of examples/fraud.avsc with Schema Registry framing",
    )
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="only the fixed-rate latency run: this many records/s, default configuration",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the --rate run")
    parser.add_argument(
        "--kafka",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--rate run: a kafka field (max_wait_s=0.5) or a librdkafka setting",
    )
    parser.add_argument(
        "--scale-out",
        type=int,
        default=0,
        metavar="N",
        help="also run the stream with 1 and with N serve processes in one group",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="first run the same benchmark on git revision REV (a temporary worktree)",
    )
    parser.add_argument(
        "--second-pass",
        action="store_true",
        help="end to end once more on a fresh topic, the retraining reservoir now full",
    )
    parser.add_argument(
        "--detectors",
        default=None,
        help="comma-separated model.detectors (default: the config's), e.g. to compare loops "
        "with --baseline on the same model",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one serve process
    parser.add_argument("--produce-child", help=argparse.SUPPRESS)  # internal: paced producer
    parser.add_argument("--status", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _serve_child(Path(args.child), Path(args.status))
    if args.produce_child:
        return _produce_child(Path(args.produce_child), Path(args.status), args.rate)

    if args.baseline:
        _run_baseline(args.baseline)

    import torch
    from confluent_kafka import Consumer, Producer

    from anomaly.config import config_from_dict
    from anomaly.estimator.model import AnomalyModel
    from anomaly.synthetic.datasets import generate_fraud
    from streams.broker import EmbeddedBroker, create_topic
    from streams.kafka import consumer_settings
    from streams.replay import encode_values

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    db_url = args.db_url or f"sqlite:///{tmp / 'bench.db'}"
    # A database given on the command line keeps the rows of earlier runs, a full retraining
    # reservoir among them (a fresh one fills first): a pipeline of its own for each run there.
    pipeline_name = "bench" if args.db_url is None else f"bench-{uuid.uuid4().hex[:6]}"
    example = Path(__file__).resolve().parents[1] / "examples" / "fraud.yaml"
    import yaml

    schema = yaml.safe_load(example.read_text())["schema"]

    print(f"training a small fraud model ({args.threads} torch thread(s)) ...", flush=True)
    labels = ["is_anomaly", "anomaly_kind"]
    model_section = {"detectors": args.detectors.split(",")} if args.detectors else {}
    base = config_from_dict({"name": "bench", "schema": schema, "model": model_section}, environ={})
    # Trained on the CPU whatever --device says: the service loads the bundle on its device.
    model = AnomalyModel.from_config(
        base, max_epochs=3, max_steps=300, progress=False, device="cpu"
    )
    train = generate_fraud(5000, anomaly_fraction=0.0, seed=1).drop(columns=labels)
    model.fit(train)
    bundle = tmp / "model"
    model.save(bundle)

    records = generate_fraud(args.records, anomaly_fraction=0.01, seed=2)
    kafka_format = {"format": args.format}
    if args.format == "avro":
        kafka_format["avro_schema"] = str(example.parent / "fraud.avsc")
    values = encode_values(
        records, config_from_dict({"name": "bench", "schema": schema, "kafka": kafka_format}, {})
    )
    keys = [k.encode() for k in records[schema["entity_field"]]]

    with EmbeddedBroker(log_path=tmp / "tansu.log") as broker:
        topic = f"bench-{uuid.uuid4().hex[:6]}"
        create_topic(broker.bootstrap_servers, topic, partitions=args.partitions)

        def config(group: str, topic_name: str = topic):
            # The default configuration: only the connection, the database and the model set.
            tuning = {"batch_size": args.batch_size} if args.batch_size else {}
            return config_from_dict(
                {
                    "name": pipeline_name,
                    "schema": schema,
                    "kafka": {
                        "bootstrap_servers": broker.bootstrap_servers,
                        "topic": topic_name,
                        "group_id": group,
                        **tuning,
                        **kafka_format,
                    },
                    "database": {"url": db_url},
                    "serve": {
                        "metrics_port": None,
                        "model_dir": str(bundle),
                        "threads": args.threads,
                        "device": args.device,
                        "model_poll_s": 3600,
                    },
                },
                environ={},
            )

        if args.rate:
            cfg = config("bench-rate")
            _override_kafka(cfg, args.kafka)
            n = int(args.rate * args.seconds)
            report = _latency_run(cfg, records.iloc[:n], args.rate, broker, tmp, args.partitions)
            print(
                f"fixed rate {args.rate:,.0f} records/s for {args.seconds:.0f} s, kafka settings "
                f"max_wait_s={cfg.kafka.max_wait_s}, batch_size={cfg.kafka.batch_size}"
                + (f", {cfg.kafka.settings}" if cfg.kafka.settings else "")
                + f", db {db_url.split(':')[0]}\n{report}"
            )
            return 0

        t = time.perf_counter()
        _produce_all(Producer, broker.bootstrap_servers, topic, keys, values)
        print(f"produced {len(values):,} records in {time.perf_counter() - t:.1f} s", flush=True)

        # 1. Raw consume, same settings, no processing. Manual assignment (no group join), so
        #    it can be repeated: the median of three runs.
        from confluent_kafka import TopicPartition

        raw_rates = []
        for run in range(3):
            consumer = Consumer(consumer_settings(config(f"bench-raw-{run}")))
            consumer.assign([TopicPartition(topic, p, 0) for p in range(args.partitions)])
            got, first = 0, None
            deadline = time.monotonic() + 120
            while got < len(values) and time.monotonic() < deadline:
                batch = consumer.consume(args.batch_size or 1000, 0.25)
                if batch and first is None:
                    first = time.perf_counter()
                for m in batch:
                    if m.error() is None:
                        m.value()
                        got += 1
            raw_s = time.perf_counter() - (first or time.perf_counter())
            consumer.close()
            raw_rates.append(got / raw_s)
        raw_rate = float(np.median(raw_rates))
        print(
            f"raw consume:  {got:,} records, {raw_rate:,.0f} records/s "
            f"(median of {', '.join(f'{r:,.0f}' for r in raw_rates)})"
        )

        # 2. End to end.
        e2e_rate, service = _end_to_end(config("bench-serve"), db_url)
        print(f"ratio end-to-end / raw consume: {e2e_rate / raw_rate:.2f} (goal >= 0.5)")
        ours_precision = _precision(_alerted_ids(db_url, pipeline_name), records)
        peer_rate, peer_ids = float("nan"), []
        if args.format == "json":  # the peer reads JSON values only
            peer_rate, peer_ids = _naive_peer(
                broker.bootstrap_servers, topic, args.partitions, db_url, train, schema,
                model.target_fpr,
            )  # fmt: skip
        print(
            f"naive peer:   {peer_rate:,.0f} records/s, {len(peer_ids)} alerts, precision "
            f"{_precision(peer_ids, records):.3f} (ours {ours_precision:.3f}); "
            f"ours / peer: {e2e_rate / peer_rate:.2f}x (goal >= 4)"
        )
        _print_stages(service)
        if args.second_pass:
            again = f"{topic}-again"
            create_topic(broker.bootstrap_servers, again, partitions=args.partitions)
            _produce_all(Producer, broker.bootstrap_servers, again, keys, values)
            print("second pass (the retraining reservoir full):")
            _, service = _end_to_end(config("bench-serve-again", again), db_url)
            _print_stages(service)

        # 3. Latency at half the end-to-end rate.
        rate = e2e_rate / 2
        n_lat = int(rate * args.latency_seconds)
        cfg = config("bench-lat", f"{topic}-lat")
        report = _latency_run(cfg, records.iloc[:n_lat], rate, broker, tmp, args.partitions)
        print(f"latency at {rate:,.0f} records/s (half the end-to-end rate):\n{report}")

        # 4. Scale-out: 1 and N serve processes in one group.
        if args.scale_out:
            rates = {}
            for n in sorted({1, args.scale_out}):
                scale_topic = f"{topic}-x{n}"
                create_topic(broker.bootstrap_servers, scale_topic, partitions=args.partitions)
                pipeline = tmp / f"scale-{n}.yaml"
                pipeline.write_text(yaml.safe_dump(config(f"bench-x{n}", scale_topic).to_dict()))
                rates[n] = _scale_out(n, pipeline, tmp, args.partitions, lambda t=scale_topic: (
                    _produce_all(Producer, broker.bootstrap_servers, t, keys, values)
                ))  # fmt: skip
                print(
                    f"scale-out:    {n} serve process(es): {rates[n]:,.0f} records/s "
                    f"= {rates[n] / raw_rate:.2f}x raw consume",
                    flush=True,
                )
            if args.scale_out > 1:
                print(
                    f"scale-out {args.scale_out} / 1 processes: "
                    f"{rates[args.scale_out] / rates[1]:.2f}x"
                )
    return 0


def _end_to_end(cfg, db_url: str):
    """``ScoringService`` over every record on ``cfg``'s topic: records/s from the first batch to
    the last commit, and the service (its totals and stage metrics)."""
    from streams.service import ScoringService

    service = ScoringService(cfg, stop_when_idle_s=3.0)
    span = _instrument(service)
    service.run()
    e2e_s = span["last"] - span["first"]
    rate = service.totals.consumed / e2e_s
    print(
        f"end to end:   {service.totals.consumed:,} records in {e2e_s:.2f} s = "
        f"{rate:,.0f} records/s ({service.totals.alerts} alerts, db {db_url.split(':')[0]})"
    )
    return rate, service


def _print_stages(service) -> None:
    stages = {
        name: (h._sum.get(), sum(b.get() for b in h._buckets))
        for name, h in service.metrics.stage.items()
    }
    print(
        "stage seconds per 1k records: "
        + ", ".join(
            f"{k} {1000 * s / max(1, service.totals.consumed):.3f}" for k, (s, _) in stages.items()
        )
    )


def _run_baseline(rev: str) -> None:
    """This script with the same arguments, importing ``anomaly``, ``streams`` and ``storage``
    from a worktree of ``rev``: a before/after in one run, on the same machine and load."""
    repo = _HERE.parent
    tree = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rev],
                   check=True, capture_output=True)  # fmt: skip
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--baseline")
    del argv[i : i + 2]
    try:
        print(f"== baseline {rev} ==", flush=True)
        subprocess.run([sys.executable, __file__, *argv],
                       env={**os.environ, "PYTHONPATH": str(tree)}, check=True)  # fmt: skip
        print("== this tree ==", flush=True)
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                       check=False, capture_output=True)  # fmt: skip


def _naive_peer(
    bootstrap: str, topic: str, partitions: int, db_url: str, train, schema: dict, target: float
) -> tuple[float, list[str]]:
    """The pipeline a user would write instead of ``anomaly serve``, on the same records,
    broker and database: a confluent-kafka consumer, ``json.loads`` per message into a pandas
    frame, one-hot categoricals, scikit-learn's IsolationForest (threshold: the training rows'
    score quantile at the target false-positive rate), an SQLAlchemy insert of the alerts, and
    a Kafka commit per batch of 1,000. Returns records/s (first batch to last commit) and the
    alerted record ids."""
    import json

    import pandas as pd
    import sqlalchemy as sa
    from confluent_kafka import Consumer, TopicPartition
    from sklearn.ensemble import IsolationForest

    features = [*schema["numeric"], *schema["categorical"]]

    def encode(frame):
        return pd.get_dummies(frame[features], columns=schema["categorical"], dtype=float)

    x_train = encode(train)
    forest = IsolationForest(random_state=0).fit(x_train.to_numpy())
    threshold = np.quantile(-forest.score_samples(x_train.to_numpy()), 1 - target)
    engine = sa.create_engine(db_url)
    table = sa.Table(
        "naive_peer_alerts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("record_id", sa.String(64)),
        sa.Column("score", sa.Float),
        sa.Column("ingest_time", sa.DateTime(timezone=True)),
    )
    table.drop(engine, checkfirst=True)
    table.create(engine)
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "naive-peer", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    alerted: list[str] = []
    first = last = None
    seen, idle_since = 0, time.monotonic()
    while time.monotonic() - idle_since < 3.0:
        batch = [m for m in consumer.consume(1000, 0.25) if m.error() is None]
        if not batch:
            continue
        idle_since = time.monotonic()
        first = first or time.perf_counter()
        frame = pd.DataFrame([json.loads(m.value()) for m in batch])
        x = encode(frame).reindex(columns=x_train.columns, fill_value=0.0)
        scores = -forest.score_samples(x.to_numpy())
        hits = frame.loc[scores > threshold, schema["id_field"]].tolist()
        if hits:
            now = pd.Timestamp.now(tz="UTC").to_pydatetime()
            rows = [
                {"record_id": r, "score": float(v), "ingest_time": now}
                for r, v in zip(hits, scores[scores > threshold], strict=True)
            ]
            with engine.begin() as conn:
                conn.execute(table.insert(), rows)
        consumer.commit(asynchronous=False)
        alerted += hits
        seen += len(batch)
        last = time.perf_counter()
    consumer.close()
    engine.dispose()
    return seen / (last - first), alerted


def _alerted_ids(db_url: str, pipeline: str) -> list[str]:
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        ids = conn.execute(
            sa.text("SELECT record_id FROM alerts WHERE pipeline = :p"), {"p": pipeline}
        )
        out = [r[0] for r in ids]
    engine.dispose()
    return out


def _precision(ids: list[str], records) -> float:
    labels = records.set_index("id")["is_anomaly"]
    return float(labels.loc[ids].mean()) if ids else float("nan")


def _override_kafka(cfg, pairs: list[str]) -> None:
    """``--kafka KEY=VALUE``: a field of the kafka section, or else a librdkafka setting."""
    import dataclasses

    fields = {f.name: f.type for f in dataclasses.fields(cfg.kafka)}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key in fields:
            setattr(cfg.kafka, key, type(getattr(cfg.kafka, key))(value))
        else:
            cfg.kafka.settings[key] = value


def _latency_run(cfg, records, rate: float, broker, tmp: Path, partitions: int) -> str:
    """Serve ``cfg`` on a fresh topic; once it holds its partitions, ``anomaly replay`` produces
    ``records`` at ``rate`` per second in another process. Latency per record: the service's
    Kafka commit done - the record's CreateTime (librdkafka sets it in the produce call).
    Reported for the records created in the first 2 s after the first one (start-up) and for
    the rest (steady state), with the group join time on its own."""
    import yaml

    from anomaly.synthetic.datasets import write_frame
    from streams.broker import create_topic
    from streams.service import ScoringService

    create_topic(broker.bootstrap_servers, cfg.kafka.topic, partitions=partitions)
    data = tmp / f"{cfg.kafka.topic}.csv"
    write_frame(records, str(data))
    pipeline = tmp / f"{cfg.kafka.topic}.yaml"
    pipeline.write_text(yaml.safe_dump(cfg.to_dict()))
    service = ScoringService(cfg)
    latencies: list[np.ndarray] = []
    created: list[np.ndarray] = []
    waits: list[np.ndarray] = []
    _instrument(service, latencies, created=created, waits=waits)
    started = time.monotonic()
    runner = threading.Thread(target=service.run)
    runner.start()
    while not service.state.assigned and time.monotonic() - started < 60:
        time.sleep(0.01)
    join_s = time.monotonic() - started
    replay = subprocess.run(
        [sys.executable, __file__, "--produce-child", str(pipeline), "--status", str(data),
         "--rate", f"{rate:.0f}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while service.totals.consumed < len(records) and time.monotonic() < deadline:
        time.sleep(0.1)
    service.stop()
    runner.join()
    if replay.returncode:
        print(replay.stdout, replay.stderr)
    if not latencies:
        return "  no records were processed"
    lat = np.concatenate(latencies) * 1000
    born = np.concatenate(created)
    early = born < born.min() + 2.0
    sizes = np.array([len(x) for x in latencies])
    lines = [
        f"  service start to partitions assigned (group join included): {join_s:.1f} s",
        f"  batches: {len(sizes):,}, records per batch median {np.median(sizes):.0f}, "
        f"max {sizes.max()}",
    ]
    stages = {
        name: (h._sum.get(), sum(b.get() for b in h._buckets))
        for name, h in service.metrics.stage.items()
    }
    lines.append(
        "  mean ms per batch: "
        + ", ".join(f"{k} {1000 * total / max(1, n):.2f}" for k, (total, n) in stages.items())
    )
    wait = np.concatenate(waits) * 1000 if waits else None
    for label, mask in (("first 2 s", early), ("after 2 s", ~early)):
        part = lat[mask]
        if len(part):
            p50, p95, p99 = np.percentile(part, [50, 95, 99])
            lines.append(
                f"  {label}: {len(part):,} records, p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
                f"p99 {p99:.1f} ms, max {part.max():.1f} ms (produce call -> Kafka commit done)"
            )
        if wait is not None and len(wait[mask]):
            # The part of it spent before the service's loop had the record: producer linger,
            # broker, fetch, and waiting for the loop to take the next batch.
            w50, w99 = np.percentile(wait[mask], [50, 99])
            lines.append(
                f"    of which produce call -> batch taken: p50 {w50:.1f} ms, p99 {w99:.1f} ms"
            )
    return "\n".join(lines)


def _produce_child(pipeline: Path, data: Path, rate: float) -> int:
    """The records of ``data`` into the pipeline's topic at ``rate`` per second, as a running
    application would send them: with the service's producer settings (idempotent, linger 5 ms)
    and a producer that is already connected. A new producer holds its first records for
    ~0.5 s while it fetches metadata and its producer id; that is the sender's start-up, not
    the service's, and is kept out of the latencies by one record to a warm-up topic first."""
    from confluent_kafka import Producer

    from anomaly.config import load_config
    from streams.kafka import producer_settings
    from streams.replay import encode_values, read_records

    cfg = load_config(pipeline, environ={})
    frame = read_records(data, cfg)
    values = encode_values(frame, cfg)
    keys = [str(k).encode() for k in frame[cfg.schema.entity_field]]
    producer = Producer(producer_settings(cfg.kafka))
    producer.produce(f"{cfg.kafka.topic}-warm-up", value=b"{}")
    producer.flush(30)
    step = max(1, int(rate // 200))  # pace every 5 ms, as `anomaly replay` does
    start = time.monotonic()
    for i, (key, value) in enumerate(zip(keys, values, strict=True)):
        producer.produce(cfg.kafka.topic, value=value, key=key)
        if (i + 1) % step == 0:
            producer.poll(0)
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return 1 if producer.flush(60) else 0


def _produce_all(producer_cls, bootstrap: str, topic: str, keys: list, values: list) -> None:
    producer = producer_cls({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for key, value in zip(keys, values, strict=True):
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)


def _scale_out(n: int, pipeline: Path, tmp: Path, partitions: int, produce) -> float:
    """Start n serve processes, wait until the group has settled, produce, return records/s."""
    import json

    statuses = [tmp / f"{pipeline.stem}-{i}.json" for i in range(n)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", str(pipeline), "--status", str(status)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            text=True,
        )
        for status in statuses
    ]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        held = [json.loads(s.read_text()) if s.exists() else [] for s in statuses]
        owned = [p for member in held for p in member]
        # Settled: every member holds partitions and together they hold each one once.
        if all(held) and sorted(owned) == list(range(partitions)):
            break
        time.sleep(0.1)
    else:
        for proc in procs:
            proc.kill()
        raise RuntimeError(f"the group of {n} serve processes did not settle: {held}")
    produce()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode:
            raise RuntimeError(f"a serve process exited with {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    spans = [r for r in results if r["consumed"]]
    print(
        "  per process: "
        + ", ".join(f"{r['consumed']:,} records in {r['last'] - r['first']:.2f} s" for r in spans)
    )
    span = max(r["last"] for r in spans) - min(r["first"] for r in spans)
    return sum(r["consumed"] for r in results) / span


def _serve_child(pipeline: Path, status: Path) -> int:
    """One serve process of the scale-out stage: reports its partitions, then its span."""
    import json

    from anomaly.config import load_config
    from streams.service import ScoringService

    service = ScoringService(load_config(pipeline, environ={}), stop_when_idle_s=4.0)
    span = _instrument(service, clock=time.monotonic)  # system-wide, comparable across processes
    done = threading.Event()

    def report() -> None:
        while not done.wait(0.05):
            held = sorted(p for _, p in service.state.assigned)
            status.with_suffix(".tmp").write_text(json.dumps(held))
            status.with_suffix(".tmp").replace(status)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    service.run()
    done.set()
    print(
        json.dumps(
            {
                "consumed": service.totals.consumed,
                "first": span.get("first"),
                "last": span.get("last"),
            }
        )
    )
    return 0


def _created_s(messages) -> np.ndarray:
    """The records' Kafka CreateTimes, seconds since the epoch."""
    return np.array([m.timestamp_ms or 0 for m in messages], dtype=np.float64) / 1000


def _instrument(
    service,
    latencies: list | None = None,
    clock=time.perf_counter,
    created: list | None = None,
    waits: list | None = None,
) -> dict:
    """Time from the first batch's start to the last batch's commit; per-record latency (and
    the records' creation times, seconds since the epoch, and how long each waited until its
    batch was taken). Works on the pipelined loop (a batch starts in ``_prepare`` and ends in
    ``_write_and_commit``) and on revisions from before it (one ``process`` call per batch), for
    ``--baseline``."""
    span: dict[str, float] = {}

    def done(messages, start: float) -> None:
        span["last"] = clock()
        if os.environ.get("BENCH_TRACE"):
            born = [m.timestamp_ms / 1000 for m in messages if m.timestamp_ms]
            wait = 1000 * (time.time() - min(born)) if born else 0.0
            took = 1000 * (span["last"] - start)
            print(f"batch {len(messages)} records {took:.1f} ms, oldest {wait:.0f} ms")
        if latencies is not None:
            born = _created_s(messages)
            latencies.append(time.time() - born)
            if created is not None:
                created.append(born)

    if hasattr(service, "_write_and_commit"):
        prepare, finish = service._prepare, service._write_and_commit

        def timed_prepare(messages, loaded):
            span.setdefault("first", clock())
            if waits is not None:
                waits.append(time.time() - _created_s(messages))
            return prepare(messages, loaded)

        def timed_finish(prepared, generation, held):
            start = clock()
            outcome = finish(prepared, generation, held)
            done(prepared.messages, start)
            return outcome

        service._prepare, service._write_and_commit = timed_prepare, timed_finish
        return span

    process = service.process

    def timed(messages):
        start = clock()
        span.setdefault("first", start)
        outcome = process(messages)
        done(messages, start)
        return outcome

    service.process = timed
    return span


if __name__ == "__main__":
    sys.exit(main())
