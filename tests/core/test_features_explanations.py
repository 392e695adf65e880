"""Explanations name each feature's value as JSON can hold it, whatever the column's dtype."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from anomaly import AnomalyModel
from anomaly.config import SchemaConfig
from anomaly.estimator.explain import top_features

SCHEMA = SchemaConfig(
    id_field="id", time_field=None, numeric=["amount", "flag", "ok"], categorical=["merchant"]
)


def nullable_frame() -> pd.DataFrame:
    """Nullable columns, each missing in row 0: their missing value is pd.NA, not NaN."""
    return pd.DataFrame(
        {
            "amount": pd.array([None, 2.5, 3.0], dtype="Float64"),
            "flag": pd.array([None, 1, 0], dtype="Int64"),
            "ok": pd.array([None, True, False], dtype="boolean"),
            "merchant": pd.array([None, "fuel", "grocery"], dtype="string"),
            "when": pd.to_datetime([None, "2026-01-01", "2026-01-02"]),
            "plain": [np.nan, np.inf, 1.0],
        }
    )


def test_missing_values_of_every_dtype_become_null():
    frame = nullable_frame()
    names = list(frame.columns)
    shares = np.tile(np.linspace(1, 0.5, len(names)), (3, 1))
    out = top_features(frame, names, shares, np.arange(3), top=len(names))
    assert [item["value"] for item in out[0]] == [None] * len(names)
    assert [item["value"] for item in out[1]][:4] == [2.5, 1, True, "fuel"]
    assert out[1][5]["value"] is None  # an infinity is no JSON number either
    json.dumps(out[:1], allow_nan=False)


def test_a_models_explanations_of_nullable_columns_are_json():
    rng = np.random.default_rng(0)
    n = 300
    train = pd.DataFrame(
        {
            "id": np.arange(n),
            "amount": rng.lognormal(3, 1, n),
            "flag": (rng.random(n) < 0.1).astype(int),
            "ok": rng.random(n) < 0.5,
            "merchant": rng.choice(["fuel", "grocery", "online"], n),
        }
    )
    model = AnomalyModel(target_fpr=0.05, seed=0, device="cpu", schema=SCHEMA, detectors=("knn",))
    model.fit(train)
    probe = nullable_frame()[["amount", "flag", "ok", "merchant"]].assign(id=[0, 1, 2])
    explained = model.explain(probe, top=4)
    assert {item["feature"]: item["value"] for item in explained[0]} == {
        "amount": None,
        "flag": None,
        "ok": None,
        "merchant": None,
    }
    json.dumps(explained, allow_nan=False)
