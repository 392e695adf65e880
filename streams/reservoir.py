"""Which scored records go into the retraining reservoir (README, "Retraining").

The rule: a weighted sample without replacement, kept as the ``reservoir_size`` records of the
highest priority (Efraimidis-Spirakis A-ES in log form, the "Gumbel top-k" trick)::

    priority = t * ln 2 / half_life_s  -  ln(-ln u)

``t`` is the record's Kafka timestamp (seconds; the ingest time when the message has none) and
``u`` in (0, 1) a hash of its Kafka position (topic, partition, offset). The Gumbel term makes
the top-k a sample drawn with probability proportional to ``exp(t ln2 / half_life_s)``: a
record's weight doubles every half-life, so the reservoir leans towards recent traffic and old
records leave it by themselves (no sawtooth when retention deletes a whole old sample at once,
as with a uniform reservoir). ``half_life_s = 0`` leaves the Gumbel term alone: every record
equally likely, the distribution of Algorithm R, over the retention window.

Why a priority and not Algorithm R's "keep the n-th record with probability k/n, in a random
slot": R needs a global count n, shared by every consumer of the pipeline and exactly right
across restarts and replays, and its choices depend on the order records arrive in. A priority
is a function of the record alone (position and timestamp, both fixed in the Kafka log), so a
batch read again, by this consumer or another, makes the same choices, and the sample does not
depend on how partitions were spread over consumers. The database keeps the top k (storage.
reservoir) and tells the service the lowest priority kept; the service sends only records above
it. Expected rows per batch once full: with a half-life, about ``batch * k / (rate * half_life /
ln 2)`` (the records of one mean lifetime compete for k places); uniform, ``batch * k / seen``.

Alerting records are sampled too, marked ``alerted``: after a shift of normal traffic the old
model alerts on much of it, and a sample of only the records it let through is cut off exactly
where the traffic moved (a model retrained on it flags the rest again). ``anomaly retrain``
leaves out the records an analyst confirmed as anomalies (``true_positive`` verdicts), and with
``--exclude-alerts`` every record that alerted.

Exactly once: candidates are written in the batch's transaction, fenced by the stored offsets
like its alerts (a replayed batch adds nothing) and inserted with ON CONFLICT DO NOTHING on the
Kafka position; and since the priority is deterministic, even a replay asked for (offsets reset)
makes the same choices.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np

from storage.records import ReservoirRecord, SinkBatch, WriteResult
from storage.sanitize import JSONText

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, element-wise (uint64 arithmetic wraps around)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def priorities(
    topic: str,
    partitions: np.ndarray,
    offsets: np.ndarray,
    times_s: np.ndarray,
    half_life_s: float,
) -> np.ndarray:
    """The sampling priority of each record (see the module docstring)."""
    seed = np.uint64(zlib.crc32(topic.encode("utf-8", "surrogateescape")))
    with np.errstate(over="ignore"):
        key = _mix(offsets.astype(np.uint64) ^ _mix(partitions.astype(np.uint64) ^ (seed << 32)))
    u = ((key >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1)
    gumbel = -np.log(-np.log(u))
    if half_life_s > 0:
        return times_s * (math.log(2.0) / half_life_s) + gumbel
    return gumbel


class ReservoirSampler:
    """The service's side: picks a batch's candidates, learns the threshold from the store."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg.retraining
        self.pipeline = cfg.name
        self.time_field: str | None = cfg.schema.time_field
        self.threshold = -math.inf  # the lowest priority the store keeps (-inf: not full)

    def fill(
        self,
        batch: SinkBatch,
        messages: list[Any],
        decoded: Any,
        result: Any,
        version: str,
        ingest: datetime,
        record_fields: Callable[[bytes | None], dict[str, Any] | JSONText],
    ) -> None:
        """Put the batch's candidates on ``batch.reservoir``: scored records with a priority
        above the threshold (at most ``reservoir_size`` of the highest), alerting ones marked."""
        if not self.cfg.enabled or result is None or not len(result.is_alert):
            return
        is_alert = np.asarray(result.is_alert, dtype=bool)
        # Scored row i is the record decoded.index[i] of the batch.
        picked = [messages[i] for i in np.asarray(decoded.index).tolist()]
        # One topic per service (kafka.topic); priorities are vectorised per batch.
        partitions = np.fromiter((m.partition for m in picked), np.int64, len(picked))
        offsets = np.fromiter((m.offset for m in picked), np.int64, len(picked))
        now = ingest.timestamp()
        times = np.fromiter(
            (m.timestamp_ms / 1000.0 if m.timestamp_ms else now for m in picked),
            np.float64,
            len(picked),
        )
        prio = priorities(picked[0].topic, partitions, offsets, times, self.cfg.half_life_s)
        keep = np.flatnonzero(prio > self.threshold)
        if not len(keep):
            return
        if len(keep) > self.cfg.reservoir_size:
            keep = keep[np.argsort(-prio[keep])[: self.cfg.reservoir_size]]
        event_times: list[Any] = [None] * len(keep)
        if self.time_field:
            column = decoded.frame[self.time_field].iloc[keep]
            event_times = [None if t != t else t for t in column.dt.to_pydatetime().tolist()]
        batch.reservoir = [
            ReservoirRecord(
                pipeline=self.pipeline,
                kafka_topic=picked[k].topic,
                kafka_partition=picked[k].partition,
                kafka_offset=picked[k].offset,
                priority=float(prio[k]),
                alerted=bool(is_alert[k]),
                model_version=version,
                sampled_at=ingest,
                event_time=event_times[j],
                record=record_fields(picked[k].value),
            )
            for j, k in enumerate(keep.tolist())
        ]
        batch.reservoir_size = self.cfg.reservoir_size
        batch.reservoir_retention_s = self.cfg.retention_s

    def written(self, batch: SinkBatch, write: WriteResult) -> None:
        """After the batch's transaction: the store's threshold (only known when the batch had
        candidates; it only rises, except when retention emptied part of the reservoir)."""
        if batch.reservoir:
            t = write.reservoir_threshold
            self.threshold = -math.inf if t is None else t
