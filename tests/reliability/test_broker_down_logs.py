"""What ``anomaly serve`` and ``anomaly replay`` write while the broker is down: JSON lines
(librdkafka's own lines included), each repeated error once per interval, no Alembic chatter.

(Here rather than in tests/streams: that directory is imported as a package named ``streams``,
which shadows the real one for in-process imports such as ``streams.metrics``.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from streams.broker import free_port
from streams.metrics import JsonFormatter, RepeatFilter

pytestmark = pytest.mark.reliability


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _logger(name: str, filt: logging.Filter) -> tuple[logging.Logger, list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger(name)
    logger.handlers[:] = [Keep()]
    logger.filters[:] = [filt]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, records


def test_repeat_filter_lets_each_message_through_once_per_interval():
    clock = _Clock()
    logger, records = _logger("test.repeat", RepeatFilter(30.0, clock=clock))
    refused = "127.0.0.1:9/bootstrap: Connect failed: Connection refused (after %dms in state X)"
    for i in range(100):
        logger.error(refused, i % 3)  # the duration differs, the problem does not
        logger.warning("kafka error: %s", "1/1 brokers are down")
        clock.now += 0.05
    assert [r.getMessage() for r in records] == [
        refused % 0,
        "kafka error: 1/1 brokers are down",
    ]
    # Another message, or the same at another level, is not a repeat.
    logger.error("kafka error: %s", "1/1 brokers are down")
    logger.error("something else")
    assert len(records) == 4

    clock.now += 30.0
    logger.error(refused, 7)
    last = records[-1]
    assert last.getMessage() == refused % 7 + " (repeated 99 times in the last 35 s)"
    entry = json.loads(JsonFormatter().format(last))
    assert entry["repeated"] == 99 and entry["message"] == last.getMessage()
    # The count starts again after each line let through.
    clock.now += 31.0
    logger.error(refused, 0)
    assert records[-1].getMessage() == refused % 0
    assert not hasattr(records[-1], "fields")
    # librdkafka's own count of the lines it held back makes no new message either: the first
    # line of a problem has none, a repeat ends "(after 0ms in state X, 1 identical error(s)
    # suppressed)".
    n = len(records)
    logger.error(refused.replace("X)", "X, 1 identical error(s) suppressed)"), 0)
    assert len(records) == n


def test_repeat_filter_keeps_a_bounded_table_of_messages():
    clock = _Clock()
    filt = RepeatFilter(30.0, clock=clock)
    logger, records = _logger("test.repeat.bounded", filt)
    for i in range(5 * RepeatFilter.MAX_KEYS):
        logger.warning("distinct %d", i)
    assert len(records) == 5 * RepeatFilter.MAX_KEYS
    assert len(filt._seen) <= RepeatFilter.MAX_KEYS


def _run_without_broker(argv: list[str], seconds: float, sig: int) -> tuple[int, list[str]]:
    """Run ``anomaly ARGV`` for ``seconds`` once its Kafka client exists, then send ``sig``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomaly.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        time.sleep(seconds)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.splitlines()


def _pipeline(tmp_path: Path, schema: dict, bundle: Path | None) -> Path:
    path = tmp_path / "pipeline.yaml"
    data = {
        "name": "no-broker",
        "schema": schema,
        # Nothing listens there: every connection attempt is refused at once.
        "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}", "topic": "t"},
        "database": {"url": f"sqlite:///{tmp_path / 'anomaly.db'}"},
        "serve": {"metrics_port": None, "model_dir": str(bundle), "threads": 1, "device": "cpu"},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_serve_without_a_broker_writes_a_few_json_lines(tmp_path, trained_model, fraud_schema):
    config = _pipeline(tmp_path, fraud_schema, trained_model.bundle)
    # Model loading and warm-up take a few seconds; then the consumer meets no broker for ~6 s
    # (librdkafka retries every ~50 ms: ~40 lines a second before the rate limit).
    rc, lines = _run_without_broker(["serve", "--config", str(config)], 12.0, signal.SIGTERM)
    text = "\n".join(lines)
    assert rc == 0, text
    entries = []
    for line in lines:
        assert line.startswith("{"), f"not a JSON log line: {line!r}\n{text}"
        entries.append(json.loads(line))
    messages = [e["message"] for e in entries]
    assert "starting consumer" in messages and messages[-1] == "stopped", text
    refused = [e for e in entries if "Connection refused" in e["message"]]
    # librdkafka's own line, once per client, and the consumer's and producer's error_cb.
    assert {e["logger"] for e in refused} == {"librdkafka", "streams.kafka"}, text
    assert len(refused) <= 4, text
    # Alembic's INFO lines stay out; the store says in one line that it migrated.
    assert not [e for e in entries if e["logger"].startswith("alembic")], text
    assert "database migrated from base to " in text


def test_replay_without_a_broker_writes_a_few_lines(tmp_path, fraud_schema):
    from anomaly.synthetic.datasets import generate_fraud, write_frame

    config = _pipeline(tmp_path, fraud_schema, None)
    data = tmp_path / "records.csv"
    write_frame(generate_fraud(100, anomaly_fraction=0.0, seed=3), str(data))
    argv = ["replay", "--config", str(config), "--data", str(data)]
    rc, lines = _run_without_broker(argv, 6.0, signal.SIGINT)
    text = "\n".join(lines)
    assert rc == 130 and lines[-1] == "interrupted", text
    assert not [line for line in lines if line.startswith("%")], text  # raw librdkafka lines
    refused = [line for line in lines if "Connection refused" in line]
    assert 1 <= len(refused) <= 2, text
    assert any(" librdkafka FAIL [rdkafka#producer-" in line for line in refused), text
