"""Pipeline configuration: one YAML file per stream, every field overridable from the environment.

A field ``section.field`` is overridden by the variable ``ANOMALY_SECTION_FIELD`` (upper case), for
example ``ANOMALY_KAFKA_BOOTSTRAP_SERVERS`` or ``ANOMALY_DATABASE_URL``; ``ANOMALY_PIPELINE_NAME``
sets ``name``. Every value, from the file or the environment, is checked against the field's
declared type: text fields (URLs, passwords, topics) take the variable verbatim, so
``ANOMALY_KAFKA_SASL_PASSWORD=0123`` stays ``"0123"``; numbers and booleans are parsed strictly
(booleans: true/false, yes/no, on/off, 1/0); only list and mapping fields parse the variable as
YAML or JSON (``ANOMALY_SCHEMA_NUMERIC='[a, b]'``). An empty variable unsets an optional field.
Any other ``ANOMALY_*`` variable (outside :data:`OTHER_ENV_VARS`) is an error, so a misspelled
override is never silently ignored. Secrets (passwords, SASL credentials) belong in the
environment or in a file named by ``*_file`` fields, never in the YAML that is committed.

This module is plain dataclasses and YAML: it imports neither Kafka nor SQL, so every subsystem can
read its own section of the same file.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from anomaly.config_values import coerce, value_from_env
from anomaly.errors import ConfigError

ENV_PREFIX = "ANOMALY_"
NAME_ENV_VAR = "ANOMALY_PIPELINE_NAME"
# ANOMALY_* variables that are not config fields; every other one must name a field.
OTHER_ENV_VARS = frozenset(
    {
        "ANOMALY_GRAFANA_DB_PASSWORD",  # the Grafana role's password (dashboards, db grafana-role)
        "ANOMALY_TEST_PG",  # the test suite's PostgreSQL server
        "ANOMALY_FAILPOINT",  # a reliability test's deterministic crash (streams.failpoints)
    }
)


# Pipeline names are stored in columns of this many characters (storage.schema.PIPELINE_LEN; a
# storage test checks they agree) and go into Kafka group ids, Prometheus labels and Grafana
# regex variables, so they are kept to a character set that is plain text in all of them.
PIPELINE_NAME_MAX_LEN = 200
_PIPELINE_NAME = re.compile(r"[A-Za-z0-9._-]+")

# The ensemble's members, in score-table order (anomaly.estimator.model maps each to its class).
DETECTOR_NAMES = ("vae", "flow", "gan", "knn", "knn_linear")


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
    # Fewer normal rows than this: the knn detector alone (see AnomalyModel; 0: fit all).
    min_generative_rows: int = 200
    # Cap on passes over the training rows (None: the step budget and early stopping decide).
    max_epochs: int | None = None
    # Wall-clock budget for the training of each detector, in seconds (None: no time limit).
    time_budget_s: float | None = None
    calibration_fraction: float = 0.25
    batch_size: int = 256
    # Per-detector hyper-parameters over the defaults, e.g. {knn: {max_reference: 2048}} (half
    # the neighbour search per scored row, for a little less ranking quality: docs/benchmarks.md).
    detector_params: dict[str, dict[str, Any]] = field(default_factory=dict)
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
    # Micro-batches: whatever the consumer has ready, up to batch_size records, scored at once
    # (latency first: batches grow with the load by themselves). max_wait_s > 0 waits that much
    # longer after the first record for a fuller batch: more throughput per batch, more latency.
    batch_size: int = 1000
    max_wait_s: float = 0.0
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
    # PostgreSQL: a session whose transaction sits idle this long is ended by the server, so a
    # scorer stalled mid-batch cannot hold the locks other scorers need (0: the server's setting).
    stalled_transaction_timeout_s: float = 10.0


@dataclass
class IncidentConfig:
    # Alerts for the same entity closer together than this are one incident.
    window_s: float = 600.0


@dataclass
class AlertingConfig:
    """Open incidents to Alertmanager (README, "Alerts to people: Alertmanager")."""

    # e.g. http://alertmanager:9093; unset: nothing is sent (incidents still close).
    # Credentials may be in the URL, so it can come from ANOMALY_ALERTING_ALERTMANAGER_URL.
    alertmanager_url: str | None = None
    # Base URL of Grafana for the dashboard link in each alert's annotations.
    grafana_url: str | None = None
    # How often the notifier looks for incidents to close and alerts to send.
    poll_s: float = 5.0
    # Open incidents are sent again this often (Alertmanager forgets alerts that are not
    # re-sent); a resolved one is sent no sooner than this after its first firing send, so keep
    # it above Alertmanager's group_wait.
    resend_interval_s: float = 60.0
    # Backoff (doubling, up to max) while Alertmanager does not answer.
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    timeout_s: float = 5.0
    # Incidents that closed longer ago than this and were never sent are not sent any more
    # (e.g. when alerting is switched on for a database with history).
    max_catch_up_s: float = 86400.0


@dataclass
class DriftConfig:
    """Drift detection on the live stream (anomaly.monitoring.drift; README, "Drift")."""

    enabled: bool = True
    # Windows are aligned to multiples of window_s since the epoch (hourly by default).
    window_s: float = 3600.0
    # Below this many scored records a window is stored without tests (never "drifted").
    min_records: int = 1000
    # Family-wise false-alarm budget per day of the two p-value tests (alert rate, KS), split
    # Bonferroni-style over the tests and the windows of a day.
    daily_alpha: float = 0.05
    # PSI above which a feature counts as moved (the common rule of thumb).
    psi_threshold: float = 0.2
    # Features kept per window (JSON column, metrics), highest PSI first.
    top_features: int = 5
    # Numeric features left out of the PSI: ones that move by design from window to window
    # (time of day, a counter), which would otherwise "drift" every window.
    ignore_features: list[str] = field(default_factory=list)


@dataclass
class RetrainingConfig:
    """The reservoir of recent non-alerting records that ``anomaly retrain`` trains on (README,
    "Retraining")."""

    enabled: bool = True
    # Rows kept per pipeline (a weighted sample without replacement, see streams.reservoir).
    reservoir_size: int = 20000
    # Rows sampled longer ago than this are deleted by the service's reservoir writes.
    retention_s: float = 7 * 86400.0
    # A record's sampling weight doubles every half_life_s of record time, so the sample leans
    # towards recent traffic; 0: every record equally likely (a uniform sample, as Algorithm R).
    half_life_s: float = 86400.0


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
    drift: DriftConfig = field(default_factory=DriftConfig)
    retraining: RetrainingConfig = field(default_factory=RetrainingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    alerting: AlertingConfig = field(default_factory=AlertingConfig)
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


# Each section's name and class: the fields of PipelineConfig but its name and source path.
_SECTIONS: dict[str, type] = {
    f.name: get_type_hints(PipelineConfig)[f.name]
    for f in fields(PipelineConfig)
    if f.name not in ("name", "source_path")
}


def _build_section(section: str, cls: type, raw: Any, sources: Mapping[str, str]) -> Any:
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
    hints = get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        where = f"{section}.{name}"
        if where in sources:
            where += f" (from {sources[where]})"
        values[name] = coerce(where, hints[name], value)
    return cls(**values)


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Merge the overrides into ``data``; returns which variable set each ``section.field``."""
    # Every override variable: ANOMALY_SECTION_FIELD -> (section, field).
    known = {
        f"{ENV_PREFIX}{section}_{f.name}".upper(): (section, f.name)
        for section, cls in _SECTIONS.items()
        for f in fields(cls)
    }
    sources: dict[str, str] = {}
    for var, text in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var in OTHER_ENV_VARS:
            continue
        if var == NAME_ENV_VAR:
            data["name"] = text
            sources["name"] = var
            continue
        if var not in known:
            close = difflib.get_close_matches(var, [*known, NAME_ENV_VAR], n=1, cutoff=0.8)
            hint = f"did you mean {close[0]}?" if close else "overrides: ANOMALY_<SECTION>_<FIELD>"
            raise ConfigError(f"unknown environment variable {var} ({hint})")
        section, name = known[var]
        if data.get(section) is None:
            data[section] = {}
        if isinstance(data[section], dict):  # otherwise _build_section reports the section
            data[section][name] = value_from_env(
                var, get_type_hints(_SECTIONS[section])[name], text
            )
            sources[f"{section}.{name}"] = var
    return sources


