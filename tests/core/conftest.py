"""Small generated problems and one shared fitted model for the core tests.

Normal rows lie near a 2-D manifold in 6-D (plus noise), with a heavy-tailed ``amount`` column and
a categorical ``merchant``; anomalies break the correlations between features (their marginals look
normal) or are far out. Everything is seeded; torch runs with one thread.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from anomaly.config import SchemaConfig

SMALL = {"max_steps": 700, "max_epochs": 40, "batch_size": 128}
SMALL_PARAMS = {
    "vae": {"hidden": (32, 16)},
    "flow": {"hidden": (32, 32), "transforms": 3},
    "gan": {"hidden": (32, 32)},
    "knn": {},
}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)


def manifold_rows(n: int, rng: np.random.Generator, d: int = 6) -> np.ndarray:
    mixing = np.random.default_rng(123).normal(size=(2, d))
    z = rng.normal(size=(n, 2))
    return (z @ mixing + 0.2 * rng.normal(size=(n, d))).astype(np.float32)


def anomaly_rows(n: int, rng: np.random.Generator, d: int = 6) -> np.ndarray:
    """Half off-manifold with normal-looking marginals, half shifted far out."""
    ref = manifold_rows(4000, np.random.default_rng(7), d)
    std = ref.std(0)
    off = rng.normal(size=(n - n // 2, d)) * std  # independent columns: correlations broken
    far = manifold_rows(n // 2, rng, d) + rng.choice([-1, 1], size=(n // 2, d)) * 3 * std
    return np.vstack([off, far]).astype(np.float32)


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = train.mean(0), train.std(0)
    return [((a - mu) / sd).astype(np.float32) for a in (train, *others)]


@pytest.fixture(scope="session")
def array_problem():
    """(train normal, eval rows, eval labels) as standardised float32 arrays."""
    rng = np.random.default_rng(0)
    train = manifold_rows(2000, rng)
    normal = manifold_rows(600, rng)
    anomalous = anomaly_rows(150, rng)
    train, normal, anomalous = standardise(train, normal, anomalous)
    x_eval = np.vstack([normal, anomalous])
    y_eval = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return train, x_eval, y_eval


SCHEMA = SchemaConfig(
    id_field="id",
    time_field="event_time",
    entity_field="card",
    numeric=["amount", "f0", "f1", "f2", "f3", "f4", "f5"],
    categorical=["merchant"],
    missing="impute",
)


def record_frame(x: np.ndarray, rng: np.random.Generator, start_id: int = 0) -> pd.DataFrame:
    n = len(x)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    frame.insert(0, "amount", np.round(np.exp(rng.normal(3.0, 1.2, n)), 2))
    frame.insert(0, "card", rng.integers(0, 50, n).astype(str))
    frame.insert(0, "event_time", pd.Timestamp("2026-01-01", tz="UTC").isoformat())
    frame.insert(0, "id", np.arange(start_id, start_id + n))
    frame["merchant"] = rng.choice(
        ["grocery", "fuel", "online", "travel"], n, p=[0.4, 0.3, 0.2, 0.1]
    )
    return frame


@pytest.fixture(scope="session")
def frame_problem():
    rng = np.random.default_rng(1)
    train = record_frame(manifold_rows(2400, rng), rng)
    normal = record_frame(manifold_rows(600, rng), rng, start_id=10_000)
    anomalous = record_frame(anomaly_rows(100, rng), rng, start_id=20_000)
    return train, normal, anomalous


@pytest.fixture(scope="session")
def fitted_model(frame_problem):
    from anomaly import AnomalyModel

    train, _, _ = frame_problem
    model = AnomalyModel(
        target_fpr=0.01, seed=0, device="cpu", schema=SCHEMA, detector_params=SMALL_PARAMS, **SMALL
    )
    return model.fit(train)


@pytest.fixture(scope="session")
def saved_bundle(fitted_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "model"
    fitted_model.save(path)
    return path
