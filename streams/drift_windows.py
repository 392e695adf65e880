"""Drift windows of the scoring service (``anomaly.monitoring.drift``).

``DriftMixin`` is one part of ``streams.service.ScoringService``: each committed batch is counted
into the open window, and each window that closes is exported as metrics, logged, and stored in
``drift_windows``. Storing is best effort: a window the database refuses is logged and lost, and
scoring never waits for it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from anomaly.monitoring.drift import DriftMonitor, DriftReport
from storage.errors import RetryableStorageError
from streams.models import LoadedModel

log = logging.getLogger("streams.service")


class DriftMixin:
    """Drift of ``ScoringService`` (its attributes: ``cfg``, ``pipeline``, ``metrics``,
    ``store``, ``_drift``)."""

    cfg: Any
    pipeline: str
    metrics: Any
    store: Any
    _drift: DriftMonitor | None

    def _observe_drift(self, result: Any, loaded: LoadedModel, now: datetime) -> None:
        """Count a committed batch into the drift window (by processing time; a new model
        version starts new windows, the open one of the old version is not stored)."""
        if not self.cfg.drift.enabled:
            return
        monitor = self._drift
        if monitor is None or monitor.model is not loaded.model:
            monitor = DriftMonitor(loaded.model, self.cfg.drift, self.pipeline, loaded.version)
            self._drift = monitor
        # The scorer's numeric block: the values observe would extract from the frame again.
        self._drift_windows(
            monitor.observe_values(result.numeric, result.columns["ensemble_p"], now)
        )

    def _drift_windows(self, reports: list[DriftReport]) -> None:
        """Export and store closed drift windows; a window the database refuses is logged and
        lost (scoring does not wait for it)."""
        for report in reports:
            self.metrics.drift_window(report)
            fields = {
                "window_start": report.window_start.isoformat(),
                "records": report.records,
                "drifted": report.drifted,
                "reasons": report.reasons,
            }
            log.log(
                logging.WARNING if report.drifted else logging.INFO,
                "drift window",
                extra={"fields": fields},
            )
            try:
                self.store.write_drift_window(report)
            except RetryableStorageError as exc:
                log.warning("drift window not stored: %s", exc)
