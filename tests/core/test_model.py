"""AnomalyModel end to end on a DataFrame with a schema: scores, explanations, the scorer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from anomaly import AnomalyModel
from anomaly.config import config_from_dict
from anomaly.errors import DataError, NotFittedError
from anomaly.estimator.detectors.registry import ALL_DETECTORS
from anomaly.estimator.model import SCORE_COLUMNS, SmallDataWarning
from anomaly.scoring.scorer import BatchScorer, EmulatedBf16Warning, cpu_has_native_bf16

from .conftest import SCHEMA

# The pipeline config's schema section for the frames of ``frame_problem``.
SCHEMA_SECTION = {
    "id_field": "id",
    "entity_field": "card",
    "numeric": SCHEMA.numeric,
    "categorical": ["merchant"],
}


def test_score_detectors_contract_and_auroc(fitted_model, frame_problem):
    _, normal, anomalous = frame_problem
    rows = pd.concat([normal, anomalous], ignore_index=True)
    y = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    table = fitted_model.score_detectors(rows)
    assert list(table.columns) == SCORE_COLUMNS and len(table) == len(rows)
    assert np.isfinite(table.to_numpy()).all()
    for col in ("vae", "flow", "gan", "ensemble"):
        assert roc_auc_score(y, table[col]) > 0.9, col
        assert table[f"{col}_p"].between(0, 1).all()
    np.testing.assert_array_equal(
        fitted_model.decision_function(rows), table["ensemble"].to_numpy()
    )
    pred = fitted_model.predict(rows)
    assert set(np.unique(pred)) <= {0, 1} and pred[len(normal) :].mean() > 0.5


def test_explain_names_the_feature_that_was_changed(fitted_model, frame_problem):
    _, normal, _ = frame_problem
    rows = normal.head(4).copy()
    rows["f2"] += 8.0
    explanations = fitted_model.explain(rows, top=3)
    assert len(explanations) == 4
    for row, items in zip(rows.itertuples(), explanations, strict=True):
        assert len(items) == 3 and items[0]["feature"] == "f2"
        assert items[0]["value"] == pytest.approx(row.f2)
        assert set(items[0]) == {"feature", "value", "contribution"}
        assert items[0]["contribution"] >= items[1]["contribution"] >= items[2]["contribution"]


def test_batch_scorer_matches_model_and_explains_only_alerts(fitted_model, frame_problem):
    _, normal, anomalous = frame_problem
    rows = pd.concat([normal.head(300), anomalous.head(20)], ignore_index=True)
    scorer = BatchScorer(fitted_model, device="auto", batch_size=64, threads=1)
    assert scorer.device in {"cpu", "cuda", "mps"}
    result = scorer.score(rows)
    expected = fitted_model.score_detectors(rows)
    np.testing.assert_allclose(result.scores.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.is_alert, expected["ensemble_p"].to_numpy() <= 0.01)
    assert result.is_alert[300:].sum() >= 15
    for i in range(len(rows)):
        if result.is_alert[i]:
            assert result.severity[i] in {"low", "medium", "high", "critical"}
            assert len(result.top_features[i]) == 3
        else:
            assert result.severity[i] is None and result.top_features[i] == ()
        expected_fired = [d for d in ALL_DETECTORS if expected[f"{d}_p"][i] <= 0.01]
        assert list(result.fired[i]) == expected_fired
    empty = scorer.score(rows.iloc[:0])
    assert len(empty) == 0


def test_from_config_and_bad_input(frame_problem):
    cfg = config_from_dict(
        {
            "name": "cards",
            "schema": SCHEMA_SECTION,
            "model": {
                "target_fpr": 0.02,
                "seed": 3,
                "detectors": ["vae", "gan"],
                "max_epochs": 2,
                "progress": False,
            },
        },
        environ={},
    )
    model = AnomalyModel.from_config(cfg)
    assert model.target_fpr == 0.02 and model.seed == 3 and model.detectors == ("vae", "gan")
    with pytest.raises(NotFittedError):
        model.predict(frame_problem[1])
    train = frame_problem[0]
    with pytest.raises(DataError, match="only 19 normal rows"):
        model.fit(train.head(19))
    bad = train.head(200).astype({"f3": object})
    bad.loc[123, "f3"] = "broken"
    with pytest.raises(DataError, match=r"column 'f3', row 123: 'broken' is not a number"):
        model.fit(bad)
    with pytest.raises(DataError, match=r"missing column.*merchant"):
        model.fit(train.drop(columns=["merchant"]))
    model.fit(train.head(400))
    table = model.score_detectors(frame_problem[1].head(10))
    assert table[["flow", "flow_p"]].isna().all().all() and table["vae"].notna().all()


def test_version_before_and_after_fit(frame_problem):
    model = AnomalyModel(seed=0, device="cpu", detectors=["vae"], max_epochs=1, min_steps=0)
    assert model.version is None
    model.fit(frame_problem[0].head(300)[SCHEMA.numeric].to_numpy())
    assert model.version.startswith("unsaved-")


@pytest.mark.gpu
@pytest.mark.parametrize("device_steps", [True, False], ids=["device-steps", "host-steps"])
def test_cuda_scores_match_cpu(fitted_model, frame_problem, device_steps):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, normal, anomalous = frame_problem
    rows = pd.concat([normal, anomalous], ignore_index=True)
    cpu_result = BatchScorer(fitted_model, device="cpu").score(rows)
    gpu_result = BatchScorer(fitted_model, device="cuda", device_steps=device_steps).score(rows)
    fitted_model.to("cpu")
    cpu, gpu = cpu_result.scores, gpu_result.scores
    assert np.mean(cpu_result.is_alert != gpu_result.is_alert) < 0.01
    for col in ("vae", "flow", "gan", "knn"):
        np.testing.assert_allclose(gpu[col], cpu[col], rtol=1e-3, atol=1e-3)
    # p-values are ranks: float noise may move a row across one calibration score, rarely.
    assert np.mean(np.abs(gpu["ensemble_p"] - cpu["ensemble_p"]) > 0.01) < 0.01
    # The ensemble score is a mean of the members' -log10(p): it moves with a member's p-value
    # where float noise moved the row across one of that member's calibration scores, and agrees
    # to float precision everywhere else.
    moved = np.zeros(len(cpu), dtype=bool)
    for col in fitted_model.detectors:
        moved |= ~np.isclose(gpu[f"{col}_p"], cpu[f"{col}_p"], rtol=1e-4, atol=0.0)
    close = np.isclose(gpu["ensemble"], cpu["ensemble"], rtol=1e-3, atol=1e-3)
    assert np.all(close | moved) and moved.mean() < 0.01


def test_bf16_autocast_keeps_the_ranking_and_the_alerts(fitted_model, frame_problem):
    """serve.bf16 on the CPU: matmuls in bfloat16 (float32 accumulation) move scores slightly;
    the ranking of rows and the alert decisions must survive it."""
    _, normal, anomalous = frame_problem
    rows = pd.concat([normal, anomalous], ignore_index=True)
    fp32 = BatchScorer(fitted_model, device="cpu").score(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmulatedBf16Warning)  # (tested below)
        bf16 = BatchScorer(fitted_model, device="cpu", bf16=True).score(rows)
    for col in ("vae", "flow", "gan", "ensemble"):
        a, b = fp32.scores[col].to_numpy(), bf16.scores[col].to_numpy()
        assert not np.array_equal(a, b), f"{col}: bf16 changed nothing; is autocast on?"
        assert np.corrcoef(a, b)[0, 1] > 0.99, col
    assert np.mean(fp32.is_alert != bf16.is_alert) <= 0.01
    assert bf16.is_alert[len(normal) :].mean() > 0.5


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_native_bf16_is_read_from_the_cpu_instructions():
    """The CPU's flags say whether it has bfloat16 instructions; oneDNN's 'bf16 supported' is
    also true on AVX512 CPUs without them, where bf16 is emulated (and slower)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_bf16_on_a_cpu_without_bf16_instructions_warns(fitted_model):
    """Emulated bf16 is several times slower than float32: a scorer asked for it there says so;
    where the CPU has the instructions (or on another device) it stays quiet."""
    native = cpu_has_native_bf16()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BatchScorer(fitted_model, device="cpu", bf16=True)
        BatchScorer(fitted_model, device="cpu", bf16=False)
    emulated = [w for w in caught if issubclass(w.category, EmulatedBf16Warning)]
    assert len(emulated) == (1 if native is False else 0)
    if emulated:
        assert "serve.bf16: false" in str(emulated[0].message)