def check_pipeline_name(name: Any, where: str = "name") -> str:
    """``name`` if it can name a pipeline, else a ConfigError naming ``where``."""
    if name is None or name == "":
        raise ConfigError(f"{where}: the pipeline name is required")
    name = coerce(where, str, name)
    if len(name) > PIPELINE_NAME_MAX_LEN:
        raise ConfigError(
            f"{where}: a pipeline name has at most {PIPELINE_NAME_MAX_LEN} characters, "
            f"got {len(name)}"
        )
    if not _PIPELINE_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: a pipeline name has only letters, digits, '.', '_' and '-', got {name!r}"
        )
    return name


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
    _check_model(cfg.model)
    _check_serve(cfg.serve)
    d = cfg.drift
    if not (d.window_s > 0 and d.min_records >= 1 and 0 < d.daily_alpha < 1):
        raise ConfigError("drift: window_s > 0, min_records >= 1 and daily_alpha in (0, 1)")
    if not (d.psi_threshold > 0 and d.top_features >= 1):
        raise ConfigError("drift: psi_threshold > 0 and top_features >= 1")
    r = cfg.retraining
    if not (r.reservoir_size >= 1 and r.retention_s > 0 and r.half_life_s >= 0):
        raise ConfigError("retraining: reservoir_size >= 1, retention_s > 0, half_life_s >= 0")
    if cfg.kafka.batch_size < 1:
        raise ConfigError("kafka.batch_size must be >= 1")
    if cfg.kafka.max_wait_s < 0:
        raise ConfigError("kafka.max_wait_s must be >= 0")
    if not cfg.database.stalled_transaction_timeout_s >= 0:
        raise ConfigError("database.stalled_transaction_timeout_s must be >= 0")
    a = cfg.alerting
    for name in ("poll_s", "resend_interval_s", "retry_initial_s", "retry_max_s", "timeout_s"):
        if getattr(a, name) <= 0:
            raise ConfigError(f"alerting.{name} must be > 0, got {getattr(a, name)}")
    k = cfg.kafka
    if k.format == "avro" and not k.avro_schema:
        raise ConfigError("kafka.format is 'avro': set kafka.avro_schema to the .avsc file")
    if not all(0 <= i < 2**32 for i in k.avro_schema_ids):
        raise ConfigError("kafka.avro_schema_ids must be a list of schema ids (0 to 2**32-1)")
    _check_rebalance_protocol(k.settings)
    if k.schema_registry_url and (k.format != "avro" or k.avro_framing != "confluent"):
        raise ConfigError(
            "kafka.schema_registry_url needs kafka.format: avro with kafka.avro_framing: "
            "confluent (the schema id is read from the value's header)"
        )


