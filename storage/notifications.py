"""Incidents to people: closing stale incidents and the bookkeeping of the Alertmanager notifier.

The notifier (streams/alertmanager.py) sends from SQL, never from the batch in memory, so what is
due survives a restart and an Alertmanager outage:

- ``close_stale``: an open incident that no alert has joined for the incident window (by the
  alerts' ingest time, the wall clock of the service) is closed: ``status = 'resolved'``. It runs
  under the same per-entity locks as the batch writer's incident grouping (PostgreSQL advisory
  locks; SQLite's write lock), so an alert never joins an incident that is being closed.
- ``due``: the incidents to send now, with what the message needs (first and last ingest time,
  the strongest alert) and what was sent last (``incident_notifications``).
- ``mark_sent``: after Alertmanager accepted a send, record it.

Nothing here knows HTTP or Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, union, update

from storage import schema as s
from storage.engine import Database
from storage.incidents import _chunks, _lock_entities

_CHUNK = 1000


@dataclass(slots=True)
class DueIncident:
    id: int
    pipeline: str
    entity: str
    status: str  # open or resolved
    first_seen: datetime  # event time of its first and last alert
    last_seen: datetime
    alert_count: int
    max_severity: str
    started_at: datetime | None  # ingest time of its first and last alert (None: no alerts left)
    last_alert_at: datetime | None
    strongest: dict[str, Any] | None  # the alert with the highest ensemble score
    sent: dict[str, Any] | None  # its incident_notifications row, if it was ever sent


def close_stale(
    db: Database, pipeline: str, now: datetime, window: timedelta, max_rounds: int = 100
) -> list[int]:
    """Close the pipeline's open incidents without an alert ingested since ``now - window``
    (in transactions of up to 1000, at most ``max_rounds`` of them); returns their ids."""
    closed: list[int] = []
    for _ in range(max_rounds):
        done, found = _close_some(db, pipeline, now - window)
        closed += done
        if found < _CHUNK:
            break
    return sorted(closed)


def _close_some(db: Database, pipeline: str, cutoff: datetime) -> tuple[list[int], int]:
    i, a = s.incidents, s.alerts
    stale = and_(
        i.c.pipeline == pipeline,
        i.c.status == "open",
        ~exists().where(a.c.incident_id == i.c.id, a.c.ingest_time >= cutoff),
    )
    with db.transaction("finding stale incidents", write=False) as conn:
        found = conn.execute(select(i.c.id, i.c.entity).where(stale).limit(_CHUNK)).all()
    if not found:
        return [], 0
    with db.transaction("closing stale incidents") as conn:
        if db.dialect == "postgresql":
            _lock_entities(conn, sorted({(pipeline, r.entity) for r in found}))
        closed = conn.execute(
            update(i)
            .where(i.c.id.in_([r.id for r in found]), stale)
            .values(status="resolved")
            .returning(i.c.id)
        ).all()
    return [r.id for r in closed], len(found)


def due(
    db: Database,
    pipeline: str,
    now: datetime,
    resend: timedelta,
    since: datetime,
    limit: int = 500,
) -> list[DueIncident]:
    """The incidents to send now, oldest first:

    - open ones never sent, sent longer than ``resend`` ago, or with alerts added since;
    - closed ones last sent firing, at least ``resend`` after their first send (so Alertmanager's
      group_wait has passed and the firing notification went out before the resolved one);
    - closed ones never sent with an alert ingested at or after ``since`` (they are sent
      firing first, then resolved as above). Only an outage or a restart leaves such incidents:
      the notifier passes the time of its last successful cycle (less a margin), so this looks
      at the alerts of minutes, not of the whole history.

    The candidates come from three index lookups (open incidents, firing notifications, recent
    alerts), never from a scan of all incidents.
    """
    with db.transaction("finding incidents to notify", write=False) as conn:
        rows = conn.execute(_due_query(pipeline, now, resend, since, limit)).mappings().all()
        times, strongest = _alert_facts(conn, [r["id"] for r in rows])
    return [
        _due_incident(r, times.get(r["id"], (None, None)), strongest.get(r["id"])) for r in rows
    ]


def _due_query(pipeline: str, now: datetime, resend: timedelta, since: datetime, limit: int):
    """The due incidents of ``due``'s docstring with their last notification, if any."""
    i, n, a = s.incidents, s.incident_notifications, s.alerts
    never = n.c.incident_id.is_(None)
    open_due = and_(
        i.c.status == "open",
        or_(
            never,
            n.c.state != "firing",
            n.c.sent_at <= now - resend,
            n.c.alert_count != i.c.alert_count,
        ),
    )
    resolved_due = and_(
        i.c.status == "resolved",
        or_(
            and_(n.c.state == "firing", n.c.first_sent_at <= now - resend),
            never,  # candidates below: only those with recent alerts
        ),
    )
    candidates = union(
        select(i.c.id).where(i.c.pipeline == pipeline, i.c.status == "open"),
        select(n.c.incident_id).where(n.c.state == "firing"),
        select(a.c.incident_id).where(
            a.c.pipeline == pipeline, a.c.ingest_time >= since, a.c.incident_id.is_not(None)
        ),
    ).subquery()
    return (
        select(i, n.c.state, n.c.labels, n.c.alert_count.label("sent_count"), n.c.first_sent_at)
        .select_from(i.outerjoin(n, n.c.incident_id == i.c.id))
        .where(
            i.c.id.in_(select(candidates.c[0])),
            i.c.pipeline == pipeline,
            or_(open_due, resolved_due),
        )
        .order_by(i.c.id)
        .limit(limit)
    )


