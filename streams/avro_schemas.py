"""Avro schemas of ``kafka.format: avro``: the pipeline's ``.avsc`` file (the reader schema) and
the writer schemas of a Confluent Schema Registry, by id (``WriterSchemas``); the ids the
replayed values carry (``writer_schema_id``). How values are read with them: ``streams.avro``.
"""

from __future__ import annotations

import json
import time as clock
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomaly.config import KafkaConfig, PipelineConfig
from anomaly.errors import ConfigError

INVALID_AVRO = "invalid_avro"
UNKNOWN_SCHEMA = "unknown_schema"
INCOMPATIBLE_SCHEMA = "incompatible_schema"
MAGIC = 0
HEADER = 5  # magic byte + 4-byte schema id
# How long an id the registry does not know stays unknown: its records are dead-lettered
# without asking again (not one request per record), and an id registered later is found.
UNKNOWN_ID_TTL_S = 30.0
MAX_UNKNOWN_IDS = 1024  # unknown ids remembered at once (WriterSchemas._remember_unknown)
_TIMESTAMP_UNITS = {"timestamp-millis": 1_000_000, "timestamp-micros": 1_000}


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
            self._remember_unknown(schema_id, bad.message)
            raise
        self._unknown.pop(schema_id, None)
        self._known[schema_id] = writer
        return writer

    def _remember_unknown(self, schema_id: int, why: str) -> None:
        """Not asked again for ``UNKNOWN_ID_TTL_S``; at most ``MAX_UNKNOWN_IDS`` remembered, the
        oldest forgotten first: garbage whose first byte is 0 reads as ever new schema ids, and
        one entry per id kept them all (~240 bytes each, for as long as the service ran)."""
        self._unknown.pop(schema_id, None)  # re-inserted last: the newest
        while len(self._unknown) >= MAX_UNKNOWN_IDS:
            self._unknown.pop(next(iter(self._unknown)))
        self._unknown[schema_id] = (clock.monotonic() + UNKNOWN_ID_TTL_S, why)

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


def _branches(avro_type: Any) -> list[Any]:
    return list(avro_type) if isinstance(avro_type, list) else [avro_type]


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
