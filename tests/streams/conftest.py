"""Fixtures of the streams tests: a small trained fraud model, generated records, pipeline files.

Everything is real: the model is trained with torch (a few hundred steps, ~3 s), records go
through the embedded Tansu broker, alerts into SQLite or PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

LABELS = ["is_anomaly", "anomaly_kind"]


@dataclass
class TrainedModel:
    model: object
    bundle: Path
    version: str


@pytest.fixture(scope="session")
def fraud_schema() -> dict:
    example = Path(__file__).resolve().parents[2] / "examples" / "fraud.yaml"
    return yaml.safe_load(example.read_text())["schema"]


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory, fraud_schema: dict) -> TrainedModel:
    import torch

    from anomaly.config import config_from_dict
    from anomaly.estimator.model import AnomalyModel
    from anomaly.synthetic.datasets import generate_fraud

    torch.set_num_threads(1)
    cfg = config_from_dict({"name": "fraud-test", "schema": fraud_schema}, environ={})
    train = generate_fraud(3000, anomaly_fraction=0.0, seed=11).drop(columns=LABELS)
    # target_fpr 1%: enough alerts on a small stream to check them one by one.
    model = AnomalyModel.from_config(
        cfg, target_fpr=0.01, max_epochs=3, max_steps=300, progress=False, threads=1
    )
    model.fit(train)
    bundle = tmp_path_factory.mktemp("bundle") / "fraud-model"
    version = model.save(bundle)
    return TrainedModel(model=model, bundle=bundle, version=version)


@pytest.fixture(scope="session")
def fraud_records() -> pd.DataFrame:
    """Generated transactions with labeled anomalies (labels travel along as extra fields)."""
    from anomaly.synthetic.datasets import generate_fraud

    return generate_fraud(1200, anomaly_fraction=0.03, seed=5)


@pytest.fixture
def pipeline_file(tmp_path: Path, kafka_bootstrap: str, topic_name: str, fraud_schema: dict):
    """``make(db_url, bundle, **sections)`` writes a pipeline YAML for this test's topic."""

    def make(db_url: str, bundle: Path | None, **sections: dict) -> Path:
        data = {
            "name": f"p-{topic_name}",
            "schema": dict(fraud_schema),
            "kafka": {
                "bootstrap_servers": kafka_bootstrap,
                "topic": topic_name,
                "batch_size": 300,
                "max_wait_s": 0.2,
            },
            "database": {"url": db_url},
            "serve": {
                "metrics_port": 0,
                "model_dir": str(bundle) if bundle else None,
                "threads": 1,
                "device": "cpu",
                "db_retry_initial_s": 0.2,
                "db_retry_max_s": 1.0,
                "model_poll_s": 0.5,
            },
        }
        for key, value in sections.items():
            data.setdefault(key, {}).update(value)
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


def produce(bootstrap: str, topic: str, values: list[bytes], partition: int | None = None) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for value in values:
        if partition is None:
            producer.produce(topic, value=value)
        else:
            producer.produce(topic, value=value, partition=partition)
    assert producer.flush(30) == 0


def consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list:
    """Read a topic from the start with manual assignment (no group join) until ``expected``."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False}
    )
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = meta.topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for m in consumer.consume(500, 0.5):
                if m.error() is None:
                    out.append(m)
        # Anything beyond what was expected would be a duplicate: read a little longer.
        out.extend(m for m in consumer.consume(500, 1.0) if m.error() is None)
        return out
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str, expected: int) -> dict[int, int]:
    """Next offset after the last record of each partition, found by reading the topic.

    (Tansu's ListOffsets answers the base offset of the last record batch + 1, not the end.)
    """
    messages = consume_all(bootstrap, topic, expected)
    ends: dict[int, int] = {}
    for m in messages:
        ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
    return ends


def committed_offsets(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()


def bad_records(good: dict) -> list[tuple[bytes, str]]:
    """Hand-made bad values and the error kind each must be dead-lettered with."""
    no_amount = {k: v for k, v in good.items() if k != "amount"}
    return [
        (b"{not json", "invalid_json"),
        (b"[1, 2, 3]", "not_object"),
        (json.dumps(no_amount).encode(), "missing_field"),
        (json.dumps(good | {"amount": "12.50"}).encode(), "wrong_type"),
        (json.dumps(good | {"amount": None}).encode(), "missing_value"),
        (json.dumps(good | {"amount": float("nan")}).encode(), "missing_value"),
        (json.dumps(good | {"note": "\x00"}).encode().replace(b"\\u0000", b"\xff"), "invalid_utf8"),
        (json.dumps(good | {"pad": "x" * 2000}).encode(), "oversized"),
        (json.dumps(good | {"event_time": "not a time"}).encode(), "invalid_time"),
    ]


@pytest.fixture
def sql(request: pytest.FixtureRequest) -> Iterator:
    """``sql(url, query)`` -> list of row tuples."""
    from sqlalchemy import create_engine, text

    engines: dict[str, object] = {}

    def run(url: str, query: str, **params: object) -> list[tuple]:
        engine = engines.get(url) or engines.setdefault(url, create_engine(url))
        with engine.connect() as conn:  # type: ignore[attr-defined]
            return [tuple(r) for r in conn.execute(text(query), params)]

    yield run
    for engine in engines.values():
        engine.dispose()  # type: ignore[attr-defined]
