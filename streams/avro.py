"""Avro record values (``kafka.format: avro``): decoding for ``serve``, encoding for ``replay``.

The writer schema is a record schema in an ``.avsc`` file (``kafka.avro_schema``, relative to the
pipeline file). With ``kafka.avro_framing: confluent`` (the default) each value starts with the
header Confluent's Schema Registry serializers write: byte 0, then the schema id as 4 bytes
big-endian. The ids in ``kafka.avro_schema_ids`` are the ones written with the ``.avsc`` file.
A value with another id is read one of two ways:

- with ``kafka.schema_registry_url``, with the writer schema the registry has for that id,
  resolved to the ``.avsc`` file (the reader schema) by Avro's schema-evolution rules: fields
  added or reordered by the producer are fine; an id the registry does not know is
  ``unknown_schema``; a writer schema that does not resolve (a feature turned into a string, a
  field removed that the file has no default for) is ``incompatible_schema``. A registry that
  cannot be reached is not the record's fault: ``SchemaRegistryUnavailable``, and the service
  holds the batch and retries, as when the database is down;
- without a registry it is dead-lettered (``unknown_schema``) rather than read with the wrong
  schema, which Avro's binary encoding would not notice. With no ids listed and no registry,
  every id is read with the file's schema.

A batch of one schema (a flat record: primitives, enums and unions of those) is read column by
column (``streams.avro_columnar``: a few numpy operations per field over all records). When it
is not plainly well-formed, or the schema is not flat, it is read record by record with
fastavro's ``schemaless_reader``, which finds the bad records and why. Either way the columns go
through the same checks and make the same frame as the JSON decoder's
(``streams.decode.RecordDecoder``): the same dead-letter reasons for the same faults (missing
values under ``schema.missing: reject``, non-finite numbers, bad times), plus ``invalid_avro``
for a value that is not the schema's Avro binary (bad header, truncated, bytes left over).

The schemas themselves (the file, the registry's writer schemas, the replayed ids) are
``streams.avro_schemas``.

fastavro and confluent-kafka's Schema Registry client are optional dependencies:
``pip install 'anomaly-monitor[avro]'``.
"""

from __future__ import annotations

import copy
import io
import math
import re
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
import numpy as np
import pandas as pd

from anomaly.config import KafkaConfig, PipelineConfig, SchemaConfig
from anomaly.errors import DataError
from streams.avro_columnar import ColumnarPlan, Role, compile_plan
from streams.avro_schemas import (
    HEADER,
    INCOMPATIBLE_SCHEMA,
    INVALID_AVRO,
    MAGIC,
    UNKNOWN_SCHEMA,
    SchemaRegistryUnavailable,  # noqa: F401 - the service and tests import it from here
    WriterSchema,
    WriterSchemas,
    _Bad,
    _branches,
    _fastavro,
    _timestamp_unit,
    _without_time_logical_type,
    load_schema,
    writer_schema_id,
)
from streams.decode import DecodedBatch, RecordDecoder
from streams.rejects import clipped, json_safe, validation_reason


