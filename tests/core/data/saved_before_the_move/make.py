"""How this directory was made: run with main's code (b4062e4, before anomaly/ was split into
subpackages), from outside any worktree:

    cd /tmp && PYTHONPATH=/path/to/main python make.py OUT_DIR

It fits a tiny model, saves it to OUT_DIR/bundle and writes probe rows and their scores.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import anomaly
from anomaly import AnomalyModel
from anomaly.config import SchemaConfig


def rows(rng: np.random.Generator, n: int) -> pd.DataFrame:
    z = rng.normal(size=(n, 1))
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "a": np.round(z[:, 0] + 0.1 * rng.normal(size=n), 4),
            "b": np.round(2 * z[:, 0] + 0.1 * rng.normal(size=n), 4),
            "amount": np.round(np.exp(rng.normal(3, 1, n)), 2),
            "kind": rng.choice(["x", "y", "z"], n),
        }
    )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(5)
    schema = SchemaConfig(id_field="id", numeric=["a", "b", "amount"], categorical=["kind"])
    model = AnomalyModel(
        target_fpr=0.05,
        seed=0,
        device="cpu",
        schema=schema,
        max_epochs=3,
        min_steps=10,
        max_steps=20,
        batch_size=64,
        detector_params={
            "vae": {"hidden": (8, 4)},
            "flow": {"hidden": (8, 8), "transforms": 2},
            "gan": {"hidden": (8, 8)},
            "knn": {"max_reference": 64},
        },
    )
    model.fit(rows(rng, 240))
    model.version = "saved-before-the-move"
    model.save(out / "bundle")
    probe = rows(rng, 12)
    probe.loc[3, "b"] = 9.0
    probe.loc[7, "kind"] = "never-seen"
    probe.to_csv(out / "probe.csv", index=False)
    scores = model.score_detectors(probe)
    saved_by = f"anomaly-monitor {anomaly.__version__}, {anomaly.__file__} (main before the move)"
    payload = {
        "columns": list(scores.columns),
        "rows": scores.to_numpy().tolist(),
        "saved_by": saved_by,
    }
    (out / "probe_scores.json").write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
