"""Incidents to Alertmanager, end to end: the real ``anomaly serve``, the Tansu broker, PostgreSQL,
the real Alertmanager (Debian's ``prometheus-alertmanager``) and a webhook receiver in the test
that records what Alertmanager delivers.

Alertmanager is down (not started) for the first 20 s of the service: the notifier retries with
backoff, the stream goes on, the incidents close meanwhile (a short ``incidents.window_s``), and
once Alertmanager is up each incident reaches the webhook exactly once firing, then once resolved.
No alert row is lost or duplicated.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime

import pandas as pd
import pytest
from harness import (
    Ledger,
    ServeProcess,
    StreamProducer,
    dispose_engines,
    end_offsets,
    http_get,
    records_seen,
    wait_for,
)
from sqlalchemy import create_engine, text

from anomaly.config import load_config
from streams.broker import create_topic, free_port
from tests.alertmanager_helpers import ALERTMANAGER, Webhook, start_alertmanager

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.kafka,
    pytest.mark.postgres,
    pytest.mark.skipif(ALERTMANAGER is None, reason="no alertmanager binary"),
]
DOWN_S = 20.0
GRAFANA = "http://grafana.test:3000"
ATTACKED = "card-under-attack"  # during the outage
ATTACKED_LATER = "card-attacked-later"  # while Alertmanager is up


def fraud_stream(
    model, n: int, card: str, *, burst: int = 4, seed: int = 41, prefix: str = ""
) -> tuple[list[bytes], set[str]]:
    """Generated transactions in which ``burst`` of the alerting ones are moved onto ``card``
    within two seconds (card testing: one incident of several alerts); returns the encoded
    values and the ids the model alerts on (ids start with ``prefix``)."""
    from harness import LABELS

    from anomaly.synthetic.datasets import generate_fraud
    from streams.replay import encode_rows

    features = generate_fraud(n, anomaly_fraction=0.03, seed=seed).drop(columns=LABELS)
    features["id"] = prefix + features["id"].astype(str)
    alerting = model.predict(features) == 1
    rows = features.index[alerting][:burst]
    assert len(rows) == burst, "too few alerts in the generated stream"
    start = features.loc[rows[0], "event_time"]
    features.loc[rows, "card_id"] = card
    for i, row in enumerate(rows):
        features.loc[row, "event_time"] = start + pd.Timedelta(seconds=0.5 * i)
    expected = set(features["id"].astype(str)[model.predict(features) == 1])
    return encode_rows(features), expected


def _incidents(db_url: str, pipeline: str) -> dict[str, tuple[str, str, str, int]]:
    """incident id -> (status, max severity, entity, alert count)."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, status, max_severity, entity, alert_count FROM incidents "
                    "WHERE pipeline = :p"
                ),
                {"p": pipeline},
            ).all()
        return {str(r[0]): tuple(r[1:]) for r in rows}
    finally:
        engine.dispose()


