"""Pipeline configuration: one YAML file per stream, every field overridable from the environment.

A field ``section.field`` is overridden by the variable ``ANOMALY_SECTION_FIELD`` (upper case), for
example ``ANOMALY_KAFKA_BOOTSTRAP_SERVERS`` or ``ANOMALY_DATABASE_URL``. Values from the environment
are parsed as YAML scalars, so ``ANOMALY_MODEL_TARGET_FPR=0.01`` is a float and
``ANOMALY_SCHEMA_NUMERIC='[a, b]'`` a list. Secrets (passwords, SASL credentials) belong in the
environment or in a file named by ``*_file`` fields, never in the YAML that is committed.

This module is plain dataclasses and YAML: it imports neither Kafka nor SQL, so every subsystem can
read its own section of the same file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from anomaly.errors import ConfigError

ENV_PREFIX = "ANOMALY_"


# The ensemble's members, in score-table order (anomaly.model maps each to its class).
DETECTOR_NAMES = ("vae", "flow", "gan", "knn")


@dataclass
class SchemaConfig:
    """Which fields of a record mean what."""

    id_field: str = "id"
    time_field: str | None = "event_time"
    entity_field: str | None = None
    numeric: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    # What to do with a missing or NaN feature: "impute" fills numeric with the training median and
    # categorical with the unseen-category bucket; "reject" makes the record a dead letter.
    missing: Literal["impute", "reject"] = "impute"
    # Records larger than this many bytes are dead-lettered before decoding.
    max_record_bytes: int = 1_000_000

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]


@dataclass
class ModelConfig:
    """Detector training and calibration settings."""

    target_fpr: float = 0.001
    seed: int = 0
    detectors: list[str] = field(default_factory=lambda: list(DETECTOR_NAMES))
    max_epochs: int = 60
    # Wall-clock budget for the training of each detector, in seconds (None: epochs only).
    time_budget_s: float | None = None
    calibration_fraction: float = 0.25
    batch_size: int = 256
    device: str = "auto"
    # torch intra-op threads; 1 in the service, where Kafka and the database share the cores.
    threads: int = 1
    progress: bool = True


@dataclass
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "records"
    group_id: str | None = None  # default: "anomaly-<pipeline name>"
    dead_letter_topic: str | None = None  # default: "<topic>.dead-letters"
    scores_topic: str | None = None  # when set, every record's scores are produced here
    # Micro-batch bounds: at most batch_size records, waiting at most max_wait_s for them.
    batch_size: int = 1000
    max_wait_s: float = 0.5
    # Record values: "json" (one object each) or "avro" (Avro binary of the record schema in
    # avro_schema, a .avsc file relative to this file; see streams/avro.py).
    format: Literal["json", "avro"] = "json"
    avro_schema: str | None = None
    # "confluent": values start with Schema Registry's header (byte 0, the schema id as 4 bytes
    # big-endian), as Confluent's serializers write them; "none": bare Avro binary.
    avro_framing: Literal["confluent", "none"] = "confluent"
    # Schema ids written with avro_schema; values with another id are dead-lettered
    # (unknown_schema). Empty: every id is read with avro_schema.
    avro_schema_ids: list[int] = field(default_factory=list)
    # A Confluent Schema Registry: a value whose schema id is not in avro_schema_ids is read
    # with the writer schema the registry has for that id, resolved to avro_schema by Avro's
    # schema-evolution rules. Credentials may be in the URL (https://user:password@host), so
    # it can come from the environment: ANOMALY_KAFKA_SCHEMA_REGISTRY_URL.
    schema_registry_url: str | None = None
    # Other settings of confluent_kafka's SchemaRegistryClient (ssl.ca.location, timeout, ...).
    schema_registry_settings: dict[str, Any] = field(default_factory=dict)
    security_protocol: str | None = None  # e.g. SASL_SSL
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None  # from the environment: ANOMALY_KAFKA_SASL_PASSWORD
    sasl_password_file: str | None = None
    ssl_ca_location: str | None = None
    # Any other librdkafka settings, passed through unchanged.
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatabaseConfig:
    url: str = "sqlite:///anomaly.db"
    password_file: str | None = None  # read at connect time and put into the URL


@dataclass
class IncidentConfig:
    # Alerts for the same entity closer together than this are one incident.
    window_s: float = 600.0


@dataclass
class ServeConfig:
    metrics_port: int | None = 9108
    metrics_host: str = "127.0.0.1"
    # Used when the database has no active model version for this pipeline.
    model_dir: str | None = None
    scoring_batch_size: int = 8192
    device: str = "auto"
    threads: int = 1
    bf16: bool = False
    # How long to back off (doubling, up to max) while the database is unreachable.
    db_retry_initial_s: float = 0.5
    db_retry_max_s: float = 10.0
    # How often to look for a newly activated model version.
    model_poll_s: float = 10.0


@dataclass
class PipelineConfig:
    name: str
    schema: SchemaConfig = field(default_factory=SchemaConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    incidents: IncidentConfig = field(default_factory=IncidentConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    source_path: str | None = None

    @property
    def group_id(self) -> str:
        return self.kafka.group_id or f"anomaly-{self.name}"

    @property
    def dead_letter_topic(self) -> str:
        return self.kafka.dead_letter_topic or f"{self.kafka.topic}.dead-letters"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source_path", None)
        return data


_SECTIONS: dict[str, type] = {
    "schema": SchemaConfig,
    "model": ModelConfig,
    "kafka": KafkaConfig,
    "database": DatabaseConfig,
    "incidents": IncidentConfig,
    "serve": ServeConfig,
}


def _build_section(section: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config section '{section}' must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown field(s) in section '{section}': {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )
    try:
        return cls(**raw)
    except TypeError as exc:  # pragma: no cover - guarded by the unknown-field check above
        raise ConfigError(f"section '{section}': {exc}") from exc


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            var = f"{ENV_PREFIX}{section}_{f.name}".upper()
            if var in environ:
                data.setdefault(section, {})
                if data[section] is None:
                    data[section] = {}
                data[section][f.name] = yaml.safe_load(environ[var])
    name_var = f"{ENV_PREFIX}PIPELINE_NAME"
    if name_var in environ:
        data["name"] = environ[name_var]


def _validate(cfg: PipelineConfig) -> None:
    s = cfg.schema
    if not s.features:
        raise ConfigError("schema: at least one field in 'numeric' or 'categorical' is required")
    seen: set[str] = set()
    for name in s.features:
        if name in seen:
            raise ConfigError(f"schema: feature '{name}' is listed twice")
        seen.add(name)
    for role in ("id_field", "time_field", "entity_field"):
        value = getattr(s, role)
        if value is not None and value in seen:
            raise ConfigError(f"schema.{role} '{value}' is also listed as a feature")
    if s.missing not in ("impute", "reject"):
        raise ConfigError(f"schema.missing must be 'impute' or 'reject', got {s.missing!r}")
    if not 0.0 < cfg.model.target_fpr < 0.5:
        raise ConfigError(f"model.target_fpr must be in (0, 0.5), got {cfg.model.target_fpr}")
    unknown = set(cfg.model.detectors) - set(DETECTOR_NAMES)
    if unknown or not cfg.model.detectors:
        raise ConfigError(
            f"model.detectors must be a non-empty subset of {', '.join(DETECTOR_NAMES)}, got "
            f"{unknown or 'none'}"
        )
    if cfg.kafka.batch_size < 1:
        raise ConfigError("kafka.batch_size must be >= 1")
    if cfg.kafka.max_wait_s <= 0:
        raise ConfigError("kafka.max_wait_s must be > 0")
    k = cfg.kafka
    if k.format not in ("json", "avro"):
        raise ConfigError(f"kafka.format must be 'json' or 'avro', got {k.format!r}")
    if k.avro_framing not in ("confluent", "none"):
        raise ConfigError(
            f"kafka.avro_framing must be 'confluent' or 'none', got {k.avro_framing!r}"
        )
    if k.format == "avro" and not k.avro_schema:
        raise ConfigError("kafka.format is 'avro': set kafka.avro_schema to the .avsc file")
    if not isinstance(k.avro_schema_ids, list) or not all(
        isinstance(i, int) and 0 <= i < 2**32 for i in k.avro_schema_ids
    ):
        raise ConfigError("kafka.avro_schema_ids must be a list of schema ids (0 to 2**32-1)")
    if k.schema_registry_url and (k.format != "avro" or k.avro_framing != "confluent"):
        raise ConfigError(
            "kafka.schema_registry_url needs kafka.format: avro with kafka.avro_framing: "
            "confluent (the schema id is read from the value's header)"
        )
    if not isinstance(k.schema_registry_settings, dict):
        raise ConfigError("kafka.schema_registry_settings must be a mapping of client settings")


def config_from_dict(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> PipelineConfig:
    """Build a validated config from a mapping, applying ``ANOMALY_*`` overrides."""
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    _apply_env(data, os.environ if environ is None else environ)
    allowed = {"name", "source_path", *_SECTIONS}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("config field 'name' (the pipeline name) is required")
    sections = {key: _build_section(key, cls, data.get(key)) for key, cls in _SECTIONS.items()}
    cfg = PipelineConfig(name=name, source_path=data.get("source_path"), **sections)
    _validate(cfg)
    return cfg


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> PipelineConfig:
    """Read a pipeline YAML file; environment variables override its fields."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline config {p}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"pipeline config {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"pipeline config {p} must be a mapping at the top level")
    data = dict(data)
    data["source_path"] = str(p)
    return config_from_dict(data, environ)


def read_secret(value: str | None, file: str | None) -> str | None:
    """A secret given directly (from the environment) or as a file path; files win."""
    if file:
        return Path(file).read_text(encoding="utf-8").strip()
    return value
