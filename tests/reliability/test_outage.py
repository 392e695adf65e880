"""Database outage: the PostgreSQL connection is cut by a loopback TCP proxy the test controls
(open connections reset, new ones refused) while records keep arriving. ``anomaly serve`` stays
up, reports not ready, commits nothing, reconnects by itself and catches up: nothing lost, nothing
duplicated.

CI cuts for 8 s; the documented full run (docs/reliability.md) cuts for 25 s:

    RELIABILITY_OUTAGE_S=25 RELIABILITY_OUTAGE_RECORDS=8000 \
        python -m pytest tests/reliability/test_outage.py -m reliability -s
"""

from __future__ import annotations

import json
import time

import pytest
from harness import (
    Ledger,
    RssSampler,
    ServeProcess,
    StreamProducer,
    committed_offsets,
    dispose_engines,
    end_offsets,
    env_float,
    env_int,
    http_get,
    make_stream,
    records_seen,
    report,
    wait_for,
)
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from anomaly.config import load_config
from streams.broker import create_topic, free_port

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.postgres]


def test_postgres_cut_by_proxy_pauses_reconnects_and_loses_nothing(
    pg_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model
):
    cut_s = env_float("RELIABILITY_OUTAGE_S", 8.0)
    n_records = env_int("RELIABILITY_OUTAGE_RECORDS", 3000)
    stream = make_stream(trained_model.model, n_records, seed=33)
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    url = make_url(pg_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    port = free_port()
    config = pipeline_file(
        proxied,
        trained_model.bundle,
        schema={"max_record_bytes": 1500},
        kafka={"batch_size": 100},
        serve={"metrics_port": port},
    )
    cfg = load_config(config)
    ready_url = f"http://127.0.0.1:{port}/readyz"
    serve = ServeProcess(config, tmp_path / "serve.log")
    sampler = RssSampler(serve, every=0.5)
    sampler.start()
    # Spread the stream over the whole scenario: before, during and after the cut.
    rate = len(stream.values) / (cut_s + 12.0)
    producer = StreamProducer(kafka_bootstrap, topic_name, stream.values, rate=rate)
    figures: dict = {"cut_s": cut_s}
    try:
        wait_for(lambda: http_get(ready_url)[0] == 200, 120, "the service to be ready")
        producer.start()
        wait_for(lambda: records_seen(pg_url, cfg.name) > 200, 60, "records before the cut")

        proxy.cut()
        t_cut = time.monotonic()
        seen_at_cut = records_seen(pg_url, cfg.name)
        wait_for(lambda: http_get(ready_url)[0] == 503, 30, "/readyz to report the outage")
        figures["not_ready_after_s"] = round(time.monotonic() - t_cut, 2)
        status, body = http_get(ready_url)
        assert status == 503 and json.loads(body)["conditions"]["database_up"] is False
        metrics = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        assert f'anomaly_database_up{{pipeline="{cfg.name}"}} 0.0' in metrics
        committed_during = committed_offsets(kafka_bootstrap, topic_name, cfg.group_id)
        while time.monotonic() - t_cut < cut_s:
            assert serve.alive(), serve.log_text()[-3000:]
            assert http_get(ready_url)[0] == 503
            time.sleep(0.5)
        # Nothing was written or committed while the database was away.
        assert records_seen(pg_url, cfg.name) == seen_at_cut
        assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == committed_during
        produced_during_cut = producer.produced
        backlog = producer.produced
        proxy.restore()
        t_restore = time.monotonic()
        wait_for(lambda: records_seen(pg_url, cfg.name) > seen_at_cut, 60, "the first write after")
        figures["first_write_after_restore_s"] = round(time.monotonic() - t_restore, 2)
        wait_for(lambda: http_get(ready_url)[0] == 200, 60, "/readyz to recover")
        figures["ready_after_restore_s"] = round(time.monotonic() - t_restore, 2)
        wait_for(lambda: records_seen(pg_url, cfg.name) >= backlog, 60, "the backlog")
        figures["backlog_drained_after_restore_s"] = round(time.monotonic() - t_restore, 2)
        producer.finish(timeout=120)
        total = len(stream.values)
        wait_for(lambda: records_seen(pg_url, cfg.name) == total, 120, "the end of the stream")
        assert serve.stop() == 0, serve.log_text()[-3000:]
    finally:
        sampler.stop()
        if serve.alive():
            serve.kill()
        proxy.close()
        dispose_engines()

    ledger = Ledger.read(pg_url, cfg.name, topic_name)
    ends = end_offsets(kafka_bootstrap, topic_name, total)
    figures |= ledger.check_exactly_once(
        records_in=total,
        expected_alert_ids=stream.expected_alert_ids,
        expected_dead=stream.n_bad,
        end_offsets=ends,
    )
    assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == ends
    logs = serve.log_lines()
    retries = [e for e in logs if e.get("message") == "batch not written, retrying"]
    assert retries, "the service never noticed the outage"
    assert not [e for e in logs if e.get("level") in ("error", "critical")], logs[-5:]
    report(
        "database_outage",
        figures
        | {
            "records_produced_during_cut": produced_during_cut - seen_at_cut,
            "write_retries_logged": len(retries),
            "connections_reset": proxy.stats.reset,
            "peak_rss_mb": round(sampler.peak_mb, 1),
        },
    )


def test_lost_commit_reply_is_retried_without_duplicates(
    pg_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model
):
    """The ambiguous commit: PostgreSQL commits a batch but the reply is lost with the connection.
    The service cannot know the batch was written and writes it again; the store's offset fencing
    must turn that second write into a no-op (no alert, dead letter or count twice)."""
    stream = make_stream(trained_model.model, env_int("RELIABILITY_OUTAGE_RECORDS", 3000), seed=34)
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    url = make_url(pg_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    config = pipeline_file(
        proxied, trained_model.bundle, schema={"max_record_bytes": 1500}, kafka={"batch_size": 100}
    )
    cfg = load_config(config)
    serve = ServeProcess(config, tmp_path / "serve.log", "--stop-when-idle", "4")
    total = len(stream.values)
    producer = StreamProducer(kafka_bootstrap, topic_name, stream.values, rate=total / 20)
    try:
        producer.start()
        losses = 0
        # Several lost replies, spread over the stream (the first on the first batch written).
        for _ in range(3):
            # The alert COPY: in every batch with alerts, and never sent as a prepared statement
            # (psycopg prepares repeated statements; their text is not resent).
            proxy.lose_next_commit_reply(b"COPY alerts")
            wait_for(lambda n=losses: proxy.stats.commit_replies_lost > n, 60, "a lost commit")
            losses += 1
            time.sleep(2.0)
        producer.finish(timeout=120)
        assert serve.wait(180) == 0, serve.log_text()[-3000:]
    finally:
        if serve.alive():
            serve.kill()
        proxy.close()
        dispose_engines()
    ledger = Ledger.read(pg_url, cfg.name, topic_name)
    figures = ledger.check_exactly_once(
        records_in=total,
        expected_alert_ids=stream.expected_alert_ids,
        expected_dead=stream.n_bad,
        end_offsets=end_offsets(kafka_bootstrap, topic_name, total),
    )
    retries = [e for e in serve.log_lines() if e.get("message") == "batch not written, retrying"]
    assert len(retries) >= losses
    report(
        "lost_commit_reply",
        figures | {"commit_replies_lost": losses, "write_retries_logged": len(retries)},
    )
