"""A real Prometheus scrapes a real ``anomaly serve`` and evaluates the shipped alerting rules:
a stream in which far more records alert than the model's target_fpr drives
AnomalyAlertRateAboveTarget through pending to firing, read from Prometheus' HTTP API; Prometheus
sends it to a real Alertmanager, which delivers it to a webhook receiver in the test beside the
incidents the scorer posts to the same Alertmanager itself (the two paths to people).

The rules Prometheus loads are deploy/prometheus/rules.yml with only its durations shortened
(every ``[Nm]`` range and ``for: Nm`` becomes N seconds, 60x faster): the expressions, thresholds
and labels are the shipped ones, but a 15-minute window and a 10-minute ``for:`` cannot run in a
test. Scrape and evaluation intervals are 1 s. Nothing is mocked: the broker is the embedded
Tansu, the service the ``anomaly serve`` command, Prometheus and Alertmanager Debian's binaries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from anomaly.config import load_config
from streams.broker import create_topic, free_port
from tests.alertmanager_helpers import ALERTMANAGER, Webhook, start_alertmanager

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")

# The streams tests' fixtures (trained model, pipeline file), loaded from their file, not copied.
_NAME = "_streams_test_fixtures"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, ROOT / "tests/streams/conftest.py")
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
    _spec.loader.exec_module(sys.modules[_NAME])  # type: ignore[union-attr]
_fixtures = sys.modules[_NAME]
fraud_schema = _fixtures.fraud_schema
trained_model = _fixtures.trained_model
pipeline_file = _fixtures.pipeline_file

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        PROMETHEUS is None or ALERTMANAGER is None,
        reason="the prometheus or alertmanager binary is absent (Debian: apt-get install -y "
        "prometheus prometheus-alertmanager; .ci/run installs them)",
    ),
]


def shortened_rules(text: str) -> str:
    """The shipped rules with every minute duration (``[15m]``, ``for: 10m``) in seconds."""
    short = re.sub(r"\[(\d+)m\]", r"[\1s]", text)
    short = re.sub(r"(\n\s+for: )(\d+)m\n", r"\1\2s\n", short)
    # Nothing but the durations changed.
    assert "s]" not in text and short != text
    assert re.sub(r"(\[\d+|for: \d+)s", r"\1m", short) == text
    return short


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=3) as response:
        return json.loads(response.read())


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _wait(condition, timeout_s: float, what: str, every: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class _Producer(threading.Thread):
    """Produce ``values`` at about ``rate`` records/s until they run out or ``stop()``."""

    def __init__(self, bootstrap: str, topic: str, values: list[bytes], rate: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.values, self.rate = bootstrap, topic, values, rate
        self._halt = threading.Event()

    def run(self) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        start, step = time.monotonic(), max(1, int(self.rate / 10))
        for i in range(0, len(self.values), step):
            if self._halt.is_set():
                break
            for value in self.values[i : i + step]:
                producer.produce(self.topic, value=value)
            producer.poll(0)
            time.sleep(max(0.0, start + (i + step) / self.rate - time.monotonic()))
        producer.flush(30)

    def stop(self) -> None:
        self._halt.set()
        self.join(60)


def test_real_prometheus_fires_the_alert_rate_rule_on_a_real_scorer(
    tmp_path, kafka_bootstrap, topic_name, sqlite_url, pipeline_file, trained_model
):
    from anomaly.synthetic.datasets import generate_fraud
    from streams.replay import encode_rows

    started = time.monotonic()
    # About a third of the records are injected anomalies; the model (target_fpr 1%) alerts on
    # a share of them far above 3%. Its own predictions say how far.
    records = generate_fraud(6000, anomaly_fraction=0.3, seed=8).drop(columns=_fixtures.LABELS)
    share = float(trained_model.model.predict(records).mean())
    assert trained_model.model.target_fpr == 0.01
    assert share > 0.1, share  # well above 3 x 1%
    values = encode_rows(records)

    create_topic(kafka_bootstrap, topic_name, partitions=1)
    metrics_port, prom_port, am_port = free_port(), free_port(), free_port()
    am_url = f"http://127.0.0.1:{am_port}"
    config = pipeline_file(
        sqlite_url,
        trained_model.bundle,
        serve={"metrics_port": metrics_port},
        alerting={"alertmanager_url": am_url, "poll_s": 0.5, "resend_interval_s": 2},
    )
    cfg = load_config(config)
    rules = tmp_path / "rules.yml"
    rules.write_text(shortened_rules((ROOT / "deploy/prometheus/rules.yml").read_text()))
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am_url[7:]]}]}]},
                "scrape_configs": [
                    {
                        "job_name": "anomaly-scorer",  # the job deploy/prometheus.yml scrapes
                        "static_configs": [
                            {
                                "targets": [f"127.0.0.1:{metrics_port}"],
                                "labels": {"service": "scorer-test"},
                            }
                        ],
                    }
                ],
            }
        )
    )

    # Both paths to people end at one real Alertmanager and its webhook receiver: Prometheus'
    # rule alerts, and the scorer's own incidents (alerting.alertmanager_url).
    webhook = Webhook()
    alertmanager = start_alertmanager(tmp_path, am_port, webhook.url, group_by=("alertname",))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # Drift windows close on the hour: one closing mid-test would fire AnomalyDriftDetected
    # beside the rule measured here (it has its own promtool tests).
    env["ANOMALY_DRIFT_ENABLED"] = "false"
    serve_log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "anomaly.cli", "serve", "--config", str(config)],
        stdout=serve_log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    prom_log = (tmp_path / "prometheus.log").open("wb")
    prometheus = None
    producer = _Producer(kafka_bootstrap, topic_name, values, rate=100)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    states: list[str] = []
    try:
        _wait(
            lambda: _status(f"http://127.0.0.1:{metrics_port}/readyz") == 200,
            90,
            "the service to be ready",
        )
        # Started once the service answers, so that its scrapes never see it down.
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        _wait(lambda: _status(f"http://127.0.0.1:{prom_port}/-/ready") == 200, 30, "Prometheus")
        groups = _get(f"{api}/rules")["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        shipped = yaml.safe_load(rules.read_text())["groups"][0]["rules"]
        assert set(loaded) == {r["alert"] for r in shipped}, loaded
        producer.start()

        def alert_rate_state() -> str | None:
            for alert in _get(f"{api}/alerts")["data"]["alerts"]:
                labels = alert["labels"]
                if labels["alertname"] == "AnomalyAlertRateAboveTarget":
                    assert labels["pipeline"] == cfg.name and labels["severity"] == "ticket"
                    if not states or states[-1] != alert["state"]:
                        states.append(alert["state"])
                    return alert["state"] == "firing"
            return None

        _wait(alert_rate_state, 45, "AnomalyAlertRateAboveTarget to fire", every=0.5)
        assert states[0] == "pending" and states[-1] == "firing", states
        # The gauge the rule compares with came from the service's scrape.
        result = _get(f"{api}/query?query=anomaly_target_fpr")["data"]["result"]
        assert [(r["metric"]["pipeline"], float(r["value"][1])) for r in result] == [
            (cfg.name, 0.01)
        ]
        # A healthy service: nothing else fires, and every rule evaluates without error.
        firing = {
            a["labels"]["alertname"]
            for a in _get(f"{api}/alerts")["data"]["alerts"]
            if a["state"] == "firing"
        }
        assert firing == {"AnomalyAlertRateAboveTarget"}, firing
        groups = _get(f"{api}/rules")["data"]["groups"]
        assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups

        # Prometheus sent the firing rule to Alertmanager, which delivered it to the receiver,
        # beside the incidents the scorer posted itself.
        def delivered(name: str) -> list[dict]:
            return [a for a in webhook.alerts() if a["labels"]["alertname"] == name]

        _wait(lambda: delivered("AnomalyAlertRateAboveTarget"), 30, "the rule alert delivered")
        (rule_alert,) = {
            a["fingerprint"]: a for a in delivered("AnomalyAlertRateAboveTarget")
        }.values()
        assert rule_alert["status"] == "firing"
        assert rule_alert["labels"]["pipeline"] == cfg.name
        assert rule_alert["labels"]["severity"] == "ticket"
        _wait(lambda: delivered("AnomalyIncident"), 30, "an incident delivered")
        incident = delivered("AnomalyIncident")[0]
        assert incident["labels"]["pipeline"] == cfg.name and incident["status"] == "firing"
    finally:
        producer.stop()
        for proc in (serve, prometheus):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in (serve, prometheus):
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        serve_log.close()
        prom_log.close()
        alertmanager.terminate()
        alertmanager.wait(30)
        webhook.close()
    print(f"alert states {states}; {time.monotonic() - started:.1f} s")
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
