"""Pipeline config: values checked against each field's declared type, from the file and from the
``ANOMALY_*`` environment, with one-line errors that name the field or the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from anomaly.cli import main
from anomaly.config import config_from_dict, load_config
from anomaly.errors import ConfigError

BASE = {"name": "cards", "schema": {"numeric": ["amount"]}}


def build(environ: dict[str, str], **sections: dict) -> object:
    return config_from_dict({**BASE, **sections}, environ=environ)


def test_text_fields_from_the_environment_are_taken_verbatim() -> None:
    cfg = build(
        {
            "ANOMALY_KAFKA_SASL_PASSWORD": "0123",  # YAML: the octal number 83
            "ANOMALY_KAFKA_TOPIC": "12:30",  # YAML: the sexagesimal number 750
            "ANOMALY_KAFKA_GROUP_ID": "no",  # YAML: False
            "ANOMALY_DATABASE_URL": "sqlite:///x.db",
            "ANOMALY_SERVE_MODEL_DIR": "",  # empty: unset
        }
    )
    assert cfg.kafka.sasl_password == "0123"
    assert cfg.kafka.topic == "12:30"
    assert cfg.group_id == "no"
    assert cfg.database.url == "sqlite:///x.db"
    assert cfg.serve.model_dir is None


def test_numbers_booleans_lists_and_mappings_from_the_environment() -> None:
    cfg = build(
        {
            "ANOMALY_KAFKA_BATCH_SIZE": "2000",
            "ANOMALY_MODEL_TARGET_FPR": "1e-3",
            "ANOMALY_SERVE_BF16": "yes",
            "ANOMALY_MODEL_PROGRESS": "false",
            "ANOMALY_SERVE_METRICS_PORT": "",
            "ANOMALY_SCHEMA_NUMERIC": "[amount, hour]",
            "ANOMALY_KAFKA_SETTINGS": '{"fetch.min.bytes": 1024}',
        }
    )
    assert cfg.kafka.batch_size == 2000 and cfg.model.target_fpr == 0.001
    assert cfg.serve.bf16 is True and cfg.model.progress is False
    assert cfg.serve.metrics_port is None
    assert cfg.schema.numeric == ["amount", "hour"]
    assert cfg.kafka.settings == {"fetch.min.bytes": 1024}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"ANOMALY_KAFKA_BATCH_SIZE": "abc"},
            "kafka.batch_size (from ANOMALY_KAFKA_BATCH_SIZE): expected an integer, got 'abc'",
        ),
        ({"ANOMALY_KAFKA_BATCH_SIZE": "1.5"}, "kafka.batch_size (from "),
        ({"ANOMALY_SERVE_METRICS_PORT": "12:30"}, "serve.metrics_port (from "),
        ({"ANOMALY_MODEL_TARGET_FPR": "nan"}, "model.target_fpr (from "),
        ({"ANOMALY_SERVE_BF16": "maybe"}, "expected true or false, got 'maybe'"),
        ({"ANOMALY_KAFKA_FORMAT": "xml"}, "kafka.format (from ANOMALY_KAFKA_FORMAT): expected"),
        ({"ANOMALY_SCHEMA_NUMERIC": "amount"}, "schema.numeric (from "),
        ({"ANOMALY_KAFKA_SETTINGS": "{a: ["}, "ANOMALY_KAFKA_SETTINGS: not valid YAML or JSON"),
    ],
)
def test_wrong_types_from_the_environment_name_field_and_variable(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        build(environ)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"model": {"target_fpr": "abc"}}, "model.target_fpr: expected a number, got 'abc'"),
        ({"kafka": {"batch_size": None}}, "kafka.batch_size: expected an integer, got null"),
        ({"serve": {"bf16": 2}}, "serve.bf16: expected true or false, got 2"),
        ({"schema": {"numeric": ["amount", 2024]}}, "schema.numeric[1]: expected a string"),
        ({"kafka": {"avro_schema_ids": [1, "x"]}}, "kafka.avro_schema_ids[1]: expected an int"),
        ({"kafka": {"settings": ["a"]}}, "kafka.settings: expected a mapping, got a list"),
        ({"schema": {"numeric": ["amount"], "missing": "drop"}}, "schema.missing: expected"),
    ],
)
def test_wrong_types_in_the_file_name_the_field(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        build({}, **sections)


def test_a_secret_of_the_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    config = tmp_path / "cards.yaml"
    config.write_text(
        "name: cards\nschema:\n  numeric: [amount]\nkafka:\n  sasl_password: 0123\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as raised:
        load_config(config, environ={})
    assert str(raised.value) == (
        "kafka.sasl_password: expected a string, got a number (quote it in YAML)"
    )


def test_misspelled_environment_variable_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as raised:
        build({"ANOMALY_KAFKA_BATCHSIZE": "50"})
    assert str(raised.value) == (
        "unknown environment variable ANOMALY_KAFKA_BATCHSIZE "
        "(did you mean ANOMALY_KAFKA_BATCH_SIZE?)"
    )
    with pytest.raises(ConfigError, match="unknown environment variable ANOMALY_KAFAK_TOPIC"):
        build({"ANOMALY_KAFAK_TOPIC": "t"})
    with pytest.raises(ConfigError, match="unknown environment variable ANOMALY_NOPE "):
        build({"ANOMALY_NOPE": "1"})
    # The project's variables that are not config fields, and other programs' variables.
    build({"ANOMALY_GRAFANA_DB_PASSWORD": "x", "ANOMALY_TEST_PG": "x", "HOME": "/root"})


def test_config_errors_reach_the_cli_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cards.yaml"
    config.write_text("name: cards\nschema:\n  numeric: [amount]\n", encoding="utf-8")
    monkeypatch.setenv("ANOMALY_KAFKA_BATCH_SIZE", "abc")
    argv = ["train", "--config", str(config), "--data", "x.csv", "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "error: kafka.batch_size (from ANOMALY_KAFKA_BATCH_SIZE): expected an integer, got 'abc'\n"
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("p" * 201, "name: a pipeline name has at most 200 characters, got 201"),
        ("fraud detection", "name: a pipeline name has only letters, digits, '.', '_' and '-'"),
        ("cards/eu", "name: a pipeline name has only letters"),
        ("cartes-\u00e9t\u00e9", "name: a pipeline name has only letters"),
        ("", "name: the pipeline name is required"),
        (None, "name: the pipeline name is required"),
        (123, "name: expected a string, got a number (quote it in YAML)"),
    ],
)
def test_pipeline_name_is_checked_where_the_config_is_loaded(name: object, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        config_from_dict({**BASE, "name": name}, environ={})


def test_pipeline_name_limits_accept_the_longest_plain_name() -> None:
    longest = "Fraud_eu-1." + "p" * 189
    assert config_from_dict({**BASE, "name": longest}, environ={}).name == longest
    with pytest.raises(ConfigError, match=r"^name \(from ANOMALY_PIPELINE_NAME\): .* got 201$"):
        config_from_dict(BASE, environ={"ANOMALY_PIPELINE_NAME": "p" * 201})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"partition.assignment.strategy": "cooperative-sticky"},
            "kafka.settings: partition.assignment.strategy 'cooperative-sticky' is not "
            "supported: the service rebalances eagerly; use range or roundrobin (or leave it "
            "unset)",
        ),
        (
            {"partition.assignment.strategy": "range,cooperative-sticky"},
            "kafka.settings: partition.assignment.strategy 'range,cooperative-sticky' is not",
        ),
        (
            {"group.protocol": "consumer"},
            "kafka.settings: group.protocol 'consumer' is not supported: the service "
            "rebalances eagerly; use classic (or leave it unset)",
        ),
    ],
)
def test_an_incremental_rebalance_protocol_is_refused(settings: dict, message: str) -> None:
    """The rebalance callbacks treat each assignment as the whole one (eager protocol)."""
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        build({}, kafka={"settings": settings})
    for fine in (
        {"partition.assignment.strategy": "range,roundrobin"},
        {"group.protocol": "classic"},
    ):
        build({}, kafka={"settings": fine})


def test_alerting_section_from_the_file_and_the_environment() -> None:
    cfg = build(
        {
            "ANOMALY_ALERTING_ALERTMANAGER_URL": "http://am:9093",
            "ANOMALY_ALERTING_RESEND_INTERVAL_S": "30",
        },
        alerting={"grafana_url": "http://grafana:3000", "retry_max_s": 120},
    )
    a = cfg.alerting
    assert (a.alertmanager_url, a.grafana_url) == ("http://am:9093", "http://grafana:3000")
    assert (a.resend_interval_s, a.retry_max_s, a.poll_s) == (30.0, 120.0, 5.0)
    assert build({}).alerting.alertmanager_url is None  # off unless configured
    with pytest.raises(ConfigError, match=re.escape("alerting.resend_interval_s must be > 0")):
        build({}, alerting={"resend_interval_s": 0})


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("model.calibration_fraction", 1.5, "must be in (0, 1), got 1.5"),
        ("model.calibration_fraction", 0, "must be in (0, 1), got 0.0"),
        ("model.seed", -1, "must be in 0 to 2**63-1, got -1"),
        ("model.seed", 2**64, f"must be in 0 to 2**63-1, got {2**64}"),
        ("model.threads", 0, "must be >= 1, got 0"),
        ("model.batch_size", 0, "must be >= 1, got 0"),
        ("model.min_generative_rows", -1, "must be >= 0, got -1"),
        ("model.max_epochs", 0, "must be >= 1 (or unset), got 0"),
        ("model.time_budget_s", 0, "must be > 0 (or unset), got 0.0"),
        ("serve.scoring_batch_size", 0, "must be >= 1, got 0"),
        ("serve.threads", -2, "must be >= 1, got -2"),
        ("serve.metrics_port", 70000, "must be in 0-65535 (or unset), got 70000"),
        ("serve.db_retry_initial_s", 0, "must be > 0, got 0.0"),
        ("serve.model_poll_s", -1, "must be >= 0, got -1.0"),
    ],
)
def test_values_out_of_range_are_refused_by_the_loader_naming_the_field(
    where: str, value: object, message: str
) -> None:
    """Not later, inside AnomalyModel, torch or the service, as a traceback."""
    section, name = where.split(".")
    with pytest.raises(ConfigError) as raised:
        build({}, **{section: {name: value}})
    assert str(raised.value) == f"{where} {message}"


def test_out_of_range_values_from_the_environment_and_unknown_detectors_are_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape("model.threads must be >= 1, got 0")):
        build({"ANOMALY_MODEL_THREADS": "0"})
    with pytest.raises(ConfigError) as raised:
        build({}, model={"detector_params": {"knnn": {"n_neighbors": 3}}})
    assert str(raised.value) == (
        "model.detector_params: unknown detector(s) knnn (known: vae, flow, gan, knn, knn_linear)"
    )


def test_the_ends_of_each_range_are_accepted() -> None:
    model = {"seed": 2**63 - 1, "calibration_fraction": 0.99, "threads": 1, "batch_size": 1}
    model |= {"min_generative_rows": 0, "max_epochs": 1, "time_budget_s": 0.1}
    serve = {"metrics_port": 0, "scoring_batch_size": 1, "threads": 1, "model_poll_s": 0}
    cfg = build({}, model=model, serve=serve)
    assert (cfg.model.seed, cfg.serve.metrics_port, cfg.serve.model_poll_s) == (2**63 - 1, 0, 0)
    assert build({}, model={"seed": 0, "max_epochs": None}).model.seed == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"knn": {"bogus": 1}}, "model.detector_params.knn: unknown parameter(s) bogus"),
        (
            {"knn": {"n_neighbours": 3}},
            "model.detector_params.knn: unknown parameter(s) n_neighbours "
            "(did you mean n_neighbors?)",
        ),
        ({"knn": {"n_neighbors": 0}}, "model.detector_params.knn: n_neighbors must be >= 1, got 0"),
        (
            {"gan": {"boundary": 2.0}},
            "model.detector_params.gan: boundary must be in (0, 1), got 2",
        ),
        ({"knn_linear": {"n_neighbors": "five"}}, "model.detector_params.knn_linear: "),
        ({"flow": {"kind": "xyz"}}, "model.detector_params.flow: kind must be 'maf' or 'nsf'"),
    ],
)
def test_detector_params_are_checked_by_from_config_naming_the_field(
    params: dict, message: str
) -> None:
    """Their names and values are the detectors' own: checked when the model is made from the
    config, before any data is read, as a ConfigError (one line at the CLI)."""
    from anomaly.estimator.model import AnomalyModel

    cfg = build({}, model={"detector_params": params})
    with pytest.raises(ConfigError) as raised:
        AnomalyModel.from_config(cfg)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_from_config_reports_a_bad_override_as_a_config_error() -> None:
    from anomaly.estimator.model import AnomalyModel

    cfg = build({}, model={"detector_params": {"knn": {"n_neighbors": 3}}})
    assert AnomalyModel.from_config(cfg).detector_params == {"knn": {"n_neighbors": 3}}
    with pytest.raises(ConfigError, match=re.escape("model: calibration_fraction must be in")):
        AnomalyModel.from_config(cfg, calibration_fraction=2.0)
