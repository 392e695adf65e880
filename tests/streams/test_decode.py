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
from streams.times import parse_iso_fast, parse_times

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


# -- times: the fast ISO 8601 path must read exactly what pandas reads -----------------------------


def pandas_time(text: str) -> int | None:
    """What a time string means: pandas' ISO 8601 parse of it alone, in ns since the epoch (UTC);
    None when pandas cannot parse it or the time does not fit in datetime64[ns]."""
    parsed = pd.to_datetime(
        pd.Series([text], dtype=object), utc=True, format="ISO8601", errors="coerce"
    )
    if pd.isna(parsed[0]):
        return None
    try:
        return parsed[0].as_unit("ns").value
    except (OverflowError, ValueError):
        return None


def assert_times_match_pandas(column: list) -> None:
    times, bad = parse_times(column)
    assert times.dtype == np.dtype("datetime64[ns]")
    expected = []
    for value in column:
        if isinstance(value, str):
            expected.append(pandas_time(value))
        else:  # whole epoch seconds in these tests
            expected.append(pd.Timestamp(value, unit="s").as_unit("ns").value)
    got = [None if np.isnat(t) else int(t.view(np.int64)) for t in times]
    differ = [(v, g, e) for v, g, e in zip(column, got, expected, strict=True) if g != e]
    assert not differ
    assert bad == [i for i, e in enumerate(expected) if e is None]


TIME_CASES = [
    "2024-03-01T10:00:00Z",
    "2024-03-01 10:00:00Z",
    "2024-03-01t10:00:00z",
    "2024-03-01T10:00:00",
    "2024-03-01T10:00:00.5",
    "2024-03-01T10:00:00.123Z",
    "2024-03-01T10:00:00.123456Z",
    "2024-03-01T10:00:00.123456789Z",
    "2024-03-01T10:00:00.1234567891Z",
    "2024-03-01T10:00:00.Z",
    "2024-03-01T10:00:00,5Z",
    "2024-03-01T10:00:00+02:00",
    "2024-03-01T10:00:00.250-05:30",
    "2024-03-01T10:00:00+23:59",
    "2024-03-01T10:00:00-23:59",
    "2024-03-01T10:00:00+24:00",
    "2024-03-01T10:00:00+02:60",
    "2024-03-01T10:00:00-00:00",
    "2024-03-01T10:00:00+0200",
    "2024-03-01T10:00:00+02",
    "2024-03-01T10:00:00 Z",
    " 2024-03-01T10:00:00Z",
    "2024-03-01T10:00",
    "2024-03-01",
    "2024-02-29T00:00:00Z",
    "2023-02-29T00:00:00Z",
    "2024-04-31T00:00:00Z",
    "2024-00-10T00:00:00Z",
    "2024-13-10T00:00:00Z",
    "2024-01-00T00:00:00Z",
    "2024-01-01T24:00:00Z",
    "2024-01-01T23:60:00Z",
    "2024-01-01T23:59:60Z",
    "1677-09-21T00:12:43.145224193Z",
    "1677-09-21T00:12:43.145224192Z",
    "1678-01-01T00:00:00+23:59",
    "2262-04-11T23:47:16.854775807Z",
    "2262-04-11T23:47:16.854775808Z",
    "2261-12-31T23:59:59-23:59",
    "3000-01-01T00:00:00Z",
    "0000-01-01T00:00:00Z",
    "+2024-03-01T10:00:00Z",
    "2024-03-01T10:00:00+02:00:00",
    "\u0662\u0660\u0662\u0664-03-01T10:00:00Z",
    "2024-03-01T10:00:00Z\n",
    "2024-03-01T10:\n0:00Z",
    "yesterday",
    "NaT",
    "",
]


def test_times_each_shape_alone_and_in_one_batch():
    for text in TIME_CASES:
        assert_times_match_pandas([text])
    assert_times_match_pandas(TIME_CASES)
    assert_times_match_pandas([1_700_000_000, *TIME_CASES, 1_700_000_001])


def test_fast_time_path_reads_the_common_shapes():
    """The comparison with pandas is only worth something if the fast path takes these."""
    common = [
        "2026-01-05T05:19:01.673000Z",  # anomaly replay / bench
        "2024-03-01T10:00:00Z",
        "2024-03-01 10:00:00.123Z",
        "2024-03-01T10:00:00.123456789+05:30",
        "2024-03-01T10:00:00-08:00",
        "2024-03-01T10:00:00",
    ]
    for text in common:
        _, ok = parse_iso_fast([text, text])
        assert ok.all(), text
    _, ok = parse_iso_fast(common)  # mixed lengths go by length
    assert ok.all()


