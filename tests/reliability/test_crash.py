"""Crash: SIGKILL ``anomaly serve`` at random moments while records stream in, restart it each time;
at the end every record is accounted for exactly once.

CI runs 6,000 records and 5 kills; the full run (docs/reliability.md) is

    RELIABILITY_CRASH_RECORDS=50000 RELIABILITY_CRASH_KILLS=10 RELIABILITY_CRASH_RATE=1500 \
        python -m pytest tests/reliability/test_crash.py -m reliability -s
"""

from __future__ import annotations

import time

import pytest
from harness import (
    Ledger,
    RssSampler,
    ServeProcess,
    StreamProducer,
    crash_scenario,
    dispose_engines,
    end_offsets,
    env_float,
    env_int,
    records_seen,
    report,
    rng,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.postgres]


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    pg_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model
):
    n_records = env_int("RELIABILITY_CRASH_RECORDS", 6000)
    kills = env_int("RELIABILITY_CRASH_KILLS", 5)
    rate = env_float("RELIABILITY_CRASH_RATE", 500.0)
    random = rng()
    stream, config, pipeline = crash_scenario(
        pg_url, kafka_bootstrap, topic_name, pipeline_file, trained_model, n_records
    )
    assert stream.expected_alert_ids and stream.n_bad
    # The records arrive in kills + 1 tranches: a quarter of one is waiting when a run starts, the
    # rest streams in (at ``rate``) once it has written its first batch, so that the kill lands
    # while records are arriving and being written.
    producer = StreamProducer(kafka_bootstrap, topic_name, stream.values, rate=rate)
    tranche = len(stream.values) // (kills + 1) + 1
    producer.allow(tranche // 4)
    producer.start()

    log_path = tmp_path / "serve.log"
    restarts: list[dict] = []
    peak_rss = 0.0
    try:
        for k in range(kills):
            producer.allow(k * tranche + tranche // 4)
            serve = ServeProcess(config, log_path)
            sampler = RssSampler(serve, every=0.5)
            sampler.start()
            before = max(records_seen(pg_url, pipeline), 0)
            # Most kills land while batches are being written; one in three at a random moment of
            # the start-up (import, migration, model load, group join) instead.
            during_startup = k % 3 == 1
            if during_startup:
                producer.allow((k + 1) * tranche)
                time.sleep(random.uniform(0.5, 4.0))
                resumed_s = None
            else:
                wait_for(
                    lambda b=before: records_seen(pg_url, pipeline) > b,
                    120,
                    f"restart {k} to write a batch",
                    every=0.05,
                )
                resumed_s = time.monotonic() - serve.started
                producer.allow((k + 1) * tranche)
                time.sleep(random.uniform(0.0, 1.5))
            assert serve.alive(), serve.log_text()[-3000:]
            at = records_seen(pg_url, pipeline)
            serve.kill()
            sampler.stop()
            peak_rss = max(peak_rss, sampler.peak_mb)
            restarts.append(
                {
                    "kill": k,
                    "during_startup": during_startup,
                    "seconds_to_first_batch": None if resumed_s is None else round(resumed_s, 2),
                    "records_written_at_kill": at,
                    "records_produced_at_kill": producer.produced,
                }
            )
        # The last start runs until the stream is drained and idle.
        producer.allow(len(stream.values))
        producer.finish(timeout=max(120.0, 2 * n_records / rate))
        final = ServeProcess(config, log_path, "--stop-when-idle", "5")
        sampler = RssSampler(final, every=0.5)
        sampler.start()
        t0 = time.monotonic()
        wait_for(lambda: records_seen(pg_url, pipeline) >= 0, 120, "the final start")
        assert final.wait(max(180.0, n_records / 200)) == 0, final.log_text()[-3000:]
        drain_s = time.monotonic() - t0
        sampler.stop()
        peak_rss = max(peak_rss, sampler.peak_mb)
    finally:
        dispose_engines()

    total = len(stream.values)
    ledger = Ledger.read(pg_url, pipeline, topic_name)
    figures = ledger.check_exactly_once(
        records_in=total,
        expected_alert_ids=stream.expected_alert_ids,
        expected_dead=stream.n_bad,
        end_offsets=end_offsets(kafka_bootstrap, topic_name, total),
    )
    assert sorted(ledger.dead_letter_kinds) == sorted(stream.bad_kinds)
    # The kills really interrupted the stream: the database was mid-way each time.
    mid_stream = [r for r in restarts if 0 < r["records_written_at_kill"] < total]
    assert len(mid_stream) >= kills - 1, restarts
    recoveries = [r["seconds_to_first_batch"] for r in restarts if r["seconds_to_first_batch"]]
    report(
        "crash",
        figures
        | {
            "kills": kills,
            "labeled_anomalies": stream.labeled_anomalies,
            "recovery_s_median": sorted(recoveries)[len(recoveries) // 2] if recoveries else None,
            "recovery_s_max": max(recoveries, default=None),
            "final_drain_s": round(drain_s, 1),
            "peak_rss_mb": round(peak_rss, 1),
            "restarts": restarts,
        },
    )
