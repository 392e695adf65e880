"""The demo's training step: both example pipelines fit side by side, one process each.

Training is most of the demo's time and each model fits on one torch thread, so on a machine with
two or more cores the pipelines train at once, each in a worker process (``python -m
streams.demo_training JOB``; a forked copy of a process that already runs torch's thread pools
can hang). Threads would not do: the small networks' training loops hold the GIL for much of each
step, and torch's global RNG, which seeds each network's initial weights, is shared by the
threads of a process, so the demo would no longer give the same models for the same seed.

A worker fits, saves the bundle and evaluates it on the labeled stream, and returns what the
parent needs to register the model: the parent keeps the database, the broker and the terminal.
Ctrl-C is the parent's alone (``streams.demo._Interrupts``): each worker runs in a session of its
own, so a terminal's Ctrl-C, sent to the foreground process group, cannot interrupt one
mid-import and print its traceback; the parent terminates them (SIGTERM) instead. The job goes
to the worker and its outcome comes back as pickles in a private temporary directory: both ends
are this same code.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomaly.errors import UserFacingError


@dataclass(frozen=True)
class TrainingJob:
    name: str
    config: Any  # anomaly.config.PipelineConfig
    train: Any  # pandas.DataFrame of normal records
    model_dir: Path
    labeled_path: Path  # the stream with its labels, for the offline evaluation
    report_dir: Path


@dataclass(frozen=True)
class TrainedModel:
    name: str
    version: str
    model_dir: Path
    bundle_sha256: str
    metrics: dict[str, Any]
    seconds: float
    report: str  # path of the HTML evaluation report
    evaluation: dict[str, float]  # ensemble AUROC and AUPRC on the labeled stream; {} if none


def train_all(jobs: list[TrainingJob], progress: bool) -> list[TrainedModel]:
    """Fit, save and evaluate every job: at once, one worker process each, where there is a core
    for each, else one after another here. On any exception (KeyboardInterrupt included) the
    workers still running are terminated."""
    if len(jobs) <= 1 or _usable_cores() < len(jobs):
        return [_fit_save_evaluate(job) for job in jobs]
    with tempfile.TemporaryDirectory(prefix="anomaly-demo-") as scratch:
        workers = []
        try:
            for position, job in enumerate(jobs):
                job_path = Path(scratch) / f"{job.name}.job"
                job_path.write_bytes(pickle.dumps(job))
                workers.append(
                    subprocess.Popen(
                        # -P: the package this process runs, not one that happens to share its
                        # name in the current directory.
                        [sys.executable, "-P", "-m", "streams.demo_training", str(job_path)],
                        env={**os.environ, **_progress_bars_of(job.name, position, progress)},
                        # Its own session: a terminal's Ctrl-C or hang-up is not sent to it.
                        start_new_session=True,
                    )
                )
            outcomes: dict[int, TrainedModel] = {}
            while len(outcomes) < len(jobs):
                # The first failure is raised as soon as it is known (and the others stopped).
                for i, (job, worker) in enumerate(zip(jobs, workers, strict=True)):
                    if i not in outcomes and worker.poll() is not None:
                        outcomes[i] = _outcome(Path(scratch) / f"{job.name}.job", worker.returncode)
                time.sleep(0.1)
            return [outcomes[i] for i in range(len(jobs))]
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
                worker.wait()


class TrainingWorkerError(UserFacingError, RuntimeError):
    """A training worker that ended without a result: killed (out of memory?) or crashed."""


def _usable_cores() -> int:
    """The cores this process may run on (its affinity, as a container's cpuset sets it), not
    the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _signal_name(number: int) -> str:
    """SIGKILL, or "signal 40" for one ``signal.Signals`` has no name for (real-time signals)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _outcome(job_path: Path, returncode: int) -> TrainedModel:
    """What the worker left beside its job: the model, or the exception to raise here."""
    result = job_path.with_suffix(".result")
    if not result.exists():
        how = (
            f"was killed by {_signal_name(-returncode)}"
            if returncode < 0
            else f"exited with status {returncode}"
        )
        raise TrainingWorkerError(
            f"the worker training {job_path.stem} {how} before it had a model"
            " (out of memory? its output above says more)"
        )
    outcome = pickle.loads(result.read_bytes())
    if isinstance(outcome, BaseException):
        raise outcome  # as if the fit had run in this process
    return outcome


def _progress_bars_of(name: str, position: int, progress: bool) -> dict[str, str]:
    """The environment that puts a worker's progress bars on line ``position`` below the
    cursor, named by pipeline (tqdm takes its defaults from TQDM_* variables; the detectors set
    only each bar's description)."""
    if not progress:  # the job's config says so too
        return {}
    return {
        "TQDM_POSITION": str(position),
        "TQDM_BAR_FORMAT": f"[{name}] {{l_bar}}{{bar}}{{r_bar}}",
    }


def _fit_save_evaluate(job: TrainingJob) -> TrainedModel:
    from anomaly.estimator.model import AnomalyModel

    started = time.monotonic()
    model = AnomalyModel.from_config(job.config).fit(job.train)
    seconds = time.monotonic() - started
    if job.model_dir.exists():
        import shutil

        shutil.rmtree(job.model_dir)
    version = model.save(job.model_dir)
    report, evaluation = _evaluate(job)
    return TrainedModel(
        name=job.name,
        version=version,
        model_dir=job.model_dir,
        bundle_sha256=model.bundle_sha256_,  # the identity serve compares with the bundle on disk
        metrics={k: v for k, v in model.metrics_.items() if k != "training"},
        seconds=seconds,
        report=report,
        evaluation=evaluation,
    )


def _evaluate(job: TrainingJob) -> tuple[str, dict[str, float]]:
    from anomaly.evaluation.run import run_evaluation

    result, html_path, _ = run_evaluation(
        model_dir=str(job.model_dir),
        data_path=str(job.labeled_path),
        label="is_anomaly",
        report_dir=str(job.report_dir),
        top_rows=10,
        device="cpu",
    )
    ens = result.detectors.get("ensemble")
    return str(html_path), ({"auroc": ens.auroc, "auprc": ens.auprc} if ens else {})


def main(job_path: str) -> None:
    """A worker: run the job pickled at ``job_path`` (written by ``train_all`` of this same
    code) and leave the model, or the exception that stopped it, beside it."""
    path = Path(job_path)
    job = pickle.loads(path.read_bytes())
    try:
        outcome: TrainedModel | Exception = _fit_save_evaluate(job)
    except Exception as exc:
        outcome = exc
    partial = path.with_suffix(".partial")
    partial.write_bytes(pickle.dumps(outcome))
    partial.rename(path.with_suffix(".result"))  # whole or absent


if __name__ == "__main__":
    # Through the module's own name, not ``__main__``, so that the pickled outcome names classes
    # the parent can find.
    from streams.demo_training import main as run_job

    run_job(sys.argv[1])
