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

fastavro and confluent-kafka's Schema Registry client are optional dependencies:
``pip install 'anomaly-monitor[avro]'``.
"""

from __future__ import annotations

import io
import json
import math
import re
import time as clock
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
import numpy as np
import pandas as pd

from anomaly.config import KafkaConfig, PipelineConfig, SchemaConfig
from anomaly.errors import ConfigError, DataError
from streams.avro_columnar import ColumnarPlan, Role, compile_plan
from streams.decode import DecodedBatch, RecordDecoder, _json_safe, _validation_reason

INVALID_AVRO = "invalid_avro"
UNKNOWN_SCHEMA = "unknown_schema"
INCOMPATIBLE_SCHEMA = "incompatible_schema"
MAGIC = 0
HEADER = 5  # magic byte + 4-byte schema id
# How long an id the registry does not know stays unknown: its records are dead-lettered
# without asking again (not one request per record), and an id registered later is found.
UNKNOWN_ID_TTL_S = 30.0


class SchemaRegistryUnavailable(Exception):
    """The schema registry could not be asked (network, timeout, authentication, server
    error). Not the record's fault: the batch is held and decoded again later."""


class _Bad(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _fastavro() -> Any:
    try:
        import fastavro
    except ImportError:  # pragma: no cover - the extra is part of the dev install
        raise ConfigError(
            "kafka.format is 'avro' but fastavro is not installed: "
            "pip install 'anomaly-monitor[avro]'"
        ) from None
    return fastavro


def schema_path(cfg: PipelineConfig) -> Path:
    """``kafka.avro_schema`` (required with ``kafka.format: avro``, checked with the config),
    relative to the pipeline file when it is relative."""
    path = Path(cfg.kafka.avro_schema or "")
    if not path.is_absolute() and cfg.source_path:
        path = Path(cfg.source_path).parent / path
    return path


def load_schema(cfg: PipelineConfig) -> Any:
    """The parsed writer schema; ``ConfigError`` naming what is wrong with it."""
    fastavro = _fastavro()
    path = schema_path(cfg)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read kafka.avro_schema {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"kafka.avro_schema {path} is not JSON: {exc}") from None
    try:
        parsed = fastavro.parse_schema(raw)
    except Exception as exc:  # fastavro raises several types for a bad schema
        raise ConfigError(f"kafka.avro_schema {path} is not a valid Avro schema: {exc}") from None
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise ConfigError(f"kafka.avro_schema {path} must be a record schema")
    present = {f["name"] for f in parsed["fields"]}
    s = cfg.schema
    wanted = [f for f in (s.id_field, s.time_field, s.entity_field, *s.features) if f]
    missing = [f for f in wanted if f not in present]
    if missing:
        raise ConfigError(
            f"kafka.avro_schema {path} lacks the pipeline schema's field(s): {', '.join(missing)}"
        )
    return parsed


def _timestamp_unit(parsed: Any, time_field: str | None) -> int | None:
    """Nanoseconds per tick of the time field when it is a ``timestamp-millis/-micros`` long
    (in any union branch), else ``None``."""
    for f in parsed["fields"]:
        if f["name"] == time_field:
            for branch in _branches(f["type"]):
                if isinstance(branch, dict) and branch.get("type") == "long":
                    unit = _TIMESTAMP_UNITS.get(branch.get("logicalType"))
                    if unit:
                        return unit
    return None


def _without_time_logical_type(parsed: Any, time_field: str | None) -> Any:
    """A copy of the schema whose time field reads as its plain long: fastavro's per-record
    datetime (and a string for the shared time parser) cost more than the rest of the record,
    so the decoder turns the whole batch's ticks into nanoseconds at once instead."""
    fastavro = _fastavro()
    raw = json.loads(json.dumps(parsed))  # a plain copy to edit
    for f in raw["fields"]:
        if f["name"] == time_field:
            for branch in _branches(f["type"]):
                if isinstance(branch, dict) and branch.get("logicalType") in _TIMESTAMP_UNITS:
                    del branch["logicalType"]
    return fastavro.parse_schema(raw)


@dataclass(frozen=True)
class WriterSchema:
    """A writer schema from the registry: as the decoder reads it, as written (for the alert's
    record fields), and its time field's nanoseconds per tick (``None``: not a timestamp)."""

    schema_id: int
    for_reading: Any
    as_written: Any
    time_unit: int | None
    # False when every field of the reader schema is in the writer's with the same type (and
    # the records have the same name): reading with the writer schema alone then gives the
    # same values as Avro's resolution, at half the cost; the extra fields are ignored.
    resolve: bool


class WriterSchemas:
    """Writer schemas by id from a Confluent Schema Registry, asked once per id (ids are
    immutable in a registry). Uses confluent-kafka's ``SchemaRegistryClient``."""

    def __init__(
        self, kafka: KafkaConfig, time_field: str | None, reader: Any, time_unit: int | None
    ) -> None:
        self._client = registry_client(kafka)
        self.where = _without_userinfo(kafka.schema_registry_url or "")
        self._time_field = time_field
        self._reader = reader
        # The file's timestamp long is read as ticks (see _times); so is the writer's.
        self._strip_time = time_unit is not None
        self._known: dict[int, WriterSchema] = {}
        self._unknown: dict[int, tuple[float, str]] = {}  # id -> (until, why)

    def get(self, schema_id: int) -> WriterSchema:
        known = self._known.get(schema_id)
        if known is not None:
            return known
        unknown = self._unknown.get(schema_id)
        if unknown is not None and unknown[0] > clock.monotonic():
            raise _Bad(UNKNOWN_SCHEMA, unknown[1])
        try:
            writer = self._fetch(schema_id)
        except _Bad as bad:
            self._unknown[schema_id] = (clock.monotonic() + UNKNOWN_ID_TTL_S, bad.message)
            raise
        self._unknown.pop(schema_id, None)
        self._known[schema_id] = writer
        return writer

    def _fetch(self, schema_id: int) -> WriterSchema:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            registered = self._client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise _Bad(
                    UNKNOWN_SCHEMA, f"schema id {schema_id} is not in the schema registry"
                ) from None
            raise SchemaRegistryUnavailable(
                f"schema registry {self.where}: HTTP {exc.http_status_code}: {exc.error_message}"
            ) from None
        except Exception as exc:  # the client's transport errors (refused, timeout, TLS, ...)
            raise SchemaRegistryUnavailable(
                f"schema registry {self.where}: {type(exc).__name__}: {exc}"
            ) from None
        kind = registered.schema_type or "AVRO"
        if kind != "AVRO":
            raise _Bad(UNKNOWN_SCHEMA, f"schema id {schema_id} is a {kind} schema, not Avro")
        if registered.references:
            raise _Bad(
                UNKNOWN_SCHEMA,
                f"schema id {schema_id} refers to other registered schemas, which the service "
                "does not resolve",
            )
        fastavro = _fastavro()
        try:
            parsed = fastavro.parse_schema(json.loads(registered.schema_str))
        except Exception as exc:  # not JSON, or not a valid Avro schema
            raise _Bad(
                UNKNOWN_SCHEMA, f"schema id {schema_id} is not a valid Avro schema: {exc}"
            ) from None
        if not isinstance(parsed, dict) or parsed.get("type") != "record":
            raise _Bad(UNKNOWN_SCHEMA, f"schema id {schema_id} is not a record schema")
        for_reading = (
            _without_time_logical_type(parsed, self._time_field) if self._strip_time else parsed
        )
        return WriterSchema(
            schema_id,
            for_reading,
            parsed,
            _timestamp_unit(parsed, self._time_field),
            resolve=not _reads_alike(for_reading, self._reader),
        )


def registry_client(kafka: KafkaConfig) -> Any:
    """confluent-kafka's ``SchemaRegistryClient`` for ``kafka.schema_registry_url`` and
    ``kafka.schema_registry_settings``; ``ConfigError`` when it is missing or refuses them."""
    try:
        from confluent_kafka.schema_registry import SchemaRegistryClient
    except ImportError:  # pragma: no cover - the extra is part of the dev install
        raise ConfigError(
            "kafka.schema_registry_url is set but confluent-kafka's Schema Registry client "
            "cannot be imported: pip install 'anomaly-monitor[avro]'"
        ) from None
    url = kafka.schema_registry_url or ""
    try:
        return SchemaRegistryClient({**kafka.schema_registry_settings, "url": url})
    except Exception as exc:  # the client checks its settings: ValueError, TypeError
        raise ConfigError(f"kafka.schema_registry settings: {exc}") from None


def _reads_alike(writer: Any, reader: Any) -> bool:
    """Whether the writer has every reader field with the same (parsed) type."""
    if writer["name"].rsplit(".", 1)[-1] != reader["name"].rsplit(".", 1)[-1]:
        return False
    types = {f["name"]: json.dumps(f["type"], sort_keys=True) for f in writer["fields"]}
    return all(
        types.get(f["name"]) == json.dumps(f["type"], sort_keys=True) for f in reader["fields"]
    )


def _without_userinfo(url: str) -> str:
    """The URL for messages and logs: credentials in it are not repeated."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


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
        self._roles = self._struct_roles()
        self._file_plan = compile_plan(self._parsed, self._roles)
        self._writer_plans: dict[int, ColumnarPlan | None] = {}

    def _struct_roles(self) -> dict[str, Role]:
        s = self.schema
        roles: dict[str, Role] = {s.id_field: "id"}
        if s.time_field:
            roles[s.time_field] = "time"
        if s.entity_field:
            roles[s.entity_field] = "text"
        roles.update(dict.fromkeys(s.numeric, "numeric"))
        roles.update(dict.fromkeys(s.categorical, "text"))
        return roles

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
        return self._finish(frame, bad_rows, index, [], partitions, offsets)

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
        """The registry's writer schema for a framed value, ``None`` for the file's schema."""
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
        buffer = io.BytesIO(value)
        if self._framed:
            if len(value) < HEADER or value[0] != MAGIC:
                raise _Bad(
                    INVALID_AVRO,
                    "value does not start with the Schema Registry header "
                    "(byte 0, then a 4-byte schema id); set kafka.avro_framing: none for bare "
                    "Avro",
                )
            writer = self._writer(value) if self._ids or self.registry else None
            buffer.seek(HEADER)
        else:
            writer = None
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
        writer = self._writer(value) if self._framed and (self._ids or self.registry) else None
        schema = self._parsed_as_written if writer is None else writer.as_written
        record = self._reader(buffer, schema, None)  # the record as its producer wrote it
        return _json_safe({k: _json_value(v) for k, v in record.items()})

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
            return _validation_reason(str(exc))


def _exception_text(exc: Exception) -> str:
    """A reader error for a dead letter: its type and message, without the object addresses
    fastavro puts in some (``<_io.BytesIO object at 0x...>``), so one fault reads the same
    every time."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the value", str(exc))
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


