"""A bundle saved before ``anomaly/`` was split into subpackages still loads, verifies and scores
the same.

``data/saved_before_the_move/`` was written by main at b4062e4 (the flat ``anomaly/bundle.py``)
with ``make.py`` beside it: a tiny model (three numeric and one categorical feature, all four
detectors), a dozen probe rows (one off the correlation, one unseen category) and the scores main
gave them. The manifest names each detector by class name only (``"class": "VAEDetector"``),
never by module path, so moving the modules changes nothing it records.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly import AnomalyModel
from anomaly.estimator.bundle import inspect_bundle

DATA = Path(__file__).parent / "data" / "saved_before_the_move"


def test_a_bundle_saved_before_the_move_loads_and_scores_the_same() -> None:
    model = AnomalyModel.load(DATA / "bundle")
    assert model.version == "saved-before-the-move"
    assert model.detectors == ("vae", "flow", "gan", "knn")
    expected = json.loads((DATA / "probe_scores.json").read_text())
    scores = model.score_detectors(pd.read_csv(DATA / "probe.csv"))
    # The score table has grown columns for detectors added since (knn_linear); a bundle without
    # them has NaN there and the columns it had score the same.
    added = [c for c in scores.columns if c not in expected["columns"]]
    assert added == ["knn_linear", "knn_linear_p"] and scores[added].isna().all().all()
    np.testing.assert_allclose(
        scores[expected["columns"]].to_numpy(), np.array(expected["rows"]), rtol=1e-5, atol=1e-7
    )


def test_its_manifest_names_detector_classes_not_module_paths() -> None:
    info = inspect_bundle(DATA / "bundle")
    assert info["identity"]["self_check"] == "ok"
    classes = {name: spec["class"] for name, spec in info["detector_params"].items()}
    assert classes == {
        "vae": "VAEDetector",
        "flow": "FlowDetector",
        "gan": "GANDetector",
        "knn": "KNNDetector",
    }
    assert "anomaly." not in (DATA / "bundle" / "manifest.json").read_text()
