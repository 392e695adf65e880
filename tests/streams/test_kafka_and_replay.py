"""Client settings from the pipeline config, and `anomaly replay` into the real broker."""

from __future__ import annotations

import json

import pytest

from anomaly.cli import main as cli_main
from anomaly.config import config_from_dict, load_config
from anomaly.synthetic.datasets import write_frame
from streams.broker import create_topic
from streams.kafka import consumer_settings, producer_settings, redacted

from .conftest import LABELS, consume_all


def test_consumer_settings_commit_by_hand_and_read_secrets(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    cfg = config_from_dict(
        {
            "name": "fraud",
            "schema": {"numeric": ["amount"]},
            "kafka": {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "svc",
                "sasl_password_file": str(secret),
                "settings": {"fetch.min.bytes": 1024, "message.timeout.ms": 2000, "acks": 1},
            },
        },
        environ={},
    )
    conf = consumer_settings(cfg)
    assert conf["enable.auto.commit"] is False
    assert conf["group.id"] == "anomaly-fraud"
    assert conf["session.timeout.ms"] == 6000
    assert conf["fetch.queue.backoff.ms"] == 10
    assert conf["sasl.password"] == "s3cret"
    assert conf["fetch.min.bytes"] == 1024
    assert "s3cret" not in json.dumps(redacted(conf))
    # Each client gets only the settings it reads (librdkafka warns at start about the others).
    assert "message.timeout.ms" not in conf and "acks" not in conf
    producer = producer_settings(cfg.kafka)
    assert producer["sasl.password"] == "s3cret" and "fetch.min.bytes" not in producer
    assert producer["message.timeout.ms"] == 2000 and producer["acks"] == 1
    # The password from the environment, when no file is named.
    env = config_from_dict(
        {"name": "x", "schema": {"numeric": ["a"]}},
        environ={"ANOMALY_KAFKA_SASL_PASSWORD": "from-env"},
    )
    assert consumer_settings(env)["sasl.password"] == "from-env"


@pytest.mark.kafka
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_replay_command_keys_by_entity_with_limit(
    suffix, tmp_path, kafka_bootstrap, topic_name, pipeline_file, fraud_records, sqlite_url, capsys
):
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    config = pipeline_file(sqlite_url, None)
    data = tmp_path / f"records{suffix}"
    write_frame(fraud_records, str(data))
    argv = ["replay", "--config", str(config), "--data", str(data), "--limit", "150"]
    assert cli_main([*argv, "--rate", "2000"]) == 0
    assert "produced 150 records" in capsys.readouterr().out
    messages = consume_all(kafka_bootstrap, topic_name, 150)
    assert len(messages) == 150
    sent = fraud_records.drop(columns=LABELS).iloc[:150]
    cfg = load_config(config)
    entity = cfg.schema.entity_field
    by_id = {r["id"]: r for r in (json.loads(m.value()) for m in messages)}
    assert sorted(by_id) == sorted(sent["id"])
    for m in messages:
        record = json.loads(m.value())
        assert m.key().decode() == record[entity]
    first = sent.iloc[0]
    got = by_id[first["id"]]
    assert got["amount"] == first["amount"]
    assert got["merchant_category"] == first["merchant_category"]
    assert got["event_time"].startswith(first["event_time"].strftime("%Y-%m-%dT%H:%M:%S"))


def test_replay_rejects_a_file_without_the_schema_fields(tmp_path, pipeline_file, sqlite_url):
    config = pipeline_file(sqlite_url, None)
    data = tmp_path / "bad.csv"
    data.write_text("id,amount\n1,2\n")
    assert cli_main(["replay", "--config", str(config), "--data", str(data)]) == 2


def test_replay_reads_a_parquet_dataset_directory(tmp_path, pipeline_file, sqlite_url):
    """A dataset written in parts (Spark, pyarrow's write_to_dataset) is a directory."""
    from anomaly.config import load_config
    from anomaly.synthetic.datasets import generate_fraud
    from streams.replay import read_records

    cfg = load_config(pipeline_file(sqlite_url, None))
    frame = generate_fraud(40, anomaly_fraction=0.0, seed=4)
    dataset = tmp_path / "records.parquet"
    dataset.mkdir()
    frame.iloc[:25].to_parquet(dataset / "part-0.parquet")
    frame.iloc[25:].to_parquet(dataset / "part-1.parquet")
    read = read_records(dataset, cfg, limit=30)
    assert len(read) == 30 and sorted(read["id"]) == sorted(frame["id"].iloc[:30])


def test_replay_names_an_unreadable_file_or_a_bad_limit_in_one_line(
    tmp_path, pipeline_file, sqlite_url, capsys
):
    """Checked before any broker is asked: no broker runs here."""
    replay = ["replay", "--config", str(pipeline_file(sqlite_url, None))]
    empty, parquet_of_text = tmp_path / "empty.csv", tmp_path / "text.parquet"
    empty.write_text("")
    parquet_of_text.write_text("id,amount\n1,2\n")
    csv_directory = tmp_path / "parts.csv"
    csv_directory.mkdir()
    for argv, needle in [
        (["--data", str(empty)], f"cannot read replay data file {empty}"),
        (["--data", str(parquet_of_text)], f"cannot read replay data file {parquet_of_text}"),
        (["--data", str(tmp_path)], "replay data must be .csv or .parquet"),
        (["--data", str(csv_directory)], f"cannot read replay data file {csv_directory}"),
        (["--data", str(empty), "--limit", "-3"], "--limit must be >= 0, got -3"),
        (["--data", str(empty), "--rate", "0"], "--rate must be > 0 records/s"),
    ]:
        assert cli_main([*replay, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
