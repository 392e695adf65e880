"""What the reliability scenarios share: ``anomaly serve`` subprocesses, a paced producer, memory
sampling, the exactly-once accounting against the database, and the figures each scenario reports.

Nothing is mocked: the service is the real ``anomaly serve`` command, the broker the embedded Tansu,
the database the real PostgreSQL. Sizes come from environment variables so that CI runs small
versions and the documented commands (docs/reliability.md) run the full ones with the same code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]

# The streams tests' fixtures and Kafka helpers, loaded from their file (not copied).
_spec = importlib.util.spec_from_file_location(
    "_streams_test_fixtures", ROOT / "tests" / "streams" / "conftest.py"
)
streams_fixtures = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules[_spec.name] = streams_fixtures
_spec.loader.exec_module(streams_fixtures)  # type: ignore[union-attr]
LABELS = streams_fixtures.LABELS
bad_records = streams_fixtures.bad_records
end_offsets = streams_fixtures.end_offsets
committed_offsets = streams_fixtures.committed_offsets
consume_all = streams_fixtures.consume_all


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def rng(name: str = "RELIABILITY_SEED") -> random.Random:
    """Seeded from ``RELIABILITY_SEED`` (default: random, printed so a failure can be re-run)."""
    seed = int(os.environ.get(name) or random.SystemRandom().randrange(1 << 30))
    print(f"{name}={seed}")
    return random.Random(seed)


# -- the service as a subprocess ----------------------------------------------------------------


class ServeProcess:
    """``anomaly serve --config PATH`` with its JSON log lines in a file."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        verbose: bool = False,
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "anomaly.cli",
                *(["--verbose"] if verbose else []),
                "serve",
                "--config",
                str(config),
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            cwd=ROOT,
        )
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float | None:
        try:
            return self.ps.memory_info().rss / 2**20
        except psutil.Error:
            return None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed, the consumer does not leave the group."""
        self.signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._log.close()

    def stop(self, timeout: float = 60) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# -- a paced producer ---------------------------------------------------------------------------


class StreamProducer(threading.Thread):
    """Produce ``values`` at about ``rate`` records/s (None: as fast as possible) in a thread."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        values: Sequence[bytes],
        rate: float | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(name="stream-producer", daemon=True)
        self.bootstrap = bootstrap
        self.topic = topic
        self.values = values
        self.rate = rate
        self.settings = settings or {}
        self.produced = 0
        self.failed: list[str] = []
        self.error: BaseException | None = None
        # Records the test has released so far (``allow``); all of them unless it holds some back.
        self.limit = len(values)

    def allow(self, n: int) -> None:
        """Produce only the first ``n`` values until allowed more (call before ``start``)."""
        self.limit = min(n, len(self.values))

    def run(self) -> None:
        from confluent_kafka import Producer

        try:
            producer = Producer(
                {"bootstrap.servers": self.bootstrap, "linger.ms": 5} | self.settings
            )

            def delivered(err: Any, _msg: Any) -> None:
                if err is not None:
                    self.failed.append(str(err))

            start = time.monotonic()
            chunk = 50
            paced = 0
            for i in range(0, len(self.values), chunk):
                while i >= self.limit:
                    time.sleep(0.02)
                    producer.poll(0)
                    start, paced = time.monotonic(), i
                for value in self.values[i : i + chunk]:
                    while True:
                        try:
                            producer.produce(self.topic, value=value, on_delivery=delivered)
                            break
                        except BufferError:
                            producer.poll(0.05)
                producer.poll(0)
                self.produced = min(i + chunk, len(self.values))
                if self.rate:
                    ahead = (self.produced - paced) / self.rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
            remaining = producer.flush(60)
            if remaining:
                self.failed.append(f"{remaining} not delivered")
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 120) -> None:
        self.join(timeout)
        assert not self.is_alive(), "producer did not finish"
        if self.error is not None:
            raise self.error
        assert not self.failed, self.failed[:3]


