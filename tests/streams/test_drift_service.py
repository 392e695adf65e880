"""Drift windows through the real service: Tansu broker, real model, rows in SQL, metrics."""

from __future__ import annotations

import json

import pytest

from anomaly.config import load_config
from anomaly.synthetic.datasets import write_frame
from streams.broker import create_topic
from streams.replay import replay
from streams.service import ScoringService

pytestmark = [pytest.mark.kafka]


def test_served_stream_lands_drift_windows_in_sql_and_metrics(
    db_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model, fraud_records, sql
):
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    # One-second windows, so the stream spans a few and the idle loop closes the last one.
    config = pipeline_file(db_url, trained_model.bundle, drift={"window_s": 1.0, "min_records": 50})
    cfg = load_config(config)
    data = tmp_path / "records.parquet"
    write_frame(fraud_records, str(data))
    assert replay(cfg, data, progress=False).produced == len(fraud_records)

    service = ScoringService(cfg, stop_when_idle_s=3.0)
    assert service.run() == 0
    assert service.totals.scored == len(fraud_records)

    rows = sql(
        db_url,
        "SELECT pipeline, model_version, records, alerts, top_features, drifted, window_start, "
        "window_end FROM drift_windows ORDER BY window_start",
    )
    assert rows, "no drift window was stored"
    assert {r[0] for r in rows} == {cfg.name}
    assert {r[1] for r in rows} == {trained_model.version}
    assert sum(r[2] for r in rows) == len(fraud_records)  # every scored record, once
    assert sum(r[3] for r in rows) == service.totals.alerts
    top = rows[-1][4]
    top = json.loads(top) if isinstance(top, str) else top
    assert top and {"feature", "psi"} <= set(top[0])
    starts = [r[6] for r in rows]
    assert len(set(starts)) == len(starts)

    value = service.metrics.registry.get_sample_value
    assert value("anomaly_drift_detected", {"pipeline": cfg.name}) in (0.0, 1.0)
    assert value("anomaly_drift_feature_psi", {"pipeline": cfg.name, "feature": top[0]["feature"]})
    windows = sum(
        value("anomaly_drift_windows_total", {"pipeline": cfg.name, "drifted": d}) or 0
        for d in ("true", "false")
    )
    assert windows == len(rows)
