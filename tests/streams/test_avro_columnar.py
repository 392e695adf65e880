"""The columnar Avro reader gives what fastavro record by record gives: the same frame, the same
rejects, for random flat schemas, random records and mangled bytes."""

from __future__ import annotations

import io
import itertools
import json
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly.config import config_from_dict
from streams.avro import AvroRecordDecoder
from streams.decode import RecordDecoder

fastavro = pytest.importorskip("fastavro")

ENUM = {"type": "enum", "name": "Colour", "symbols": ["red", "green", "blue"]}
NUMERIC_TYPES = [
    "double", "float", "int", "long", ["null", "double"], ["double", "null"], ["null", "long"],
    ["null", "float"], ["null", "int", "double"],
]  # fmt: skip
CATEGORICAL_TYPES = ["string", ["null", "string"], "ENUM", ["null", "ENUM"], "int", "long"]
EXTRA_TYPES = ["boolean", "string", ["null", "double"], "ENUM", "int", ["null", "boolean"]]
TIME_TYPES = [
    {"type": "long", "logicalType": "timestamp-millis"},
    {"type": "long", "logicalType": "timestamp-micros"},
    "string",
    "double",
]
ID_TYPES = ["string", "long", ["null", "string"]]
START = datetime(2026, 1, 1, tzinfo=UTC)
LONGS = st.one_of(st.integers(-5, 300), st.integers(-(2**63), 2**63 - 1))
DOUBLES = st.one_of(
    st.floats(-1e6, 1e6), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e300])
)


def _resolve(avro_type, enum_used: list[bool]):
    """Spell out the shared enum once (Avro names it once per schema)."""
    branches = avro_type if isinstance(avro_type, list) else [avro_type]
    out = []
    for b in branches:
        if b == "ENUM":
            out.append("Colour" if enum_used[0] else ENUM)
            enum_used[0] = True
        else:
            out.append(b)
    return out if isinstance(avro_type, list) else out[0]


@st.composite
def batches(draw):
    """A flat schema, a pipeline schema over it and a batch of records written with it."""
    n_numeric = draw(st.integers(1, 4))
    n_categorical = draw(st.integers(0, 3))
    enum_used = [False]
    fields = [
        ("id", draw(st.sampled_from(ID_TYPES))),
        ("event_time", draw(st.sampled_from(TIME_TYPES))),
        ("entity", draw(st.sampled_from(["string", ["null", "string"], "long"]))),
    ]
    fields += [(f"n{i}", draw(st.sampled_from(NUMERIC_TYPES))) for i in range(n_numeric)]
    fields += [(f"c{i}", draw(st.sampled_from(CATEGORICAL_TYPES))) for i in range(n_categorical)]
    extras = [(f"x{i}", draw(st.sampled_from(EXTRA_TYPES))) for i in range(draw(st.integers(0, 2)))]
    order = draw(st.permutations(fields + extras))
    schema = {
        "type": "record",
        "name": "R",
        "fields": [{"name": n, "type": _resolve(t, enum_used)} for n, t in order],
    }
    types = dict(order)
    n = draw(st.integers(1, 40))
    records = []
    for _ in range(n):
        record = {}
        for name, avro_type in order:
            record[name] = draw(_value(avro_type))
        records.append(record)
    pipeline = {
        "id_field": "id",
        "time_field": "event_time",
        "entity_field": "entity",
        "numeric": [f"n{i}" for i in range(n_numeric)],
        "categorical": [f"c{i}" for i in range(n_categorical)],
        "missing": draw(st.sampled_from(["impute", "reject"])),
    }
    return schema, pipeline, records, types


def _value(avro_type):
    if isinstance(avro_type, list):
        return st.one_of(*[_value(b) for b in avro_type])
    if isinstance(avro_type, dict):  # a timestamp
        return st.integers(-(10**15), 10**15).map(
            lambda us: START + timedelta(microseconds=us)
        ) | st.just(START)
    return {
        "null": st.none(),
        "boolean": st.booleans(),
        "int": st.integers(-(2**31), 2**31 - 1),
        "long": LONGS,
        "float": st.floats(-1e6, 1e6, width=32) | st.sampled_from([math.nan, math.inf]),
        "double": DOUBLES,
        "string": st.sampled_from(
            ["", "a", "2026-01-02T03:04:05Z", "ü€𝄞", "x" * 200, "2026-13-01"]
        ),
        "ENUM": st.sampled_from(ENUM["symbols"]),
    }[avro_type]


def _decoder(schema: dict, pipeline: dict, framing: str) -> AvroRecordDecoder:
    cfg = config_from_dict(
        {"name": "p", "schema": pipeline, "kafka": {"format": "avro", "avro_schema": "x.avsc",
                                                   "avro_framing": framing}},
        environ={},
    )  # fmt: skip
    return AvroRecordDecoder(cfg.schema, cfg.kafka, fastavro.parse_schema(schema))


def _encode(schema: dict, records: list[dict], framing: str) -> list[bytes]:
    parsed = fastavro.parse_schema(schema)
    header = b"\x00\x00\x00\x00\x01" if framing == "confluent" else b""
    out = []
    for record in records:
        buffer = io.BytesIO()
        buffer.write(header)
        fastavro.schemaless_writer(buffer, parsed, record)
        out.append(buffer.getvalue())
    return out