# -- memory -------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Sample a process's resident memory (and a progress counter) every ``every`` seconds."""

    def __init__(
        self, process: ServeProcess, every: float = 1.0, progress: Callable[[], int] | None = None
    ):
        super().__init__(name="rss-sampler", daemon=True)
        self.process = process
        self.every = every
        self.progress = progress
        self.samples: list[tuple[float, float, int | None]] = []  # (t, rss MB, progress)
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.is_set():
            rss = self.process.rss_mb()
            if rss is None:
                return
            done = None
            if self.progress is not None:
                try:
                    done = self.progress()
                except Exception:
                    done = None
            self.samples.append((round(time.monotonic() - t0, 2), round(rss, 1), done))
            self._halt.wait(self.every)

    def stop(self) -> list[tuple[float, float, int | None]]:
        self._halt.set()
        self.join(10)
        return self.samples

    @property
    def peak_mb(self) -> float:
        return max((s[1] for s in self.samples), default=0.0)


# -- accounting ---------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the database says happened to a topic's records."""

    seen: int
    scored: int
    alerted: int
    dead_lettered: int
    alert_ids: list[str]
    alert_positions: list[tuple[int, int]]
    dead_letter_kinds: list[str]
    dead_letter_positions: list[tuple[int, int]]
    offsets: dict[int, int]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, db_url: str, pipeline: str, topic: str) -> Ledger:
        from sqlalchemy import create_engine, text

        engine = create_engine(db_url)
        try:
            with engine.connect() as conn:

                def q(sql: str) -> list[tuple]:
                    return [tuple(r) for r in conn.execute(text(sql), {"p": pipeline, "t": topic})]

                [(seen, scored, alerted, dead)] = q(
                    "SELECT coalesce(sum(records_seen), 0), coalesce(sum(records_scored), 0), "
                    "coalesce(sum(records_alerted), 0), coalesce(sum(records_dead_lettered), 0) "
                    "FROM stream_stats WHERE pipeline = :p"
                )
                alerts = q(
                    "SELECT record_id, kafka_partition, kafka_offset FROM alerts "
                    "WHERE pipeline = :p AND kafka_topic = :t"
                )
                dls = q(
                    "SELECT error_kind, error_message, kafka_partition, kafka_offset "
                    "FROM dead_letters WHERE pipeline = :p AND kafka_topic = :t"
                )
                offsets = dict(
                    q(
                        "SELECT kafka_partition, next_offset FROM consumer_offsets "
                        "WHERE pipeline = :p AND kafka_topic = :t"
                    )
                )
        finally:
            engine.dispose()
        assert all(d[1] for d in dls), "a dead letter without a reason"
        return cls(
            seen=int(seen),
            scored=int(scored),
            alerted=int(alerted),
            dead_lettered=int(dead),
            alert_ids=[a[0] for a in alerts],
            alert_positions=[(a[1], a[2]) for a in alerts],
            dead_letter_kinds=[d[0] for d in dls],
            dead_letter_positions=[(d[2], d[3]) for d in dls],
            offsets={int(k): int(v) for k, v in offsets.items()},
        )

    @property
    def duplicate_alerts(self) -> int:
        return len(self.alert_ids) - len(set(self.alert_ids))

    def check_exactly_once(
        self,
        *,
        records_in: int,
        expected_alert_ids: set[str],
        expected_dead: int,
        end_offsets: dict[int, int],
    ) -> dict[str, Any]:
        """Assert every record was accounted for exactly once; return the scenario's figures."""
        figures = {
            "records_in": records_in,
            "alerts_expected": len(expected_alert_ids),
            "alerts_stored": len(self.alert_ids),
            "duplicate_alerts": self.duplicate_alerts,
            "missing_alerts": len(expected_alert_ids - set(self.alert_ids)),
            "unexpected_alerts": len(set(self.alert_ids) - expected_alert_ids),
            "dead_letters_expected": expected_dead,
            "dead_letters_stored": len(self.dead_letter_kinds),
            "records_seen": self.seen,
            "records_scored": self.scored,
        }
        assert self.seen == records_in, figures
        assert self.scored + self.dead_lettered == records_in, figures
        assert self.dead_lettered == len(self.dead_letter_kinds) == expected_dead, figures
        assert len(set(self.dead_letter_positions)) == len(self.dead_letter_positions), figures
        assert self.duplicate_alerts == 0, figures
        assert len(set(self.alert_positions)) == len(self.alert_positions), figures
        assert set(self.alert_ids) == expected_alert_ids, figures
        assert self.alerted == len(self.alert_ids), figures
        assert self.offsets == end_offsets, (self.offsets, end_offsets)
        return figures