def test_small_data_fits_with_a_warning_about_calibration(frame_problem):
    """hepatitis leaves 33 normal training rows: a model must still fit on 20-odd rows, and say
    what its calibration can promise."""
    train, normal, anomalous = frame_problem
    rows = pd.concat([normal.head(50), anomalous.head(50)])
    model = AnomalyModel(
        target_fpr=0.01, seed=0, device="cpu", schema=SCHEMA, max_steps=200, min_generative_rows=0
    )
    with pytest.warns(SmallDataWarning, match=r"only 24 normal rows: .* 1/11") as caught:
        model.fit(train.head(24))
    assert model.training_["n_calibration"] == 10 and model.training_["n_train"] == 14
    assert any("cannot reach target_fpr" in str(w.message) for w in caught.list)
    table = model.score_detectors(rows)
    assert np.isfinite(table[["ensemble", *ALL_DETECTORS]].to_numpy()).all()
    assert table["ensemble_p"].min() >= 1 / 11


def test_below_min_generative_rows_the_knn_detectors_score_alone(frame_problem, tmp_path):
    """With fewer normal rows than min_generative_rows (default 200) the generative detectors are
    left out, with a warning that names them, unless no neighbour detector is among the
    detectors."""
    train, normal, anomalous = frame_problem
    rows = pd.concat([normal.head(50), anomalous.head(50)])
    model = AnomalyModel(target_fpr=0.01, seed=0, device="cpu", schema=SCHEMA, max_steps=50)
    with pytest.warns(SmallDataWarning, match=r"vae, flow, gan detector\(s\) are left out"):
        model.fit(train.head(150))
    assert list(model.detectors_) == ["knn", "knn_linear"]
    assert model.ensemble_weights_ == [0.5, 0.5]
    table = model.score_detectors(rows)
    assert table[["vae", "flow", "gan"]].isna().all().all()
    # The ensemble is the two neighbour members' evidence alone.
    logs = [
        -np.log10(model.calibrators_[d].tail_pvalues(table[d].to_numpy())) for d in model.detectors_
    ]
    np.testing.assert_allclose(table["ensemble"], (logs[0] + logs[1]) / 2, rtol=1e-12)
    assert table["ensemble"].iloc[50:].mean() > table["ensemble"].iloc[:50].mean()
    model.save(tmp_path / "small")
    assert AnomalyModel.load(tmp_path / "small").metrics_["detectors"] == ["knn", "knn_linear"]
    one = AnomalyModel(seed=0, device="cpu", schema=SCHEMA, detectors=["gan", "knn"], max_steps=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallDataWarning)
        assert list(one.fit(train.head(150)).detectors_) == ["knn"]
    alone = AnomalyModel(seed=0, device="cpu", schema=SCHEMA, detectors=["flow"], max_steps=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallDataWarning)
        assert list(alone.fit(train.head(150)).detectors_) == ["flow"]
    assert list(AnomalyModel(seed=0, device="cpu", schema=SCHEMA, max_steps=50)
                .fit(train.head(200)).detectors_) == list(ALL_DETECTORS)  # fmt: skip


