"""Incidents to people: open incidents posted to Alertmanager, re-sent while open, resolved when
they close (README, "Alerts to people: Alertmanager").

``Notifier`` is a daemon thread of the service, apart from the batch loop: the loop writes and
commits, the notifier reads what to send from SQL (``storage.notifications``) after the commit,
so it never blocks or loses the stream, and a restart or an Alertmanager outage only delays it.
Each cycle (every ``alerting.poll_s``):

1. closes the open incidents that no alert joined for ``incidents.window_s`` (by ingest time):
   ``status = 'resolved'`` in SQL, as the dashboards' "Open incidents" then show; this runs with
   or without ``alerting.alertmanager_url``;
2. with a URL: posts what is due to ``POST /api/v2/alerts`` (open incidents never sent, sent
   longer than ``alerting.resend_interval_s`` ago or with new alerts; closed ones with
   ``endsAt``), and records each accepted send in ``incident_notifications``.

A failed post (connection refused, timeout, any non-2xx answer) is retried with exponential
backoff (``alerting.retry_initial_s`` doubling up to ``retry_max_s``); nothing is recorded as sent
until Alertmanager accepted it, so the catch-up after an outage is the next successful cycle.
Metrics: ``anomaly_alertmanager_up``, ``anomaly_alertmanager_notifications_total{result}``
(alerts accepted as firing or resolved, or failed), ``anomaly_alertmanager_errors_total``.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from storage.errors import RetryableStorageError
from storage.notifications import DueIncident, Sent

log = logging.getLogger("streams.alertmanager")

ALERTNAME = "AnomalyIncident"
# The Grafana dashboard of alerts and incidents (dashboards/alerts.py) and its variable.
DASHBOARD_UID = "anomaly-alerts"
POST_CHUNK = 200  # incidents per POST
DUE_LIMIT = 500  # incidents per cycle: fewer due than this means the cycle sent everything
CATCH_UP_MARGIN = timedelta(minutes=1)


class AlertmanagerError(Exception):
    """Alertmanager did not accept a post (unreachable, timed out or a non-2xx answer)."""


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def post_alerts(url: str, alerts: list[dict[str, Any]], timeout_s: float) -> None:
    """``POST {url}/api/v2/alerts``; credentials in the URL become basic auth."""
    parts = urllib.parse.urlsplit(url)
    headers = {"Content-Type": "application/json"}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        parts = parts._replace(netloc=netloc)
    endpoint = urllib.parse.urlunsplit(parts).rstrip("/") + "/api/v2/alerts"
    request = urllib.request.Request(
        endpoint, data=json.dumps(alerts).encode(), headers=headers, method="POST"
    )
    where = urllib.parse.urlunsplit(parts)  # without credentials
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace").strip()
        raise AlertmanagerError(f"{where} answered HTTP {exc.code}: {detail}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise AlertmanagerError(f"{where} unreachable: {exc}") from None


def dashboard_link(
    grafana_url: str | None, inc: DueIncident, window: timedelta, now: datetime
) -> str | None:
    """The alerts dashboard for the incident's pipeline, over its time span (with a margin)."""
    if not grafana_url:
        return None
    start = min(inc.first_seen, inc.started_at or inc.first_seen) - window
    end = max(inc.last_seen, inc.last_alert_at or inc.last_seen) + window
    query = urllib.parse.urlencode(
        {
            "var-pipeline": inc.pipeline,
            "from": int(start.timestamp() * 1000),
            "to": int(min(end, now).timestamp() * 1000) if inc.status != "open" else "now",
        }
    )
    return f"{grafana_url.rstrip('/')}/d/{DASHBOARD_UID}/anomaly-alerts?{query}"


def _features(top: Any) -> str:
    if isinstance(top, str):
        try:
            top = json.loads(top)
        except ValueError:
            return top
    items = []
    for item in top or []:
        if isinstance(item, dict) and "feature" in item:
            items.append(f"{item['feature']}={item.get('value')}")
        else:
            items.append(str(item))
    return ", ".join(items)


def incident_labels(inc: DueIncident) -> dict[str, str]:
    labels = {
        "alertname": ALERTNAME,
        "pipeline": inc.pipeline,
        "entity": inc.entity,
        "incident": str(inc.id),
        "severity": inc.max_severity,
    }
    if inc.strongest is not None:
        labels["model_version"] = str(inc.strongest["model_version"])
    return labels