def test_incidents_reach_alertmanager_once_firing_once_resolved_after_an_outage(
    pg_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model
):
    t_start = time.monotonic()
    values, expected_alert_ids = fraud_stream(trained_model.model, 300, ATTACKED)
    later, later_alert_ids = fraud_stream(
        trained_model.model, 200, ATTACKED_LATER, seed=42, prefix="later-"
    )
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    am_port, metrics_port = free_port(), free_port()
    webhook = Webhook()
    config = pipeline_file(
        pg_url,
        trained_model.bundle,
        serve={"metrics_port": metrics_port},
        incidents={"window_s": 4},
        alerting={
            "alertmanager_url": f"http://127.0.0.1:{am_port}",
            "grafana_url": GRAFANA,
            "poll_s": 0.5,
            "resend_interval_s": 2,
            "retry_initial_s": 0.5,
            "retry_max_s": 2,
        },
    )
    cfg = load_config(config)
    serve = ServeProcess(config, tmp_path / "serve.log")
    t_down = time.monotonic()  # Alertmanager is down from here (not started yet)
    am = None
    try:
        StreamProducer(kafka_bootstrap, topic_name, values).start()
        total = len(values)
        wait_for(lambda: records_seen(pg_url, cfg.name) == total, 90, "the whole stream")
        assert _incidents(pg_url, cfg.name), "no incident"
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

        def metric(name: str) -> float | None:
            for line in http_get(metrics_url)[1].splitlines():
                if line.startswith(f'{name}{{pipeline="{cfg.name}"'):
                    return float(line.rsplit(" ", 1)[1])
            return None

        wait_for(lambda: (metric("anomaly_alertmanager_errors_total") or 0) > 0, 30, "an error")
        assert metric("anomaly_alertmanager_up") == 0
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - t_down)))
        assert webhook.alerts() == []

        am = start_alertmanager(tmp_path, am_port, webhook.url)
        t_up = time.monotonic()
        incidents = _incidents(pg_url, cfg.name)

        def all_resolved() -> bool:
            done = {a["labels"]["incident"] for a in webhook.alerts() if a["status"] == "resolved"}
            return done >= set(incidents)

        wait_for(all_resolved, 60, "every incident resolved at the webhook")
        caught_up_s = time.monotonic() - t_up
        assert metric("anomaly_alertmanager_up") == 1

        # With Alertmanager up: an incident is sent while open, and resolved once it closes.
        StreamProducer(kafka_bootstrap, topic_name, later).start()
        total += len(later)
        expected_alert_ids |= later_alert_ids
        wait_for(lambda: records_seen(pg_url, cfg.name) == total, 60, "the second stream")
        incidents = _incidents(pg_url, cfg.name)
        [later_incident] = [k for k, i in incidents.items() if i[2] == ATTACKED_LATER]
        wait_for(all_resolved, 60, "the new incidents resolved at the webhook")
        time.sleep(2.5)  # a duplicate would come within a group_interval or two
        assert serve.stop() == 0, serve.log_text()[-3000:]
    finally:
        if serve.alive():
            serve.kill()
        if am is not None:
            am.terminate()
            am.wait(10)
        webhook.close()
        dispose_engines()

    # Every incident closed in SQL, reached the webhook exactly once firing and once resolved.
    incidents = _incidents(pg_url, cfg.name)
    assert {i[0] for i in incidents.values()} == {"resolved"}
    # A card under attack is one incident of all its alerts.
    for card in (ATTACKED, ATTACKED_LATER):
        [attack] = [i for i in incidents.values() if i[2] == card]
        assert attack[3] == 4
    delivered = webhook.alerts()
    # The later incident reached the webhook firing before the service closed it.
    [fired_at] = [
        body["received_at"]
        for body in webhook.bodies
        for a in body["alerts"]
        if a["labels"]["incident"] == later_incident and a["status"] == "firing"
    ]
    [closed] = [
        e
        for e in serve.log_lines()
        if e.get("message") == "incidents closed" and int(later_incident) in e["incidents"]
    ]
    closed_at = datetime.fromisoformat(closed["ts"].replace("Z", "+00:00")).timestamp()
    assert fired_at < closed_at
    counts = Counter((a["labels"]["incident"], a["status"]) for a in delivered)
    for incident in incidents:
        assert counts[(incident, "firing")] == 1, (incident, counts)
        assert counts[(incident, "resolved")] == 1, (incident, counts)
    assert {a["labels"]["incident"] for a in delivered} == set(incidents)
    for a in delivered:
        labels, notes = a["labels"], a["annotations"]
        assert labels["alertname"] == "AnomalyIncident"
        assert labels["pipeline"] == cfg.name and labels["entity"]
        assert labels["severity"] == incidents[labels["incident"]][1]
        assert labels["model_version"] == trained_model.version
        assert float(notes["score"]) > 0 and 0 <= float(notes["p_value"]) <= 1
        assert notes["top_features"]
        assert notes["dashboard"].startswith(f"{GRAFANA}/d/anomaly-alerts/")
        assert f"var-pipeline={cfg.name}" in notes["dashboard"]

    # The stream lost and duplicated nothing.
    ledger = Ledger.read(pg_url, cfg.name, topic_name)
    ledger.check_exactly_once(
        records_in=total,
        expected_alert_ids=expected_alert_ids,
        expected_dead=0,
        end_offsets=end_offsets(kafka_bootstrap, topic_name, total),
    )
    logs = serve.log_lines()
    assert [e for e in logs if e.get("message") == "alertmanager unavailable, retrying"]
    print(
        json.dumps(
            {
                "incidents": len(incidents),
                "alerts": len(ledger.alert_ids),
                "caught_up_after_s": round(caught_up_s, 1),
                "runtime_s": round(time.monotonic() - t_start, 1),
            }
        )
    )
