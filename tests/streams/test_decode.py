"""The batch decoder: every bad record found with its reason, the good ones decoded intact."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly.config import SchemaConfig
from streams.decode import FALLBACK_CHUNK, RecordDecoder

SCHEMA = dict(
    id_field="id",
    time_field="ts",
    entity_field="card",
    numeric=["amount", "v-1"],
    categorical=["mcc"],
    max_record_bytes=300,
)


def good(i: int, **overrides: object) -> dict:
    record = {"id": f"r{i}", "ts": 1_700_000_000 + i, "card": f"c{i % 3}", "amount": i * 1.5}
    record |= {"v-1": -float(i), "mcc": "5411"}
    record.update(overrides)
    return record


def enc(record: object) -> bytes:
    return json.dumps(record).encode()


@pytest.mark.parametrize(
    ("value", "kind", "needle"),
    [
        (b"{not json", "invalid_json", "invalid JSON"),
        (enc(good(1)) + b" x", "invalid_json", "trailing"),
        (b"[1, 2]", "not_object", "array"),
        (b'"text"', "not_object", "str"),
        (b"", "empty", "empty"),
        (None, "empty", "empty"),
        (enc(good(1)).replace(b"5411", b"\xff\xfe"), "invalid_utf8", "UTF-8"),
        (enc(good(1, pad="x" * 400)), "oversized", "max_record_bytes=300"),
        (enc(good(1) | {"deep": json.loads("[" * 80 + "]" * 80)}), "too_deep", "depth 81"),
        (enc({k: v for k, v in good(1).items() if k != "amount"}), "missing_field", "'amount'"),
        (enc({k: v for k, v in good(1).items() if k != "id"}), "missing_field", "'id'"),
        (enc(good(1, amount="12.5")), "wrong_type", "'amount'"),
        (enc(good(1, amount=True)), "wrong_type", "'amount'"),
        (enc(good(1, mcc={"a": 1})), "wrong_type", "'mcc'"),
        (enc(good(1, id=[1])), "wrong_type", "'id'"),
        (enc(good(1, amount=math.inf)), "not_finite", "'amount'"),
        (enc(good(1)).replace(b'"amount": 1.5', b'"amount": 1e999'), "not_finite", "'amount'"),
        (enc(good(1, ts="yesterday")), "invalid_time", "'ts'"),
        (enc(good(1, **{"v-1": None})), "missing_value", "'v-1'"),
        (enc(good(1, amount=math.nan)), "missing_value", "'amount'"),
        (enc(good(1, mcc=None)), "missing_value", "'mcc'"),
    ],
)
def test_each_bad_record_gets_its_reason(value, kind, needle):
    decoder = RecordDecoder(SchemaConfig(**SCHEMA, missing="reject"))
    values = [enc(good(0)), value, enc(good(2))]
    batch = decoder.decode(values, partitions=[3, 3, 3], offsets=[10, 11, 12])
    assert list(batch.index) == [0, 2]
    assert list(batch.frame["id"]) == ["r0", "r2"]
    [reject] = batch.rejected
    assert (reject.index, reject.partition, reject.offset) == (1, 3, 11)
    assert reject.error_kind == kind
    assert needle in reject.error_message


def test_values_types_and_times():
    decoder = RecordDecoder(SchemaConfig(**SCHEMA))
    values = [
        enc(good(0, ts="2024-03-01T12:00:00+02:00", mcc=7995, id=17)),
        enc(good(1, ts=1_709_294_400.25, card=None)),
        enc(good(2, ts="2024-03-01T10:00:00")),
    ]
    frame = decoder.decode(values).frame
    assert list(frame.columns) == ["id", "ts", "card", "amount", "v-1", "mcc"]
    assert list(frame["id"]) == ["17", "r1", "r2"]
    assert list(frame["mcc"]) == ["7995", "5411", "5411"]
    assert frame["amount"].dtype == np.float64
    assert list(frame["v-1"]) == [-0.0, -1.0, -2.0]
    assert pd.isna(frame["card"][1])
    expected = pd.to_datetime(
        ["2024-03-01T10:00:00Z", "2024-03-01T12:00:00.25Z", "2024-03-01T10:00:00Z"],
        utc=True,
        format="ISO8601",
    )
    assert list(frame["ts"]) == list(expected)


def test_impute_keeps_missing_features_as_nan():
    decoder = RecordDecoder(SchemaConfig(**SCHEMA, missing="impute"))
    missing_amount = {k: v for k, v in good(0).items() if k != "amount"}
    values = [enc(missing_amount), enc(good(1, mcc=None)), enc(good(2, amount=math.nan))]
    batch = decoder.decode(values)
    assert batch.rejected == []
    assert np.isnan(batch.frame["amount"][0]) and np.isnan(batch.frame["amount"][2])
    assert pd.isna(batch.frame["mcc"][1])
    # inf is never a missing value: it is rejected even when missing values are imputed.
    assert decoder.decode([enc(good(3, amount=-math.inf))]).rejected[0].error_kind == "not_finite"


def test_crafted_values_cannot_shift_records():
    """Values that only make sense when concatenated must not be decoded as records."""
    decoder = RecordDecoder(SchemaConfig(**SCHEMA))
    a, b = enc(good(0)), enc(good(1))
    values = [a + b",\n" + b, a[:-1], b"," + b[1:], enc(good(2))]
    batch = decoder.decode(values)
    assert list(batch.frame["id"]) == ["r2"]
    assert [r.index for r in batch.rejected] == [0, 1, 2]
    assert {r.error_kind for r in batch.rejected} == {"invalid_json"}


def test_empty_batch():
    batch = RecordDecoder(SchemaConfig(**SCHEMA)).decode([])
    assert batch.n_valid == 0 and batch.rejected == []
    assert list(batch.frame.columns) == ["id", "ts", "card", "amount", "v-1", "mcc"]


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
records = st.fixed_dictionaries(
    {
        "id": st.one_of(st.text(max_size=8), st.integers(0, 10**6)),
        "ts": st.one_of(st.integers(0, 4_000_000_000), st.floats(0, 4e9)),
        "card": st.one_of(st.none(), st.text(max_size=5)),
        "amount": finite,
        "v-1": finite,
        "mcc": st.text(max_size=5),
    },
    optional={"extra": st.recursive(st.none() | st.integers(), st.lists, max_leaves=5)},
)
garbage = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda r: enc(r)[:-1], records),
    st.builds(lambda r, k: enc(r | {"amount": k}), records, st.text(max_size=3)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(records.map(lambda r: ("ok", r)), garbage.map(lambda g: ("bad", g)))))
def test_property_every_record_accounted_for_once(items):
    decoder = RecordDecoder(SchemaConfig(**SCHEMA | {"max_record_bytes": 10_000}))
    values = [enc(x) if tag == "ok" else x for tag, x in items]
    batch = decoder.decode(values)
    seen = sorted([*batch.index.tolist(), *(r.index for r in batch.rejected)])
    assert seen == list(range(len(values)))
    valid = {i for i, (tag, _) in enumerate(items) if tag == "ok"}
    # Every well-formed record is accepted, decoded to the values that were sent.
    assert valid <= set(batch.index.tolist())
    for row, i in enumerate(batch.index.tolist()):
        if i in valid:
            sent = items[i][1]
            assert batch.frame["id"][row] == str(sent["id"])
            assert batch.frame["amount"][row] == sent["amount"]
            assert batch.frame["v-1"][row] == sent["v-1"]
    # Decoding record by record gives the same answer as decoding the batch.
    for i, value in enumerate(values):
        one = decoder.decode([value])
        assert one.n_valid == (i in set(batch.index.tolist()))


def test_bad_records_across_fallback_chunks_keep_order():
    """A bad record re-decodes only its chunk; the good rows stay aligned with their input."""
    decoder = RecordDecoder(SchemaConfig(**SCHEMA))
    n = 3 * FALLBACK_CHUNK + 7
    bad_at = {0, FALLBACK_CHUNK - 1, FALLBACK_CHUNK, 2 * FALLBACK_CHUNK + 5, n - 1}
    values = [b"{oops" if i in bad_at else enc(good(i)) for i in range(n)]
    batch = decoder.decode(values)
    assert [r.index for r in batch.rejected] == sorted(bad_at)
    expected = [i for i in range(n) if i not in bad_at]
    assert batch.index.tolist() == expected
    assert list(batch.frame["id"]) == [f"r{i}" for i in expected]
    assert list(batch.frame["amount"]) == [i * 1.5 for i in expected]
