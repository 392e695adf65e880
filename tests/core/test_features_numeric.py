"""Numeric preprocessing at its edges: no numeric column at all, and huge finite values."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from anomaly import AnomalyModel
from anomaly.config import SchemaConfig
from anomaly.errors import DataError
from anomaly.features.numeric import fit_numeric_params, mean_and_std
from anomaly.features.preprocess import UNSEEN, Preprocessor

CATEGORIES_ONLY = SchemaConfig(
    id_field="id", time_field=None, numeric=[], categorical=["kind", "size"]
)


def categories_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "kind": rng.choice(["a", "b", "c"], n),
            "size": rng.choice(["s", "m"], n),
        }
    )


def test_a_preprocessor_of_categorical_features_only_transforms():
    pre = Preprocessor(CATEGORIES_ONLY).fit(categories_frame(100))
    assert pre.feature_names_out_ == [
        "kind=a", "kind=b", "kind=c", f"kind={UNSEEN}", "size=m", "size=s", f"size={UNSEEN}",
    ]  # fmt: skip
    probe = categories_frame(3).assign(kind=["a", "c", "zzz"], size=["m", "s", "m"])
    x, numeric = pre.transform_with_numeric(probe)
    assert numeric.shape == (3, 0)
    np.testing.assert_array_equal(
        x[:, [0, 1, 2, 4, 5]], [[1, 0, 0, 1, 0], [0, 0, 1, 0, 1], [0, 0, 0, 1, 0]]
    )
    assert x[2, 3] == pre.unseen_value_["kind"] > 1
    np.testing.assert_array_equal(pre.linear_view(x, numeric), x)
    again = Preprocessor.from_dict(pre.to_dict(), CATEGORIES_ONLY)
    np.testing.assert_array_equal(again.transform(probe), x)


def test_a_model_of_categorical_features_only_fits_and_scores():
    train = categories_frame(400)
    model = AnomalyModel(
        target_fpr=0.01, seed=0, device="cpu", schema=CATEGORIES_ONLY, detectors=("knn",)
    )
    model.fit(train)
    probe = categories_frame(4, seed=1).assign(kind=["a", "b", "c", "never"])
    assert model.predict(probe).tolist() == [0, 0, 0, 1]


def huge_frame(n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {"id": range(n), "x": rng.normal(size=n), "big": rng.lognormal(0, 1, n) * 1e160}
    )


@pytest.mark.parametrize("transform", ["quantile", "robust"])
def test_huge_finite_values_keep_finite_parameters(transform):
    """Their squares overflow: np.std was inf, which a bundle stores as null."""
    values = huge_frame()["big"].to_numpy()
    params = fit_numeric_params("big", values, transform, 100)
    assert np.isfinite([params.mean, params.std, params.median, params.scale]).all()
    scaled_mean, scaled_std = mean_and_std(values / 1e160)
    assert params.mean == pytest.approx(scaled_mean * 1e160, rel=1e-12)
    assert params.std == pytest.approx(scaled_std * 1e160, rel=1e-12)


def test_ordinary_values_keep_numpys_mean_and_std_bit_for_bit():
    values = np.random.default_rng(0).normal(5, 3, 1000)
    assert mean_and_std(values) == (float(np.mean(values)), float(np.std(values)))


def test_a_model_of_huge_values_saves_and_loads(tmp_path):
    schema = SchemaConfig(id_field="id", time_field=None, numeric=["x", "big"])
    frame = huge_frame()
    model = AnomalyModel(
        target_fpr=0.01, seed=0, device="cpu", schema=schema, detectors=("knn", "knn_linear")
    )
    model.fit(frame)
    model.save(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["preprocessing"]["numeric_params"]["big"]["std"] is not None
    loaded = AnomalyModel.load(tmp_path / "model")
    np.testing.assert_array_equal(
        loaded.decision_function(frame.head(20)), model.decision_function(frame.head(20))
    )


def test_parameters_that_still_overflow_are_a_data_error_naming_the_column():
    # A third at each end of the float range: the interquartile range itself overflows.
    values = np.repeat([-1.7e308, 0.0, 1.7e308], 10)
    frame = pd.DataFrame({"x": np.arange(30.0), "wide": values})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow in the quantiles
        with pytest.raises(DataError, match=r"column 'wide'.*too large"):
            Preprocessor(numeric_transform="robust").fit(frame)