def test_ensemble_weights_each_view_then_each_kind_of_evidence_once(fitted_model, frame_problem):
    """Half the weight to each view of the features (quantile-mapped, linear); within the
    quantile view half to the generative detectors (shared), half to the neighbour distance; the
    ensemble score is that weighted mean of -log10 of the members' tail p-values."""
    from anomaly.estimator.ensemble import member_weights

    assert member_weights(ALL_DETECTORS) == [1 / 12, 1 / 12, 1 / 12, 1 / 4, 1 / 2]
    assert member_weights(["vae", "flow", "gan", "knn"]) == [1 / 6, 1 / 6, 1 / 6, 1 / 2]
    assert member_weights(["vae", "flow", "knn_linear"]) == [1 / 4, 1 / 4, 1 / 2]
    assert member_weights(["knn", "knn_linear"]) == [1 / 2, 1 / 2]
    assert member_weights(["vae", "gan"]) == [1 / 2, 1 / 2]
    assert member_weights(["flow", "knn"]) == [1 / 2, 1 / 2]
    with pytest.raises(ValueError, match="lof"):
        member_weights(["vae", "lof"])
    _, normal, _ = frame_problem
    raw, _ = fitted_model._raw_scores(*fitted_model.preprocessor_.transform_with_numeric(normal))
    logs = [-np.log10(fitted_model.calibrators_[d].tail_pvalues(raw[d])) for d in ALL_DETECTORS]
    expected = sum(w * v for w, v in zip(fitted_model.ensemble_weights_, logs, strict=True))
    np.testing.assert_allclose(fitted_model.decision_function(normal), expected, rtol=1e-12)


