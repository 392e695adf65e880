"""Columnar reading of a batch of flat Avro records: field by field across all records at once.

fastavro reads one record per call at ~0.6 us per field (8.5 us for the fraud schema's 12
fields), eight times the JSON decoder's whole cost. Avro binary has no per-record field index,
but a record's fields come in schema order, so the whole batch can be read field by field: one
read position per record, and for each field a few numpy operations over all records (union
branch indexes, zig-zag varints, little-endian floats, string lengths), then one slice per
string.

It handles flat record schemas: fields of type null, boolean, int, long, float, double, string
or enum, or unions of those; a logical type only on the time field, which the decoder reads as
its long ticks. ``compile_plan`` returns ``None`` for anything else, and the caller reads those
schemas with fastavro.

Nothing here decides what is wrong with a record. Whenever the batch is not plainly well-formed
(a value that ends early or has bytes left over, a union or enum index out of range, a varint
over 10 bytes, invalid UTF-8, a negative length) or holds a value that the pipeline's typed
struct would refuse (a null id, a string where a number belongs), ``read`` returns ``None`` and
the caller decodes the batch record by record with fastavro, which finds out which records are
bad and why. Tests check that both give the same frame.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

# What the pipeline's struct makes of a field (streams.decode.RecordDecoder): a float or None;
# a str, an int or None (id: not None); a str, an int or a float (the time: not None).
Role = Literal["numeric", "text", "id", "time", "skip"]

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "string"}
# Branch types each role takes as it is; any other makes the batch go record by record.
_ACCEPTS: dict[str, set[str]] = {
    "numeric": {"null", "int", "long", "float", "double"},
    "text": {"null", "int", "long", "string", "enum"},
    "id": {"int", "long", "string", "enum"},
    "time": {"int", "long", "float", "double", "string", "enum"},
    "skip": _PRIMITIVES | {"enum"},
}


class _Unreadable(Exception):
    """The batch is not plainly well-formed for the columnar reader."""


@dataclass(frozen=True)
class _Branch:
    kind: str  # a primitive type name or "enum"
    symbols: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Field:
    name: str
    role: Role
    branches: tuple[_Branch, ...]
    union: bool


@dataclass(frozen=True)
class ColumnarPlan:
    """How to read one flat record schema column by column."""

    fields: tuple[_Field, ...]

    def read(
        self, joined: bytes, starts: np.ndarray, ends: np.ndarray
    ) -> dict[str, np.ndarray | list[Any]] | None:
        """The wanted fields' columns of the records at ``joined[starts[i]:ends[i]]``:
        numeric fields as float64 arrays (NaN for null), the time as an int64 array of ticks
        or a list, text fields as lists of str, int or None. ``None``: read record by record."""
        try:
            return _read(self, joined, starts, ends)
        except _Unreadable:
            return None


def compile_plan(parsed: dict[str, Any], roles: dict[str, Role]) -> ColumnarPlan | None:
    """The plan for a (fastavro-parsed) record schema, ``roles`` naming what each wanted field
    becomes; ``None`` when the schema is not one this reader handles."""
    fields = []
    named: dict[str, _Branch] = {}  # enums by full name, for later fields that refer to them
    for f in parsed.get("fields", ()):
        role = roles.get(f["name"], "skip")
        avro_type = f["type"]
        union = isinstance(avro_type, list)
        branches = []
        for branch in avro_type if union else [avro_type]:
            parsed_branch = named.get(branch) if isinstance(branch, str) else None
            parsed_branch = parsed_branch or _branch(branch, time=role == "time")
            if parsed_branch is None:
                return None
            if parsed_branch.kind == "enum" and isinstance(branch, dict):
                named[branch["name"]] = parsed_branch
            branches.append(parsed_branch)
        fields.append(_Field(f["name"], role, tuple(branches), union))
    if set(roles) - {f.name for f in fields}:
        return None
    return ColumnarPlan(tuple(fields))


def _branch(avro_type: Any, time: bool) -> _Branch | None:
    if isinstance(avro_type, str):
        return _Branch(avro_type) if avro_type in _PRIMITIVES else None
    if not isinstance(avro_type, dict):
        return None
    kind = avro_type.get("type")
    if kind == "enum":
        return _Branch("enum", tuple(avro_type["symbols"]))
    if kind not in _PRIMITIVES:
        return None
    # A logical type changes what fastavro returns (dates, UUIDs, decimals): only the time
    # field's, which the decoder has already stripped to plain ticks, is left to read here.
    if "logicalType" in avro_type and not time:
        return None
    return _Branch(kind)


def _read(
    plan: ColumnarPlan, joined: bytes, starts: np.ndarray, ends: np.ndarray
) -> dict[str, np.ndarray | list[Any]]:
    batch = _Batch(joined)
    buf = batch.buf
    pos = starts.astype(np.int64, copy=True)
    n = len(pos)
    columns: dict[str, np.ndarray | list[Any]] = {}
    for field in plan.fields:
        if field.union:
            index = _varint(buf, pos, np.arange(n))
            if (index < 0).any() or (index >= len(field.branches)).any() or (pos > ends).any():
                raise _Unreadable
            parts = [(b, np.flatnonzero(index == i)) for i, b in enumerate(field.branches)]
        else:
            parts = [(field.branches[0], None)]
        column = _Column(field.role, n)
        for branch, rows in parts:
            if rows is not None and rows.size == 0:
                continue
            if branch.kind not in _ACCEPTS[field.role]:
                raise _Unreadable
            rows = np.arange(n) if rows is None else rows
            value = _read_branch(branch, batch, pos, rows, ends, field.role != "skip")
            column.put(rows, value)
        if (pos > ends).any():
            raise _Unreadable  # a value ran past its record's end
        if field.role != "skip":
            columns[field.name] = column.result()
    if (pos != ends).any():
        raise _Unreadable  # bytes left over
    return columns


class _Batch:
    """The batch's bytes, as bytes (for string slices) and as a padded uint8 array."""

    def __init__(self, joined: bytes) -> None:
        self.joined = joined
        # Padding: a union index, then a varint or a double read at a record's end stay in
        # bounds (positions are checked against the records' ends after each index and field).
        self.buf = np.frombuffer(joined + bytes(32), dtype=np.uint8)

    @functools.cached_property
    def high_before(self) -> np.ndarray:
        """How many bytes >= 0x80 come before each position."""
        high = np.zeros(len(self.buf) + 1, dtype=np.int32)
        np.cumsum(self.buf >= 0x80, dtype=np.int32, out=high[1:])
        return high