@st.composite
def time_batches(draw) -> list:
    """Batches whose strings mostly share one layout (the fast path's case), with values in and
    out of range, some other layouts, broken strings and epoch seconds."""
    fraction = draw(st.sampled_from([0, 0, 1, 3, 6, 9, 10]))
    zone_kind = draw(st.sampled_from(["", "Z", "offset", "z", "+HHMM"]))
    sep = draw(st.sampled_from(["T", "T", " ", "t"]))

    def text(d) -> str:
        year = d(st.one_of(st.integers(1970, 2100), st.integers(0, 9999)))
        parts = [d(st.integers(0, 14)), d(st.integers(0, 32))]
        clock = [d(st.integers(0, 25)), d(st.integers(0, 61)), d(st.integers(0, 61))]
        out = f"{year:04d}-{parts[0]:02d}-{parts[1]:02d}{sep}"
        out += ":".join(f"{v:02d}" for v in clock)
        if fraction:
            out += "." + "".join(str(d(st.integers(0, 9))) for _ in range(fraction))
        sign = d(st.sampled_from("+-"))
        hours, minutes = d(st.integers(0, 25)), d(st.integers(0, 61))
        zone = {"Z": "Z", "z": "z", "offset": f"{sign}{hours:02d}:{minutes:02d}"}
        out += zone.get(zone_kind, f"{sign}{hours:02d}{minutes:02d}" if zone_kind else "")
        return out

    column: list = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["same"] * 6 + ["mutated", "other", "epoch"]))
        if kind == "same":
            column.append(text(draw))
        elif kind == "mutated":
            value = text(draw)
            at = draw(st.integers(0, len(value)))
            inserted = draw(st.sampled_from(["", "0", ":", "\n", "\u0663"]))
            column.append(value[:at] + inserted + value[at + 1 :])
        elif kind == "other":
            column.append(draw(st.sampled_from(TIME_CASES)))
        else:
            column.append(draw(st.integers(0, 4_000_000_000)))
    return column


@settings(max_examples=300, deadline=None)
@given(time_batches())
def test_property_times_match_pandas(column):
    assert_times_match_pandas(column)


def test_time_outside_the_ns_range_is_rejected_whatever_the_batch():
    """pandas >= 3 parses '3000-01-01' at us resolution; it must not wrap around to 1830."""
    decoder = RecordDecoder(SchemaConfig(**SCHEMA))
    for neighbour in ("2024-03-01T10:00:00Z", "2024-03-01T10:00:00.123456789Z"):
        values = [enc(good(0, ts="3000-01-01T00:00:00Z")), enc(good(1, ts=neighbour))]
        batch = decoder.decode(values)
        assert batch.index.tolist() == [1]
        assert [(r.index, r.error_kind) for r in batch.rejected] == [(0, "invalid_time")]


def test_times_with_newlines_cannot_shift_rows():
    """The byte-matrix read relies on one '\\n' per string: a string holding one, next to others
    whose lengths make the total come out right, must not be read as two times."""
    a = "2024-03-01T10:00:00Z"
    column = [a, f"{a}\n{a}", "", a[:-1]]
    assert sum(map(len, column)) == len(a) * len(column)
    assert_times_match_pandas(column)
    assert parse_times(column)[1] == [1, 2]


# -- a varied batch against a reference decode -----------------------------------------------------

VALID_RECORDS = [
    good(0, ts="2026-01-05T05:19:01.673000Z"),  # the replay / bench shape
    good(1, ts="2024-03-01T12:00:00+02:00", mcc=7995, id=17),
    good(2, ts="2024-03-01T10:00:00", card=None),
    good(3, ts="2024-03-01 10:00:00.123456789-05:30", card=42),
    good(4, ts="2024-03-01", amount=7),
    good(5, ts=1_709_294_400.25),
    good(6, ts=1_709_294_400, amount=-0.0),
    good(7, ts="2024-02-29T23:59:59.5Z", amount=1e-300, **{"v-1": 1.7976931348623157e308}),
    good(8, ts="2024-03-01T10:00:00.1Z", mcc=""),
    good(9, ts="2024-03-01T10:00Z", id="ü-9", card="é"),
]
# Valid only where missing values are imputed.
MISSING_RECORDS = [
    good(10, amount=None),
    good(11, amount=math.nan),  # Python's json writes NaN
    good(12, mcc=None),
    {k: v for k, v in good(13).items() if k != "v-1"},
]


