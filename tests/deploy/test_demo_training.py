"""The demo's training workers: what goes wrong in a worker reaches the parent as it was."""

from __future__ import annotations

import os
import signal
import threading
import time

import pandas as pd
import pytest

from anomaly.errors import DataError
from anomaly.synthetic.datasets import generate
from streams.demo import SHORT, _config
from streams.demo_training import (
    TrainingJob,
    TrainingWorkerError,
    _outcome,
    _usable_cores,
    train_all,
)
from tests.demo_helpers import training_workers

needs_two_cores = pytest.mark.skipif(
    _usable_cores() < 2, reason="one core: the jobs run in this process"
)


def _jobs(tmp_path, rows: pd.DataFrame) -> list[TrainingJob]:
    cfg = _config("fraud", "127.0.0.1:9", "sqlite:///unused.db", SHORT, "0", progress=False)
    return [
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


@needs_two_cores
def test_a_workers_error_is_raised_in_the_parent_with_its_message(tmp_path):
    rows = pd.DataFrame({"amount": [1.0] * 50})  # the schema's other columns are missing
    with pytest.raises(DataError, match=r"missing column.*merchant_category"):
        train_all(_jobs(tmp_path, rows), progress=False)
    assert not (tmp_path / "first").exists()  # nothing was saved


@needs_two_cores
def test_a_killed_worker_is_one_line_that_says_so_and_the_other_is_stopped(tmp_path):
    psutil = pytest.importorskip("psutil")
    rows = generate("fraud", 2000, 0.0, seed=0).drop(columns=["is_anomaly", "anomaly_kind"])
    failure: list[BaseException] = []

    def run() -> None:
        try:
            train_all(_jobs(tmp_path, rows), progress=False)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    workers = training_workers(os.getpid())
    assert len(workers) == 2
    time.sleep(1.0)  # into the imports or the fit
    workers[0].kill()
    thread.join(10)  # not the other worker's whole fit
    assert not thread.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], TrainingWorkerError), failure
    assert str(failure[0]).startswith("the worker training first was killed by SIGKILL")
    assert "\n" not in str(failure[0])
    # The other was stopped, not waited for.
    assert not workers[1].is_running() or workers[1].status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "second").exists()


def test_a_worker_killed_by_a_signal_without_a_name_is_still_one_line(tmp_path):
    # signal.Signals has no member for most real-time signals (SIGRTMIN + 1 ...).
    number = signal.SIGRTMIN + 1
    with pytest.raises(TrainingWorkerError, match=rf"killed by signal {number} before"):
        _outcome(tmp_path / "fraud.job", -number)
