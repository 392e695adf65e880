"""``anomaly train`` / ``score`` / ``inspect`` through ``anomaly.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from anomaly.cli import main

from .conftest import SCHEMA


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "cards",
                "schema": {
                    "id_field": "id",
                    "time_field": "event_time",
                    "entity_field": "card",
                    "numeric": SCHEMA.numeric,
                    "categorical": SCHEMA.categorical,
                },
                "model": {"target_fpr": 0.01, "max_epochs": 8, "threads": 1, "progress": False},
            }
        )
    )
    return path


def test_train_score_inspect_end_to_end(config_file, frame_problem, tmp_path, capsys):
    train, normal, anomalous = frame_problem
    train_csv = tmp_path / "normal.csv"
    train.to_csv(train_csv, index=False)
    model_dir = tmp_path / "model"
    assert (
        main(
            [
                "train",
                "--config",
                str(config_file),
                "--data",
                str(train_csv),
                "--out",
                str(model_dir),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["target_fpr"] == 0.01 and len(summary["version"]) == 12

    rows = pd.concat([normal, anomalous], ignore_index=True)
    rows_parquet = tmp_path / "rows.parquet"
    rows.to_parquet(rows_parquet)
    out = tmp_path / "scores.parquet"
    assert (
        main(["score", "--model", str(model_dir), "--data", str(rows_parquet), "--out", str(out)])
        == 0
    )
    assert "alert(s)" in capsys.readouterr().out
    scores = pd.read_parquet(out)
    assert list(scores["id"]) == list(rows["id"])
    assert {"vae", "flow", "gan", "ensemble", "ensemble_p", "alert", "severity", "fired"} <= set(
        scores.columns
    )
    assert scores["alert"][len(normal) :].mean() > scores["alert"][: len(normal)].mean() + 0.3

    csv_out = tmp_path / "scores.csv"
    assert (
        main(
            ["score", "--model", str(model_dir), "--data", str(rows_parquet), "--out", str(csv_out)]
        )
        == 0
    )
    np.testing.assert_allclose(pd.read_csv(csv_out)["ensemble"], scores["ensemble"])
    capsys.readouterr()

    assert main(["inspect", "--model", str(model_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == summary["version"]
    assert info["schema"]["numeric"] == SCHEMA.numeric
    assert set(info["thresholds"]) == {"vae", "flow", "gan", "knn", "ensemble"}


def test_user_errors_print_without_traceback(config_file, frame_problem, tmp_path, capsys):
    train = frame_problem[0]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert (
        main(
            [
                "train",
                "--config",
                str(config_file),
                "--data",
                str(empty),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    assert "is empty" in capsys.readouterr().err

    bad = train.head(300).astype({"amount": object})
    bad.loc[42, "amount"] = "12,50 EUR"
    bad_csv = tmp_path / "bad.csv"
    bad.to_csv(bad_csv, index=False)
    assert (
        main(
            [
                "train",
                "--config",
                str(config_file),
                "--data",
                str(bad_csv),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "column 'amount', row 42" in err and "Traceback" not in err

    assert main(["inspect", "--model", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert (
        main(
            [
                "score",
                "--model",
                str(tmp_path / "missing"),
                "--data",
                str(bad_csv),
                "--out",
                str(tmp_path / "x.csv"),
            ]
        )
        == 2
    )