class AvroRecordDecoder(RecordDecoder):
    """``RecordDecoder`` for Avro values: same frame, same checks, same dead-letter reasons."""

    def __init__(self, schema: SchemaConfig, kafka: KafkaConfig, parsed: Any) -> None:
        super().__init__(schema)
        fastavro = _fastavro()
        self._reader = fastavro.schemaless_reader
        self._resolution_error = fastavro.read.SchemaResolutionError
        self._framed = kafka.avro_framing == "confluent"
        self._ids = frozenset(kafka.avro_schema_ids)
        # A timestamp-millis/-micros time field is read as its plain long; _times turns the
        # batch's ticks into nanoseconds at once.
        self._time_ns_per_unit = _timestamp_unit(parsed, schema.time_field)
        self._parsed = (
            _without_time_logical_type(parsed, schema.time_field)
            if self._time_ns_per_unit
            else parsed
        )
        self._parsed_as_written = parsed
        self.registry = (
            WriterSchemas(kafka, schema.time_field, self._parsed, self._time_ns_per_unit)
            if kafka.schema_registry_url
            else None
        )
        # The columnar reader's plans (streams/avro_columnar.py): the file's, and one per
        # registry writer schema read without resolution (None: that schema goes by fastavro).
        self._roles: dict[str, Role] = {schema.id_field: "id"}
        if schema.time_field:
            self._roles[schema.time_field] = "time"
        if schema.entity_field:
            self._roles[schema.entity_field] = "text"
        self._roles.update(dict.fromkeys(schema.numeric, "numeric"))
        self._roles.update(dict.fromkeys(schema.categorical, "text"))
        self._file_plan = compile_plan(self._parsed, self._roles)
        self._writer_plans: dict[int, ColumnarPlan | None] = {}

    def for_warm_up(self) -> AvroRecordDecoder:
        """A decoder that reads every value with the file's schema (no registry, no ids): the
        scorer's warm-up decodes made-up values with it, which must never reach the schema
        registry. It shares this decoder's compiled readers, so those are warmed up too."""
        twin = copy.copy(self)
        twin.registry = None
        twin._ids = frozenset()
        twin._writer_plans = {}
        return twin

    # -- the whole batch, column by column -------------------------------------------------------

    def decode(
        self,
        values: Any,
        partitions: Any = None,
        offsets: Any = None,
    ) -> DecodedBatch:
        """The batch read column by column when it is plainly well-formed and of one schema
        (``streams.avro_columnar``); otherwise record by record with fastavro, which finds the
        bad records and their reasons."""
        values = list(values)
        columns = self._read_columnar(values)
        if columns is None:
            return super().decode(values, partitions, offsets)
        n = len(values)
        frame, bad_rows = self._frame_from_fields([columns[c] for c in self.columns], n)
        index = np.arange(n, dtype=np.int64)
        return DecodedBatch(frame, index).without(bad_rows, partitions, offsets)

    def _read_columnar(self, values: list[bytes | None]) -> dict[str, Any] | None:
        n = len(values)
        if not n:
            return None
        try:
            joined = b"".join(values)  # type: ignore[arg-type]
        except TypeError:  # a None value
            return None
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)  # type: ignore[arg-type]
        if lengths.min() == 0 or lengths.max() > self.schema.max_record_bytes:
            return None
        ends = np.cumsum(lengths)
        starts = ends - lengths
        plan, writer_unit = self._file_plan, self._time_ns_per_unit
        if self._framed:
            if lengths.min() < HEADER:
                return None
            raw = np.frombuffer(joined, dtype=np.uint8)
            if raw[starts].any():
                return None  # a value without the magic byte
            header = raw[starts[:, None] + np.arange(1, HEADER)].astype(np.uint32)
            ids = (header[:, 0] << 24) | (header[:, 1] << 16) | (header[:, 2] << 8) | header[:, 3]
            schema_id = int(ids[0])
            if (ids != schema_id).any():
                return None  # several schemas in one batch
            try:
                writer = self._writer_for(schema_id)
            except _Bad:
                return None  # an id the file or the registry does not read: record by record
            if writer is not None:
                if writer.resolve:
                    return None
                if schema_id not in self._writer_plans:
                    self._writer_plans[schema_id] = compile_plan(writer.for_reading, self._roles)
                plan, writer_unit = self._writer_plans[schema_id], writer.time_unit
            starts = starts + HEADER
        if plan is None:
            return None
        columns = plan.read(joined, starts, ends)
        if columns is None:
            return None
        name, file_unit = self.schema.time_field, self._time_ns_per_unit
        if name and writer_unit and file_unit and writer_unit != file_unit:
            ticks = columns[name]
            if not isinstance(ticks, np.ndarray):
                return None
            columns[name] = _ticks_in_unit(ticks, writer_unit, file_unit)
        return columns

    def _writer(self, value: bytes) -> WriterSchema | None:
        """The registry's writer schema for a value, ``None`` for the file's schema."""
        if not self._framed:
            return None
        return self._writer_for(int.from_bytes(value[1:HEADER], "big"))

    def _writer_for(self, schema_id: int) -> WriterSchema | None:
        """The registry's writer schema for an id, ``None`` for the file's schema; ``_Bad``
        for an id neither reads."""
        if schema_id in self._ids:
            return None
        if self.registry is not None:
            return self.registry.get(schema_id)
        if self._ids:
            raise _Bad(
                UNKNOWN_SCHEMA,
                f"schema id {schema_id} is not one of kafka.avro_schema_ids {sorted(self._ids)}",
            )
        return None

    def _read(self, value: bytes) -> dict[str, Any]:
        if self._framed and (len(value) < HEADER or value[0] != MAGIC):
            raise _Bad(
                INVALID_AVRO,
                "value does not start with the Schema Registry header "
                "(byte 0, then a 4-byte schema id); set kafka.avro_framing: none for bare Avro",
            )
        writer = self._writer(value)
        buffer = io.BytesIO(value)
        buffer.seek(HEADER if self._framed else 0)
        try:
            if writer is None:
                record = self._reader(buffer, self._parsed, None)
            else:
                reader = self._parsed if writer.resolve else None
                record = self._reader(buffer, writer.for_reading, reader)
        except self._resolution_error as exc:
            raise _Bad(
                INCOMPATIBLE_SCHEMA,
                f"schema id {writer.schema_id if writer else '?'} does not resolve to "
                f"kafka.avro_schema: {exc}",
            ) from None
        except Exception as exc:  # EOFError, ValueError, UnicodeDecodeError, ...
            raise _Bad(
                INVALID_AVRO, f"not Avro of the pipeline's schema: {_exception_text(exc)}"
            ) from None
        left = len(value) - buffer.tell()
        if left:
            raise _Bad(INVALID_AVRO, f"{left} byte(s) left after the Avro record")
        if writer is not None and writer.time_unit != self._time_ns_per_unit:
            self._to_file_time_unit(record, writer.time_unit)
        return record

    def _to_file_time_unit(self, record: dict[str, Any], writer_unit: int | None) -> None:
        """Ticks of the writer's timestamp unit as ticks of the file's (floored: micros read
        as millis lose the sub-millisecond part; beyond a long: the largest, invalid_time)."""
        name = self.schema.time_field
        ticks = record.get(name)
        if writer_unit and self._time_ns_per_unit and isinstance(ticks, int):
            one = np.array([ticks], dtype=np.int64)  # an Avro long fits
            record[name] = int(_ticks_in_unit(one, writer_unit, self._time_ns_per_unit)[0])

    def record_fields(self, value: bytes | None) -> dict[str, Any]:
        """``RecordDecoder.record_fields`` for a valid Avro value: logical types as JSON text
        (timestamps in ISO 8601, decimals and UUIDs as strings), bytes as hex."""
        if not value:
            return {}
        buffer = io.BytesIO(value)
        buffer.seek(HEADER if self._framed else 0)
        writer = self._writer(value)
        schema = self._parsed_as_written if writer is None else writer.as_written
        record = self._reader(buffer, schema, None)  # the record as its producer wrote it
        return json_safe({k: _json_value(v) for k, v in record.items()})

    # Avro values are binary: what the store keeps is always the decoded fields.
    stored_record = record_fields

    def _convert(self, value: bytes) -> Any:
        return msgspec.convert(self._read(value), self._struct, from_attributes=False)

    def _times(self, column: Any) -> tuple[np.ndarray, list[int]]:
        unit = self._time_ns_per_unit
        if unit is None:
            return super()._times(column)
        if isinstance(column, np.ndarray):  # the columnar reader's ticks
            ticks, bad = column.astype(np.int64, copy=True), []
        else:
            ticks = np.array([v if isinstance(v, int) else 0 for v in column], dtype=np.int64)
            bad = [i for i, v in enumerate(column) if not isinstance(v, int)]
        # Outside 1677..2262 nanoseconds overflow int64: invalid, as in the JSON decoder.
        # (Compared both ways: np.abs of the smallest int64 overflows.)
        limit = np.iinfo(np.int64).max // unit
        bad.extend(np.flatnonzero((ticks > limit) | (ticks < -limit)).tolist())
        ticks[bad] = 0
        result = (ticks * unit).view("datetime64[ns]")
        result[bad] = np.datetime64("NaT")
        return result, sorted(set(bad))

    def _decode_fast(self, values: list[bytes | None]) -> list[Any] | None:
        limit = self.schema.max_record_bytes
        try:
            if any(not v or len(v) > limit for v in values):
                return None
            return list(map(self._convert, values))  # type: ignore[arg-type]
        except (_Bad, msgspec.MsgspecError):
            return None

    def _decode_one(self, value: bytes | None) -> Any:
        problem = self._size_problem(value)
        if problem is not None:
            return problem
        try:
            return self._convert(value)  # type: ignore[arg-type]
        except _Bad as bad:
            return (bad.kind, bad.message)
        except msgspec.ValidationError as exc:
            return validation_reason(str(exc))


