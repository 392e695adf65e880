"""Bad input: a property test over the decoder, the model's own checks and the scorer; a short
atheris fuzz run; and 10k malformed records of every kind through the real ``anomaly serve``, all
dead-lettered with a reason while the service keeps running in bounded memory.

    RELIABILITY_MALFORMED_RECORDS=10000 RELIABILITY_MALFORMED_5MB=20 \
        python -m pytest tests/reliability/test_bad_input.py -s
    python tests/reliability/fuzz_decoder.py -max_total_time=600      # the long fuzz run
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from harness import (
    Ledger,
    RssSampler,
    ServeProcess,
    StreamProducer,
    dispose_engines,
    end_offsets,
    env_int,
    records_seen,
    report,
    streams_fixtures,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from malformed import FIVE_MB, MUTATIONS, VALIDATOR_KINDS, five_megabytes

from anomaly.config import SchemaConfig, load_config
from streams.broker import create_topic
from streams.decode import RecordDecoder
from streams.rejects import ERROR_KINDS

pytestmark = [pytest.mark.reliability]

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def base_records(trained_model) -> list[dict]:
    from anomaly.synthetic.datasets import generate_fraud
    from streams.replay import encode_rows

    frame = generate_fraud(200, anomaly_fraction=0.05, seed=3).drop(columns=streams_fixtures.LABELS)
    return [json.loads(v) for v in encode_rows(frame)]


@pytest.fixture(scope="module")
def scorer(trained_model):
    from anomaly.scoring.scorer import BatchScorer

    return BatchScorer(trained_model.model, device="cpu", threads=1)


mixed_batches = st.lists(
    st.tuples(
        st.sampled_from(["valid", *MUTATIONS]),
        st.integers(0, 199),  # which base record
        st.integers(0, 2**32 - 1),  # the mutation's own randomness
    ),
    max_size=40,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=mixed_batches)
def test_property_decode_validate_score(items, fraud_schema, trained_model, base_records, scorer):
    """Any mix of valid and malformed records: each is accounted for once; a malformed one is
    rejected with the kind its defect calls for and a message; a valid one is accepted; whatever
    is accepted scores to finite numbers (the scorer never sees a value it cannot use)."""
    schema = SchemaConfig(**fraud_schema)
    decoder = RecordDecoder(schema)
    values: list[bytes] = []
    expected: list[set[str] | None] = []
    for kind, base, seed in items:
        record = base_records[base]
        if kind == "valid":
            values.append(json.dumps(record).encode())
            expected.append(None)
        else:
            value, kinds = MUTATIONS[kind](record, fraud_schema, random.Random(seed))
            values.append(value)
            expected.append(kinds)
    batch = decoder.decode(values, partitions=[0] * len(values), offsets=list(range(len(values))))
    problems = trained_model.model.preprocessor_.validate_frame(batch.frame)
    rejected = {r.index: (r.error_kind, r.error_message) for r in batch.rejected}
    for row, kind, message in problems:
        rejected.setdefault(int(batch.index[row]), (kind, message))
    accepted = set(batch.index.tolist()) - rejected.keys()
    assert sorted([*accepted, *rejected]) == list(range(len(values)))
    for i, kinds in enumerate(expected):
        if kinds is None:
            assert i in accepted, (values[i][:200], rejected.get(i))
        else:
            assert i in rejected, values[i][:300]
            kind, message = rejected[i]
            assert kind in kinds, (kind, kinds, message, values[i][:200])
            assert kind in (*ERROR_KINDS, *VALIDATOR_KINDS) and message
    keep = np.isin(batch.index, sorted(accepted))
    if keep.any():
        result = scorer.score(batch.frame.loc[keep].reset_index(drop=True))
        assert np.isfinite(result.scores.to_numpy(dtype=np.float64)).all()


def test_atheris_fuzz_run_of_the_decoder_and_validator(tmp_path, trained_model):
    """A short coverage-guided run (CI); the long one is the same script with a larger budget."""
    pytest.importorskip("atheris")
    seconds = env_int("RELIABILITY_FUZZ_SECONDS", 10)
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzz_decoder.py"),
            f"-max_total_time={seconds}",
            "-rss_limit_mb=4096",
            "-timeout=20",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        env={**os.environ, "FUZZ_BUNDLE": str(trained_model.bundle), "OMP_NUM_THREADS": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    stats = [line for line in out.splitlines() if line.startswith("#") and "exec/s" in line]
    assert stats, out[-2000:]
    report("fuzz", {"seconds": seconds, "last_status": stats[-1], "crashes": 0})


@pytest.mark.kafka
@pytest.mark.postgres
def test_malformed_records_are_all_dead_lettered_service_stays_up_memory_bounded(
    pg_url,
    tmp_path,
    kafka_bootstrap,
    topic_name,
    pipeline_file,
    trained_model,
    base_records,
    fraud_schema,
):
    n_records = env_int("RELIABILITY_MALFORMED_RECORDS", 10_000)
    n_big = env_int("RELIABILITY_MALFORMED_5MB", 3)
    r = random.Random(7)
    kinds = list(MUTATIONS)
    values: list[bytes] = []
    expected: list[set[str]] = []
    counts: dict[str, int] = dict.fromkeys([*kinds, "five_megabytes"], 0)
    big_at = set(r.sample(range(n_records), n_big))
    for i in range(n_records):
        record = base_records[r.randrange(len(base_records))]
        kind = "five_megabytes" if i in big_at else kinds[i % len(kinds)]
        fn = five_megabytes if kind == "five_megabytes" else MUTATIONS[kind]
        value, ok = fn(record, fraud_schema, r)
        values.append(value)
        expected.append(ok)
        counts[kind] += 1
    # A valid record every 100, so that the stream also moves forward with scored records.
    valid = [
        base_records[k % len(base_records)] | {"id": f"valid-{k}"} for k in range(n_records // 100)
    ]
    stream = []
    for i, value in enumerate(values):
        stream.append(value)
        if i % 100 == 99:
            stream.append(json.dumps(valid[i // 100]).encode())
    n_valid = len(valid)
    features = pd.DataFrame(valid)
    expected_alerts = set(features["id"][trained_model.model.predict(features) == 1])

    create_topic(kafka_bootstrap, topic_name, partitions=2)
    big_limit = FIVE_MB * 2
    # librdkafka refuses messages over message.max.bytes (1 MB by default) in the producer; the
    # dead-letter copy of a 5 MB value needs the same room in the service's producer.
    kafka_big = {"message.max.bytes": big_limit, "fetch.max.bytes": big_limit * 2}
    config = pipeline_file(
        pg_url,
        trained_model.bundle,
        kafka={"batch_size": 500, "settings": kafka_big},
    )
    cfg = load_config(config)
    serve = ServeProcess(config, tmp_path / "serve.log", "--stop-when-idle", "6")
    sampler = RssSampler(serve, every=0.25, progress=lambda: records_seen(pg_url, cfg.name))
    sampler.start()
    producer = StreamProducer(
        kafka_bootstrap,
        topic_name,
        stream,
        rate=len(stream) / 8,
        settings={"message.max.bytes": big_limit},
    )
    t0 = time.monotonic()
    try:
        wait_for(lambda: records_seen(pg_url, cfg.name) >= 0, 120, "the service to start")
        baseline = serve.rss_mb()
        producer.start()
        producer.finish(timeout=180)
        code = serve.wait(300)
        elapsed = time.monotonic() - t0
        assert code == 0, serve.log_text()[-3000:]
    finally:
        sampler.stop()
        if serve.alive():
            serve.kill()
        dispose_engines()

    ledger = Ledger.read(pg_url, cfg.name, topic_name)
    figures = ledger.check_exactly_once(
        records_in=len(stream),
        expected_alert_ids=expected_alerts,
        expected_dead=len(values),
        end_offsets=end_offsets(kafka_bootstrap, topic_name, len(stream)),
    )
    assert ledger.scored == n_valid
    by_kind: dict[str, int] = {}
    for kind in ledger.dead_letter_kinds:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    allowed = set().union(*expected)
    assert set(by_kind) <= allowed, by_kind
    samples = sampler.samples
    rss = [s[1] for s in samples]
    quarter = max(1, len(rss) // 4)
    figures |= {
        "malformed_in": len(values),
        "valid_in": n_valid,
        "five_mb_values": n_big,
        "generated_by_kind": counts,
        "dead_letters_by_kind": by_kind,
        "seconds": round(elapsed, 1),
        "rss_baseline_mb": baseline,
        "rss_peak_mb": round(max(rss), 1),
        "rss_first_quarter_max_mb": round(max(rss[:quarter]), 1),
        "rss_last_quarter_max_mb": round(max(rss[-quarter:]), 1),
    }
    report("malformed", figures)
    # Bounded: a few 5 MB values in flight at a time, not the whole stream.
    assert max(rss) < (baseline or 0) + 400, figures
    assert not math.isnan(max(rss))


@pytest.mark.kafka
@pytest.mark.postgres
def test_a_value_too_large_for_the_dead_letter_topic_does_not_stall_the_service(
    pg_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model, base_records, sql
):
    """A 5 MB value arrives (the topic accepts it) while the service's producer keeps librdkafka's
    default 1 MB ``message.max.bytes``: its dead-letter copy cannot be produced as is. The record
    must still be dead-lettered (table and topic) and the stream must go on, not retry forever."""
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    config = pipeline_file(pg_url, trained_model.bundle, kafka={"batch_size": 50})
    cfg = load_config(config)
    big = five_megabytes(base_records[0], {}, random.Random(0))[0]
    after = [json.dumps(r | {"id": f"after-{i}"}).encode() for i, r in enumerate(base_records)]
    producer = StreamProducer(
        kafka_bootstrap,
        topic_name,
        [big, *after],
        settings={"message.max.bytes": FIVE_MB * 2},
    )
    producer.start()
    producer.finish()
    serve = ServeProcess(config, tmp_path / "serve.log", "--stop-when-idle", "4")
    try:
        wait_for(
            lambda: records_seen(pg_url, cfg.name) == 1 + len(after),
            90,
            "the records after the 5 MB value",
        )
        assert serve.wait(60) == 0, serve.log_text()[-3000:]
    finally:
        if serve.alive():
            serve.kill()
        dispose_engines()
    ledger = Ledger.read(pg_url, cfg.name, topic_name)
    assert ledger.dead_letter_kinds == ["oversized"]
    assert ledger.scored == len(after)
    dlq = streams_fixtures.consume_all(kafka_bootstrap, cfg.dead_letter_topic, 1)
    assert len(dlq) == 1
    headers = dict(dlq[0].headers())
    assert headers["error_kind"] == b"oversized" and headers["source_offset"] == b"0"
    # The topic gets the value's head and its size; the table keeps all of it.
    assert headers["original_bytes"] == str(len(big)).encode()
    assert big.startswith(dlq[0].value()) and len(dlq[0].value()) < 1_000_000
    [(raw,)] = sql(pg_url, "SELECT raw FROM dead_letters")
    assert bytes(raw) == big
