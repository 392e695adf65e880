"""Avro record values (kafka.format: avro): decoding, bad values, config errors, end to end."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly.config import config_from_dict, load_config
from anomaly.errors import ConfigError
from anomaly.synthetic.datasets import generate_fraud, write_frame
from streams.avro import (
    AvroRecordDecoder,
    SchemaRegistryUnavailable,
    encode_avro_rows,
    load_schema,
    make_decoder,
)
from streams.broker import create_topic
from streams.decode import RecordDecoder
from streams.replay import encode_rows, encode_values, replay
from streams.service import ScoringService

from .conftest import LABELS, committed_offsets, end_offsets, produce
from .registry import SchemaRegistryStandIn

fastavro = pytest.importorskip("fastavro")

EXAMPLE_AVSC = Path(__file__).resolve().parents[2] / "examples" / "fraud.avsc"


def avro_config(fraud_schema: dict, tmp_path: Path, **kafka: object):
    shutil.copy(EXAMPLE_AVSC, tmp_path / "fraud.avsc")
    data = {
        "name": "fraud-avro",
        "schema": fraud_schema,
        "kafka": {"format": "avro", "avro_schema": "fraud.avsc", **kafka},
        # Relative schema paths are taken from the pipeline file's folder.
        "source_path": str(tmp_path / "pipeline.yaml"),
    }
    return config_from_dict(data, environ={})


@pytest.mark.parametrize("framing", ["confluent", "none"])
def test_avro_values_decode_to_the_frame_the_json_values_give(fraud_schema, tmp_path, framing):
    cfg = avro_config(fraud_schema, tmp_path, avro_framing=framing, avro_schema_ids=[7])
    records = generate_fraud(500, anomaly_fraction=0.05, seed=3).drop(columns=LABELS)
    records.loc[4, "amount"] = np.nan  # a null: missing under schema.missing=reject
    values = encode_avro_rows(records, cfg)
    if framing == "confluent":
        assert all(v[:5] == b"\x00\x00\x00\x00\x07" for v in values)
    decoder = make_decoder(cfg)
    assert isinstance(decoder, AvroRecordDecoder)
    got = decoder.decode(values)
    want = RecordDecoder(cfg.schema).decode(encode_rows(records))
    pd.testing.assert_frame_equal(got.frame, want.frame)
    np.testing.assert_array_equal(got.index, want.index)
    assert [(r.index, r.error_kind) for r in got.rejected] == [(4, "missing_value")]
    assert [(r.index, r.error_kind) for r in want.rejected] == [(4, "missing_value")]


def _body(cfg, record: dict) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, load_schema(cfg), record)
    return buffer.getvalue()


def test_bad_avro_values_are_rejected_with_their_reason(fraud_schema, tmp_path):
    cfg = avro_config(fraud_schema, tmp_path, avro_schema_ids=[7])
    cfg.schema.max_record_bytes = 400
    good_row = generate_fraud(10, seed=1).drop(columns=LABELS).iloc[:3]
    good = encode_avro_rows(good_row, cfg)
    record = fastavro.schemaless_reader(io.BytesIO(good[0][5:]), load_schema(cfg), None)
    header = good[0][:5]
    bad = [
        (b"", "empty"),
        (good[0][5:], "invalid_avro"),  # no header
        (b"\x00\x00\x00\x00\x08" + good[0][5:], "unknown_schema"),
        (good[0][:12], "invalid_avro"),  # truncated
        (good[0] + b"\x02", "invalid_avro"),  # a byte left over
        (header + b"\xff" * 40, "invalid_avro"),
        (header + _body(cfg, record | {"amount": float("inf")}), "not_finite"),
        (header + _body(cfg, record | {"velocity_1h": None}), "missing_value"),
        (header + _body(cfg, record | {"channel": None}), "missing_value"),
        (header + _body(cfg, record | {"event_time": 2**62}), "invalid_time"),
        (header + _body(cfg, record | {"event_time": -(2**63)}), "invalid_time"),
        (header + _body(cfg, record | {"id": "x" * 500}), "oversized"),
    ]
    batch = [good[1], *(v for v, _ in bad), good[2]]
    decoded = make_decoder(cfg).decode(
        batch, partitions=[0] * len(batch), offsets=range(len(batch))
    )
    assert [(r.index, r.error_kind) for r in decoded.rejected] == [
        (i, kind) for i, (_, kind) in enumerate(bad, start=1)
    ]
    assert all(r.error_message and r.offset == r.index for r in decoded.rejected)
    assert decoded.frame["id"].tolist() == good_row["id"].iloc[[1, 2]].tolist()
    unknown = next(r for r in decoded.rejected if r.error_kind == "unknown_schema")
    assert "schema id 8" in unknown.error_message and "[7]" in unknown.error_message


def test_avro_config_errors_name_the_problem(fraud_schema, tmp_path):
    with pytest.raises(ConfigError, match=r"set kafka\.avro_schema"):
        config_from_dict(
            {"name": "p", "schema": fraud_schema, "kafka": {"format": "avro"}}, environ={}
        )
    with pytest.raises(ConfigError, match=r"kafka\.format: expected .json. or .avro., got .xml."):
        config_from_dict(
            {"name": "p", "schema": fraud_schema, "kafka": {"format": "xml"}}, environ={}
        )
    with pytest.raises(ConfigError, match="avro_schema_ids"):
        avro_config(fraud_schema, tmp_path, avro_schema_ids=[-1])
    cfg = avro_config(fraud_schema, tmp_path)
    (tmp_path / "fraud.avsc").unlink()
    with pytest.raises(ConfigError, match=r"cannot read kafka\.avro_schema"):
        make_decoder(cfg)
    schema = json.loads(EXAMPLE_AVSC.read_text())
    schema["fields"] = [f for f in schema["fields"] if f["name"] not in ("country", "hour")]
    (tmp_path / "fraud.avsc").write_text(json.dumps(schema))
    with pytest.raises(ConfigError, match=r"lacks the pipeline schema's field.*hour, country"):
        make_decoder(cfg)
    (tmp_path / "fraud.avsc").write_text('{"type": "record", "name": "x", "fields": [{"x": 1}]}')
    with pytest.raises(ConfigError, match="not a valid Avro schema"):
        make_decoder(cfg)


@pytest.mark.kafka
def test_avro_stream_end_to_end_alerts_dead_letters_and_offsets(
    sqlite_url,
    tmp_path,
    kafka_bootstrap,
    topic_name,
    pipeline_file,
    trained_model,
    fraud_records,
    sql,
):
    """Replay Avro values (Schema Registry framing), add bad ones, serve until idle: one alert
    per record over the threshold, each bad value dead-lettered with its reason."""
    create_topic(kafka_bootstrap, topic_name, partitions=2)
    shutil.copy(EXAMPLE_AVSC, tmp_path / "fraud.avsc")
    config = pipeline_file(
        sqlite_url,
        trained_model.bundle,
        kafka={"format": "avro", "avro_schema": "fraud.avsc", "avro_schema_ids": [3]},
    )
    cfg = load_config(config)
    data = tmp_path / "records.parquet"
    write_frame(fraud_records, str(data))
    assert replay(cfg, data, progress=False).produced == len(fraud_records)
    good = encode_avro_rows(fraud_records.drop(columns=LABELS).iloc[:1], cfg)[0]
    bad = [
        (b'{"id": "json"}', "invalid_avro"),
        (b"\x00\x00\x00\x00\x04" + good[5:], "unknown_schema"),
    ]
    produce(kafka_bootstrap, topic_name, [v for v, _ in bad], partition=1)
    total = len(fraud_records) + len(bad)

    service = ScoringService(cfg, stop_when_idle_s=3.0)
    assert service.run() == 0
    assert service.totals.consumed == total

    features = fraud_records.drop(columns=LABELS)
    expected = set(features["id"][trained_model.model.predict(features) == 1])
    assert expected
    assert sorted(r[0] for r in sql(sqlite_url, "SELECT record_id FROM alerts")) == sorted(expected)
    # Each alert keeps the record's fields, the Avro timestamp as ISO 8601 text.
    stored = json.loads(sql(sqlite_url, "SELECT record FROM alerts LIMIT 1")[0][0])
    row = fraud_records.set_index("id").loc[stored["id"]]
    assert pd.Timestamp(stored["event_time"]) == row["event_time"]
    assert stored["amount"] == row["amount"] and stored["channel"] == row["channel"]
    dead = sql(sqlite_url, "SELECT error_kind, raw FROM dead_letters")
    assert sorted(r[0] for r in dead) == sorted(k for _, k in bad)
    assert {bytes(r[1]) for r in dead} == {v for v, _ in bad}
    ends = end_offsets(kafka_bootstrap, topic_name, total)
    assert service.store.load_offsets(cfg.name, topic_name) == ends
    assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == ends


def test_mangled_avro_values_never_raise_and_are_rejected_with_a_known_reason(
    fraud_schema, tmp_path
):
    """Bytes flipped, cut and appended at random: each value decodes or is rejected, with one of
    the decoders' reasons; the batch around it goes on."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    cfg = avro_config(fraud_schema, tmp_path, avro_schema_ids=[1])
    good = encode_avro_rows(generate_fraud(10, seed=4).drop(columns=LABELS), cfg)
    decoder = make_decoder(cfg)
    kinds = {
        "empty", "oversized", "invalid_avro", "unknown_schema", "missing_field", "wrong_type",
        "missing_value", "not_finite", "invalid_time", "invalid_value",
    }  # fmt: skip

    @settings(max_examples=300, deadline=None)
    @given(
        which=st.integers(0, len(good) - 1),
        flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
        cut=st.integers(0, 200),
        tail=st.binary(max_size=8),
    )
    def check(which, flips, cut, tail):
        value = bytearray(good[which])
        for pos, byte in flips:
            if pos < len(value):
                value[pos] = byte
        value = bytes(value[: max(cut, 0)] if cut < len(value) else value) + tail
        batch = decoder.decode([good[0], value, good[1]])
        assert batch.n_valid + len(batch.rejected) == 3
        assert [r.index for r in batch.rejected] in ([], [1])
        assert all(r.error_kind in kinds and r.error_message for r in batch.rejected)

    check()


