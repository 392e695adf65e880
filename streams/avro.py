"""Avro record values (``kafka.format: avro``): decoding for ``serve``, encoding for ``replay``.

The writer schema is a record schema in an ``.avsc`` file (``kafka.avro_schema``, relative to the
pipeline file). With ``kafka.avro_framing: confluent`` (the default) each value starts with the
header Confluent's Schema Registry serializers write: byte 0, then the schema id as 4 bytes
big-endian. The service does not ask a registry for schemas: the ids in
``kafka.avro_schema_ids`` are the ones written with the ``.avsc`` file, and a value with another
id is dead-lettered (``unknown_schema``) rather than read with the wrong schema, which Avro's
binary encoding would not notice. With no ids listed, every id is read with the file's schema.

Decoding is fastavro's ``schemaless_reader``, one call per record (Avro binary has no columnar
reader for single messages), then the same typed struct, checks and columnar frame as the JSON
decoder (``streams.decode.RecordDecoder``): the same dead-letter reasons for the same faults
(missing values under ``schema.missing: reject``, non-finite numbers, bad times), plus
``invalid_avro`` for a value that is not the schema's Avro binary (bad header, truncated, bytes
left over).

fastavro is an optional dependency: ``pip install 'anomaly-monitor[avro]'``.
"""

from __future__ import annotations

import io
import json
import math
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
from streams.decode import RecordDecoder, _json_safe, _validation_reason

INVALID_AVRO = "invalid_avro"
UNKNOWN_SCHEMA = "unknown_schema"
MAGIC = 0
HEADER = 5  # magic byte + 4-byte schema id


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


class AvroRecordDecoder(RecordDecoder):
    """``RecordDecoder`` for Avro values: same frame, same checks, same dead-letter reasons."""

    def __init__(self, schema: SchemaConfig, kafka: KafkaConfig, parsed: Any) -> None:
        super().__init__(schema)
        fastavro = _fastavro()
        self._reader = fastavro.schemaless_reader
        self._framed = kafka.avro_framing == "confluent"
        self._ids = frozenset(kafka.avro_schema_ids)
        # A timestamp-millis/-micros time field is read as its plain long and turned into
        # nanoseconds for the whole batch at once: fastavro's per-record datetime (and a string
        # for the shared time parser) cost more than the rest of the record.
        self._time_ns_per_unit = None
        raw = json.loads(json.dumps(parsed))  # a plain copy to edit
        for f in raw["fields"]:
            if f["name"] == schema.time_field:
                for branch in _branches(f["type"]):
                    unit = _TIMESTAMP_UNITS.get(
                        branch.get("logicalType") if isinstance(branch, dict) else None
                    )
                    if unit and branch.get("type") == "long":
                        self._time_ns_per_unit = unit
                        del branch["logicalType"]
        self._parsed = fastavro.parse_schema(raw) if self._time_ns_per_unit else parsed
        self._parsed_as_written = parsed

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
            if self._ids:
                schema_id = int.from_bytes(value[1:HEADER], "big")
                if schema_id not in self._ids:
                    raise _Bad(
                        UNKNOWN_SCHEMA,
                        f"schema id {schema_id} is not one of kafka.avro_schema_ids "
                        f"{sorted(self._ids)}",
                    )
            buffer.seek(HEADER)
        try:
            record = self._reader(buffer, self._parsed, None)
        except Exception as exc:  # EOFError, ValueError, UnicodeDecodeError, ...
            raise _Bad(INVALID_AVRO, f"not Avro of the pipeline's schema: {exc!r}") from None
        left = len(value) - buffer.tell()
        if left:
            raise _Bad(INVALID_AVRO, f"{left} byte(s) left after the Avro record")
        return record

    def record_fields(self, value: bytes | None) -> dict[str, Any]:
        """``RecordDecoder.record_fields`` for a valid Avro value: logical types as JSON text
        (timestamps in ISO 8601, decimals and UUIDs as strings), bytes as hex."""
        if not value:
            return {}
        buffer = io.BytesIO(value)
        buffer.seek(HEADER if self._framed else 0)
        record = self._reader(buffer, self._parsed_as_written, None)
        return _json_safe({k: _json_value(v) for k, v in record.items()})

    def _convert(self, value: bytes) -> Any:
        return msgspec.convert(self._read(value), self._struct, from_attributes=False)

    def _times(self, column: list[Any]) -> tuple[np.ndarray, list[int]]:
        unit = self._time_ns_per_unit
        if unit is None:
            return super()._times(column)
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


def encode_avro_rows(frame: pd.DataFrame, cfg: PipelineConfig) -> list[bytes]:
    """One Avro value per row, framed as ``kafka.avro_framing`` says (with the first id of
    ``kafka.avro_schema_ids``, or 1, in the header). Fields of the schema the frame lacks are
    written as null; a value the schema cannot hold is a ``DataError`` naming row and field."""
    fastavro = _fastavro()
    parsed = load_schema(cfg)
    header = b""
    if cfg.kafka.avro_framing == "confluent":
        schema_id = cfg.kafka.avro_schema_ids[0] if cfg.kafka.avro_schema_ids else 1
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