def _check_model(m: ModelConfig) -> None:
    """Ranges of the model section. AnomalyModel and torch would refuse most of these too, but
    only once ``anomaly train`` has read the data, and with a traceback that names no field."""
    if not 0.0 < m.target_fpr < 0.5:
        raise ConfigError(f"model.target_fpr must be in (0, 0.5), got {m.target_fpr}")
    unknown = set(m.detectors) - set(DETECTOR_NAMES)
    if unknown or not m.detectors:
        raise ConfigError(
            f"model.detectors must be a non-empty subset of {', '.join(DETECTOR_NAMES)}, got "
            f"{unknown or 'none'}"
        )
    if not 0.0 < m.calibration_fraction < 1.0:
        raise ConfigError(
            f"model.calibration_fraction must be in (0, 1), got {m.calibration_fraction}"
        )
    # numpy's generators take no negative seed, torch's at most 64 bits (and the detectors seed
    # some at seed + 1, seed + 2).
    if not 0 <= m.seed < 2**63:
        raise ConfigError(f"model.seed must be in 0 to 2**63-1, got {m.seed}")
    for name in ("batch_size", "threads"):
        if getattr(m, name) < 1:
            raise ConfigError(f"model.{name} must be >= 1, got {getattr(m, name)}")
    if m.min_generative_rows < 0:
        raise ConfigError(f"model.min_generative_rows must be >= 0, got {m.min_generative_rows}")
    if m.max_epochs is not None and m.max_epochs < 1:
        raise ConfigError(f"model.max_epochs must be >= 1 (or unset), got {m.max_epochs}")
    if m.time_budget_s is not None and m.time_budget_s <= 0:
        raise ConfigError(f"model.time_budget_s must be > 0 (or unset), got {m.time_budget_s}")
    # The parameters' names and values are the detector classes' to check (torch code, which
    # this module does not import): AnomalyModel.from_config does, naming the field.
    unknown = sorted(set(m.detector_params) - set(DETECTOR_NAMES))
    if unknown:
        raise ConfigError(
            f"model.detector_params: unknown detector(s) {', '.join(unknown)} "
            f"(known: {', '.join(DETECTOR_NAMES)})"
        )