def reference_row(record: dict) -> dict:
    """The documented meaning of a valid record, from json-level values."""
    ts = record["ts"]
    if isinstance(ts, str):
        stamp = pd.Timestamp(pandas_time(ts), tz="UTC")
    else:
        stamp = pd.Timestamp(ts, unit="s", tz="UTC")
    text = {k: None if record.get(k) is None else str(record[k]) for k in ("card", "mcc")}
    numbers = {
        k: math.nan if record.get(k) is None else float(record[k]) for k in ("amount", "v-1")
    }
    return {"id": str(record["id"]), "ts": stamp, **text, **numbers}


def reference_frame(records: list[dict]) -> pd.DataFrame:
    rows = [reference_row(r) for r in records]
    column = {k: [row[k] for row in rows] for k in ("id", "ts", "card", "amount", "v-1", "mcc")}
    return pd.DataFrame(
        {
            "id": pd.Series(column["id"], dtype=object),
            "ts": pd.Series(column["ts"], dtype="datetime64[ns, UTC]"),
            "card": pd.Series(column["card"], dtype=object),
            "amount": np.array(column["amount"], dtype=np.float64),
            "v-1": np.array(column["v-1"], dtype=np.float64),
            "mcc": pd.Series(column["mcc"], dtype=object),
        }
    )


def assert_same_frame(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(frame, expected, check_exact=True, check_column_type=True)
    assert isinstance(frame.index, pd.RangeIndex)
    for name in {"id", "card", "mcc"} & set(frame.columns):  # None, not NaN; str, not a number
        assert list(map(type, frame[name])) == list(map(type, expected[name]))
    for name in {"amount", "v-1"} & set(frame.columns):  # -0.0 and NaN bit for bit
        assert frame[name].to_numpy().tobytes() == expected[name].to_numpy().tobytes()


# (value, error kind, exact message or None where the text is msgspec's or Python's)
BAD_VALUES = [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "not_object", "expected a JSON object, got array"),
    (b"", "empty", "message value is empty"),
    (None, "empty", "message value is empty"),
    (enc(good(1)).replace(b"5411", b"\xff\xfe"), "invalid_utf8", None),
    (enc(good(1, pad="x" * 400)), "oversized", None),
    (enc(good(1) | {"deep": json.loads("[" * 80 + "]" * 80)}), "too_deep", None),
    (
        enc({k: v for k, v in good(1).items() if k != "id"}),
        "missing_field",
        "field 'id' is missing",
    ),
    (enc(good(1, amount="12.5")), "wrong_type", None),
    (enc(good(1, mcc=True)), "wrong_type", None),
    (enc(good(1, amount=math.inf)), "not_finite", "field 'amount': inf is not a finite number"),
    (enc(good(1, **{"v-1": -math.inf})), "not_finite", "field 'v-1': -inf is not a finite number"),
    (
        enc(good(1, ts="2024-02-30T00:00:00Z")),
        "invalid_time",
        "field 'ts': '2024-02-30T00:00:00Z' is not an ISO 8601 time or epoch seconds",
    ),
    (
        enc(good(1, ts=1e300)),
        "invalid_time",
        "field 'ts': 1e+300 is not an ISO 8601 time or epoch seconds",
    ),
    # Two faults: the time is reported (checked first).
    (
        enc(good(1, ts="soon", mcc=None)),
        "invalid_time",
        "field 'ts': 'soon' is not an ISO 8601 time or epoch seconds",
    ),
]
MISSING_MESSAGES = [
    "field 'amount' is null or NaN (schema.missing=reject)",
    "field 'amount' is null or NaN (schema.missing=reject)",
    "field 'mcc' is null (schema.missing=reject)",
    None,  # missing_field: the key is absent
]


