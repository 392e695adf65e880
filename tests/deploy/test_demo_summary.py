"""The demo's summary counts what its own run stored (fast: no broker, no training)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from storage import AlertStore
from storage.records import AlertRecord, SinkBatch
from streams.demo import SHORT, _config, _summarize


def _alert(topic: str, offset: int, entity: str, event_time: datetime) -> AlertRecord:
    return AlertRecord(
        pipeline="fraud",
        record_id=f"txn-{offset:07d}",
        entity=entity,
        event_time=event_time,
        ingest_time=datetime.now(UTC),
        kafka_topic=topic,
        kafka_partition=0,
        kafka_offset=offset,
        model_version="v1",
        ensemble_score=12.0,
        ensemble_p=0.0001,
        severity="high",
    )


def test_summary_counts_the_incidents_of_its_own_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'anomaly.db'}"
    cfg = _config("fraud", "127.0.0.1:9", url, SHORT, "20260101000000", progress=False)
    with AlertStore(url, incident_window_s=cfg.incidents.window_s) as store:
        store.upgrade()
        # An earlier run (another topic) left an incident of its own.
        old = datetime.now(UTC) - timedelta(days=3)
        store.write_batch(SinkBatch("fraud", alerts=[_alert("demo-old.fraud", 0, "card-9", old)]))
        # This run's stream ends "now", so its event times (and the incidents' first_seen) lie
        # before the run's wall-clock start: the summary must count them all the same.
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        alerts = [
            _alert(cfg.kafka.topic, i, entity, hour_ago + timedelta(seconds=i))
            for i, entity in enumerate(["card-1", "card-1", "card-2", "card-3"])
        ]
        store.write_batch(SinkBatch("fraud", alerts=alerts))
        assert len(store.list_incidents("fraud")) == 4  # 3 of this run, 1 of the earlier one

    labels = pd.DataFrame(
        {"is_anomaly": [1, 1, 0, 0, 1], "anomaly_kind": ["spike", "spike", "", "", "burst"]},
        index=[f"txn-{i:07d}" for i in range(5)],
    )
    summary = _summarize(cfg, "v1", labels, scored=5, rate=None)
    assert (summary.alerts, summary.incidents) == (4, 3)
    assert (summary.injected, summary.true_alerts) == (3, 2)
