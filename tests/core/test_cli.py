"""``anomaly train`` / ``score`` / ``inspect`` through ``anomaly.cli.main``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
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
    # Strict JSON: the knn members have no validation loss, which is null, not NaN.
    summary = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)
    assert summary["target_fpr"] == 0.01 and len(summary["version"]) == 12
    assert summary["training"]["detectors"]["knn"]["best_val_loss"] is None

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
    assert set(info["thresholds"]) == {"vae", "flow", "gan", "knn", "knn_linear", "ensemble"}


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
    # An output directory in use is refused before the data is read (and the training run).
    used = tmp_path / "used"
    used.mkdir()
    (used / "model.txt").write_text("another model")
    argv = ["train", "--config", str(config_file), "--data", str(empty), "--out", str(used)]
    assert main(argv) == 2
    assert f"bundle directory {used} exists and is not empty" in capsys.readouterr().err

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


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's stderr, checked to be the single `error: ...` line a user error prints."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def test_output_and_data_paths_are_one_line_errors(saved_bundle, frame_problem, tmp_path, capsys):
    rows = frame_problem[1]
    data = tmp_path / "rows.csv"
    rows.to_csv(data, index=False)
    score = ["score", "--model", str(saved_bundle)]
    # A missing output directory is found before any scoring, and named.
    out = tmp_path / "nodir" / "s.csv"
    assert main([*score, "--data", str(data), "--out", str(out)]) == 2
    assert _one_line_error(capsys) == (
        f"error: output file {out}: directory {out.parent} does not exist"
    )
    # A directory where a data file belongs is called a directory, not a missing file.
    assert main([*score, "--data", str(tmp_path), "--out", str(tmp_path / "s.csv")]) == 2
    assert "is a directory" in _one_line_error(capsys)
    # A missing column is every row's problem: said once, with the rows, never "(and N more)"
    # after the field name (which read as N more missing fields).
    no_amount = tmp_path / "no_amount.csv"
    rows.drop(columns=["amount"]).to_csv(no_amount, index=False)
    assert main([*score, "--data", str(no_amount), "--out", str(tmp_path / "s.csv")]) == 2
    err = _one_line_error(capsys)
    assert err.endswith(f"missing field(s): amount (in all {len(rows)} rows)"), err
    # Other problems: the first row shown, with how many rows have one.
    bad = rows.astype({"amount": object, "f1": object})
    bad.loc[5, "amount"] = "x"
    bad.loc[9, "f1"] = "y"
    bad_csv = tmp_path / "bad.csv"
    bad.to_csv(bad_csv, index=False)
    assert main([*score, "--data", str(bad_csv), "--out", str(tmp_path / "s.csv")]) == 2
    err = _one_line_error(capsys)
    assert err.endswith(
        "row 5: not_a_number: field 'amount': 'x' is not a number (first of 2 rows with problems)"
    ), err
    assert not (tmp_path / "s.csv").exists()


def test_an_os_error_of_any_command_is_one_line(tmp_path, capsys):
    # The dispatcher's rule, through a command that checks nothing itself: pandas' OSError for
    # a missing directory.
    out = tmp_path / "nodir" / "x.csv"
    assert main(["generate", "--example", "fraud", "--rows", "50", "--out", str(out)]) == 2
    assert "non-existent directory" in _one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unusable_device_is_one_line_error(saved_bundle, frame_problem, tmp_path, capsys):
    data = tmp_path / "rows.csv"
    frame_problem[1].head(50).to_csv(data, index=False)
    score = ["score", "--model", str(saved_bundle), "--data", str(data), "--out"]
    assert main([*score, str(tmp_path / "s.csv"), "--device", "cuda"]) == 2
    assert _one_line_error(capsys).startswith("error: device 'cuda': ")
    # Not a device at all: argparse names the choices.
    with pytest.raises(SystemExit) as exit_info:
        main([*score, str(tmp_path / "s.csv"), "--device", "tpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tpu'" in err and "'mps'" in err and "Traceback" not in err


def test_a_reader_that_stops_early_ends_the_command_quietly(saved_bundle):
    """`anomaly inspect | head -3`: the reader goes away; no traceback, no 'Exception ignored'."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomaly.cli", "inspect", "--model", str(saved_bundle), "--full"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the command has its output ready (it imports torch)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1, err
    assert err == ""


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"calibration_fraction": 1.5}, "error: model.calibration_fraction must be in (0, 1)"),
        ({"threads": 0}, "error: model.threads must be >= 1, got 0"),
        ({"seed": -1}, "error: model.seed must be in 0 to 2**63-1, got -1"),
        ({"detector_params": {"knnn": {"n_neighbors": 3}}}, "error: model.detector_params: "),
        ({"detector_params": {"knn": {"bogus": 1}}}, "error: model.detector_params.knn: unknown"),
        (
            {"detector_params": {"knn": {"n_neighbors": 0}}},
            "error: model.detector_params.knn: n_neighbors must be >= 1, got 0",
        ),
    ],
)
def test_train_refuses_bad_model_values_in_one_line(
    model, message, frame_problem, tmp_path, capsys
):
    """Values only AnomalyModel, a detector or torch would refuse, once fitting: before the data
    is read, one line naming the field."""
    config = tmp_path / "pipeline.yaml"
    schema = {"id_field": "id", "time_field": None, "numeric": ["amount", "f0", "f1"]}
    model = {"detectors": ["knn"], "progress": False, **model}
    config.write_text(yaml.safe_dump({"name": "cards", "schema": schema, "model": model}))
    data = tmp_path / "normal.csv"
    frame_problem[0].head(300).to_csv(data, index=False)
    out = tmp_path / "m"
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(out)]) == 2
    assert _one_line_error(capsys).startswith(message)
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
        (["--batch-size", "-5"], "error: --batch-size must be >= 1, got -5"),
        (["--threads", "0"], "error: --threads must be >= 1, got 0"),
    ],
)
def test_score_refuses_counts_below_one_in_one_line(
    option, message, saved_bundle, frame_problem, tmp_path, capsys
):
    data = tmp_path / "rows.csv"
    frame_problem[1].head(50).to_csv(data, index=False)
    out = tmp_path / "s.csv"
    score = ["score", "--model", str(saved_bundle), "--data", str(data), "--out", str(out)]
    assert main([*score, *option]) == 2
    assert _one_line_error(capsys) == message
    assert not out.exists()


def test_batch_scorer_names_a_bad_batch_size_or_thread_count(saved_bundle):
    from anomaly.estimator.model import AnomalyModel
    from anomaly.scoring.scorer import BatchScorer

    model = AnomalyModel.load(saved_bundle)
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        BatchScorer(model, device="cpu", batch_size=0)
    with pytest.raises(ValueError, match=r"^threads must be >= 1 \(or None\), got 0$"):
        BatchScorer(model, device="cpu", threads=0)