@pytest.mark.parametrize("missing", ["impute", "reject"])
@pytest.mark.parametrize("copies", [1, 40])
def test_varied_batch_matches_the_reference(missing, copies):
    """Valid records of every shape, interleaved with one bad record of every kind, decoded as
    one batch (40 copies: several fallback chunks, some of them clean)."""
    decoder = RecordDecoder(SchemaConfig(**SCHEMA, missing=missing))
    valid = VALID_RECORDS + (MISSING_RECORDS if missing == "impute" else [])
    bad = BAD_VALUES
    if missing == "reject":
        kinds = ["missing_value"] * 3 + ["missing_field"]
        missing_values = zip(MISSING_RECORDS, kinds, MISSING_MESSAGES, strict=True)
        bad = bad + [(enc(r), k, m) for r, k, m in missing_values]
    values, kept, expected_rejects = [], [], []
    for _ in range(copies):
        for i in range(max(len(valid), len(bad))):
            if i < len(valid):
                kept.append(len(values))
                values.append(enc(valid[i]))
            if i < len(bad):
                value, kind, message = bad[i]
                expected_rejects.append((len(values), kind, message, value))
                values.append(value)
    batch = decoder.decode(
        values, partitions=[2] * len(values), offsets=range(100, 100 + len(values))
    )
    assert_same_frame(batch.frame, reference_frame(valid * copies))
    assert batch.index.tolist() == kept
    assert [(r.index, r.error_kind) for r in batch.rejected] == [e[:2] for e in expected_rejects]
    for reject, (index, _, message, value) in zip(batch.rejected, expected_rejects, strict=True):
        assert (reject.partition, reject.offset) == (2, 100 + index)
        alone = decoder.decode([value]).rejected[0]
        assert reject.error_message == (message or alone.error_message)
        assert alone.error_message == reject.error_message


def test_clean_batch_matches_the_reference():
    """A batch without a bad record takes the fast path from end to end."""
    decoder = RecordDecoder(SchemaConfig(**SCHEMA, missing="impute"))
    records = (VALID_RECORDS + MISSING_RECORDS) * 30
    batch = decoder.decode([enc(r) for r in records])
    assert batch.rejected == []
    assert_same_frame(batch.frame, reference_frame(records))


def test_frame_without_pandas_block_api(monkeypatch):
    """pandas < 3 has no create_dataframe_from_blocks: the public constructor's frame is equal."""
    import streams.decode as decode

    decoder = RecordDecoder(SchemaConfig(**SCHEMA, missing="impute"))
    values = [enc(r) for r in VALID_RECORDS + MISSING_RECORDS]
    blocks_frame = decoder.decode(values).frame
    monkeypatch.setattr(decode, "_create_dataframe_from_blocks", None)
    plain_frame = decoder.decode(values).frame
    assert_same_frame(plain_frame, blocks_frame)
    assert_same_frame(plain_frame, reference_frame(VALID_RECORDS + MISSING_RECORDS))


@pytest.mark.parametrize(
    "schema",
    [
        dict(id_field="id", time_field=None, entity_field=None, numeric=[], categorical=[]),
        dict(id_field="id", time_field="ts", entity_field=None, numeric=[], categorical=["mcc"]),
        dict(id_field="id", time_field=None, entity_field="card", numeric=["amount"]),
    ],
)
def test_schemas_without_some_fields(schema):
    decoder = RecordDecoder(SchemaConfig(**schema))
    records = [good(0, mcc=7), good(1, card=None)]
    for values in ([enc(r) for r in records], []):
        frame = decoder.decode(values).frame
        reference = reference_frame(records[: len(values)])[decoder.columns]
        if not len(values):
            reference = reference.reset_index(drop=True)
        assert_same_frame(frame, reference)


def test_empty_frame_has_the_documented_time_dtype():
    decoder = RecordDecoder(SchemaConfig(**SCHEMA))
    for values in ([], [b"{oops"]):
        assert str(decoder.decode(values).frame["ts"].dtype) == "datetime64[ns, UTC]"


def test_nesting_at_the_depth_limit():
    """The batch-wide bracket count only decides when to look closer: records at the limit are
    kept, one past it rejected, whatever their neighbours."""
    decoder = RecordDecoder(SchemaConfig(**SCHEMA | {"max_record_bytes": 10_000}), max_depth=8)
    at_limit = enc(good(0) | {"x": json.loads("[" * 7 + "]" * 7)})  # depth 8 with the object
    past = enc(good(1) | {"x": json.loads("[" * 8 + "]" * 8)})
    in_string = enc(good(2, mcc="[[[[[[[[[[[["))
    batch = decoder.decode([at_limit, in_string, past, at_limit] * 3)
    assert [(r.index, r.error_kind) for r in batch.rejected] == [
        (2, "too_deep"),
        (6, "too_deep"),
        (10, "too_deep"),
    ]
    assert decoder.decode([at_limit] * 20 + [in_string] * 20).rejected == []