def records_seen(db_url: str, pipeline: str) -> int:
    """Records written so far (``-1`` while the tables do not exist or the database is away)."""
    from sqlalchemy import create_engine, text

    engine = _engines.get(db_url)
    if engine is None:
        engine = _engines[db_url] = create_engine(db_url, pool_size=4, max_overflow=0)
    try:
        with engine.connect() as conn:
            value = conn.execute(
                text("SELECT coalesce(sum(records_seen), 0) FROM stream_stats WHERE pipeline = :p"),
                {"p": pipeline},
            ).scalar()
            return int(value or 0)
    except Exception:
        return -1


_engines: dict[str, Any] = {}


def dispose_engines() -> None:
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()


# -- figures ------------------------------------------------------------------------------------


def report(scenario: str, figures: dict[str, Any]) -> None:
    """Print the figures and, with ``RELIABILITY_FIGURES=path``, append them as a JSON line."""
    line = json.dumps({"scenario": scenario, **figures}, default=str)
    print(line)
    path = os.environ.get("RELIABILITY_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# -- generated streams -----------------------------------------------------------------------


@dataclass
class Stream:
    """Generated records with labeled anomalies, some bad values mixed in, and what to expect."""

    values: list[bytes]
    n_valid: int
    n_bad: int
    expected_alert_ids: set[str]
    labeled_anomalies: int
    bad_kinds: list[str]


def make_stream(model, n: int, *, bad_every: int = 100, seed: int = 21) -> Stream:
    """``n`` fraud records (2% injected anomalies) and one hand-made bad value every
    ``bad_every`` records; the expected alerts are the model's own predictions on the valid ones."""
    from anomaly.synthetic.datasets import generate_fraud
    from streams.replay import encode_rows

    records = generate_fraud(n, anomaly_fraction=0.02, seed=seed)
    features = records.drop(columns=LABELS)
    expected = set(features["id"].astype(str)[model.predict(features) == 1])
    good = encode_rows(features)
    first = json.loads(good[0])
    bad = bad_records(first | {"id": "bad"}) if bad_every else []
    values: list[bytes] = []
    kinds: list[str] = []
    for i, value in enumerate(good):
        values.append(value)
        if bad and i % bad_every == bad_every - 1:
            raw, kind = bad[(i // bad_every) % len(bad)]
            values.append(raw)
            kinds.append(kind)
    return Stream(
        values=values,
        n_valid=len(good),
        n_bad=len(kinds),
        expected_alert_ids=expected,
        labeled_anomalies=int(records["is_anomaly"].sum()),
        bad_kinds=kinds,
    )


def crash_scenario(
    pg_url: str, kafka_bootstrap: str, topic: str, pipeline_file, trained_model, n_records: int
) -> tuple[Stream, Path, str]:
    """The crash scenarios' set-up: ``n_records`` of the fraud stream, the topic with 2
    partitions and a pipeline file (batches of 200, records up to 1,500 bytes); returns the
    stream, the pipeline file and the pipeline's name."""
    from anomaly.config import load_config
    from streams.broker import create_topic

    stream = make_stream(trained_model.model, n_records)
    create_topic(kafka_bootstrap, topic, partitions=2)
    config = pipeline_file(
        pg_url,
        trained_model.bundle,
        schema={"max_record_bytes": 1500},
        kafka={"batch_size": 200},
    )
    return stream, config, load_config(config).name
