"""Prometheus metrics, the health endpoints and structured logs of the scoring service.

Metric names and labels are a contract (docs/architecture.md): the Grafana dashboards query them.
Each ``ServiceMetrics`` has its own registry, so several services (tests, two pipelines in one
process) never collide. ``MetricsServer`` serves ``/metrics``, ``/healthz`` (the process is alive)
and ``/readyz`` (partitions assigned, model loaded and the database reachable).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Micro-batches take milliseconds to seconds; records wait from milliseconds to minutes.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 50000)

T = TypeVar("T")


class ServiceMetrics:
    """The service's metrics, all labelled with the pipeline name."""

    def __init__(self, pipeline: str, registry: CollectorRegistry | None = None) -> None:
        self.pipeline = pipeline
        self.registry = registry or CollectorRegistry()
        self._records_and_stages()
        self._service_state()
        self._alertmanager()
        self._drift_state()

    def _new(self, kind: type[T], name: str, doc: str, *labels: str, **kwargs: Any) -> T:
        """A metric of this registry, labelled with the pipeline and ``labels``."""
        return kind(name, doc, ["pipeline", *labels], registry=self.registry, **kwargs)

    def _records_and_stages(self) -> None:
        """What the stream does: records, batches and the time per stage."""
        p, new = self.pipeline, self._new
        consumed = new(Counter, "anomaly_records_consumed", "Records read from Kafka")
        scored = new(Counter, "anomaly_records_scored", "Records scored by the model")
        self.consumed, self.scored = consumed.labels(p), scored.labels(p)
        self._alerted = new(
            Counter, "anomaly_records_alerted", "Records over the alert threshold", "severity"
        )
        self._dead = new(
            Counter, "anomaly_records_dead_lettered", "Records sent to the dead-letter topic",
            "reason",
        )  # fmt: skip
        self.batch_size = new(
            Histogram, "anomaly_batch_size", "Records per micro-batch", buckets=BATCH_BUCKETS
        ).labels(p)
        self._stage = new(
            Histogram, "anomaly_stage_seconds", "Seconds per micro-batch stage", "stage",
            buckets=STAGE_BUCKETS,
        )  # fmt: skip
        self.end_to_end = new(
            Histogram, "anomaly_end_to_end_seconds", "From the record's event time to its commit",
            buckets=E2E_BUCKETS,
        ).labels(p)  # fmt: skip
        self._lag = new(
            Gauge, "anomaly_consumer_lag",
            "Records behind the partition end (librdkafka statistics)", "topic", "partition",
        )  # fmt: skip
        self.stage = {
            name: self._stage.labels(p, name) for name in ("decode", "score", "write", "commit")
        }

    def _service_state(self) -> None:
        """What the service runs with and whether its dependencies are there."""
        p, new = self.pipeline, self._new
        self._device = new(Gauge, "anomaly_scoring_device_info", "The device that scores", "device")
        self._version = new(
            Gauge, "anomaly_model_version_info", "The model version that scores", "version"
        )
        # 0 while the active version's bundle is refused because it is not the bundle that was
        # registered (or its manifest was edited): the service scores with an older model, or
        # (at start) not at all. A gauge, not a counter of refusals: the switch is retried every
        # serve.model_poll_s, so a counter would count polls rather than bad bundles.
        # No series until a bundle was checked (a 0 before the first load would read as a refusal).
        self._model_identity_ok = new(
            Gauge, "anomaly_model_identity_ok",
            "1 while the loaded bundle is the one registered for the active model version",
        )  # fmt: skip
        self.database_up = new(
            Gauge, "anomaly_database_up", "1 while the alert database is reachable"
        ).labels(p)
        # The loaded model's model.target_fpr (the alert rate it was calibrated to on normal
        # records): deploy/prometheus/rules.yml compares the observed alert rate with it.
        # No series until a model loads.
        self._target_fpr = new(
            Gauge, "anomaly_target_fpr", "model.target_fpr of the model that scores"
        )
        # No series until set: a pipeline without a registry must not show one that is down.
        self._schema_registry_up = new(
            Gauge, "anomaly_schema_registry_up",
            "1 while the Avro schema registry answers (only with kafka.schema_registry_url)",
        )  # fmt: skip
        # No series before the first batch is written.
        self._output_topics_up = new(
            Gauge, "anomaly_output_topics_up",
            "0 while a batch's dead letters or scores cannot be delivered to their topics",
        )  # fmt: skip
        # Stream safety (docs/reliability.md, "Offset gaps"): a partition whose records would be
        # skipped is stopped, never read past.
        self._offset_gaps = new(
            Counter, "anomaly_offset_gaps",
            "Partitions stopped because records would have been skipped (kind: beyond_end, "
            "below_start, skipped, unverified)",
            "topic", "partition", "kind",
        )  # fmt: skip
        self._partitions_stopped = new(
            Gauge, "anomaly_partitions_stopped", "Assigned partitions stopped for an offset gap"
        ).labels(p)
        self.producer_rebuilds = new(
            Counter, "anomaly_producer_rebuilds",
            "Output producers replaced after a fatal librdkafka error",
        ).labels(p)  # fmt: skip

    def _alertmanager(self) -> None:
        """Incidents to Alertmanager (streams/alertmanager.py)."""
        p, new = self.pipeline, self._new
        # No series until the first post: a pipeline without alerting must not show one down.
        self._alertmanager_up = new(
            Gauge, "anomaly_alertmanager_up", "1 while the last post to Alertmanager succeeded"
        )
        self._alertmanager_sent = new(
            Counter, "anomaly_alertmanager_notifications",
            "Alerts posted to Alertmanager (result: firing, resolved, failed)", "result",
        )  # fmt: skip
        self.alertmanager_errors = new(
            Counter, "anomaly_alertmanager_errors", "Posts to Alertmanager that failed"
        ).labels(p)

    def set_alertmanager_up(self, up: bool) -> None:
        self._alertmanager_up.labels(self.pipeline).set(1 if up else 0)

    def alertmanager_sent(self, result: str, n: int = 1) -> None:
        self._alertmanager_sent.labels(self.pipeline, result).inc(n)

    def _drift_state(self) -> None:
        """The last closed drift window (anomaly.monitoring.drift; README, "Drift"). No series
        until a window closed."""
        new = self._new
        self._drift_ks = new(
            Gauge, "anomaly_drift_ks", "KS statistic of the ensemble p-values, last window"
        )
        self._drift_rate_p = new(
            Gauge, "anomaly_drift_alert_rate_pvalue",
            "p-value of the alert count against the model's rate, last window",
        )  # fmt: skip
        self._drift_psi = new(
            Gauge, "anomaly_drift_feature_psi",
            "PSI over the training deciles, last window (the top drift.top_features)", "feature",
        )  # fmt: skip
        self._drift_detected = new(
            Gauge, "anomaly_drift_detected", "1 when the last closed window drifted"
        )
        self._drift_windows = new(
            Counter, "anomaly_drift_windows", "Closed drift windows", "drifted"
        )

    def drift_window(self, report: Any) -> None:
        """Export a closed window (an ``anomaly.monitoring.drift.DriftReport``)."""
        p = self.pipeline
        if report.ks_stat is not None:
            self._drift_ks.labels(p).set(report.ks_stat)
        if report.alert_rate_p is not None:
            self._drift_rate_p.labels(p).set(report.alert_rate_p)
        self._drift_psi.clear()  # only this window's top features
        for item in report.features:
            self._drift_psi.labels(p, item["feature"]).set(item["psi"])
        self._drift_detected.labels(p).set(1 if report.drifted else 0)
        self._drift_windows.labels(p, "true" if report.drifted else "false").inc()

    def alerted(self, severity: str, n: int = 1) -> None:
        self._alerted.labels(self.pipeline, severity).inc(n)

    def dead_lettered(self, reason: str, n: int = 1) -> None:
        self._dead.labels(self.pipeline, reason).inc(n)

    def offset_gap(self, topic: str, partition: int, kind: str) -> None:
        self._offset_gaps.labels(self.pipeline, topic, str(partition), kind).inc()

    def set_partitions_stopped(self, n: int) -> None:
        self._partitions_stopped.set(n)

    def set_device(self, device: str) -> None:
        self._device.clear()
        self._device.labels(self.pipeline, device).set(1)

    def set_schema_registry_up(self, up: bool) -> None:
        self._schema_registry_up.labels(self.pipeline).set(1 if up else 0)

    def set_output_topics_up(self, up: bool) -> None:
        self._output_topics_up.labels(self.pipeline).set(1 if up else 0)

    def set_model_identity_ok(self, ok: bool) -> None:
        self._model_identity_ok.labels(self.pipeline).set(1 if ok else 0)

    def set_target_fpr(self, target_fpr: float) -> None:
        self._target_fpr.labels(self.pipeline).set(target_fpr)

    def set_model_version(self, version: str) -> None:
        self._version.clear()
        self._version.labels(self.pipeline, version).set(1)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self._lag.labels(self.pipeline, topic, str(partition)).set(lag)

    def forget_lag(self, topic: str, partition: int) -> None:
        """Drop a partition's lag series when it leaves this consumer: a stale last value would
        keep lag-based rules (deploy/prometheus/rules.yml) firing for a partition read elsewhere."""
        with contextlib.suppress(KeyError):  # never reported: nothing to remove
            self._lag.remove(self.pipeline, topic, str(partition))

    def on_statistics(self, stats_json: str) -> None:
        """librdkafka's ``stats_cb``: consumer lag per assigned partition."""
        try:
            stats = json.loads(stats_json)
        except ValueError:
            return
        for topic, tstats in stats.get("topics", {}).items():
            for pid, pstats in tstats.get("partitions", {}).items():
                if pid == "-1":  # librdkafka's internal UA partition
                    continue
                if not _fetching(pstats):
                    # librdkafka keeps reporting a partition after a rebalance took it away
                    # (desired false, fetch_state stopped) with its last lag, frozen: that value
                    # must not come back after forget_lag, or lag rules page for a partition
                    # another consumer reads.
                    self.forget_lag(topic, int(pid))
                    continue
                lag = pstats.get("consumer_lag", -1)
                if lag is not None and lag >= 0:
                    self.set_lag(topic, int(pid), int(lag))


