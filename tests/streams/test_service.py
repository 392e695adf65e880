"""The scoring service end to end: real broker, real databases, real model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from anomaly.config import load_config
from anomaly.errors import BundleError
from anomaly.synthetic.datasets import write_frame
from storage.store import AlertStore
from streams.broker import create_topic
from streams.replay import encode_rows, replay
from streams.service import ScoringService

from .conftest import (
    LABELS,
    bad_records,
    committed_offsets,
    consume_all,
    end_offsets,
    produce,
)

pytestmark = [pytest.mark.kafka]


def serve_once(config: Path, idle_s: float = 3.0) -> ScoringService:
    service = ScoringService(load_config(config), stop_when_idle_s=idle_s)
    assert service.run() == 0
    return service


@pytest.mark.postgres
def test_end_to_end_alerts_dead_letters_offsets_and_rerun(
    db_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model, fraud_records, sql
):
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    config = pipeline_file(
        db_url,
        trained_model.bundle,
        schema={"max_record_bytes": 1500},
        kafka={"scores_topic": f"{topic_name}.scores"},
    )
    cfg = load_config(config)
    data = tmp_path / "records.parquet"
    write_frame(fraud_records, str(data))
    assert replay(cfg, data, progress=False).produced == len(fraud_records)
    first = json.loads(fraud_records.drop(columns=LABELS).iloc[0].to_json(date_format="iso"))
    bad = bad_records(first | {"id": "bad"})
    produce(kafka_bootstrap, topic_name, [value for value, _ in bad], partition=1)
    total = len(fraud_records) + len(bad)

    service = serve_once(config)
    assert service.totals.consumed == total
    assert service.totals.dead_letters == len(bad)

    # Exactly one alert per record over the threshold, as the model itself predicts it.
    features = fraud_records.drop(columns=LABELS)
    expected = set(features["id"][trained_model.model.predict(features) == 1])
    assert expected, "the test data should contain alerts"
    rows = sql(db_url, "SELECT record_id, model_version, kafka_offset FROM alerts")
    assert sorted(r[0] for r in rows) == sorted(expected)
    assert {r[1] for r in rows} == {trained_model.version}
    # Each alert row carries its record's entity, event time, scores and explanation.
    stored = sql(
        db_url,
        "SELECT record_id, entity, event_time, ensemble_score, top_features FROM alerts",
    )
    by_id = features.set_index("id")
    scores = trained_model.model.decision_function(by_id.loc[[r[0] for r in stored]])
    for (record_id, entity, event_time, score, top), want in zip(stored, scores, strict=True):
        row = by_id.loc[record_id]
        assert entity == row["card_id"]
        stamp = pd.Timestamp(event_time)  # SQLite: naive UTC text; PostgreSQL: aware
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        assert stamp == row["event_time"]
        assert score == pytest.approx(want, rel=1e-6)  # float32 networks, other batches
        top = json.loads(top) if isinstance(top, str) else top
        assert len(top) == 3 and all(t["feature"] in features.columns for t in top)
    # Some of the generated anomalies are caught (how many is the core's business).
    labeled = set(fraud_records["id"][fraud_records["is_anomaly"] == 1])
    assert expected & labeled

    # Every bad record dead-lettered with its reason, in the table and on the topic.
    dead = sql(db_url, "SELECT error_kind, error_message, raw FROM dead_letters")
    assert sorted(r[0] for r in dead) == sorted(kind for _, kind in bad)
    assert all(r[1] for r in dead)
    assert {bytes(r[2]) for r in dead} == {value for value, _ in bad}
    dlq = consume_all(kafka_bootstrap, cfg.dead_letter_topic, len(bad))
    assert len(dlq) == len(bad)
    headers = [dict(m.headers()) for m in dlq]
    assert sorted(h["error_kind"].decode() for h in headers) == sorted(k for _, k in bad)
    assert {h["source_topic"].decode() for h in headers} == {topic_name}

    # One score message per valid record, keyed by record id.
    scores = consume_all(kafka_bootstrap, f"{topic_name}.scores", len(fraud_records))
    assert sorted(m.key().decode() for m in scores) == sorted(features["id"])
    alerted = {m.key().decode() for m in scores if json.loads(m.value())["alert"]}
    assert alerted == expected

    # Offsets at the end of the topic, in the database and in Kafka.
    ends = end_offsets(kafka_bootstrap, topic_name, total)
    assert service.store.load_offsets(cfg.name, topic_name) == ends
    assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == ends
    [(seen, scored, dead_n)] = sql(
        db_url,
        "SELECT sum(records_seen), sum(records_scored), sum(records_dead_lettered) "
        "FROM stream_stats",
    )
    assert (seen, scored, dead_n) == (total, len(fraud_records), len(bad))

    # A second serve over the same topic adds nothing.
    again = serve_once(config, idle_s=2.0)
    assert again.totals.consumed == 0
    assert len(sql(db_url, "SELECT id FROM alerts")) == len(expected)
    assert len(sql(db_url, "SELECT id FROM dead_letters")) == len(bad)
    assert sql(db_url, "SELECT sum(records_seen) FROM stream_stats") == [(total,)]


def test_resumes_from_database_offsets_when_kafka_commit_is_lost(
    sqlite_url, kafka_bootstrap, topic_name, pipeline_file, trained_model, fraud_records, sql
):
    """The database, not Kafka, says where to resume: a new consumer group (no Kafka commits at
    all) over the same database scores nothing twice."""
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    config = pipeline_file(sqlite_url, trained_model.bundle)
    cfg = load_config(config)
    values = [
        json.dumps(r).encode()
        for r in json.loads(
            fraud_records.drop(columns=LABELS).to_json(orient="records", date_format="iso")
        )
    ]
    produce(kafka_bootstrap, topic_name, values[:600])
    serve_once(config, idle_s=2.0)
    n_alerts = len(sql(sqlite_url, "SELECT id FROM alerts"))
    produce(kafka_bootstrap, topic_name, values[600:])
    lost = pipeline_file(sqlite_url, trained_model.bundle, kafka={"group_id": "fresh-group"})
    service = serve_once(lost, idle_s=2.0)
    assert service.totals.consumed == len(values) - 600
    assert sql(sqlite_url, "SELECT sum(records_seen) FROM stream_stats") == [(len(values),)]
    assert len(sql(sqlite_url, "SELECT id FROM alerts")) >= n_alerts
    ids = [r[0] for r in sql(sqlite_url, "SELECT record_id FROM alerts")]
    assert len(ids) == len(set(ids))
    assert service.store.load_offsets(cfg.name, topic_name) == {0: len(values)}


def start_serve(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "anomaly.cli", "serve", "--config", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def final_counts(output: bytes) -> dict:
    """The JSON log line the service writes when it stops."""
    for line in reversed(output.decode(errors="replace").splitlines()):
        if line.startswith("{") and '"message": "stopped"' in line:
            return json.loads(line)
    raise AssertionError(f"no 'stopped' log line in:\n{output.decode(errors='replace')[-3000:]}")


@pytest.mark.postgres
def test_two_serve_processes_share_four_partitions_exactly_once(
    pg_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model, fraud_records, sql
):
    create_topic(kafka_bootstrap, topic_name, partitions=4)
    config = pipeline_file(pg_url, trained_model.bundle, kafka={"batch_size": 100})
    cfg = load_config(config)
    data = tmp_path / "records.csv"
    write_frame(fraud_records, str(data))
    procs = [start_serve(config, "--stop-when-idle", "4")]
    time.sleep(2.0)
    procs.append(start_serve(config, "--stop-when-idle", "4"))
    # Records arrive while the second process joins: the group rebalances mid-stream.
    replay(cfg, data, rate=400, progress=False)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    counts = [final_counts(out) for out in outputs]
    assert sum(c["consumed"] for c in counts) >= len(fraud_records)
    n = len(fraud_records)
    assert sql(pg_url, "SELECT sum(records_seen), sum(records_scored) FROM stream_stats") == [
        (n, n)
    ]
    ids = [r[0] for r in sql(pg_url, "SELECT record_id FROM alerts")]
    assert len(ids) == len(set(ids))
    features = fraud_records.drop(columns=LABELS)
    assert set(ids) == set(features["id"][trained_model.model.predict(features) == 1])
    ends = end_offsets(kafka_bootstrap, topic_name, n)
    assert len(ends) == 4
    assert AlertStore(pg_url).load_offsets(cfg.name, topic_name) == ends


def test_sigterm_drains_the_batch_and_exits_zero(
    sqlite_url,
    tmp_path,
    kafka_bootstrap,
    topic_name,
    pipeline_file,
    trained_model,
    fraud_records,
    sql,
):
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    config = pipeline_file(sqlite_url, trained_model.bundle, kafka={"batch_size": 50})
    cfg = load_config(config)
    data = tmp_path / "records.csv"
    write_frame(fraud_records, str(data))
    proc = start_serve(config)
    replay(cfg, data, rate=300, progress=False)  # ~4 s: the service is mid-stream
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            seen = sql(sqlite_url, "SELECT sum(records_seen) FROM stream_stats")[0][0]
        except Exception:  # the tables appear once the service has migrated the database
            seen = None
        if seen:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]
    consumed = final_counts(output)["consumed"]
    # Everything consumed was written, with its offsets, before the exit.
    [(seen,)] = sql(sqlite_url, "SELECT sum(records_seen) FROM stream_stats")
    assert seen == consumed > 0
    assert AlertStore(sqlite_url).load_offsets(cfg.name, topic_name) == {0: consumed}
    assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == {0: consumed}


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _manifest_sha256(bundle: Path) -> str:
    """A bundle's identity, as `anomaly models register` records it."""
    import hashlib

    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def _impostor(trained_model, path: Path) -> Path:
    """Another self-consistent bundle (every hash in order) at ``path``: same weights, saved
    again under another explicit version, so its manifest, and so its identity, differ."""
    from anomaly.estimator.model import AnomalyModel

    model = AnomalyModel.load(trained_model.bundle)
    model.version = "impostor"
    model.save(path)
    assert _manifest_sha256(path) != _manifest_sha256(trained_model.bundle)
    return path