_TIMESTAMP_UNITS = {"timestamp-millis": 1_000_000, "timestamp-micros": 1_000}
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


def _branches(avro_type: Any) -> list[Any]:
    return list(avro_type) if isinstance(avro_type, list) else [avro_type]


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


def writer_schema_id(cfg: PipelineConfig) -> int:
    """The schema id replayed values carry: the first of ``kafka.avro_schema_ids``; else, with
    a schema registry, the id the registry gives the ``.avsc`` registered under the topic's
    value subject (``<topic>-value``, as Confluent's serializers do); else 1."""
    kafka = cfg.kafka
    if kafka.avro_schema_ids:
        return kafka.avro_schema_ids[0]
    if not kafka.schema_registry_url:
        return 1
    load_schema(cfg)  # a clear ConfigError for a missing or invalid file first
    client = registry_client(kafka)
    from confluent_kafka.schema_registry import Schema

    text = json.dumps(json.loads(schema_path(cfg).read_text(encoding="utf-8")))
    subject = f"{kafka.topic}-value"
    where = _without_userinfo(kafka.schema_registry_url)
    try:
        return int(client.register_schema(subject, Schema(text, "AVRO")))
    except Exception as exc:  # refused, 409 incompatible, 401, ...
        raise ConfigError(
            f"cannot register kafka.avro_schema under subject '{subject}' in the schema "
            f"registry {where}: {type(exc).__name__}: {exc}"
        ) from None


def encode_avro_rows(frame: pd.DataFrame, cfg: PipelineConfig) -> list[bytes]:
    """One Avro value per row, framed as ``kafka.avro_framing`` says (with ``writer_schema_id``
    in the header). Fields of the schema the frame lacks are written as null; a value the
    schema cannot hold is a ``DataError`` naming row and field."""
    fastavro = _fastavro()
    parsed = load_schema(cfg)
    header = b""
    if cfg.kafka.avro_framing == "confluent":
        header = bytes([MAGIC]) + writer_schema_id(cfg).to_bytes(4, "big")
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
