"""Produce a CSV or Parquet file into a pipeline's topic: backfills, load tests and the demo.

Each row becomes one JSON object (the input message format of docs/architecture.md), or one Avro
value with ``kafka.format: avro`` (``streams.avro``), keyed by the schema's entity field so that one
entity's records stay in order on one partition.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pandas as pd

from anomaly.config import PipelineConfig
from anomaly.errors import DataError, one_line

log = logging.getLogger(__name__)


@dataclass
class ReplayResult:
    produced: int
    failed: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.produced / self.seconds if self.seconds > 0 else float("inf")


def read_records(path: str | Path, cfg: PipelineConfig, limit: int | None = None) -> pd.DataFrame:
    """Read the file; ids, entities and categorical fields stay strings (no '007' -> 7)."""
    p = Path(path)
    suffix = p.suffix.lower()
    s = cfg.schema
    text_columns = [c for c in (s.id_field, s.entity_field, *s.categorical) if c]
    if limit is not None and limit < 0:
        raise DataError(f"--limit must be >= 0, got {limit}")
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"replay data must be .csv or .parquet: {p}")
    if not p.exists():  # a directory is fine for Parquet: a dataset written in parts
        raise DataError(f"replay data file not found: {p}")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(p, nrows=limit, dtype=dict.fromkeys(text_columns, str))
        else:
            frame = pd.read_parquet(p)
            if limit is not None:
                frame = frame.iloc[:limit]
    except (ValueError, OSError) as exc:  # pandas' and pyarrow's parse errors are ValueErrors
        raise DataError(f"cannot read replay data file {p}: {one_line(exc)}") from None
    missing = [c for c in (s.id_field, *s.features) if c not in frame.columns]
    if missing:
        raise DataError(f"{p} lacks the schema field(s): {', '.join(missing)}")
    return frame


def encode_rows(frame: pd.DataFrame) -> list[bytes]:
    """One JSON object per row: times as ISO 8601 UTC, NaN as null, floats round-tripping."""
    out = frame.copy()
    for name in out.columns:
        column = out[name]
        if pd.api.types.is_datetime64_any_dtype(column.dtype):
            if getattr(column.dt, "tz", None) is None:
                column = column.dt.tz_localize("UTC")
            out[name] = column.dt.tz_convert("UTC").dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # msgspec writes NaN (pandas' empty CSV cell of a string column too) as null.
    encode = msgspec.json.Encoder(enc_hook=_native).encode
    return [encode(row) for row in out.to_dict("records")]


def encode_values(frame: pd.DataFrame, cfg: PipelineConfig, warm_up: bool = False) -> list[bytes]:
    """One record value per row in the pipeline's ``kafka.format``: JSON or Avro; ``warm_up``:
    the scorer's warm-up records (Avro: ``streams.avro.warm_up_values``)."""
    if cfg.kafka.format == "avro":
        from streams import avro

        return avro.warm_up_values(frame, cfg) if warm_up else avro.encode_avro_rows(frame, cfg)
    return encode_rows(frame)


def _native(obj: object) -> object:
    """numpy scalars and other stragglers of ``to_dict``: their Python value, else a string."""
    item = getattr(obj, "item", None)
    return item() if callable(item) else str(obj)


def replay(
    cfg: PipelineConfig,
    path: str | Path,
    rate: float | None = None,
    limit: int | None = None,
    progress: bool = True,
    topic: str | None = None,
) -> ReplayResult:
    """Produce the file's rows (at most ``limit``, at most ``rate`` per second) and flush."""
    from confluent_kafka import Producer
    from tqdm import tqdm

    from streams.kafka import produce, producer_settings

    frame = read_records(path, cfg, limit)
    values = encode_values(frame, cfg)
    entity = cfg.schema.entity_field
    keys: list[bytes | None]
    if entity and entity in frame.columns:
        keys = [None if pd.isna(k) else str(k).encode() for k in frame[entity].tolist()]
    else:
        keys = [None] * len(values)
    topic = topic or cfg.kafka.topic
    producer = Producer(producer_settings(cfg.kafka))
    failed = 0

    def on_delivery(err: object, _msg: object) -> None:
        nonlocal failed
        if err is not None:
            failed += 1

    # Sleep at most every `step` records: a check per record would cost more than it saves.
    step = max(1, int(rate // 200)) if rate else len(values) + 1
    start = time.monotonic()
    bar = tqdm(total=len(values), unit="rec", disable=not progress, desc=f"replay -> {topic}")
    for i, (key, value) in enumerate(zip(keys, values, strict=True)):
        produce(producer, topic, value=value, key=key, on_delivery=on_delivery)
        if (i + 1) % step == 0:
            producer.poll(0)
            bar.update(step)
            if rate:
                ahead = start + (i + 1) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    remaining = flush_interruptibly(producer, 60.0)
    bar.update(len(values) - bar.n)
    bar.close()
    seconds = time.monotonic() - start
    failed += remaining
    result = ReplayResult(produced=len(values) - failed, failed=failed, seconds=seconds)
    log.info(
        "replay done",
        extra={"fields": {"topic": topic, "produced": result.produced, "failed": failed}},
    )
    return result


def flush_interruptibly(producer: Any, timeout_s: float) -> int:
    """``producer.flush(timeout_s)`` that Ctrl-C interrupts cleanly; returns what is left unsent.

    Why not one ``flush``: with no broker it waits the whole timeout inside librdkafka, and a
    SIGINT landing there runs Python's handler inside one of its callbacks (delivery, logs),
    where confluent-kafka loses the KeyboardInterrupt (``SystemError: ... returned NULL without
    setting an exception``) and the wait goes on. So SIGINT only sets a flag while short flushes
    run, and the interrupt is delivered afterwards, in plain Python, by the handler that was in
    place (Python's own raises KeyboardInterrupt; the demo's records it first).
    """
    interrupted = threading.Event()
    previous: Any = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        deadline = time.monotonic() + timeout_s
        remaining = len(producer)
        while remaining and not interrupted.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            remaining = producer.flush(min(0.2, left))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        if callable(previous):
            previous(signal.SIGINT, None)
        raise KeyboardInterrupt
    return remaining