def test_knn_alone_is_saved_scored_and_explained(frame_problem, tmp_path):
    """The knn member stands on its own: fit on normal rows, saved in the bundle (reference rows
    as a tensor), scored by BatchScorer, and explained by the features that put an alert row
    away from its nearest normal neighbour."""
    train, normal, anomalous = frame_problem
    model = AnomalyModel(target_fpr=0.01, seed=0, device="cpu", schema=SCHEMA, detectors=["knn"])
    model.fit(train)
    rows = pd.concat([normal.head(300), anomalous.head(50)], ignore_index=True)
    y = np.r_[np.zeros(300), np.ones(50)]
    assert roc_auc_score(y, model.decision_function(rows)) > 0.9
    model.save(tmp_path / "knn")
    loaded = AnomalyModel.load(tmp_path / "knn")
    np.testing.assert_array_equal(
        loaded.score_detectors(rows).to_numpy(), model.score_detectors(rows).to_numpy()
    )
    result = BatchScorer(loaded, device="cpu", batch_size=64, threads=1).score(rows)
    assert result.is_alert[300:].sum() >= 10
    shifted = normal.head(1).copy()
    shifted["f4"] += 50.0
    assert loaded.explain(shifted, top=1)[0][0]["feature"] == "f4"


def test_pipeline_config_sets_detector_params(frame_problem):
    """``model.detector_params`` in a pipeline config reaches the detectors (here: a smaller
    neighbour reference set), and a name that is not a detector or not one of its parameters
    is refused when the model is built, naming it."""
    train, _, _ = frame_problem
    raw = {
        "name": "cards",
        "schema": SCHEMA_SECTION,
        "model": {"detectors": ["knn"], "detector_params": {"knn": {"max_reference": 64}}},
    }
    model = AnomalyModel.from_config(config_from_dict(raw, environ={}), device="cpu")
    model.fit(train)
    assert len(train) > 64 and model.detectors_["knn"].module_.reference.shape[0] == 64
    raw["model"]["detector_params"] = {"knn": {"max_refs": 64}}
    with pytest.raises(ValueError, match=r"detector_params\.knn: unknown parameter\(s\) max_refs"):
        AnomalyModel.from_config(config_from_dict(raw, environ={}))
    raw["model"]["detector_params"] = {"knnn": {}}
    with pytest.raises(ValueError, match=r"unknown detector\(s\) knnn"):
        AnomalyModel.from_config(config_from_dict(raw, environ={}))


def test_a_category_never_seen_in_training_alerts_in_the_neighbour_detectors():
    """Card data (the fraud example's schema, four categorical columns): a purchase in a merchant
    category no training row had is flagged by its rarity in the one-hot block, so the knn
    members see it. As a plain 1 in the unseen bucket it was one mismatch, as far from its
    neighbours as an ordinary purchase in a rarely combined category, and most went unflagged."""
    import yaml

    from anomaly.synthetic.datasets import generate_fraud

    example = Path(__file__).resolve().parents[2] / "examples" / "fraud.yaml"
    cfg = config_from_dict(
        {"name": "fraud", "schema": yaml.safe_load(example.read_text())["schema"]}, environ={}
    )
    labels = ["is_anomaly", "anomaly_kind"]
    model = AnomalyModel.from_config(
        cfg, target_fpr=0.01, detectors=["knn", "knn_linear"], progress=False, threads=1
    ).fit(generate_fraud(3000, anomaly_fraction=0.0, seed=1).drop(columns=labels))
    normal = generate_fraud(400, anomaly_fraction=0.0, seed=2).drop(columns=labels)
    new_category = normal.assign(merchant_category="never-seen-in-training")
    assert model.preprocessor_.unseen_value_["merchant_category"] == model.preprocessor_.clip
    alerts = model.score_detectors(new_category)["ensemble_p"].to_numpy() <= 0.01
    assert alerts.all()
    # Normal purchases keep their rate (test_preprocess: a missing category, imputed, is not
    # flagged).
    normal_alerts = model.score_detectors(normal)["ensemble_p"].to_numpy() <= 0.01
    assert normal_alerts.mean() < 0.05