def _alert_facts(
    conn: Any, ids: list[int]
) -> tuple[dict[int, tuple[datetime, datetime]], dict[int, dict[str, Any]]]:
    """Per incident: the first and last alert's ingest time, and its strongest alert (highest
    ensemble score; the latest among equals)."""
    a = s.alerts
    times: dict[int, tuple[datetime, datetime]] = {}
    strongest: dict[int, dict[str, Any]] = {}
    for chunk in _chunks(ids, _CHUNK):
        spans = select(a.c.incident_id, func.min(a.c.ingest_time), func.max(a.c.ingest_time)).where(
            a.c.incident_id.in_(chunk)
        )
        for r in conn.execute(spans.group_by(a.c.incident_id)):
            times[r[0]] = (r[1], r[2])  # min and max keep the column's type: aware UTC
        rank = (
            func.row_number()
            .over(
                partition_by=a.c.incident_id,
                order_by=(a.c.ensemble_score.desc(), a.c.id.desc()),
            )
            .label("rank")
        )
        ranked = (
            select(
                a.c.incident_id,
                a.c.record_id,
                a.c.model_version,
                a.c.ensemble_score,
                a.c.ensemble_p,
                a.c.severity,
                a.c.top_features,
                rank,
            )
            .where(a.c.incident_id.in_(chunk))
            .subquery()
        )
        for r in conn.execute(select(ranked).where(ranked.c.rank == 1)).mappings():
            strongest[r["incident_id"]] = dict(r)
    return times, strongest


def _due_incident(
    r: Any, span: tuple[datetime | None, datetime | None], strongest: dict[str, Any] | None
) -> DueIncident:
    sent = None
    if r["state"] is not None:
        sent = {
            "state": r["state"],
            "labels": r["labels"],
            "alert_count": r["sent_count"],
            "first_sent_at": r["first_sent_at"],
        }
    return DueIncident(
        **{c.name: r[c.name] for c in s.incidents.c},  # the incident's own columns
        started_at=span[0],
        last_alert_at=span[1],
        strongest=strongest,
        sent=sent,
    )


Sent = tuple[int, str, dict[str, str], int]  # incident id, state, labels, alert count


def mark_sent(db: Database, sent: list[Sent], now: datetime) -> None:
    """Record sends Alertmanager accepted: (incident id, state, labels, alert count) each."""
    if not sent:
        return
    n = s.incident_notifications
    upsert = db.upsert(n, ["incident_id"], ("state", "labels", "alert_count", "sent_at"))
    with db.transaction("recording notifications") as conn:
        for incident_id, state, labels, count in sent:
            # An incident pruned meanwhile: its row would violate the foreign key; skip it.
            still = select(s.incidents.c.id).where(s.incidents.c.id == incident_id)
            if conn.execute(still).first():
                row = dict(incident_id=incident_id, state=state, labels=labels, alert_count=count)
                conn.execute(upsert, row | {"first_sent_at": now, "sent_at": now})
