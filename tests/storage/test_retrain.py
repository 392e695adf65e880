"""``anomaly retrain`` (storage.retrain): after one feature's scale moved, the old model's
false-positive rate on normal traffic is far above target_fpr; a version retrained on the
reservoir the service filled from the shifted traffic brings it back to the target."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from anomaly.cli import main
from anomaly.config import config_from_dict
from storage import AlertStore
from storage.records import ModelVersionRecord, OffsetRecord, SinkBatch
from storage.retrain import format_report, retrain
from streams.batch import Message
from streams.reservoir import ReservoirSampler

TARGET = 0.05
FEATURES = ["x0", "x1", "x2", "x3"]
# Small, fast models: the FPR comes from the conformal calibration, not from the fit's quality.
SMALL = {"detectors": ["vae"], "max_epochs": 2, "min_steps": 0, "max_steps": 200, "threads": 1}
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def traffic(n: int, seed: int, shifted: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    x[:, 1] = 0.6 * x[:, 0] + 0.8 * x[:, 1]  # some structure for the model to learn
    if shifted:
        x[:, 0] *= 3.0  # the shift: x0's scale moved
    frame = pd.DataFrame(x, columns=FEATURES)
    frame.insert(0, "id", [f"r{seed}-{i}" for i in range(n)])
    return frame


def pipeline(tmp_path: Path, db_url: str, size: int) -> tuple[object, Path]:
    data = {
        "name": "shifty",
        "schema": {"numeric": FEATURES, "time_field": None},
        "model": {"target_fpr": TARGET, "detectors": ["vae"], "max_epochs": 2, "threads": 1},
        "database": {"url": db_url},
        "retraining": {"reservoir_size": size, "half_life_s": 3600.0},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return config_from_dict(data, environ={}), path


def fpr(model, frame: pd.DataFrame) -> float:
    from anomaly.scoring.scorer import BatchScorer

    return float(BatchScorer(model, device="cpu", threads=1).score(frame).is_alert.mean())


def serve_into_reservoir(store: AlertStore, cfg, model, frame: pd.DataFrame, version: str) -> None:
    """What the service does per batch: score, sample, write with the batch's offsets."""
    from anomaly.scoring.scorer import BatchScorer

    scorer = BatchScorer(model, device="cpu", threads=1)
    sampler = ReservoirSampler(cfg)
    for start in range(0, len(frame), 500):
        part = frame.iloc[start : start + 500].reset_index(drop=True)
        result = scorer.score(part)
        ingest = T0 + timedelta(seconds=start)
        messages = [
            Message("in", 0, start + i, json.dumps(rec).encode(), int(ingest.timestamp() * 1000))
            for i, rec in enumerate(part.to_dict("records"))
        ]
        batch = SinkBatch(
            pipeline=cfg.name,
            offsets=[OffsetRecord(cfg.name, "in", 0, start + len(part), first_offset=start)],
        )
        decoded = SimpleNamespace(index=np.arange(len(part)), frame=part)
        sampler.fill(batch, messages, decoded, result, version, ingest, json.loads)
        sampler.written(batch, store.write_batch(batch))


@pytest.fixture
def sqlite_store(sqlite_url: str):
    s = AlertStore(sqlite_url)
    s.upgrade()
    yield s
    s.close()


def test_retrain_on_the_post_shift_reservoir_brings_the_fpr_back_to_target(
    store: AlertStore, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from anomaly.estimator.model import AnomalyModel

    torch.set_num_threads(1)
    cfg, _ = pipeline(tmp_path, db_url, size=4000)
    old = AnomalyModel.from_config(cfg, progress=False, **SMALL).fit(traffic(3000, 1, False))
    old_version = old.save(tmp_path / "old")
    store.register_model_version(
        ModelVersionRecord("shifty", old_version, str(tmp_path / "old"), old.bundle_sha256_),
        activate=True,
    )
    test_rows = traffic(5000, 99, shifted=True)  # post-shift NORMAL traffic, never sampled
    before = fpr(old, test_rows)
    assert fpr(old, traffic(5000, 98, shifted=False)) == pytest.approx(TARGET, rel=0.5)
    assert before > 3 * TARGET  # far above target after the shift

    serve_into_reservoir(store, cfg, old, traffic(8000, 2, shifted=True), old_version)
    assert store.reservoir_count("shifty") == 4000

    report = retrain(cfg, store, out=tmp_path / "new", **SMALL)
    lines = format_report(report)
    assert not report.active and report.trained_on == 3200 and report.held_out == 800
    assert store.active_model_version("shifty").version == old_version
    shadow = {s.version: s.rate for s in report.shadow}
    assert shadow[old_version] > 3 * TARGET and shadow[report.version] < 2 * TARGET

    new = AnomalyModel.load(tmp_path / "new")
    after = fpr(new, test_rows)
    lines.append(f"FPR on 5000 post-shift normal rows: old {before:.4f}, retrained {after:.4f}")
    assert 0.5 * TARGET <= after <= 1.5 * TARGET

    # Only the records the old model let through (--exclude-alerts): a sample cut off where the
    # traffic moved, and the retrained model flags the rest again.
    censored = retrain(cfg, store, out=tmp_path / "censored", exclude_alerts=True, **SMALL)
    after_censored = fpr(AnomalyModel.load(tmp_path / "censored"), test_rows)
    lines.append(f"retrained on non-alerting records only (--exclude-alerts): {after_censored:.4f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert censored.excluded_alerts > 0 and after_censored > 3 * TARGET

    # `anomaly models activate` swaps it in as for any version.
    assert main(["models", "activate", report.version, "--db", db_url, "--pipeline", "shifty"]) == 0
    assert store.active_model_version("shifty").version == report.version
    capsys.readouterr()


def test_retrain_cli_one_line_errors(
    sqlite_store: AlertStore, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = pipeline(tmp_path, sqlite_url, size=100)
    assert main(["retrain", "--config", str(path)]) == 2
    assert "unknown pipeline 'shifty'" in capsys.readouterr().err
    sqlite_store.register_model_version(
        ModelVersionRecord("shifty", "v1", str(tmp_path), "0" * 64), activate=False
    )
    assert main(["retrain", "--config", str(path)]) == 2
    assert "reservoir is empty" in capsys.readouterr().err
    assert main(["retrain", "--config", str(path), "--since", "yesterday"]) == 2
    err = capsys.readouterr().err
    assert "--since 'yesterday'" in err and len(err.strip().splitlines()) == 1