# -- Schema Registry ------------------------------------------------------------------------------


def writer_v2() -> dict:
    """The producer's next version of examples/fraud.avsc: the fields in reverse order, a new
    field, and times in milliseconds instead of microseconds."""
    schema = json.loads(EXAMPLE_AVSC.read_text())
    fields = list(reversed(schema["fields"]))
    for f in fields:
        if f["name"] == "event_time":
            f["type"] = {"type": "long", "logicalType": "timestamp-millis"}
    fields.insert(3, {"name": "device_fingerprint", "type": "string"})
    return {**schema, "fields": fields}


def avro_rows(records: pd.DataFrame) -> list[dict]:
    rows = []
    for row in records.to_dict("records"):
        row = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()}
        row["event_time"] = row["event_time"].to_pydatetime()
        row["device_fingerprint"] = f"fp-{row['id']}"
        rows.append(row)
    return rows


def confluent_serialized(url: str, schema: dict, records: pd.DataFrame) -> list[bytes]:
    """Values as Confluent's own ``AvroSerializer`` writes them (it registers the schema)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    serializer = AvroSerializer(SchemaRegistryClient({"url": url}), json.dumps(schema))
    context = SerializationContext("transactions", MessageField.VALUE)
    return [serializer(row, context) for row in avro_rows(records)]


def framed(schema_id: int, schema: dict, row: dict) -> bytes:
    buffer = io.BytesIO()
    buffer.write(b"\x00" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), row)
    return buffer.getvalue()


def test_registry_writer_schemas_resolve_to_the_pipeline_schema(fraud_schema, tmp_path):
    """Values from Confluent's serializer with an evolved schema (reordered, a new field, times
    in milliseconds) decode to the frame the JSON values give; the registry is asked once."""
    records = generate_fraud(300, anomaly_fraction=0.05, seed=5).drop(columns=LABELS)
    records.loc[7, "amount"] = np.nan
    # v3 also swaps the order of amount's union: that needs Avro's resolution (branch indexes
    # differ); v2 has every file field with the same type and is read with its own schema.
    v3 = writer_v2()
    for f in v3["fields"]:
        if f["name"] == "amount":
            f["type"], f["default"] = ["double", "null"], 0.0
    with SchemaRegistryStandIn() as registry:
        values = confluent_serialized(registry.url, writer_v2(), records)
        values_v3 = confluent_serialized(registry.url, v3, records)
        assert {v[:5] for v in values} == {b"\x00\x00\x00\x00\x01"}
        assert {v[:5] for v in values_v3} == {b"\x00\x00\x00\x00\x02"}
        cfg = avro_config(
            fraud_schema, tmp_path, avro_schema_ids=[7], schema_registry_url=registry.url
        )
        decoder = make_decoder(cfg)
        got = decoder.decode(values)
        got_v3 = decoder.decode(values_v3)
        fields = decoder.record_fields(values[0])
        # Ids listed in kafka.avro_schema_ids are read with the .avsc file, without asking.
        from_file = decoder.decode(encode_avro_rows(records.iloc[:20], cfg))
    assert decoder.registry.get(1).resolve is False and decoder.registry.get(2).resolve is True
    assert registry.asked_for(1) == 1 and registry.asked_for(2) == 1 and registry.asked_for(7) == 0
    want = RecordDecoder(cfg.schema).decode(encode_rows(records))
    for batch in (got, got_v3):
        pd.testing.assert_frame_equal(batch.frame, want.frame)
        assert [(r.index, r.error_kind) for r in batch.rejected] == [(7, "missing_value")]
    want_first = RecordDecoder(cfg.schema).decode(encode_rows(records.iloc[:20]))
    pd.testing.assert_frame_equal(from_file.frame, want_first.frame)
    # An alert keeps the record as its producer wrote it, the new field included.
    assert fields["device_fingerprint"] == f"fp-{records['id'].iloc[0]}"
    assert pd.Timestamp(fields["event_time"]) == records["event_time"].iloc[0]


def test_registry_unknown_and_incompatible_schemas_are_dead_lettered(fraud_schema, tmp_path):
    records = generate_fraud(10, seed=6).drop(columns=LABELS)
    row = avro_rows(records.iloc[:1])[0]
    v2 = writer_v2()
    no_amount = {**v2, "fields": [f for f in v2["fields"] if f["name"] != "amount"]}
    no_id = {**v2, "fields": [f for f in v2["fields"] if f["name"] != "id"]}
    amount_text = {
        **v2,
        "fields": [
            {**f, "type": ["null", "string"]} if f["name"] == "amount" else f for f in v2["fields"]
        ],
    }
    with SchemaRegistryStandIn() as registry:
        ids = {
            name: registry.register(json.dumps(schema))
            for name, schema in [("v2", v2), ("no_amount", no_amount), ("no_id", no_id)]
        }
        ids["amount_text"] = registry.register(json.dumps(amount_text))
        ids["proto"] = registry.register('syntax = "proto3"; message M {}', "PROTOBUF")
        cfg = avro_config(fraud_schema, tmp_path, schema_registry_url=registry.url)
        decoder = make_decoder(cfg)
        values = [
            (framed(ids["v2"], v2, row), None),
            (framed(99, v2, row), "unknown_schema"),
            (framed(ids["no_amount"], no_amount, row), "missing_value"),  # the file's default
            (framed(ids["no_id"], no_id, row), "incompatible_schema"),  # no default for id
            (framed(ids["amount_text"], amount_text, row | {"amount": "12.5"}), None),
            (framed(ids["proto"], v2, row), "unknown_schema"),
            (framed(99, v2, row), "unknown_schema"),
        ]
        batch = decoder.decode([v for v, _ in values])
        again = decoder.decode([values[1][0]])
    rejected = {r.index: r for r in batch.rejected}
    assert {i: r.error_kind for i, r in rejected.items()} == {
        i: kind for i, (_, kind) in enumerate(values) if kind
    } | {4: "incompatible_schema"}  # a string does not resolve to a double
    assert "schema id 99 is not in the schema registry" in rejected[1].error_message
    assert "PROTOBUF" in rejected[5].error_message
    assert f"schema id {ids['no_id']} does not resolve" in rejected[3].error_message
    assert batch.n_valid == 1 and [r.error_kind for r in again.rejected] == ["unknown_schema"]
    # An unknown id is asked for once, not once per record.
    assert registry.asked_for(99) == 1


def test_unknown_schema_ids_are_remembered_up_to_a_bound(fraud_schema, tmp_path, monkeypatch):
    """Garbage whose first byte is 0 reads as ever new schema ids: each is dead-lettered, and
    the ids remembered as unknown (not asked again for a while) stay bounded, oldest forgotten
    first (one entry per id, kept for the life of the service, before)."""
    from streams import avro_schemas

    monkeypatch.setattr(avro_schemas, "MAX_UNKNOWN_IDS", 8)
    row = avro_rows(generate_fraud(10, seed=7).drop(columns=LABELS).iloc[:1])[0]
    with SchemaRegistryStandIn() as registry:
        decoder = make_decoder(
            avro_config(fraud_schema, tmp_path, schema_registry_url=registry.url)
        )
        batch = decoder.decode([framed(1000 + i, writer_v2(), row) for i in range(20)])
        assert [r.error_kind for r in batch.rejected] == ["unknown_schema"] * 20
        assert list(decoder.registry._unknown) == list(range(1012, 1020))
        decoder.decode([framed(1019, writer_v2(), row)])  # still remembered: not asked again
        assert registry.asked_for(1019) == 1


def test_writer_times_beyond_a_long_in_the_files_unit_are_invalid_times(fraud_schema, tmp_path):
    """Milliseconds near the largest long do not fit a long as the file's microseconds: an
    invalid time, the same column by column and record by record (not an overflow error)."""
    rows = avro_rows(generate_fraud(10, seed=9).drop(columns=LABELS))
    v2 = writer_v2()
    with SchemaRegistryStandIn() as registry:
        schema_id = registry.register(json.dumps(v2))
        cfg = avro_config(fraud_schema, tmp_path, schema_registry_url=registry.url)
        decoder = make_decoder(cfg)
        rows[2]["event_time"] = 2**62  # ms: x1000 overflows a long
        rows[5]["event_time"] = -(2**63)
        values = [framed(schema_id, v2, row) for row in rows]
        columnar = decoder.decode(values)
        one_by_one = RecordDecoder.decode(decoder, values)
    assert decoder._read_columnar(values) is not None  # the columnar reader took the batch
    for batch in (columnar, one_by_one):
        assert [(r.index, r.error_kind) for r in batch.rejected] == [
            (2, "invalid_time"),
            (5, "invalid_time"),
        ]
    pd.testing.assert_frame_equal(columnar.frame, one_by_one.frame)


def test_an_unreachable_registry_holds_the_batch_instead_of_dead_lettering(fraud_schema, tmp_path):
    records = generate_fraud(10, seed=7).drop(columns=LABELS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with SchemaRegistryStandIn() as registry:
        values = confluent_serialized(registry.url, writer_v2(), records)
        registry.available = False
        cfg = avro_config(
            fraud_schema,
            tmp_path,
            schema_registry_url=registry.url,
            schema_registry_settings={"max.retries": 0},
        )
        decoder = make_decoder(cfg)
        with pytest.raises(SchemaRegistryUnavailable, match="HTTP 503"):
            decoder.decode(values)
        registry.available = True
        assert decoder.decode(values).n_valid == len(records)
    secret = avro_config(
        fraud_schema,
        tmp_path,
        schema_registry_url=f"http://reader:s3cret@127.0.0.1:{closed_port}",
        schema_registry_settings={"max.retries": 0},
    )
    with pytest.raises(SchemaRegistryUnavailable) as raised:
        make_decoder(secret).decode(values[:1])
    assert f"127.0.0.1:{closed_port}" in str(raised.value) and "s3cret" not in str(raised.value)


def test_replay_registers_the_avsc_and_writes_the_id_the_registry_gives(fraud_schema, tmp_path):
    records = generate_fraud(50, seed=8).drop(columns=LABELS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with SchemaRegistryStandIn() as registry:
        registry.register('{"type": "string"}')  # id 1 is another producer's schema
        cfg = avro_config(fraud_schema, tmp_path, schema_registry_url=registry.url)
        values = encode_values(records, cfg)
        again = encode_values(records.iloc[:1], cfg)  # registering again: the same id
        batch = make_decoder(cfg).decode(values)
    assert {v[:5] for v in values + again} == {b"\x00\x00\x00\x00\x02"}
    assert ("POST", f"/subjects/{cfg.kafka.topic}-value/versions") in registry.requests
    want = RecordDecoder(cfg.schema).decode(encode_rows(records))
    pd.testing.assert_frame_equal(batch.frame, want.frame)
    down = avro_config(
        fraud_schema,
        tmp_path,
        schema_registry_url=f"http://writer:s3cret@127.0.0.1:{closed_port}",
        schema_registry_settings={"max.retries": 0},
    )
    with pytest.raises(ConfigError, match=f"subject '{down.kafka.topic}-value'") as raised:
        encode_values(records, down)
    assert "s3cret" not in str(raised.value)


def test_registry_config_errors_name_the_problem(fraud_schema, tmp_path):
    with pytest.raises(ConfigError, match=r"schema_registry_url needs kafka\.format: avro"):
        config_from_dict(
            {"name": "p", "schema": fraud_schema, "kafka": {"schema_registry_url": "http://r"}},
            environ={},
        )
    with pytest.raises(ConfigError, match="avro_framing: confluent"):
        avro_config(fraud_schema, tmp_path, avro_framing="none", schema_registry_url="http://r")
    cfg = avro_config(
        fraud_schema,
        tmp_path,
        schema_registry_url="http://r",
        schema_registry_settings={"no.such.setting": 1},
    )
    with pytest.raises(ConfigError, match="schema_registry settings"):
        make_decoder(cfg)


def test_the_registry_gauge_has_no_series_until_a_registry_is_used():
    """A pipeline without a registry shows no registry at all, not one that is down."""
    from streams.metrics import ServiceMetrics

    metrics = ServiceMetrics("p")
    assert (
        metrics.registry.get_sample_value("anomaly_schema_registry_up", {"pipeline": "p"}) is None
    )
    metrics.set_schema_registry_up(False)
    assert metrics.registry.get_sample_value("anomaly_schema_registry_up", {"pipeline": "p"}) == 0


@pytest.mark.kafka
def test_serve_waits_for_the_registry_then_scores_every_record(
    sqlite_url,
    tmp_path,
    kafka_bootstrap,
    topic_name,
    pipeline_file,
    trained_model,
    fraud_records,
    sql,
):
    """Values written by Confluent's serializer; the registry is down when serve starts: the
    batch is held (nothing dead-lettered, nothing committed, not ready), then scored."""
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    shutil.copy(EXAMPLE_AVSC, tmp_path / "fraud.avsc")
    features = fraud_records.drop(columns=LABELS)
    with SchemaRegistryStandIn() as registry:
        values = confluent_serialized(registry.url, writer_v2(), features)
        produce(kafka_bootstrap, topic_name, values)
        registry.available = False
        config = pipeline_file(
            sqlite_url,
            trained_model.bundle,
            kafka={
                "format": "avro",
                "avro_schema": "fraud.avsc",
                "schema_registry_url": registry.url,
                "schema_registry_settings": {"max.retries": 0},
            },
        )
        cfg = load_config(config)
        service = ScoringService(cfg, stop_when_idle_s=3.0)
        runner = threading.Thread(target=service.run)
        runner.start()
        try:
            deadline = time.monotonic() + 60
            while registry.asked_for(1) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert registry.asked_for(1) >= 3  # asked again with backoff
            assert service.health.snapshot()["schema_registry_up"] is False
            up = service.metrics.registry.get_sample_value(
                "anomaly_schema_registry_up", {"pipeline": cfg.name}
            )
            assert up == 0
            assert not service.health.ready
            assert service.totals.consumed == 0
            # Nothing committed yet (librdkafka's -1001: no offset).
            assert all(
                o < 0 for o in committed_offsets(kafka_bootstrap, topic_name, cfg.group_id).values()
            )
            registry.available = True
            runner.join(timeout=120)
        finally:
            service.stop()
            runner.join(timeout=60)
    assert not runner.is_alive()
    assert service.totals.consumed == len(values) and service.totals.dead_letters == 0
    assert service.health.snapshot()["schema_registry_up"] is True
    up = service.metrics.registry.get_sample_value(
        "anomaly_schema_registry_up", {"pipeline": cfg.name}
    )
    assert up == 1
    expected = set(features["id"][trained_model.model.predict(features) == 1])
    assert sorted(r[0] for r in sql(sqlite_url, "SELECT record_id FROM alerts")) == sorted(expected)
    assert sql(sqlite_url, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert committed_offsets(kafka_bootstrap, topic_name, cfg.group_id) == {0: len(values)}


# -- the scorer's warm-up -------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [[], [3]])
def test_serve_warms_up_without_asking_the_registry_and_with_whole_numbers(
    fraud_schema, tmp_path, trained_model, caplog, ids
):
    """Starting ``serve`` with a registry (and no avro_schema_ids) registered the pipeline's
    .avsc as a new version of the producers' subject: the warm-up encoded its made-up records
    as replay does. It also always failed on the int fields of examples/fraud.avsc (``hour``,
    ``velocity_1h``): the records sweep non-integer values. Now the warm-up succeeds, and the
    registry hears nothing from it."""
    import logging

    from streams.models import WARM_UP_ROWS, typical_records
    from streams.replay import encode_values

    shutil.copy(EXAMPLE_AVSC, tmp_path / "fraud.avsc")
    with SchemaRegistryStandIn() as registry:
        registry.register(json.dumps(writer_v2()))  # the producers' schema, id 1
        before = dict(registry.schemas)
        cfg = config_from_dict(
            {
                "name": "fraud-avro",
                "schema": fraud_schema,
                "kafka": {
                    "topic": "transactions",
                    "format": "avro",
                    "avro_schema": "fraud.avsc",
                    "avro_schema_ids": ids,
                    "schema_registry_url": registry.url,
                },
                "database": {"url": f"sqlite:///{tmp_path / 'a.db'}"},
                "serve": {"model_dir": str(trained_model.bundle), "device": "cpu", "threads": 1},
                "source_path": str(tmp_path / "pipeline.yaml"),
            },
            environ={},
        )
        service = ScoringService(cfg)
        service.store.upgrade()
        with caplog.at_level(logging.INFO, logger="streams.service"):
            service._load_model(initial=True)
        requests = list(registry.requests)
        after = dict(registry.schemas)
    assert requests == [] and after == before
    messages = [r.getMessage() for r in caplog.records]
    assert "scorer warmed up" in messages, messages
    assert not any("warm-up failed" in m for m in messages), messages
    # What it scored: every record valid, whole numbers in the int fields, some alerts.
    frame = typical_records(trained_model.model, cfg.schema, WARM_UP_ROWS)
    decoded = service.decoder.for_warm_up().decode(encode_values(frame, cfg, warm_up=True))
    assert decoded.n_valid == WARM_UP_ROWS and not decoded.rejected
    for name in ("hour", "velocity_1h"):
        assert (decoded.frame[name] == decoded.frame[name].round()).all()
    assert not trained_model.model.preprocessor_.validate_frame(decoded.frame)
    assert 0 < trained_model.model.predict(decoded.frame).sum() < WARM_UP_ROWS