def _read_branch(
    branch: _Branch,
    batch: _Batch,
    pos: np.ndarray,
    rows: np.ndarray,
    ends: np.ndarray,
    keep: bool,
) -> Any:
    """Read one value of ``branch`` for each of ``rows``, advancing their positions."""
    kind = branch.kind
    buf, joined = batch.buf, batch.joined
    if kind == "null":
        return None
    at = pos[rows]
    if kind == "boolean":
        value = buf[at]
        if (value > 1).any():
            raise _Unreadable
        pos[rows] += 1
        return value.astype(bool)
    if kind in ("int", "long"):
        return _varint(buf, pos, rows)
    if kind in ("float", "double"):
        width = 4 if kind == "float" else 8
        raw = buf[at[:, None] + np.arange(width)]
        pos[rows] += width
        return raw.view("<f4" if width == 4 else "<f8")[:, 0].astype(np.float64)
    if kind == "enum":
        index = _varint(buf, pos, rows)
        if (index < 0).any() or (index >= len(branch.symbols)).any():
            raise _Unreadable
        symbols = branch.symbols
        return [symbols[i] for i in index.tolist()] if keep else None
    # string
    length = _varint(buf, pos, rows)
    begin = pos[rows]
    if (length < 0).any() or (length > ends[rows] - begin).any():
        raise _Unreadable  # negative, or longer than what is left of the record
    pos[rows] += length
    if not keep:
        # Not wanted, but fastavro would refuse invalid UTF-8 there too: decode only the
        # values holding a byte >= 0x80 (ASCII is valid UTF-8), found by a prefix count.
        high = batch.high_before
        for b in np.flatnonzero(high[begin + length] > high[begin]).tolist():
            try:
                joined[begin[b] : begin[b] + length[b]].decode("utf-8")
            except UnicodeDecodeError:
                raise _Unreadable from None
        return None
    try:
        return [
            joined[b:e].decode("utf-8")
            for b, e in zip(begin.tolist(), (begin + length).tolist(), strict=True)
        ]
    except UnicodeDecodeError:
        raise _Unreadable from None


def _varint(buf: np.ndarray, pos: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Zig-zag varints (Avro int and long) at ``pos[rows]``, advancing those positions."""
    at = pos[rows]
    byte = buf[at].astype(np.uint64)
    raw = byte & np.uint64(0x7F)
    length = np.ones(len(rows), dtype=np.int64)
    more = np.flatnonzero(byte >= 0x80)
    shift = 7
    while more.size:
        if shift > 63:
            raise _Unreadable  # longer than 10 bytes
        byte = buf[at[more] + length[more]].astype(np.uint64)
        if shift == 63 and (byte > 1).any():
            raise _Unreadable  # more than 64 bits
        raw[more] |= (byte & np.uint64(0x7F)) << np.uint64(shift)
        length[more] += 1
        more = more[byte >= 0x80]
        shift += 7
    pos[rows] = at + length
    return (raw >> np.uint64(1)).astype(np.int64) ^ -(raw & np.uint64(1)).astype(np.int64)


class _Column:
    """Collects one field's values from the branches of its union, in record order."""

    def __init__(self, role: Role, n: int) -> None:
        self.role = role
        self.n = n
        self.numbers: np.ndarray | None = None
        self.objects: Any = None  # a list, or the time's int64 ticks

    def put(self, rows: np.ndarray, values: Any) -> None:
        if self.role == "skip":
            return
        if self.role == "numeric":
            if self.numbers is None:
                self.numbers = np.full(self.n, np.nan)
            if values is not None:
                self.numbers[rows] = values
            return
        if self.objects is None:
            self.objects = [None] * self.n
        if values is None:
            return  # null: None already
        if len(rows) == self.n:
            if self.role == "time" and isinstance(values, np.ndarray) and values.dtype.kind == "i":
                self.objects = values  # long ticks stay an array (the decoder's _times)
            else:
                self.objects = values.tolist() if isinstance(values, np.ndarray) else values
            return
        if isinstance(values, np.ndarray):
            values = values.tolist()  # Python ints and floats, as the struct holds them
        objects = self.objects
        for row, value in zip(rows.tolist(), values, strict=True):
            objects[row] = value

    def result(self) -> np.ndarray | list[Any]:
        if self.role == "numeric":
            return np.full(self.n, np.nan) if self.numbers is None else self.numbers
        return [None] * self.n if self.objects is None else self.objects
