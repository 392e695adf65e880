"""Failpoints: a deterministic crash at a named point of the service loop, for reliability tests.

``ANOMALY_FAILPOINT=<point>:<n>`` makes ``anomaly serve`` kill itself with SIGKILL (no handler,
no flush, no leaving the consumer group: what the OOM killer or a power cut does) the ``n``-th
time a batch reaches ``point``:

* ``decoded``: the batch is decoded, nothing scored;
* ``scored``: scored, nothing written;
* ``written``: alerts, dead letters and offsets are in the database, Kafka not yet committed
  (the case exactly-once rests on: the restart must find the batch in the store, not write it
  twice);
* ``committed``: committed to Kafka as well.

Random kills (``tests/reliability/test_crash.py``) land mostly in the longest stage; a failpoint
lands in each stage for certain. Unset, as in production, each point costs one comparison.
"""

from __future__ import annotations

import os
import signal

from anomaly.errors import ConfigError

POINTS = ("decoded", "scored", "written", "committed")
ENV = "ANOMALY_FAILPOINT"


class Failpoint:
    """``reached(point)`` at each point; kills the process at the configured one."""

    def __init__(self, spec: str | None) -> None:
        self.point: str | None = None
        self.remaining = 0
        if not spec:
            return
        point, _, count = spec.partition(":")
        if point not in POINTS or not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"{ENV} must be <point>:<n> with point one of {', '.join(POINTS)} and n >= 1, "
                f"got {spec!r}"
            )
        self.point, self.remaining = point, int(count)

    @classmethod
    def from_env(cls) -> Failpoint:
        return cls(os.environ.get(ENV))

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.remaining -= 1
        if self.remaining == 0:
            os.kill(os.getpid(), signal.SIGKILL)
