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
from anomaly.config import SchemaConfig
from anomaly.estimator.bundle import MANIFEST, inspect_bundle, seal_manifest

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


def test_it_keeps_a_missing_category_in_the_unseen_bucket_as_calibrated() -> None:
    """Saved before categorical imputation: a missing category still sets the unseen bucket."""
    model = AnomalyModel.load(DATA / "bundle")
    pre = model.preprocessor_
    assert pre.impute_category_ == {}
    probe = pd.read_csv(DATA / "probe.csv").head(2).assign(kind=[None, "x"])
    x = pre.transform(probe)
    kinds = [i for i, name in enumerate(pre.feature_names_out_) if name.startswith("kind=")]
    assert pre.feature_names_out_[kinds[-1]] == "kind=__unseen__"
    np.testing.assert_array_equal(x[:, kinds], [[0, 0, 0, 1], [1, 0, 0, 0]])


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


def test_a_bundle_with_float_texts_for_integer_categories_scores_as_before_and_meets_integers(
    tmp_path,
) -> None:
    """Trained on integer codes that pandas read as floats (one empty cell), the fit before
    ``category_text`` kept "5411.0": that bundle scores its float rows as it did, and the same
    codes as integers or as the stream decoder's text ("5411") no longer all land in the
    unseen bucket."""
    rng = np.random.default_rng(0)
    codes = [5411, 5812, 4111]
    train = pd.DataFrame(
        {"x": rng.normal(size=600), "y": rng.normal(size=600), "mcc": rng.choice(codes, 600)}
    ).astype({"mcc": "float64"})
    train.loc[0, "mcc"] = np.nan
    schema = SchemaConfig(id_field=None, time_field=None, numeric=["x", "y"], categorical=["mcc"])
    model = AnomalyModel(target_fpr=0.01, seed=0, device="cpu", schema=schema, detectors=("knn",))
    model.fit(train)
    model.save(tmp_path / "new")
    manifest = json.loads((tmp_path / "new" / MANIFEST).read_text())
    manifest["preprocessing"]["categories"]["mcc"] = ["4111.0", "5411.0", "5812.0"]
    del manifest["preprocessing"]["impute_categories"]  # nor did the old fit impute categories
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    for path in (tmp_path / "new").iterdir():
        (old_dir / path.name).write_bytes(path.read_bytes())
    (old_dir / MANIFEST).write_bytes(seal_manifest(manifest))
    old = AnomalyModel.load(old_dir)
    assert old.preprocessor_.categories_["mcc"] == ["4111.0", "5411.0", "5812.0"]
    probe = pd.DataFrame(
        {"x": rng.normal(size=200), "y": rng.normal(size=200), "mcc": rng.choice(codes, 200)}
    )
    floats = probe.astype({"mcc": "float64"})
    expected = model.decision_function(floats)
    for rows in (floats, probe, probe.astype({"mcc": "str"})):
        np.testing.assert_array_equal(old.decision_function(rows), expected)
    assert old.predict(probe.astype({"mcc": "str"})).mean() < 0.05