def _fetching(pstats: dict[str, Any]) -> bool:
    """Whether a partition of librdkafka's statistics is this consumer's, being fetched (a
    paused one included: its lag is real). (Keys missing in older versions: assume so.)"""
    return bool(pstats.get("desired", True)) and pstats.get("fetch_state", "active") == "active"


def observe_many(histogram: Any, values: np.ndarray) -> None:
    """Observe many values at once: per-value ``observe`` costs ~1 us each in Python."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or bounds is None or total is None:  # pragma: no cover - other versions
        for v in values:
            histogram.observe(float(v))
        return
    # prometheus_client keeps per-bucket (not cumulative) counts; le buckets are inclusive.
    idx = np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left")
    counts = np.bincount(idx, minlength=len(bounds))
    for i, c in enumerate(counts):
        if c:
            buckets[i].inc(int(c))
    total.inc(float(values.sum()))


@dataclass
class Health:
    """What ``/healthz`` and ``/readyz`` report. ``ready`` needs every condition true;
    ``details`` are one-line explanations for an operator that do not change readiness (e.g. a
    refused model switch while the service still scores with the model it has)."""

    conditions: dict[str, bool] = field(
        default_factory=lambda: {"model_loaded": False, "database_up": False, "assigned": False}
    )
    details: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, name: str, value: bool) -> None:
        with self._lock:
            self.conditions[name] = value

    def set_detail(self, name: str, text: str | None) -> None:
        """Show ``text`` under ``detail`` in /readyz; ``None`` removes it."""
        with self._lock:
            if text is None:
                self.details.pop(name, None)
            else:
                self.details[name] = text

    def detail_snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self.details)

    @property
    def ready(self) -> bool:
        with self._lock:
            return all(self.conditions.values())

    def snapshot(self) -> dict[str, bool]:
        with self._lock:
            return dict(self.conditions)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a daemon thread. Port 0 picks a free port."""

    def __init__(self, metrics: ServiceMetrics, health: Health, host: str, port: int) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b'{"status": "ok"}\n', "application/json")
                elif path == "/readyz":
                    body = {
                        "ready": health.ready,
                        "conditions": health.snapshot(),
                        "detail": health.detail_snapshot(),
                    }
                    status = 200 if body["ready"] else 503
                    self._send(status, (json.dumps(body) + "\n").encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would drown the service's own logs

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra={"fields": ...}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_json_logs(level: int | None = None) -> None:
    """Switch the root logger's handlers to JSON lines (the service's log format)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())
    if level is not None:
        root.setLevel(level)


# The parts of a message that change between repeats of the same problem: librdkafka's
# "(after 0ms in state CONNECT)", and its ", 1 identical error(s) suppressed" before the closing
# parenthesis of a repeat (dropped whole: the repeat's key must be the first line's).
_VARYING = re.compile(r"\b\d+ms\b|(, \d+ identical error\(s\) suppressed)")


def _varying_part(match: re.Match[str]) -> str:
    return "" if match.group(1) else "#"


class RepeatFilter(logging.Filter):
    """Lets the same message through at most once per ``interval_s``; the first one after the
    interval carries how many were held back: ``... (repeated 57 times in the last 30 s)``, and
    ``"repeated": 57`` in the JSON fields.

    Attach it to the logger the noisy lines come from (``logger.addFilter``): a broker or
    database that stays down then costs a line per interval, not dozens a second. Thread-safe.
    """

    MAX_KEYS = 512  # a flood of distinct messages must not grow the table without bound

    def __init__(
        self,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[Hashable, list[float]] = {}  # key -> [last let through, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        # Records are repeats of each other when logger, level and message (but for durations
        # and librdkafka's own suppression counts) are equal.
        key = (record.name, record.levelno, _VARYING.sub(_varying_part, record.getMessage()))
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.interval_s:
                entry[1] += 1
                return False
            if entry is None and len(self._seen) >= self.MAX_KEYS:
                self._forget(now)
            held = int(entry[1]) if entry is not None else 0
            since = now - entry[0] if entry is not None else 0.0
            self._seen[key] = [now, 0]
        if held:
            record.msg = f"{record.getMessage()} (repeated {held} times in the last {since:.0f} s)"
            record.args = None
            fields = getattr(record, "fields", None)
            record.fields = {**(fields if isinstance(fields, dict) else {}), "repeated": held}
        return True

    def _forget(self, now: float) -> None:
        stale = [k for k, (last, held) in self._seen.items() if now - last >= self.interval_s]
        for k in stale or list(self._seen)[: self.MAX_KEYS // 2]:
            del self._seen[k]
