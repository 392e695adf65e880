"""Decode and validate a micro-batch of Kafka record values against the pipeline schema.

Decoding is the bottleneck of a Python consumer, so the fast path does no per-record Python work
beyond one C call: a msgspec decoder compiled from the schema (a ``Struct`` with the id, time,
entity and feature fields) turns each value into a typed struct, the columns are C-level slices
of one flat list of all fields and ``numpy`` conversions of those, and the frame is put together
from its blocks (one float, one object, the time) without per-column inserts. Times are parsed
by ``streams.times``. Only when that pass fails does the decoder look closer: chunk by chunk
(``FALLBACK_CHUNK`` records), and record by record only in the chunks that fail, to find which
records are bad and why.

Why not one ``msgspec`` call on ``b"[" + b",".join(values) + b"]"``? A crafted value such as
``{"a":1},{"b":2}`` next to a value holding half an object decodes to the right *number* of
records with the wrong alignment; guarding against that needs a second pass (``list[Raw]``) and
measured slower (3.2 us/record) than the typed per-value pass (2.2 us/record, 30 features) it
would replace; one ``list[Struct]`` call without the guard is no faster than the per-value calls
either (0.59 vs 0.55 us/record, fraud schema). pyarrow's JSON reader measured 5.0 us/record on
the same batches.

Every bad record becomes a ``Rejected`` with a short machine-readable ``error_kind`` and a message
that names the field at fault; the rest of the batch goes on.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import msgspec
import numpy as np
import pandas as pd

from anomaly.config import SchemaConfig
from storage.sanitize import JSONText
from streams.rejects import (
    EMPTY,
    INVALID_JSON,
    INVALID_TIME,
    INVALID_UTF8,
    MISSING_VALUE,
    NOT_FINITE,
    NOT_OBJECT,
    OVERSIZED,
    TOO_DEEP,
    clipped,
    count_brackets,
    json_safe,
    nesting_depth,
    quoted,
    validation_reason,
)
from streams.times import parse_times

DEFAULT_MAX_DEPTH = 64
_UTC_NS = pd.DatetimeTZDtype("ns", "UTC")

try:  # pandas >= 3
    from pandas.api.internals import create_dataframe_from_blocks as _create_dataframe_from_blocks
except ImportError:  # pragma: no cover - older pandas
    _create_dataframe_from_blocks = None

# When a batch holds a bad record, it is re-decoded in chunks of this many records and only the
# chunks that fail go record by record.
FALLBACK_CHUNK = 128


# Tokens Python's json module writes for non-finite floats; msgspec (strict JSON) rejects them.
_NONSTANDARD = (b"NaN", b"Infinity")
# JSON escapes of UTF-16 surrogates (\ud800-\udfff), paired or not.
_SURROGATE_ESCAPES = (b"\\ud", b"\\uD")
# What keeps a valid value from being stored as it came (``RecordDecoder.stored_record``).
_NOT_AS_IS = (*_NONSTANDARD, b"\\u0000", *_SURROGATE_ESCAPES)


@dataclass(slots=True)
class Rejected:
    """One bad record: its position in the batch (and in Kafka, when known) and the reason."""

    index: int
    error_kind: str
    error_message: str
    partition: int | None = None
    offset: int | None = None


@dataclass
class DecodedBatch:
    """The valid records as a DataFrame (schema column names) and the rejected ones.

    ``index[i]`` is the position in the input batch of the frame's row ``i``; ``rejected`` is in
    input order.
    """

    frame: pd.DataFrame
    index: np.ndarray
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def n_valid(self) -> int:
        return len(self.index)

    def without(
        self,
        problems: list[tuple[int, str, str]],
        partitions: Sequence[int] | None = None,
        offsets: Sequence[int] | None = None,
    ) -> DecodedBatch:
        """The batch without the frame rows ``problems`` names ((row, kind, message); a row's
        first problem counts), which become rejects; with ``partitions`` and ``offsets`` every
        reject is labelled with its Kafka position."""
        batch = self
        if problems:
            drop = np.zeros(self.n_valid, dtype=bool)
            rejected = list(self.rejected)
            for row, kind, message in problems:
                if not drop[row]:
                    drop[row] = True
                    rejected.append(Rejected(int(self.index[row]), kind, message))
            rejected.sort(key=lambda r: r.index)
            frame = self.frame.loc[~drop].reset_index(drop=True)
            batch = DecodedBatch(frame=frame, index=self.index[~drop], rejected=rejected)
        if partitions is not None and offsets is not None:
            for r in batch.rejected:
                r.partition = int(partitions[r.index])
                r.offset = int(offsets[r.index])
        return batch


class RecordDecoder:
    """Decode JSON record values into a DataFrame with the schema's columns.

    Columns: the id field (str), the time field (``datetime64[ns, UTC]``; ISO 8601 strings or
    epoch seconds), the entity field (str or None), numeric features (float64, NaN where missing
    and ``schema.missing == "impute"``) and categorical features (str or None). Numbers are
    accepted for categorical fields and turned into strings.
    """

    def __init__(self, schema: SchemaConfig, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.schema = schema
        self.max_depth = max_depth
        self.reject_missing = schema.missing == "reject"
        # Struct attribute names are f0, f1, ... renamed to the schema's field names, so any field
        # name (keywords, dashes, spaces) works.
        spec: list[tuple[str, Any, Any]] = []
        names: list[str] = []

        def add(name: str, typ: Any, required: bool) -> None:
            attr = f"f{len(names)}"
            names.append(name)
            spec.append((attr, typ) if required else (attr, typ, None))  # type: ignore[arg-type]

        add(schema.id_field, str | int, True)
        if schema.time_field:
            add(schema.time_field, str | int | float, True)
        if schema.entity_field:
            add(schema.entity_field, str | int | None, False)
        for name in schema.numeric:
            add(name, float | None, self.reject_missing)
        for name in schema.categorical:
            add(name, str | int | None, self.reject_missing)
        self.columns = names
        self._struct = msgspec.defstruct(
            "Record",
            spec,
            rename={f"f{i}": n for i, n in enumerate(names)},
            kw_only=True,
            gc=False,
        )
        self._decoder = msgspec.json.Decoder(self._struct)
        # Field positions (in a struct's astuple) by what the frame makes of them: the numeric
        # block, the text block (id, entity, categorical; object dtype) and the time.
        n_head = 1 + bool(schema.time_field) + bool(schema.entity_field)
        self._numeric_pos = np.arange(n_head, n_head + len(schema.numeric))
        self._time_pos = 1 if schema.time_field else None
        text = [0, *([n_head - 1] if schema.entity_field else [])]
        self._categorical_pos = list(range(n_head + len(schema.numeric), len(names)))
        self._text_pos = np.array(text + self._categorical_pos, dtype=np.intp)
        self._column_index = pd.Index(names)

    def for_warm_up(self) -> RecordDecoder:
        """The decoder the scorer's warm-up uses (``streams.models``): this one; the Avro
        decoder's differs."""
        return self

    # -- the whole batch --------------------------------------------------------------------

    def decode(
        self,
        values: Sequence[bytes | None],
        partitions: Sequence[int] | None = None,
        offsets: Sequence[int] | None = None,
    ) -> DecodedBatch:
        """Decode one micro-batch; ``partitions``/``offsets`` only label the rejects."""
        n = len(values)
        values = list(values)
        rejected: list[Rejected] = []
        fast = self._decode_fast(values)
        if fast is not None:
            structs, keep = fast, None
        else:
            # Something in the batch is bad: decode it in chunks, so one bad record sends only
            # its own chunk record by record.
            structs, keep = [], []
            for lo in range(0, n, FALLBACK_CHUNK):
                chunk = values[lo : lo + FALLBACK_CHUNK]
                part = self._decode_fast(chunk)
                if part is not None:
                    structs.extend(part)
                    keep.extend(range(lo, lo + len(chunk)))
                    continue
                for i, value in enumerate(chunk, start=lo):
                    outcome = self._decode_one(value)
                    if isinstance(outcome, tuple):
                        rejected.append(Rejected(i, outcome[0], outcome[1]))
                    else:
                        structs.append(outcome)
                        keep.append(i)
        index = np.arange(n, dtype=np.int64) if keep is None else np.asarray(keep, dtype=np.int64)
        # All fields of all records in one list: field j of every record is then a C-level
        # strided slice, cheaper than zip(*rows) (which builds one tuple per field).
        flat = list(chain.from_iterable(map(msgspec.structs.astuple, structs)))
        width = len(self.columns)
        fields = [flat[j::width] for j in range(width)]
        frame, bad_rows = self._frame_from_fields(fields, len(structs))
        return DecodedBatch(frame, index, rejected).without(bad_rows, partitions, offsets)

    def _decode_fast(self, values: list[bytes | None]) -> list[Any] | None:
        """Every value small, valid UTF-8, shallow and decodable: one C call per value.
        ``None`` as soon as anything is off (the caller then finds out what)."""
        n = len(values)
        try:
            joined = b"".join(values)  # type: ignore[arg-type]
        except TypeError:  # a None value
            return None
        limit = self.schema.max_record_bytes
        if len(joined) > limit and max(map(len, values)) > limit:  # type: ignore[arg-type]
            return None
        try:
            if not joined.isascii():
                joined.decode("utf-8")
            structs = list(map(self._decoder.decode, values))
        except (UnicodeDecodeError, msgspec.MsgspecError, RecursionError):
            return None
        # Every decoded value is an object, so holds at least one bracket: when the batch's
        # brackets beyond one per record are fewer than max_depth, no record can be deeper.
        if count_brackets(joined) > n - 1 + self.max_depth and any(
            v.count(b"{") + v.count(b"[") > self.max_depth  # type: ignore[union-attr]
            for v in values
        ):
            return None
        return structs

    def record_fields(self, value: bytes | None) -> dict[str, Any]:
        """All fields of one valid record as JSON-safe values (non-finite numbers as null): what
        an alert stores of the record that raised it."""
        if not value:
            return {}
        try:
            obj = _ANY.decode(value)
        except msgspec.DecodeError:  # NaN/Infinity literals, accepted by the slow path
            obj = json.loads(value)
        return json_safe(obj)

    def stored_record(self, value: bytes | None) -> dict[str, Any] | JSONText:
        """A valid record as the store keeps it (an alert's or the reservoir's ``record``): the
        value itself when it is JSON the store takes as is, else ``record_fields``. Not as is: a
        NaN/Infinity literal (not JSON), a ``\\u0000`` escape or a surrogate escape
        (``\\uD800``-``\\uDFFF``, possibly unpaired), which PostgreSQL rejects. A fresh service
        samples most records into its reservoir, and decoding each value again only to encode
        it back cost ~9 us per record (cProfile, batches of 500, docs/benchmarks.md)."""
        if value and not any(token in value for token in _NOT_AS_IS):
            return JSONText(value.decode("utf-8"))
        return self.record_fields(value)

    # -- one record (slow path: only to find the bad ones) ------------------------------------

    def _size_problem(self, value: bytes | None) -> tuple[str, str] | None:
        """Empty or over ``schema.max_record_bytes``: checked before any decoding."""
        if value is None or len(value) == 0:
            return (EMPTY, "message value is empty")
        if len(value) > self.schema.max_record_bytes:
            return (
                OVERSIZED,
                f"record is {len(value)} bytes, more than schema.max_record_bytes="
                f"{self.schema.max_record_bytes}",
            )
        return None

    def _decode_one(self, value: bytes | None) -> Any:
        problem = self._size_problem(value)
        if problem is not None:
            return problem
        assert value is not None
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return (INVALID_UTF8, f"invalid UTF-8 at byte {exc.start}: {exc.reason}")
        if value.count(b"{") + value.count(b"[") > self.max_depth:
            depth = nesting_depth(value)
            if depth > self.max_depth:
                return (TOO_DEEP, f"JSON nesting depth {depth} exceeds {self.max_depth}")
        try:
            return self._decoder.decode(value)
        except msgspec.ValidationError as exc:
            return validation_reason(str(exc))
        except msgspec.DecodeError as exc:
            if any(token in value for token in _NONSTANDARD):
                return self._decode_nonstandard(value, exc)
            return (INVALID_JSON, f"invalid JSON: {exc}")
        except RecursionError:
            return (TOO_DEEP, f"JSON nesting deeper than the decoder allows ({self.max_depth})")

    def _decode_nonstandard(self, value: bytes, error: Exception) -> Any:
        """Python's json writes NaN/Infinity; accept them, then validate as usual."""
        try:
            obj = json.loads(value)
        except (ValueError, RecursionError):
            return (INVALID_JSON, f"invalid JSON: {error}")
        if not isinstance(obj, dict):
            return (NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
        # json.loads keeps an unpaired surrogate escape (\ud800) as a lone surrogate, which no
        # UTF-8 encoder takes (the scores topic's key, the store): msgspec, the fast path,
        # rejects such a value as invalid JSON, and so must this one.
        if any(escape in value for escape in _SURROGATE_ESCAPES):
            where = _unpaired_surrogate(obj)
            if where is not None:
                return (
                    INVALID_JSON,
                    f"invalid JSON: {where} holds an unpaired UTF-16 surrogate escape",
                )
        try:
            return msgspec.convert(obj, self._struct, from_attributes=False)
        except msgspec.ValidationError as exc:
            return validation_reason(str(exc))

    # -- columns ------------------------------------------------------------------------------

    def _frame_from_fields(
        self, fields: list[Any], n: int
    ) -> tuple[pd.DataFrame, list[tuple[int, str, str]]]:
        """The frame from one sequence per struct field (as the structs hold them: text fields
        as lists of str, int or None; numeric fields as lists or float64 arrays) and the rows
        the checks reject."""
        s = self.schema
        bad: dict[int, tuple[str, str]] = {}
        times = None
        if self._time_pos is not None:
            raw_times = fields[self._time_pos]
            times, bad_time = self._times(raw_times)
            for row in bad_time:
                value = raw_times[row]
                if isinstance(value, np.generic):  # Avro's columns: an array's element
                    value = value.item()
                bad.setdefault(
                    row,
                    (
                        INVALID_TIME,
                        f"field '{s.time_field}': {quoted(value)} is not an ISO 8601 time "
                        "or epoch seconds",
                    ),
                )
        matrix = _as_float_block([fields[j] for j in self._numeric_pos], n)
        by_row = matrix.T
        finite = np.isfinite(by_row)
        if not finite.all():
            nan = np.isnan(by_row)
            for row, j in zip(*np.nonzero(~finite & ~nan), strict=True):
                name = s.numeric[j]
                bad.setdefault(
                    int(row),
                    (NOT_FINITE, f"field '{name}': {by_row[row, j]} is not a finite number"),
                )
            if self.reject_missing:
                for row, j in zip(*np.nonzero(nan), strict=True):
                    bad.setdefault(
                        int(row),
                        (
                            MISSING_VALUE,
                            f"field '{s.numeric[j]}' is null or NaN (schema.missing=reject)",
                        ),
                    )
        text = np.empty((len(self._text_pos), n), dtype=object)
        mixed: set[int] = set()  # fields holding something other than str
        for i, j in enumerate(self._text_pos):
            column = fields[j]
            text[i] = column
            try:
                "".join(column)  # the cheapest all-str check (TypeError otherwise)
            except TypeError:
                mixed.add(int(j))
                _to_str(text[i], column, none_ok=j != 0)
        if self.reject_missing:
            for j, name in zip(self._categorical_pos, s.categorical, strict=True):
                column = fields[j]
                if j in mixed and None in column:
                    for row, v in enumerate(column):
                        if v is None:
                            bad.setdefault(
                                row,
                                (MISSING_VALUE, f"field '{name}' is null (schema.missing=reject)"),
                            )
        frame = self._frame(n, matrix, text, times)
        return frame, [(row, kind, msg) for row, (kind, msg) in sorted(bad.items())]

    # The time field's values as ``datetime64[ns]`` (UTC) and the rows that failed.
    _times = staticmethod(parse_times)

    def _frame(
        self, n: int, numeric: np.ndarray, text: np.ndarray, times: np.ndarray | None
    ) -> pd.DataFrame:
        """numeric: features x rows float64; text: fields x rows object; times: ns UTC."""
        blocks: list[tuple[Any, np.ndarray]] = [(text, self._text_pos)]
        if len(self._numeric_pos):
            blocks.append((numeric, self._numeric_pos))
        if times is not None:
            stamps = pd.array(times, dtype=_UTC_NS)
            blocks.append((stamps, np.array([self._time_pos], dtype=np.intp)))
        if _create_dataframe_from_blocks is not None:
            # pandas >= 3: the blocks as they are, no per-column insert (~0.4 us/record).
            return _create_dataframe_from_blocks(
                blocks, index=pd.RangeIndex(n), columns=self._column_index
            )
        return _frame_from_columns(blocks, n, self.columns)


_ANY = msgspec.json.Decoder()
_ANY_ENCODER = msgspec.json.Encoder()


def _unpaired_surrogate(obj: dict[str, Any]) -> str | None:
    """Where a decoded object holds a string (key or value, at any depth) with a lone surrogate:
    "field 'name'" (the top-level field it is under) or "a key"; ``None`` when nowhere."""
    # One encode of the whole object clears the usual case (a surrogate pair, an emoji): 1.4 us
    # for 23 fields, against 46 us for walking the fields (docs/benchmarks.md, Streams).
    if _encodes(obj):
        return None
    for key, value in obj.items():
        if not _encodes(key):
            return "a key"
        if not _encodes(value):  # depth is bounded by max_depth, checked before decoding
            return f"field '{clipped(key)}'"
    return None


def _encodes(value: Any) -> bool:
    """Whether ``value`` holds no lone surrogate (which no UTF-8 encoder takes)."""
    try:
        _ANY_ENCODER.encode(value)
    except UnicodeEncodeError:
        return False
    return True


def _frame_from_columns(
    blocks: list[tuple[Any, np.ndarray]], n: int, names: list[str]
) -> pd.DataFrame:
    """The public constructor's way to the same frame (pandas < 3)."""
    columns: dict[int, Any] = {}
    for values, positions in blocks:
        for i, pos in enumerate(positions):
            if values.ndim == 1:
                columns[int(pos)] = values
            elif values.dtype == object:
                # Plain object columns: pandas' str dtype would copy every string for no gain.
                columns[int(pos)] = pd.Series(values[i], dtype=object, copy=False)
            else:
                columns[int(pos)] = values[i]
    data = {names[pos]: columns[pos] for pos in range(len(names))}
    return pd.DataFrame(data, index=pd.RangeIndex(n), copy=False)


def _to_str(out: np.ndarray, column: Sequence[Any], none_ok: bool) -> None:
    """Numbers (accepted for text fields) become their str; None stays None or becomes ''."""
    for i, v in enumerate(column):
        if v is not None and not isinstance(v, str):
            out[i] = str(v)
        elif v is None and not none_ok:
            out[i] = ""


def _as_float_block(columns: Sequence[Sequence[Any]], n: int) -> np.ndarray:
    """Features x rows float64 (pandas' block layout); missing (None) values become NaN."""
    out = np.empty((len(columns), n), dtype=np.float64)
    # struct packs a list of Python floats ~1.6x faster than np.fromiter / np.array read them
    # (the same C double, bit for bit, NaN payloads included).
    pack_into = struct.Struct(f"{n}d").pack_into
    for j, column in enumerate(columns):
        if isinstance(column, np.ndarray):  # already float64 (the columnar Avro reader's)
            out[j] = column
            continue
        try:
            pack_into(out, j * n * 8, *column)
        except struct.error:  # None present
            out[j] = [math.nan if v is None else v for v in column]
    return out
