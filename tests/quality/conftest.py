"""Fixtures for the quality tests: small generated labeled data and one quickly trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

NUMERIC = ["load", "current", "pressure", "temperature"]
CATEGORICAL = ["mode"]
TARGET_FPR = 0.05


def make_records(n_normal: int, n_anomalous: int, seed: int) -> pd.DataFrame:
    """Correlated sensor-like records; anomalies break the correlations or spike one channel."""
    rng = np.random.default_rng(seed)

    def normal_rows(n: int) -> pd.DataFrame:
        load = rng.gamma(4.0, 1.0, n)
        ambient = rng.normal(0.0, 1.0, n)
        return pd.DataFrame(
            {
                "load": load,
                "current": 2.0 * load + rng.normal(0, 0.3, n),
                "pressure": 1.5 * np.sqrt(load) + 0.2 * ambient + rng.normal(0, 0.1, n),
                "temperature": 20 + 3 * ambient + 0.5 * load + rng.normal(0, 0.3, n),
                "mode": np.where(load > 4.0, "high", "low"),
            }
        )

    normal = normal_rows(n_normal)
    normal["is_anomaly"] = 0
    bad = normal_rows(n_anomalous)
    half = n_anomalous // 2
    # Broken correlation: current no longer follows the load.
    bad.loc[: half - 1, "current"] = rng.uniform(0.0, 3.0, half) + 12.0
    # Spikes in pressure.
    bad.loc[half:, "pressure"] += rng.choice([-1, 1], n_anomalous - half) * 3.0
    bad["is_anomaly"] = 1
    frame = pd.concat([normal, bad], ignore_index=True)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model (few epochs, one thread) trained on normal generated records, saved."""
    import torch

    from anomaly.config import SchemaConfig
    from anomaly.estimator.model import AnomalyModel

    torch.set_num_threads(1)
    train = make_records(1600, 0, seed=1).drop(columns=["is_anomaly"])
    model = AnomalyModel(
        target_fpr=TARGET_FPR,
        seed=0,
        device="cpu",
        schema=SchemaConfig(numeric=NUMERIC, categorical=CATEGORICAL),
        max_epochs=8,
        min_steps=150,
        threads=1,
    )
    model.fit(train)
    path = tmp_path_factory.mktemp("model") / "bundle"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def labeled_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out normal records plus labeled anomalies, as the user would pass them."""
    path = tmp_path_factory.mktemp("data") / "labeled.csv"
    make_records(600, 60, seed=2).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def records():
    """The generator itself, for tests that need their own labeled data."""
    return make_records
