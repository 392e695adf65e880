"""deploy/prometheus/rules.yml: ``promtool check rules`` and its unit tests
(``promtool test rules deploy/prometheus/rules_test.yml``), every rule tested firing, the tests
able to fail, and every series and label the rules use exposed by streams.metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is absent (Debian: apt-get install -y prometheus; .ci/run installs it)",
)


def _rules() -> list[dict]:
    groups = yaml.safe_load((RULES_DIR / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_rules_pass_promtool_check():
    out = _promtool("check", "rules", "rules.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in out.stdout


@needs_promtool
def test_rules_unit_tests_pass():
    out = _promtool("test", "rules", "rules_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_rule_has_a_test_that_fires_and_one_that_stays_quiet():
    tests = yaml.safe_load((RULES_DIR / "rules_test.yml").read_text())
    fired, quiet = set(), set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules()}
    assert len(alerts) == 12
    assert alerts == fired, alerts ^ fired
    assert alerts == quiet, alerts ^ quiet
    for rule in _rules():
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        if rule["alert"] != "AnomalyScorerDown":  # `up` has no pipeline label
            assert "$labels.pipeline" in rule["annotations"]["description"], rule["alert"]


@needs_promtool
@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("AnomalyAlertRateAboveTarget", "3 * max by", "1.5 * max by"),
        ("AnomalyDeadLetterRateHigh", "> 0.01", "> 0.001"),
        ("AnomalyNoRecordsScored", "anomaly_consumer_lag) > 0", "anomaly_consumer_lag) >= 0"),
    ],
)
def test_the_unit_tests_fail_for_a_wrong_rule(tmp_path, alert, old, new):
    """A loosened threshold makes a quiet series fire: promtool's tests do catch it."""
    text = (RULES_DIR / "rules.yml").read_text()
    assert text.count(old) == 1, old
    (tmp_path / "rules.yml").write_text(text.replace(old, new))
    shutil.copy(RULES_DIR / "rules_test.yml", tmp_path)
    out = _promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert out.returncode != 0
    assert f"alertname: {alert}" in out.stdout + out.stderr


def test_rules_use_the_metrics_the_service_exposes():
    """Every anomaly_* series in a rule is in the contract (docs/architecture.md) and exposed by
    streams.metrics.ServiceMetrics with the labels the rule groups and matches on."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from anomaly.monitoring.drift import DriftReport
    from streams.metrics import ServiceMetrics

    contract = set(re.findall(r"`(anomaly_\w+)`", (ROOT / "docs" / "architecture.md").read_text()))
    m = ServiceMetrics("fraud")
    m.consumed.inc(5)
    m.scored.inc(5)
    m.alerted("high")
    m.dead_lettered("invalid_json")
    m.set_lag("fraud.transactions", 0, 3)
    m.database_up.set(1)
    m.set_schema_registry_up(True)
    m.set_output_topics_up(True)
    m.set_target_fpr(0.001)
    m.set_alertmanager_up(True)
    m.set_partitions_stopped(0)
    m.set_model_identity_ok(True)
    now = datetime.now(UTC)
    m.drift_window(
        DriftReport(
            pipeline="fraud", model_version="v1", window_start=now, window_end=now, records=1000,
            alerts=3, expected_alert_rate=0.001, alert_rate_p=0.5, ks_stat=0.01, ks_p=0.9,
            features=[{"feature": "amount", "psi": 0.01}], drifted=False,
        )
    )  # fmt: skip
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    assert exposed["anomaly_target_fpr"] == {"pipeline"}

    checked = 0
    for rule in _rules():
        expr = rule["expr"]
        groups = re.findall(r"\b(?:by|on) \(([^)]*)\)", expr)
        labels = {x.strip() for g in groups for x in g.split(",") if x.strip()}
        for series in set(re.findall(r"anomaly_\w+", expr)):
            assert series in contract, (rule["alert"], series)
            assert series in exposed, f"{series} not exposed by streams.metrics"
            assert labels <= exposed[series], (rule["alert"], series, labels - exposed[series])
            checked += 1
    assert checked >= 11


def _compose_prometheus() -> tuple[dict, dict[str, Path]]:
    """deploy/prometheus.yml and the compose Prometheus' bind mounts (container path -> file)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = {}
    for volume in compose["services"]["prometheus"]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text()), mounts


def test_compose_prometheus_loads_the_rules_and_sends_to_alertmanager():
    config, mounts = _compose_prometheus()
    rule_files = [mounts[path] for path in config["rule_files"]]
    assert rule_files == [RULES_DIR / "rules.yml"]
    targets = [
        t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"]
        for t in sc["targets"]
    ]  # fmt: skip
    assert targets == ["alertmanager:9093"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "9093:9093" in compose["services"]["alertmanager"]["ports"]


@needs_promtool
def test_compose_prometheus_config_passes_promtool(tmp_path):
    """``promtool check config`` on deploy/prometheus.yml with the mounted paths as they are
    on this machine (the file names container paths)."""
    config, mounts = _compose_prometheus()
    config["rule_files"] = [str(mounts[path]) for path in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 12 rules found" in out.stdout


def test_a_partition_that_leaves_the_consumer_takes_its_lag_series_with_it():
    """AnomalyNoRecordsScored and AnomalyConsumerLagGrowing read anomaly_consumer_lag: a revoked
    partition's last value must not stay exposed (it would page for a partition read elsewhere)."""
    from prometheus_client import generate_latest

    from streams.metrics import ServiceMetrics

    m = ServiceMetrics("fraud")
    m.set_lag("fraud.transactions", 0, 3)
    m.set_lag("fraud.transactions", 1, 7)
    m.forget_lag("fraud.transactions", 0)
    m.forget_lag("fraud.transactions", 5)  # never reported: nothing to remove, no error
    text = generate_latest(m.registry).decode()
    lag_lines = [line for line in text.splitlines() if line.startswith("anomaly_consumer_lag{")]
    assert lag_lines == [
        'anomaly_consumer_lag{partition="1",pipeline="fraud",topic="fraud.transactions"} 7.0'
    ]