def _check_serve(s: ServeConfig) -> None:
    """Ranges of the serve section, which the service reads only once it has started."""
    if s.metrics_port is not None and not 0 <= s.metrics_port <= 65535:
        raise ConfigError(f"serve.metrics_port must be in 0-65535 (or unset), got {s.metrics_port}")
    for name in ("scoring_batch_size", "threads"):
        if getattr(s, name) < 1:
            raise ConfigError(f"serve.{name} must be >= 1, got {getattr(s, name)}")
    # A zero backoff retries an unreachable database in a tight loop.
    for name in ("db_retry_initial_s", "db_retry_max_s"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"serve.{name} must be > 0, got {getattr(s, name)}")
    if s.model_poll_s < 0:
        raise ConfigError(f"serve.model_poll_s must be >= 0, got {s.model_poll_s}")


def _check_rebalance_protocol(settings: Mapping[str, Any]) -> None:
    """The service's rebalance callbacks assign and revoke whole assignments (the eager
    protocol): an incremental one (cooperative-sticky, or KIP-848's group.protocol consumer)
    would hand them partial lists they treat as the whole."""
    strategy = settings.get("partition.assignment.strategy")
    if strategy is not None and "cooperative" in str(strategy).lower():
        raise ConfigError(
            f"kafka.settings: partition.assignment.strategy {str(strategy)!r} is not supported: "
            "the service rebalances eagerly; use range or roundrobin (or leave it unset)"
        )
    protocol = settings.get("group.protocol")
    if protocol is not None and str(protocol).lower() != "classic":
        raise ConfigError(
            f"kafka.settings: group.protocol {str(protocol)!r} is not supported: the service "
            "rebalances eagerly; use classic (or leave it unset)"
        )


def config_from_dict(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> PipelineConfig:
    """Build a validated config from a mapping, applying ``ANOMALY_*`` overrides."""
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    sources = _apply_env(data, os.environ if environ is None else environ)
    allowed = {"name", "source_path", *_SECTIONS}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
    name = check_pipeline_name(
        data.get("name"), f"name (from {sources['name']})" if "name" in sources else "name"
    )
    sections = {
        key: _build_section(key, cls, data.get(key), sources) for key, cls in _SECTIONS.items()
    }
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
    return config_from_dict({**data, "source_path": str(p)}, environ)


def read_secret(value: str | None, file: str | None) -> str | None:
    """A secret given directly (from the environment) or as a file path; files win."""
    if file:
        return Path(file).read_text(encoding="utf-8").strip()
    return value