def _register(cfg, version: str, bundle: Path, sha: str, *, activate: bool = True) -> None:
    from storage.records import ModelVersionRecord

    store = AlertStore.from_config(cfg)
    try:
        store.upgrade()
        store.register_model_version(
            ModelVersionRecord(
                pipeline=cfg.name, version=version, bundle_path=str(bundle), bundle_sha256=sha
            ),
            activate=activate,
        )
    finally:
        store.close()


def _wait(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.postgres
@pytest.mark.reliability
def test_database_outage_pauses_then_resumes_and_model_switches_live(
    pg_url, kafka_bootstrap, topic_name, pipeline_file, trained_model, fraud_records, sql
):
    """PostgreSQL refuses connections mid-stream: the service pauses, reports not ready, commits
    nothing, and catches up once it is back. Then a new model version is activated and the
    running service scores with it from the next batch on."""
    from sqlalchemy import create_engine, text

    from storage.records import ModelVersionRecord

    create_topic(kafka_bootstrap, topic_name, partitions=1)
    cfg = load_config(pipeline_file(pg_url, trained_model.bundle))
    service = ScoringService(cfg)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    rows = json.loads(
        fraud_records.drop(columns=LABELS).to_json(orient="records", date_format="iso")
    )
    values = [json.dumps(r).encode() for r in rows]

    def seen() -> int:
        try:
            return sql(pg_url, "SELECT coalesce(sum(records_seen), 0) FROM stream_stats")[0][0]
        except Exception:  # before the service has created the tables, or while PG refuses
            return -1

    try:
        produce(kafka_bootstrap, topic_name, values[:300])
        _wait(lambda: seen() == 300, what="the first 300 records")
        url = service.metrics_server.url
        assert _get(f"{url}/readyz")[0] == 200
        assert _get(f"{url}/healthz")[0] == 200
        body = _get(f"{url}/metrics")[1]
        assert f'anomaly_records_consumed_total{{pipeline="{cfg.name}"}} 300.0' in body
        assert f'anomaly_database_up{{pipeline="{cfg.name}"}} 1.0' in body

        name = pg_url.rsplit("/", 1)[1]
        admin = create_engine(pg_url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                {"d": name},
            )
        try:
            produce(kafka_bootstrap, topic_name, values[300:600])
            _wait(lambda: _get(f"{url}/readyz")[0] == 503, what="not ready")
            assert f'anomaly_database_up{{pipeline="{cfg.name}"}} 0.0' in _get(f"{url}/metrics")[1]
            time.sleep(1.5)  # a few retries
            assert runner.is_alive()
            assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == {0: 300}
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            admin.dispose()
        _wait(lambda: seen() == 600, what="catching up after the outage")
        _wait(lambda: _get(f"{url}/readyz")[0] == 200, what="ready again")

        service.store.register_model_version(
            ModelVersionRecord(
                pipeline=cfg.name,
                version="v2-live",
                bundle_path=str(trained_model.bundle),
                bundle_sha256=_manifest_sha256(trained_model.bundle),
            ),
            activate=True,
        )
        _wait(lambda: service.loaded.version == "v2-live", what="the model switch")
        features = fraud_records.drop(columns=LABELS)
        alerting = [
            r for r, hit in zip(rows, trained_model.model.predict(features), strict=True) if hit
        ]
        produce(
            kafka_bootstrap,
            topic_name,
            [json.dumps(r | {"id": f"{r['id']}-v2"}).encode() for r in alerting],
        )
        _wait(lambda: seen() == 600 + len(alerting), what="records after the switch")
        body = _get(f"{url}/metrics")[1]
        assert f'anomaly_model_version_info{{pipeline="{cfg.name}",version="v2-live"}} 1.0' in body
        assert f'anomaly_scoring_device_info{{device="cpu",pipeline="{cfg.name}"}} 1.0' in body
        assert (
            "anomaly_stage_seconds_bucket{" in body and "anomaly_end_to_end_seconds_count" in body
        )
        # Consumer lag from librdkafka's statistics (emitted every 5 s).
        _wait(lambda: "anomaly_consumer_lag{" in _get(f"{url}/metrics")[1], 15, "lag gauge")
    finally:
        service.stop()
        runner.join(30)
    assert not runner.is_alive()
    versions = dict(sql(pg_url, "SELECT record_id, model_version FROM alerts"))
    assert {versions[f"{r['id']}-v2"] for r in alerting} == {"v2-live"}
    before = [v for k, v in versions.items() if not k.endswith("-v2")]
    assert set(before) == {trained_model.version}
    assert sql(pg_url, "SELECT sum(records_seen) FROM stream_stats") == [(600 + len(alerting),)]
    assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == {0: 600 + len(alerting)}


def test_micro_batches_take_what_is_ready_and_wait_only_for_a_first_record(
    sqlite_url, kafka_bootstrap, topic_name, pipeline_file, trained_model, fraud_records
):
    """Latency first (max_wait_s 0, the default): a lone record is a batch at once, without
    waiting for the batch to fill; a backlog comes in batches cut at batch_size; max_wait_s > 0
    waits that long after the first record for more."""
    from confluent_kafka import Consumer, TopicPartition

    from streams.kafka import consumer_settings
    from streams.replay import encode_values

    create_topic(kafka_bootstrap, topic_name, partitions=1)
    cfg = load_config(pipeline_file(sqlite_url, trained_model.bundle, kafka={"batch_size": 300}))
    values = encode_values(fraud_records.drop(columns=LABELS).iloc[:501], cfg)
    service = ScoringService(cfg)
    service._consumer = Consumer(consumer_settings(cfg))
    service._consumer.assign([TopicPartition(topic_name, 0, 0)])
    try:
        produce(kafka_bootstrap, topic_name, values[:1])
        started = time.monotonic()
        assert len(service._next_batch(300, 0.0)) == 1
        # Nothing more is there: the call blocks at most one idle poll, then returns nothing.
        assert service._next_batch(300, 0.0) == []
        produce(kafka_bootstrap, topic_name, values[1:])
        sizes = []
        while sum(sizes) < 500 and time.monotonic() - started < 30:
            sizes.append(len(service._next_batch(300, 0.0)))
        assert sum(sizes) == 500
        assert max(sizes) == 300  # the backlog is cut at batch_size
        # With max_wait_s the batch waits for more after its first record.
        produce(kafka_bootstrap, topic_name, values[:1])
        waited = time.monotonic()
        assert len(service._next_batch(300, 1.0)) == 1
        assert time.monotonic() - waited >= 1.0
    finally:
        service._consumer.close()


def test_records_that_used_to_stop_the_service_are_dead_lettered_with_their_reason(
    sqlite_url, kafka_bootstrap, topic_name, pipeline_file, fraud_records, trained_model, sql
):
    """Two bad records that each crashed ``serve``, and again at every restart (the batch was
    never committed): a 600 kB time string, whose invalid_time message quoted it whole and made
    its dead letter (value + message header) too large to produce; and an id holding a lone
    surrogate escape in a value with a NaN literal, decoded by json.loads, which accepts it, and
    then not encodable as the scores topic's key. Both must be dead letters, the rest scored."""
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    scores_topic = f"{topic_name}.scores"
    config = pipeline_file(sqlite_url, trained_model.bundle, kafka={"scores_topic": scores_topic})
    cfg = load_config(config)
    features = fraud_records.drop(columns=LABELS).iloc[:50]
    values = encode_rows(features)
    huge_time = json.loads(values[3]) | {"event_time": "x" * 600_000}
    values[3] = json.dumps(huge_time).encode()
    surrogate_id = values[7].replace(b'"id":"', b'"id":"\\ud800', 1)
    assert surrogate_id != values[7]
    values[7] = surrogate_id[:-1] + b',"note":NaN}'
    produce(kafka_bootstrap, topic_name, values)

    service = serve_once(config)
    assert service.totals.consumed == 50 and service.totals.dead_letters == 2
    dead = sql(sqlite_url, "SELECT kafka_offset, error_kind, error_message FROM dead_letters")
    assert [(offset, kind) for offset, kind, _ in sorted(dead)] == [
        (3, "invalid_time"),
        (7, "invalid_json"),
    ]
    assert all(len(message) < 400 for _, _, message in dead)
    assert sql(sqlite_url, "SELECT next_offset FROM consumer_offsets") == [(50,)]
    dlq = consume_all(kafka_bootstrap, cfg.dead_letter_topic, 2)
    assert sorted(bytes(m.value()) for m in dlq) == sorted([values[3], values[7]])
    scores = consume_all(kafka_bootstrap, scores_topic, 48)
    valid = features["id"].drop(index=[3, 7])
    assert sorted(m.key().decode() for m in scores) == sorted(valid)


def test_a_dead_letter_with_a_huge_message_is_produced_with_its_headers_cut(
    sqlite_url, kafka_bootstrap, topic_name, pipeline_file, trained_model
):
    """The size cap of a dead letter counted only its value: a 900 kB value with a 600 kB
    message header went past the producer's message.max.bytes, produce() raised
    MSG_SIZE_TOO_LARGE and the service stopped. Each header is cut to 1 KiB, and the headers
    count in the cap."""
    from datetime import UTC, datetime

    from storage.records import DeadLetterRecord
    from streams.outputs import HEADER_MAX_BYTES

    create_topic(kafka_bootstrap, topic_name, partitions=1)
    cfg = load_config(pipeline_file(sqlite_url, trained_model.bundle))
    service = ScoringService(cfg)
    service._producer = service._new_producer()
    message = "é" * 300_000 + "\ud800"  # not UTF-8 as it is: a lone surrogate at the end
    dead = DeadLetterRecord(
        pipeline=cfg.name,
        kafka_topic=topic_name,
        kafka_partition=0,
        kafka_offset=7,
        raw=b"v" * 900_000,
        error_kind="invalid_value",
        error_message=message,
        created_at=datetime.now(UTC),
    )
    service._produce([dead], [])
    [out] = consume_all(kafka_bootstrap, cfg.dead_letter_topic, 1)
    headers = dict(out.headers())
    assert out.value() == dead.raw
    assert all(len(value) <= HEADER_MAX_BYTES for value in headers.values())
    cut = headers["error_message"].decode("utf-8")  # cut on a character boundary
    assert cut.startswith("é" * 400) and cut.endswith("... (truncated, 600006 bytes in all)")
    assert headers["error_kind"] == b"invalid_value" and headers["source_offset"] == b"7"


def test_warm_up_records_pass_every_check_and_reach_the_alert_path(trained_model, fraud_schema):
    """The made-up warm-up batch exercises what a real batch does: all records decode and pass
    the model's checks, and some alert (so the explanation path is warmed too)."""
    from anomaly.config import config_from_dict
    from streams.avro import make_decoder
    from streams.models import WARM_UP_ROWS, typical_records
    from streams.replay import encode_values

    cfg = config_from_dict({"name": "warm", "schema": fraud_schema}, environ={})
    frame = typical_records(trained_model.model, cfg.schema, WARM_UP_ROWS)
    values = encode_values(frame, cfg)
    decoded = make_decoder(cfg).decode(
        values, partitions=[0] * len(values), offsets=list(range(len(values)))
    )
    assert decoded.n_valid == WARM_UP_ROWS and not decoded.rejected
    assert not trained_model.model.preprocessor_.validate_frame(decoded.frame)
    alerts = trained_model.model.predict(decoded.frame)
    assert 0 < alerts.sum() < WARM_UP_ROWS


def _identity_error(bundle: Path, on_disk: str, registered: str, version: str, cfg) -> str:
    return (
        f"bundle {bundle}: identity (manifest sha256) {on_disk} differs from the registered "
        f"{registered} (model version {version!r} of pipeline {cfg.name!r}); refused (another "
        "bundle, or an edited one, is in its place)"
    )


def test_serve_refuses_to_start_when_the_bundle_is_not_the_registered_one(
    sqlite_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model, sql
):
    """The registered directory was swapped for another self-consistent bundle: without the
    check it was served, and its alerts were labelled with the registered version."""
    from prometheus_client import generate_latest

    create_topic(kafka_bootstrap, topic_name, partitions=1)
    cfg = load_config(pipeline_file(sqlite_url, None))
    bundle = tmp_path / "registered"
    shutil.copytree(trained_model.bundle, bundle)
    registered = _manifest_sha256(bundle)
    _register(cfg, "v1", bundle, registered)
    shutil.rmtree(bundle)
    _impostor(trained_model, bundle)

    service = ScoringService(cfg, stop_when_idle_s=1.0)
    with pytest.raises(BundleError) as info:
        service.run()
    assert str(info.value) == _identity_error(
        bundle, _manifest_sha256(bundle), registered, "v1", cfg
    )
    assert service.loaded is None and not service.health.ready
    assert service.health.detail_snapshot()["model"] == (
        f"model version 'v1' refused (nothing loaded): {info.value}"
    )
    metrics = generate_latest(service.metrics.registry).decode()
    assert f'anomaly_model_identity_ok{{pipeline="{cfg.name}"}} 0.0' in metrics


def test_running_service_keeps_its_model_when_the_active_bundle_is_not_the_registered_one(
    sqlite_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model, caplog
):
    """A live switch to a version whose bundle on disk is not the registered one is refused: the
    service keeps scoring with its model, logs an error, says why in /readyz (still ready: it
    scores with a verified model) and sets anomaly_model_identity_ok to 0; once the registered
    bundle is back in place the switch happens and both clear."""
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    cfg = load_config(pipeline_file(sqlite_url, trained_model.bundle))
    bundle = tmp_path / "v2"
    shutil.copytree(trained_model.bundle, bundle)
    registered = _manifest_sha256(bundle)
    _register(cfg, "v2", bundle, registered, activate=False)
    shutil.rmtree(bundle)
    _impostor(trained_model, bundle)

    service = ScoringService(cfg)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    gauge = f'anomaly_model_identity_ok{{pipeline="{cfg.name}"}}'
    try:
        _wait(lambda: service.metrics_server is not None and service.health.ready, what="ready")
        url = service.metrics_server.url
        assert f"{gauge} 1.0" in _get(f"{url}/metrics")[1]
        store = AlertStore.from_config(cfg)
        store.activate_model_version(cfg.name, "v2")
        _wait(
            lambda: (
                json.loads(_get(f"{url}/readyz")[1]).get("detail")
                or service.loaded.version != trained_model.version
            ),
            what="the switch to be refused",
        )
        assert service.loaded.version == trained_model.version
        status, body = _get(f"{url}/readyz")
        expected = _identity_error(bundle, _manifest_sha256(bundle), registered, "v2", cfg)
        assert status == 200
        assert json.loads(body)["detail"] == {
            "model": f"model version 'v2' refused (scoring with {trained_model.version!r}): "
            + expected
        }
        assert f"{gauge} 0.0" in _get(f"{url}/metrics")[1]
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert errors and errors[0].getMessage() == (
            "cannot switch model version, keeping the current one"
        )
        assert errors[0].fields == {"version": "v2", "error": expected}

        shutil.rmtree(bundle)
        shutil.copytree(trained_model.bundle, bundle)  # the registered bundle is back
        _wait(lambda: service.loaded.version == "v2", what="the switch")
        assert json.loads(_get(f"{url}/readyz")[1])["detail"] == {}
        assert f"{gauge} 1.0" in _get(f"{url}/metrics")[1]
        store.close()
    finally:
        service.stop()
        runner.join(30)
    assert not runner.is_alive()
