"""What the notifier posts for an incident (streams.alertmanager.incident_alerts): labels,
annotations, times; a changed label set resolves the old one. The end-to-end path with the real
Alertmanager is tests/reliability/test_alertmanager.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from anomaly.config import PipelineConfig
from storage import AlertStore
from storage.notifications import DueIncident
from storage.records import SinkBatch
from streams.alertmanager import AlertmanagerError, Notifier, incident_alerts
from streams.broker import free_port
from streams.metrics import ServiceMetrics
from tests.alertmanager_helpers import ALERTMANAGER, Webhook, start_alertmanager
from tests.storage.storage_testlib import alert

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
WINDOW, RESEND = timedelta(seconds=600), timedelta(seconds=60)


def incident(**changes) -> DueIncident:
    fields = {
        "id": 7,
        "pipeline": "fraud",
        "entity": "card-1",
        "status": "open",
        "first_seen": NOW - timedelta(minutes=5),
        "last_seen": NOW - timedelta(minutes=1),
        "alert_count": 3,
        "max_severity": "high",
        "started_at": NOW - timedelta(minutes=4),
        "last_alert_at": NOW - timedelta(seconds=30),
        "strongest": {
            "record_id": "tx-9",
            "model_version": "v3",
            "ensemble_score": 12.3456,
            "ensemble_p": 0.00012,
            "top_features": '[{"feature": "amount", "value": 950.0, "contribution": 0.7}]',
        },
        "sent": None,
    }
    return DueIncident(**(fields | changes))


def test_an_open_incident_fires_with_labels_annotations_and_a_dashboard_link() -> None:
    [alert], sent = incident_alerts(incident(), NOW, WINDOW, RESEND, "http://grafana:3000/")
    assert alert["labels"] == {
        "alertname": "AnomalyIncident",
        "pipeline": "fraud",
        "entity": "card-1",
        "incident": "7",
        "severity": "high",
        "model_version": "v3",
    }
    notes = alert["annotations"]
    assert (notes["score"], notes["p_value"], notes["record_id"]) == ("12.35", "0.00012", "tx-9")
    assert notes["top_features"] == "amount=950.0" and notes["alerts"] == "3"
    link = urlsplit(notes["dashboard"])
    assert link.path == "/d/anomaly-alerts/anomaly-alerts"
    assert alert["generatorURL"] == notes["dashboard"]
    assert parse_qs(link.query)["var-pipeline"] == ["fraud"]
    assert alert["startsAt"] == "2026-12-04T11:56:00Z"
    assert alert["endsAt"] == "2026-12-04T12:04:00Z"  # four resends ahead
    assert sent == (7, "firing", alert["labels"], 3)


def test_a_closed_incident_resolves_at_its_last_alert_plus_the_window() -> None:
    closed = incident(
        status="resolved",
        last_alert_at=NOW - timedelta(minutes=20),
        sent={"state": "firing", "labels": {}, "alert_count": 3, "first_sent_at": NOW},
    )
    [alert], sent = incident_alerts(closed, NOW, WINDOW, RESEND, None)
    assert alert["endsAt"] == "2026-12-04T11:50:00Z" and sent[1] == "resolved"
    assert "generatorURL" not in alert and "dashboard" not in alert["annotations"]
    # Never sent: firing first (so that a receiver hears of it), resolved on a later cycle.
    never_sent = incident(status="resolved", last_alert_at=NOW - timedelta(minutes=20))
    [alert], sent = incident_alerts(never_sent, NOW, WINDOW, RESEND, None)
    assert sent[1] == "firing" and alert["endsAt"] == "2026-12-04T12:04:00Z"


def test_a_changed_label_set_resolves_the_one_sent_before() -> None:
    old = {"alertname": "AnomalyIncident", "incident": "7", "severity": "medium"}
    sent_before = {"state": "firing", "labels": old, "alert_count": 2, "first_sent_at": NOW}
    new, stale = incident_alerts(incident(sent=sent_before), NOW, WINDOW, RESEND, None)[0]
    assert new["labels"]["severity"] == "high"
    assert stale["labels"] == old and stale["endsAt"] == "2026-12-04T12:00:00Z"


@pytest.mark.skipif(ALERTMANAGER is None, reason="no alertmanager binary")
def test_a_scorer_with_nothing_due_still_sees_alertmanager_come_back(
    sqlite_url: str, tmp_path
) -> None:
    """Two scorers of one pipeline both fail a post while Alertmanager is down; once it is back,
    the first delivers everything. The second then has nothing due: its gauge must still go
    back to 1 (it stayed 0 until something was due again, and AnomalyAlertmanagerUnreachable
    paged for a healthy Alertmanager)."""
    port = free_port()
    cfg = PipelineConfig(name="fraud")
    cfg.database.url = sqlite_url
    cfg.alerting.alertmanager_url = f"http://127.0.0.1:{port}"
    store = AlertStore.from_config(cfg)
    store.upgrade()
    now = datetime.now(UTC)
    store.write_batch(SinkBatch("fraud", alerts=[alert(0, pipeline="fraud", ingest_time=now)]))
    first, second = ServiceMetrics("fraud"), ServiceMetrics("fraud")
    scorers = {m: Notifier(cfg, store, m) for m in (first, second)}

    def up(m: ServiceMetrics) -> float | None:
        return m.registry.get_sample_value("anomaly_alertmanager_up", {"pipeline": "fraud"})

    for metrics, notifier in scorers.items():
        with pytest.raises(AlertmanagerError):
            notifier.run_once()
        assert up(metrics) == 0.0
    hook = Webhook()
    proc = start_alertmanager(tmp_path, port, hook.url)
    try:
        assert scorers[first].run_once() == 1  # delivers the incident
        assert up(first) == 1.0
        assert scorers[second].run_once() == 0  # nothing due: an empty post
        assert up(second) == 1.0
        errors = "anomaly_alertmanager_errors_total"
        assert second.registry.get_sample_value(errors, {"pipeline": "fraud"}) == 1.0
    finally:
        proc.terminate()
        proc.wait()
        hook.close()
        store.close()