def test_naive_times_after_an_offset_keep_utc_off_the_fast_path():
    """Two strings the fast path leaves to pandas (10 fraction digits), an offset one first:
    pandas 2 parses them in one call as if the naive one had the same offset."""
    column = ["2024-03-01T10:00:00.1234567891+02:00", "1970-01-01T00:00:00.0000000000"]
    assert_times_match_pandas(column)
    assert parse_times(column)[0][1] == np.datetime64("1970-01-01T00:00:00", "ns")


def test_stored_record_keeps_clean_json_as_it_came_and_decodes_the_rest():
    from storage.sanitize import JSONText, json_bytes

    decoder = RecordDecoder(SchemaConfig(**SCHEMA))
    clean = enc(good(1, note="café"))
    stored = decoder.stored_record(clean)
    assert type(stored) is JSONText and json.loads(stored) == good(1, note="café")
    assert json_bytes(stored) == clean  # written as it came, not encoded again
    # A NUL or surrogate escape (PostgreSQL rejects a NUL and a lone surrogate) and NaN (not
    # JSON): those records are decoded and made safe, as record_fields does.
    for value in (
        enc(good(1, note="a\u0000b")),
        enc(good(1, note="\ud800")),
        enc(good(1, x=math.nan)),
    ):
        stored = decoder.stored_record(value)
        assert isinstance(stored, dict) and stored == decoder.record_fields(value)
        json.loads(json_bytes(stored))  # and the store can take them
    assert decoder.stored_record(enc(good(1, x=math.nan)))["x"] is None
    cleaned = json.loads(json_bytes(decoder.stored_record(enc(good(1, note="a\u0000b")))))
    assert "\x00" not in cleaned["note"]


def test_a_huge_bad_value_is_quoted_short_in_its_message():
    """A 600 kB time string is an invalid_time dead letter whose message quoted it whole: the
    message travels as a Kafka header of the dead letter, which then could not be produced and
    stopped the service. The message quotes the value's head and says how long it was."""
    decoder = RecordDecoder(SchemaConfig(**{**SCHEMA, "max_record_bytes": 1_000_000}))
    values = [enc(good(0)), enc(good(1, ts="x" * 600_000)), enc(good(2, ts="soon"))]
    [huge, short] = decoder.decode(values).rejected
    assert (huge.index, huge.error_kind) == (1, "invalid_time")
    assert huge.error_message == (
        f"field 'ts': {'x' * 200!r}... (600000 characters in all) is not an ISO 8601 time "
        "or epoch seconds"
    )
    assert short.error_message == "field 'ts': 'soon' is not an ISO 8601 time or epoch seconds"


@pytest.mark.parametrize("escape", ["\\ud800", "\\uDC00", "x\\ud83d"])
@pytest.mark.parametrize(
    "record",
    [
        good(1, id="idSUR"),
        good(1, note="SUR"),
        good(1, nested={"a": [1, {"b": "SUR"}]}),
        good(1, nested={"kSUR": 1}),
        good(1, **{"kSUR": 1}),
    ],
    ids=["id", "field", "nested", "nested-key", "key"],
)
def test_a_lone_surrogate_is_invalid_json_with_or_without_a_nan_literal(escape, record):
    """msgspec (the fast path) rejects a lone surrogate escape as invalid JSON; a value that also
    holds a NaN literal went through json.loads instead, which accepts it, and an id holding it
    then crashed the service (UnicodeEncodeError encoding the scores topic's key)."""
    decoder = RecordDecoder(SchemaConfig(**SCHEMA))
    bad = enc(record).replace(b"SUR", escape.encode())
    with_nan = bad[:-1] + b', "x": NaN}'
    batch = decoder.decode([enc(good(0)), bad, with_nan, enc(good(3))])
    assert list(batch.frame["id"]) == ["r0", "r3"]
    assert [(r.index, r.error_kind) for r in batch.rejected] == [
        (1, "invalid_json"),
        (2, "invalid_json"),
    ]
    assert "unpaired UTF-16 surrogate" in batch.rejected[1].error_message
    # A surrogate *pair* is a character like any other, with or without NaN.
    pair = enc(record).replace(b"SUR", b"\\ud83d\\ude00")
    batch = decoder.decode([pair, pair[:-1] + b', "x": NaN}'])
    assert batch.rejected == [] and batch.n_valid == 2
