"""The retraining reservoir through the real service: Tansu broker, real model, rows in SQL."""

from __future__ import annotations

import json

import pytest

from anomaly.cli import main
from anomaly.config import load_config
from anomaly.synthetic.datasets import write_frame
from storage import AlertStore
from streams.broker import create_topic
from streams.replay import replay
from streams.service import ScoringService

pytestmark = [
    pytest.mark.kafka,
    # A 200-row reservoir: the retrain at the end trains on 160 records, on purpose.
    pytest.mark.filterwarnings("ignore::anomaly.estimator.model.SmallDataWarning"),
]


def test_served_stream_fills_a_bounded_reservoir_and_a_replay_changes_nothing(
    db_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model, fraud_records,
    capsys,
):  # fmt: skip
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    config = pipeline_file(
        db_url,
        trained_model.bundle,
        retraining={"reservoir_size": 200},
        model={"detectors": ["vae"], "max_epochs": 1, "target_fpr": 0.05},
    )
    cfg = load_config(config)
    data = tmp_path / "records.parquet"
    write_frame(fraud_records, str(data))
    assert replay(cfg, data, progress=False).produced == len(fraud_records)

    service = ScoringService(cfg, stop_when_idle_s=3.0)
    assert service.run() == 0
    assert service.totals.scored == len(fraud_records) > 200
    with AlertStore(db_url) as store:
        rows = store.reservoir_rows(cfg.name)
        assert len(rows) == store.reservoir_count(cfg.name) == 200  # full and bounded
        assert {r["model_version"] for r in rows} == {trained_model.version}
        ids = set(fraud_records["id"].astype(str))
        assert {str(r["record"]["id"]) for r in rows} <= ids
        alerted = {r["kafka_offset"] for r in rows if r["alerted"]}
        stored_alerts = {a["kafka_offset"] for a in store.list_alerts(cfg.name, limit=None)}
        assert alerted <= stored_alerts
        before = {(r["kafka_offset"], r["priority"]) for r in rows}

        # Read the whole topic again on purpose: every record is scored again, and the
        # reservoir makes the same choices (priorities are a function of the record).
        store.reset_offsets(cfg.name, cfg.kafka.topic, {0: 0})
    again = ScoringService(cfg, stop_when_idle_s=3.0)
    assert again.run() == 0
    assert again.totals.scored == len(fraud_records)
    with AlertStore(db_url) as store:
        assert {
            (r["kafka_offset"], r["priority"]) for r in store.reservoir_rows(cfg.name)
        } == before

    # `anomaly retrain` on it: a new version, registered inactive, with a shadow comparison.
    capsys.readouterr()
    assert main(["retrain", "--config", str(config), "--out", str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "shadow scoring on the 40 most recent reservoir records" in out
    assert trained_model.version in out and "registered (not active" in out
    with AlertStore(db_url) as store:
        versions = store.list_model_versions(cfg.name)
    assert [v.active for v in versions] == [False]
    assert json.loads(json.dumps(versions[0].metrics["retrain"]))["trained_on"] == 160