def _same(decoder: AvroRecordDecoder, values: list[bytes]) -> bool:
    """Columnar-or-fallback decode against fastavro record by record; whether the columnar
    reader took the batch."""
    columnar = decoder._read_columnar(list(values)) is not None
    got = decoder.decode(values)
    want = RecordDecoder.decode(decoder, values)  # the per-record path (fastavro)
    pd.testing.assert_frame_equal(got.frame, want.frame)
    np.testing.assert_array_equal(got.index, want.index)
    assert [(r.index, r.error_kind, r.error_message) for r in got.rejected] == [
        (r.index, r.error_kind, r.error_message) for r in want.rejected
    ]
    return columnar


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), framing=st.sampled_from(["confluent", "none"]))
def test_random_flat_schemas_decode_as_fastavro_decodes_them(batch, framing):
    schema, pipeline, records, _ = batch
    decoder = _decoder(schema, pipeline, framing)
    assert decoder._file_plan is not None  # every schema drawn here is one it reads
    _same(decoder, _encode(schema, records, framing))


def test_the_columnar_reader_takes_plain_batches():
    schema = json.loads(
        json.dumps(
            {
                "type": "record",
                "name": "R",
                "fields": [
                    {"name": "id", "type": "string"},
                    {
                        "name": "event_time",
                        "type": {"type": "long", "logicalType": "timestamp-micros"},
                    },
                    {"name": "entity", "type": "long"},
                    {"name": "n0", "type": ["null", "double"]},
                    {"name": "c0", "type": ENUM},
                ],
            }
        )
    )
    pipeline = {"id_field": "id", "time_field": "event_time", "entity_field": "entity",
                "numeric": ["n0"], "categorical": ["c0"], "missing": "reject"}  # fmt: skip
    records = [
        {"id": f"r{i}", "event_time": START + timedelta(seconds=i), "entity": i % 7,
         "n0": None if i == 3 else i / 3, "c0": ENUM["symbols"][i % 3]}
        for i in range(50)
    ]  # fmt: skip
    decoder = _decoder(schema, pipeline, "confluent")
    values = _encode(schema, records, "confluent")
    assert _same(decoder, values)  # the columnar reader took it (and agreed)
    batch = decoder.decode(values)
    assert [(r.index, r.error_kind) for r in batch.rejected] == [(3, "missing_value")]
    assert batch.frame["entity"].tolist()[:3] == ["0", "1", "2"]
    # A value cut short, one with a byte left over, a union branch index of -5 (n0's, before
    # its 8-byte double and the enum's byte): fastavro decides.
    for bad in (values[5][:-1], values[5] + b"\x00", values[5][:-10] + b"\x09" + values[5][-9:]):
        assert not _same(decoder, [*values[:5], bad, *values[6:]])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=batches(),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 200)),
    tail=st.binary(max_size=4),
)
def test_mangled_bytes_decode_as_fastavro_decodes_them(batch, flips, cut, tail):
    """Flipped, cut and appended bytes: whatever the columnar reader accepts must be what
    fastavro reads; anything else goes record by record."""
    schema, pipeline, records, _ = batch
    decoder = _decoder(schema, pipeline, "confluent")
    values = _encode(schema, records, "confluent")
    joined = bytearray(b"".join(values))
    for pos, byte in flips:
        if pos < len(joined):
            joined[pos] = byte
    lengths = np.cumsum([0, *map(len, values)])
    mangled = [bytes(joined[a:b]) for a, b in itertools.pairwise(lengths)]
    if cut is not None:
        mangled[0] = mangled[0][:cut]
    mangled[-1] += tail
    _same(decoder, mangled)


def test_a_time_out_of_range_is_named_as_the_record_holds_it():
    """The columnar reader holds times as an int64 array: the reason names the plain number, as
    the record-by-record path does (found by the mangled-bytes test above)."""
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "id", "type": "long"},
            {"name": "event_time", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "n0", "type": "double"},
        ],
    }
    pipeline = {"id_field": "id", "time_field": "event_time", "numeric": ["n0"],
                "categorical": []}  # fmt: skip
    records = [{"id": i, "event_time": START + timedelta(seconds=i), "n0": 0.5} for i in range(5)]
    decoder = _decoder(schema, pipeline, "confluent")
    values = _encode(schema, records, "confluent")
    # Record 2 written with event_time as a plain long of 2**62 microseconds (beyond year 9999):
    # the bytes a timestamp-micros of that value has, which no datetime can hold.
    late = _encode({"type": "record", "name": "R", "fields": [
        {"name": "id", "type": "long"}, {"name": "event_time", "type": "long"},
        {"name": "n0", "type": "double"}]}, [{"id": 2, "event_time": 2**62, "n0": 0.5}],
        "confluent")[0]  # fmt: skip
    values[2] = late
    assert _same(decoder, values)  # the columnar reader took the batch and agreed
    [rejected] = decoder.decode(values).rejected
    assert rejected.error_message == (
        f"field 'event_time': {2**62} is not an ISO 8601 time or epoch seconds"
    )