def _exception_text(exc: Exception) -> str:
    """A reader error for a dead letter: its type and message, without the object addresses
    fastavro puts in some (``<_io.BytesIO object at 0x...>``), so one fault reads the same
    every time."""
    text = clipped(re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the value", str(exc)))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _json_value(value: Any) -> Any:
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, (Decimal, UUID)):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _ticks_in_unit(ticks: np.ndarray, from_unit: int, to_unit: int) -> np.ndarray:
    """Ticks of one timestamp unit in another, floored (micros as millis lose the
    sub-millisecond part); a value beyond a long becomes the largest long (invalid_time)."""
    if from_unit < to_unit:
        return np.floor_divide(ticks, to_unit // from_unit)
    factor = from_unit // to_unit
    out = ticks * factor
    out[np.abs(ticks) > _INT64_MAX // factor] = _INT64_MAX  # (abs of the smallest long wraps)
    out[ticks == _INT64_MIN] = _INT64_MAX
    return out


def make_decoder(cfg: PipelineConfig) -> RecordDecoder:
    """The decoder for the pipeline's ``kafka.format``."""
    if cfg.kafka.format == "avro":
        return AvroRecordDecoder(cfg.schema, cfg.kafka, load_schema(cfg))
    return RecordDecoder(cfg.schema)


# -- encoding (replay) ----------------------------------------------------------------------------


def _coercer(avro_type: Any) -> Any:
    """Turn a pandas cell into what fastavro writes for this field (None where missing)."""
    branches = _branches(avro_type)
    nullable = "null" in branches
    main = next((b for b in branches if b != "null"), "null")
    logical = main.get("logicalType") if isinstance(main, dict) else None
    base = main.get("type") if isinstance(main, dict) else main

    def coerce(value: Any) -> Any:
        if value is None or (isinstance(value, float) and math.isnan(value) and nullable):
            return None
        if value is pd.NaT or value is pd.NA:
            return None
        if logical in ("timestamp-millis", "timestamp-micros"):
            stamp = pd.Timestamp(value)
            return (stamp if stamp.tzinfo else stamp.tz_localize("UTC")).to_pydatetime()
        if isinstance(value, pd.Timestamp):
            stamp = value if value.tzinfo else value.tz_localize("UTC")
            return stamp.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if base in ("int", "long"):
            number = float(value)
            if not number.is_integer():
                raise ValueError(f"{value!r} is not a whole number")
            return int(number)
        if base in ("float", "double"):
            return float(value)
        if base == "string":
            return str(value)
        return value

    return coerce


def encode_avro_rows(
    frame: pd.DataFrame, cfg: PipelineConfig, schema_id: int | None = None
) -> list[bytes]:
    """One Avro value per row, framed as ``kafka.avro_framing`` says (with ``schema_id`` in the
    header, by default ``writer_schema_id``). Fields of the schema the frame lacks are written
    as null; a value the schema cannot hold is a ``DataError`` naming row and field."""
    fastavro = _fastavro()
    parsed = load_schema(cfg)
    header = b""
    if cfg.kafka.avro_framing == "confluent":
        if schema_id is None:
            schema_id = writer_schema_id(cfg)
        header = bytes([MAGIC]) + schema_id.to_bytes(4, "big")
    fields = [(f["name"], _coercer(f["type"])) for f in parsed["fields"]]
    writer = fastavro.schemaless_writer
    out = []
    for i, row in enumerate(frame.to_dict("records")):
        record = {}
        for name, coerce in fields:
            try:
                record[name] = coerce(row.get(name))
            except (TypeError, ValueError) as exc:
                raise DataError(f"row {i}, field '{name}': {exc}") from None
        buffer = io.BytesIO()
        buffer.write(header)
        try:
            writer(buffer, parsed, record)
        except (TypeError, ValueError) as exc:
            raise DataError(f"row {i}: the Avro schema cannot hold it: {exc}") from None
        out.append(buffer.getvalue())
    return out


# -- the scorer's warm-up (serve) -----------------------------------------------------------------

# The schema id in the header of the warm-up's values. Any id: the warm-up decoder
# (``AvroRecordDecoder.for_warm_up``) reads every id with the file's schema.
WARM_UP_SCHEMA_ID = 1
_WHOLE_NUMBER_LIMITS = {"int": 2**31 - 1, "long": 2**53}  # long: what a float64 holds exactly


def warm_up_values(frame: pd.DataFrame, cfg: PipelineConfig) -> list[bytes]:
    """The warm-up's made-up records as Avro values of the file's schema. Unlike replay's
    ``encode_avro_rows`` this never asks a schema registry for an id (starting ``serve`` must
    not register the pipeline's ``.avsc`` as a version of the producers' subject), and values
    of int and long fields are rounded (and kept in range) so that the schema holds them."""
    frame = frame.copy()
    for f in load_schema(cfg)["fields"]:
        name = f["name"]
        branches = [b for b in _branches(f["type"]) if b != "null"]
        # A plain "int" or "long" (a dict is a logical type: the time field, a date, ...).
        base = branches[0] if len(branches) == 1 and isinstance(branches[0], str) else None
        if name not in frame or base not in _WHOLE_NUMBER_LIMITS:
            continue
        limit = _WHOLE_NUMBER_LIMITS[base]
        column = frame[name]
        if pd.api.types.is_numeric_dtype(column):
            frame[name] = np.clip(np.round(column.to_numpy(dtype=np.float64)), -limit, limit)
        else:  # made-up text (the id, the entity) in a field the schema has as a number
            frame[name] = np.arange(len(frame))
    return encode_avro_rows(frame, cfg, schema_id=WARM_UP_SCHEMA_ID)
