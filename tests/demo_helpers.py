"""The demo's training workers, as the tests find them among a process's children."""

from __future__ import annotations

import time


def training_workers(pid: int, count: int = 2, timeout_s: float = 60.0) -> list:
    """Until ``count`` training workers (``python -m streams.demo_training``) run under process
    ``pid``; they are returned as psutil processes."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = [
            c
            for c in psutil.Process(pid).children(recursive=True)
            if "streams.demo_training" in c.cmdline()
        ]
        if len(workers) >= count:
            return workers
        time.sleep(0.05)
    raise AssertionError("the training workers did not start")
