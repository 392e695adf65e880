"""Crash in each stage: ``anomaly serve`` kills itself (SIGKILL, via ``ANOMALY_FAILPOINT``) once a
batch is decoded, scored, written to the database and committed to Kafka, one restart per stage;
at the end every record is accounted for exactly once. ``test_crash.py`` kills at random moments,
which land mostly in the longest stage; here each stage boundary is hit for certain."""

from __future__ import annotations

import signal

import pytest
from harness import (
    Ledger,
    ServeProcess,
    StreamProducer,
    crash_scenario,
    dispose_engines,
    end_offsets,
    records_seen,
)

from anomaly.errors import ConfigError
from streams.failpoints import ENV, POINTS, Failpoint

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.postgres]


def test_failpoint_spec_is_checked_in_one_line():
    assert Failpoint(None).point is None
    assert Failpoint("written:2").point == "written"
    for bad in ("written", "written:0", "flushed:1", "scored:x"):
        with pytest.raises(ConfigError, match=ENV):
            Failpoint(bad)


def test_sigkill_after_each_stage_loses_and_duplicates_nothing(
    pg_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model
):
    stream, config, pipeline = crash_scenario(
        pg_url, kafka_bootstrap, topic_name, pipeline_file, trained_model, 3000
    )
    producer = StreamProducer(kafka_bootstrap, topic_name, stream.values, rate=100_000.0)
    producer.allow(len(stream.values))
    producer.start()
    producer.finish(timeout=120)
    log_path = tmp_path / "serve.log"
    written = []
    try:
        for point in POINTS:
            # The third batch of this start dies at the point (the first two get through).
            serve = ServeProcess(config, log_path, env={ENV: f"{point}:3"})
            code = serve.wait(120)
            assert code == -signal.SIGKILL, (point, code, serve.log_text()[-3000:])
            written.append(records_seen(pg_url, pipeline))
        final = ServeProcess(config, log_path, "--stop-when-idle", "5")
        assert final.wait(180) == 0, final.log_text()[-3000:]
    finally:
        dispose_engines()
    # Each start moved the stream on before it died, and none finished it.
    assert all(0 < w < len(stream.values) for w in written), written
    assert written == sorted(written), written
    total = len(stream.values)
    ledger = Ledger.read(pg_url, pipeline, topic_name)
    ledger.check_exactly_once(
        records_in=total,
        expected_alert_ids=stream.expected_alert_ids,
        expected_dead=stream.n_bad,
        end_offsets=end_offsets(kafka_bootstrap, topic_name, total),
    )