def incident_alerts(
    inc: DueIncident,
    now: datetime,
    window: timedelta,
    resend: timedelta,
    grafana_url: str | None,
) -> tuple[list[dict[str, Any]], Sent]:
    """The Alertmanager alerts that bring it up to date, and the send to record."""
    labels = incident_labels(inc)
    started = inc.started_at or inc.first_seen
    annotations = {
        "summary": f"{inc.alert_count} anomalous record(s) of {inc.entity} in {inc.pipeline}, "
        f"max severity {inc.max_severity}",
        "alerts": str(inc.alert_count),
        "first_seen": _iso(inc.first_seen),
        "last_seen": _iso(inc.last_seen),
    }
    strongest = inc.strongest
    if strongest is not None:
        annotations |= {
            "record_id": str(strongest["record_id"]),
            "score": f"{strongest['ensemble_score']:.4g}",
            "p_value": f"{strongest['ensemble_p']:.3g}",
            "top_features": _features(strongest["top_features"]),
        }
    link = dashboard_link(grafana_url, inc, window, now)
    alert: dict[str, Any] = {"labels": labels, "annotations": annotations}
    if link:
        annotations["dashboard"] = link
        alert["generatorURL"] = link
    if inc.status == "open":
        state = "firing"
        # Alertmanager resolves an alert it has not heard of by endsAt: four resends from now.
        alert |= {"startsAt": _iso(started), "endsAt": _iso(now + 4 * resend)}
    else:
        state = "resolved" if inc.sent is not None else "firing"  # never sent: firing first
        ends = min(now, (inc.last_alert_at or now) + window)
        alert |= {"startsAt": _iso(min(started, ends))}
        alert["endsAt"] = _iso(ends) if state == "resolved" else _iso(now + 4 * resend)
    alerts = [alert]
    old = inc.sent["labels"] if inc.sent is not None else None
    if old and old != labels:
        # A label changed (severity rose, another model version): resolve the old label set.
        alerts.append({"labels": old, "startsAt": _iso(min(started, now)), "endsAt": _iso(now)})
    return alerts, (inc.id, state, labels, inc.alert_count)


class Notifier:
    """The notifier thread of one pipeline's service (see the module docstring)."""

    def __init__(
        self,
        cfg: Any,
        store: Any,
        metrics: Any,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.alerting = cfg.alerting
        self.pipeline = cfg.name
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.window = timedelta(seconds=cfg.incidents.window_s)
        self.resend = timedelta(seconds=self.alerting.resend_interval_s)
        self.catch_up = timedelta(seconds=self.alerting.max_catch_up_s)
        # When the last cycle that sent everything due began (None: not since the start).
        self._last_ok: datetime | None = None
        self._reachable: bool | None = None  # how the last post went (None: none yet)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alertmanager", daemon=True)

    def start(self) -> Notifier:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def run_once(self) -> int:
        """One cycle: close stale incidents, send what is due; returns the alerts sent."""
        now = self.clock()
        closed = self.store.close_stale_incidents(self.pipeline, now)
        if closed:
            fields = {"closed": len(closed), "incidents": closed[:100]}
            log.info("incidents closed", extra={"fields": fields})
        url = self.alerting.alertmanager_url
        if not url:
            return 0
        # Closed incidents never sent can only hold alerts from after the last complete cycle
        # (the margin covers a batch ingested before it and committed after).
        since = now - self.catch_up
        if self._last_ok is not None:
            since = max(since, self._last_ok - self.window - CATCH_UP_MARGIN)
        due = self.store.incidents_to_notify(self.pipeline, now, self.resend, since, DUE_LIMIT)
        if not due and self._reachable is False:
            # The last post failed and nothing is due now: an empty post (which Alertmanager
            # accepts) says whether it answers again. Without it the gauge stayed 0 until
            # something was due: hours on a quiet pipeline, and for a second scorer of the
            # pipeline whose peer delivered everything first, a page for a healthy Alertmanager.
            self._post(url, [])
        sent_alerts = 0
        for start in range(0, len(due), POST_CHUNK):
            alerts: list[dict[str, Any]] = []
            sends: list[Sent] = []
            for inc in due[start : start + POST_CHUNK]:
                more, send = incident_alerts(
                    inc, now, self.window, self.resend, self.alerting.grafana_url
                )
                alerts += more
                sends.append(send)
            self._post(url, alerts)
            self.store.mark_notified(sends, now)
            for alert in alerts:
                firing = datetime.fromisoformat(alert["endsAt"]) > now
                self.metrics.alertmanager_sent("firing" if firing else "resolved")
            sent_alerts += len(alerts)
        if len(due) < DUE_LIMIT:
            self._last_ok = now
        return sent_alerts

    def _post(self, url: str, alerts: list[dict[str, Any]]) -> None:
        """Post, keeping ``anomaly_alertmanager_up`` and the failure counts."""
        try:
            post_alerts(url, alerts, self.alerting.timeout_s)
        except AlertmanagerError:
            self.metrics.alertmanager_sent("failed", len(alerts))
            self.metrics.alertmanager_errors.inc()
            self.metrics.set_alertmanager_up(False)
            self._reachable = False
            raise
        self.metrics.set_alertmanager_up(True)
        self._reachable = True

    def _run(self) -> None:
        a = self.alerting
        delay, backoff = 0.0, a.retry_initial_s
        while not self._stop.wait(delay):
            delay = a.poll_s
            try:
                self.run_once()
                backoff = a.retry_initial_s
            except AlertmanagerError as exc:
                delay = backoff
                log.warning(
                    "alertmanager unavailable, retrying",
                    extra={"fields": {"error": str(exc), "retry_in_s": delay}},
                )
                backoff = min(backoff * 2, a.retry_max_s)
            except RetryableStorageError as exc:
                log.warning(
                    "database unavailable for the alertmanager notifier",
                    extra={"fields": {"error": str(exc), "retry_in_s": delay}},
                )
            except Exception:  # the thread must outlive any one bad cycle
                log.exception("alertmanager notifier cycle failed")
