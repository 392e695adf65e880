"""The demo's training workers: what goes wrong in a worker reaches the parent as it was."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from anomaly.errors import DataError
from streams.demo import SHORT, _config
from streams.demo_training import TrainingJob, train_all


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: the jobs run in this process")
def test_a_workers_error_is_raised_in_the_parent_with_its_message(tmp_path):
    cfg = _config("fraud", "127.0.0.1:9", "sqlite:///unused.db", SHORT, "0", progress=False)
    rows = pd.DataFrame({"amount": [1.0] * 50})  # the schema's other columns are missing
    jobs = [
        TrainingJob(
            name=name,
            config=cfg,
            train=rows,
            model_dir=tmp_path / name,
            labeled_path=tmp_path / "unused.parquet",
            report_dir=tmp_path / "reports",
        )
        for name in ("first", "second")
    ]
    with pytest.raises(DataError, match=r"missing column.*merchant_category"):
        train_all(jobs, progress=False)
    assert not (tmp_path / "first").exists()  # nothing was saved
