"""Outages of what a batch needs: the database, the output topics' broker, the schema registry.

``OutagesMixin`` is one part of ``streams.service.ScoringService``. While something a batch needs
is down, its partitions are paused (the consumer keeps serving the group: heartbeats,
rebalances) and the batch is retried with exponential backoff (``serve.db_retry_initial_s`` to
``serve.db_retry_max_s``); the health endpoint and the ``*_up`` gauges say what is down. The
batch is dropped instead, and read again from the stored offsets, when a rebalance happens or the
service stops while it waits (the rule in ``streams.service``'s docstring).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from storage.errors import RetryableStorageError
from streams.avro import SchemaRegistryUnavailable
from streams.batch import Message
from streams.outputs import ProduceError

log = logging.getLogger("streams.service")
T = TypeVar("T")


class OutagesMixin:
    """Retries of ``ScoringService`` (its attributes: ``cfg``, ``metrics``, ``health``,
    ``state``, ``_consumer``, ``_stop``)."""

    cfg: Any
    metrics: Any
    health: Any
    state: Any
    _consumer: Any
    _stop: Any

    def _until_done(
        self,
        attempt: Callable[[], T],
        generation: int,
        messages: list[Message],
        waiting: str = "batch not written, retrying",
    ) -> T | None:
        """``attempt()`` until it returns. While what it needs is down (the database, the
        output topics' broker, the schema registry) the partitions are paused and it is retried
        with backoff; ``None`` if the batch must be dropped (see ``_wait_paused``)."""
        delay = self.cfg.serve.db_retry_initial_s
        paused = False
        try:
            while True:
                try:
                    return attempt()
                except (RetryableStorageError, ProduceError, SchemaRegistryUnavailable) as exc:
                    if isinstance(exc, RetryableStorageError):
                        self._database_up(False)
                    if isinstance(exc, SchemaRegistryUnavailable):
                        self._registry_up(False)
                    if isinstance(exc, ProduceError):
                        self._outputs_up(False)
                    if not paused and self.state.assigned:
                        self._consumer.pause(self._partitions(self.state.assigned))
                        paused = True
                    log.warning(
                        waiting,
                        extra={"fields": {"error": str(exc), "retry_in_s": delay}},
                    )
                    if not self._wait_paused(delay, generation, messages):
                        return None
                    delay = min(delay * 2, self.cfg.serve.db_retry_max_s)
        finally:
            if paused and self._consumer is not None and self._active():
                self._consumer.resume(self._partitions(self._active()))

    def _wait_paused(self, seconds: float, generation: int, messages: list[Message]) -> bool:
        """Keep serving the group (heartbeats, rebalances) while waiting; ``False`` if the batch
        must be dropped: a rebalance happened (the new owner re-reads it from the stored
        offsets) or the service is stopping (nothing of it was committed)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._stop.is_set():
                log.warning("stopping with an unwritten batch; it will be consumed again")
                return False
            got = self._consumer.consume(1, min(0.2, max(0.0, deadline - time.monotonic())))
            if self.state.generation != generation or got:
                # Partitions came back unpaused after a rebalance: put the fetched records and
                # the held batch back, from the stored offsets (seeked in on_assign).
                self._rewind([*self._messages(got), *messages])
                log.warning("rebalance while the batch was held; batch dropped")
                return False
        return True

    def _rewind(self, messages: list[Message]) -> None:
        from confluent_kafka import TopicPartition

        first: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic, m.partition)
            first[key] = min(first.get(key, m.offset), m.offset)
        for key, offset in first.items():
            if key in self._active():
                try:
                    self._consumer.seek(TopicPartition(key[0], key[1], offset))
                    self.state.position[key] = offset
                except Exception as exc:
                    # Reading on from wherever the consumer is would skip the held records:
                    # position the partition again from the database before it is read.
                    log.error(
                        "seek failed; the partition is paused until positioned again at its "
                        "stored offset",
                        extra={
                            "fields": {
                                "topic": key[0],
                                "partition": key[1],
                                "offset": offset,
                                "error": str(exc),
                            }
                        },
                    )
                    self._unposition({key})

    def _database_up(self, up: bool) -> None:
        self.metrics.database_up.set(1 if up else 0)
        self.health.set("database_up", up)

    def _database_down(self, what: str, exc: Exception, retry_in_s: float) -> None:
        self._database_up(False)
        log.warning(
            "database unavailable",
            extra={"fields": {"while": what, "error": str(exc), "retry_in_s": retry_in_s}},
        )

    def _outputs_up(self, up: bool) -> None:
        self.metrics.set_output_topics_up(up)
        self.health.set("output_topics_up", up)

    def _registry_up(self, up: bool) -> None:
        self.metrics.set_schema_registry_up(up)
        self.health.set("schema_registry_up", up)

    def _with_db_retry(self, fn: Any, what: str) -> Any:
        delay = self.cfg.serve.db_retry_initial_s
        while True:
            try:
                value = fn()
                self._database_up(True)
                return value
            except RetryableStorageError as exc:
                self._database_down(what, exc, delay)
                if self._stop.wait(delay):
                    return None
                delay = min(delay * 2, self.cfg.serve.db_retry_max_s)
