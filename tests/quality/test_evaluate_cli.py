"""`anomaly evaluate` end to end: a real model trained on generated data, the real CLI, and the
report's numbers checked against scikit-learn's metrics computed here from the model's scores."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from anomaly.cli import main

from .conftest import TARGET_FPR

DETECTORS = ("vae", "flow", "gan", "knn", "knn_linear", "ensemble")


@pytest.fixture(scope="module")
def report(trained_model_dir: Path, labeled_csv: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    rc = main(
        [
            "evaluate",
            "--model",
            str(trained_model_dir),
            "--data",
            str(labeled_csv),
            "--label",
            "is_anomaly",
            "--report",
            str(out),
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def expected(trained_model_dir: Path, labeled_csv: Path) -> tuple[pd.DataFrame, np.ndarray]:
    from anomaly.estimator.model import AnomalyModel

    frame = pd.read_csv(labeled_csv)
    y = frame.pop("is_anomaly").to_numpy()
    scores = AnomalyModel.load(trained_model_dir).score_detectors(frame)
    return scores, y


def test_json_numbers_match_sklearn(report: Path, expected) -> None:
    scores, y = expected
    data = json.loads((report / "report.json").read_text())
    assert data["target_fpr"] == pytest.approx(TARGET_FPR)
    assert data["n_rows"] == len(y)
    assert data["n_anomalies"] == int(y.sum())
    assert data["n_normals"] == int((y == 0).sum())
    assert set(data["detectors"]) == set(DETECTORS)
    for name in DETECTORS:
        got = data["detectors"][name]
        s = scores[name].to_numpy()
        pred = (scores[f"{name}_p"].to_numpy() <= TARGET_FPR).astype(int)
        tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert got["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert got["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
        assert got["recall"] == pytest.approx(recall_score(y, pred, zero_division=0))
        assert got["f1"] == pytest.approx(f1_score(y, pred, zero_division=0))
        assert got["observed_fpr"] == pytest.approx(fp / (fp + tn))
        assert got["fpr_ratio"] == pytest.approx(fp / (fp + tn) / TARGET_FPR)
        assert (got["true_positives"], got["false_positives"]) == (tp, fp)
        assert (got["false_negatives"], got["true_negatives"]) == (fn, tn)
        assert got["alerts"] == int(pred.sum())
        # The calibrated threshold is reported in score units, and it is the alert boundary.
        assert got["threshold"] is not None and np.isfinite(got["threshold"])
        assert np.all(s[pred == 0] <= got["threshold"] + 1e-9)
        assert np.all(s[pred == 1] > got["threshold"] - 1e-9)
    # The anomalies are obvious ones: the whole pipeline must rank them high.
    assert data["detectors"]["ensemble"]["auroc"] > 0.8


def test_json_top_rows_are_highest_scoring_and_explained(report: Path, expected) -> None:
    scores, y = expected
    data = json.loads((report / "report.json").read_text())
    top = data["top_rows"]
    assert len(top) == 10
    ens = scores["ensemble"].to_numpy()
    assert [t["row"] for t in top] == list(np.argsort(-ens, kind="stable")[:10])
    for t in top:
        assert t["label"] == int(y[t["row"]])
        assert t["score"] == pytest.approx(ens[t["row"]])
        assert 1 <= len(t["top_features"]) <= 3
        for f in t["top_features"]:
            assert f["feature"] in {"load", "current", "pressure", "temperature", "mode"}
            assert 0.0 <= f["contribution"] <= 1.0


def test_html_is_self_contained_with_plots_and_threshold(report: Path) -> None:
    html = (report / "report.html").read_text()
    data = json.loads((report / "report.json").read_text())
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    # ROC, PR, score histograms, top features.
    assert len(images) >= 4
    for b64 in images:
        png = base64.b64decode(b64)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
    # Nothing fetched from elsewhere.
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<script" not in html and "<link" not in html
    assert f'<span id="target-fpr">{TARGET_FPR:g}</span>' in html
    for name in DETECTORS:
        m = data["detectors"][name]
        row = re.search(rf'<tr data-detector="{name}">(.*?)</tr>', html, re.S)
        assert row is not None, name
        assert f"{m['auroc']:.4f}" in row.group(1)
        assert f"{m['auprc']:.4f}" in row.group(1)
        assert f'<td class="threshold">{m["threshold"]:.6f}</td>' in row.group(1)


def _run(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns=["is_anomaly"]), "label column 'is_anomaly' is not in"),
        (lambda f: f.assign(is_anomaly=f["is_anomaly"] * 2), "must hold 0 (normal) or 1"),
        (lambda f: f.assign(is_anomaly=f["is_anomaly"].astype(str) + "x"), "must hold 0"),
        (lambda f: f.assign(is_anomaly=0), "has no anomalies"),
        (lambda f: f.assign(is_anomaly=1), "has no normal rows"),
        (
            lambda f: f.assign(is_anomaly=f["is_anomaly"].where(f.index != 3)),
            "missing value(s), first at row(s) 3",
        ),
    ],
    ids=["missing-column", "not-binary", "strings", "no-anomalies", "no-normals", "nan"],
)
def test_bad_labels_are_user_errors(
    mutate, message, trained_model_dir: Path, labeled_csv: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "bad.csv"
    mutate(pd.read_csv(labeled_csv)).to_csv(data, index=False)
    rc, err = _run(
        ["evaluate", "--model", str(trained_model_dir), "--data", str(data), "--label",
         "is_anomaly", "--report", str(tmp_path / "r")],
        capsys,
    )  # fmt: skip
    assert rc == 2
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "r" / "report.html").exists()


def test_parquet_input_and_missing_files(
    trained_model_dir: Path, labeled_csv: Path, tmp_path: Path, capsys
) -> None:
    parquet = tmp_path / "labeled.parquet"
    pd.read_csv(labeled_csv).to_parquet(parquet)
    base = ["evaluate", "--label", "is_anomaly", "--report", str(tmp_path / "r")]
    rc, _ = _run([*base, "--model", str(trained_model_dir), "--data", str(parquet)], capsys)
    assert rc == 0
    assert (tmp_path / "r" / "report.json").exists()

    rc, err = _run([*base, "--model", str(tmp_path / "nope"), "--data", str(parquet)], capsys)
    assert rc == 2 and "model directory not found" in err
    rc, err = _run([*base, "--model", str(trained_model_dir), "--data", "x.txt"], capsys)
    assert rc == 2 and ".csv or .parquet" in err
    rc, err = _run(
        [*base, "--model", str(trained_model_dir), "--data", str(tmp_path / "gone.csv")], capsys
    )
    assert rc == 2 and "not found" in err


def test_target_fpr_override_moves_the_threshold(
    trained_model_dir: Path, labeled_csv: Path, tmp_path: Path, expected
) -> None:
    scores, _ = expected
    rc = main(
        ["evaluate", "--model", str(trained_model_dir), "--data", str(labeled_csv), "--label",
         "is_anomaly", "--report", str(tmp_path), "--target-fpr", "0.2", "--top-rows", "0"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["target_fpr"] == 0.2 and data["top_rows"] == []
    ens = data["detectors"]["ensemble"]
    assert ens["alerts"] == int((scores["ensemble_p"] <= 0.2).sum())
    assert ens["alerts"] > int((scores["ensemble_p"] <= TARGET_FPR).sum())


def test_unreachable_target_is_explained(
    trained_model_dir: Path, labeled_csv: Path, tmp_path: Path
) -> None:
    rc = main(
        ["evaluate", "--model", str(trained_model_dir), "--data", str(labeled_csv), "--label",
         "is_anomaly", "--report", str(tmp_path), "--target-fpr", "0.0001", "--top-rows", "0"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "report.json").read_text())
    n_cal = data["meta"]["calibration_rows"]
    assert 0 < n_cal < 9999
    assert all(m["alerts"] == 0 for m in data["detectors"].values())
    html = (tmp_path / "report.html").read_text()
    assert f"calibrated on {n_cal} normal rows" in html and 'id="unreachable"' in html
