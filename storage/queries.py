"""What the CLI and the dashboards' operators do besides writing batches: list alerts and
incidents, prune old rows, create Grafana's read-only role (acknowledging is in verdicts)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, Table, delete, exists, select

from storage import schema as s
from storage.engine import Database, utc
from storage.errors import InvalidArgumentError
from storage.incidents import _lock_entities
from storage.reservoir import prune_reservoir

# Incidents pruned per transaction (and entity locks held at once: PostgreSQL's lock table is
# sized for a few thousand per transaction).
_PRUNE_CHUNK = 1000


@dataclass(slots=True)
class PruneResult:
    alerts: int
    incidents: int
    dead_letters: int
    stream_stats: int
    drift_windows: int = 0
    reservoir: int = 0


def list_alerts(
    db: Database,
    pipeline: str | None,
    since: datetime | None,
    until: datetime | None,
    status: str | None,
    entity: str | None,
    limit: int | None,
) -> list[dict[str, Any]]:
    """Alerts, newest (by ingest time) first, as dicts of the table's columns."""
    t = s.alerts
    query = select(t).order_by(t.c.ingest_time.desc(), t.c.id.desc()).limit(limit)
    query = alerts_in_scope(query, since, until, pipeline=pipeline, status=status, entity=entity)
    return db.rows("listing alerts", query)


def list_incidents(db: Database, pipeline: str | None, limit: int | None) -> list[dict[str, Any]]:
    t = s.incidents
    query = select(t).order_by(t.c.last_seen.desc(), t.c.id.desc()).limit(limit)
    return db.rows("listing incidents", matching(query, t, pipeline=pipeline))


def matching(query: Select, table: Table, **equal: Any) -> Select:
    """``query`` where each column named in ``equal`` has the value given (None: any value)."""
    for name, value in equal.items():
        if value is not None:
            query = query.where(table.c[name] == value)
    return query


def alerts_in_scope(
    query: Select, since: datetime | None, until: datetime | None, **equal: Any
) -> Select:
    """``query`` of alerts ingested in [``since``, ``until``) (None: unbounded) that are
    ``matching`` ``equal``."""
    a = s.alerts
    query = matching(query, a, **equal)
    if since is not None:
        query = query.where(a.c.ingest_time >= utc(since))
    if until is not None:
        query = query.where(a.c.ingest_time < utc(until))
    return query


def prune(
    db: Database, older_than: timedelta | datetime, pipeline: str | None = None
) -> PruneResult:
    """See ``AlertStore.prune``."""
    cutoff = (
        utc(older_than) if isinstance(older_than, datetime) else (datetime.now(UTC) - older_than)
    )
    a, i, d, st, dw = s.alerts, s.incidents, s.dead_letters, s.stream_stats, s.drift_windows

    def scoped(table: Any, cond: Any) -> Any:
        return cond if pipeline is None else cond & (table.c.pipeline == pipeline)

    with db.transaction("pruning old rows") as conn:
        n_alerts = conn.execute(delete(a).where(scoped(a, a.c.ingest_time < cutoff))).rowcount
        n_dead = conn.execute(delete(d).where(scoped(d, d.c.created_at < cutoff))).rowcount
        n_stats = conn.execute(delete(st).where(scoped(st, st.c.minute < cutoff))).rowcount
        n_drift = conn.execute(delete(dw).where(scoped(dw, dw.c.window_end < cutoff))).rowcount
        # The reservoir also ages out by itself (retraining.retention_s, on the service's
        # writes); prune takes what is older than the cutoff now, e.g. for a stopped pipeline.
        n_res = prune_reservoir(db, conn, cutoff, pipeline)
    unused = scoped(i, i.c.last_seen < cutoff) & ~exists().where(a.c.incident_id == i.c.id)
    n_inc = _prune_incidents(db, unused)
    return PruneResult(
        alerts=n_alerts,
        incidents=n_inc,
        dead_letters=n_dead,
        stream_stats=n_stats,
        drift_windows=n_drift,
        reservoir=n_res,
    )


def _prune_incidents(db: Database, unused: Any) -> int:
    """Delete the incidents ``unused`` selects, after the alerts are gone, in transactions of
    up to ``_PRUNE_CHUNK``: on PostgreSQL each under the batch writers' entity locks and with
    ``unused`` checked again once they are held. A batch writing a late event's alert into one
    of these incidents (it is still open and joinable by event time) then either commits first,
    and the incident keeps its new alert, or waits and opens a new incident: never an alert
    without its incident, or a batch failing on a deleted one."""
    i = s.incidents
    deleted = 0
    while True:
        with db.transaction("finding incidents to prune", write=False) as conn:
            found = conn.execute(
                select(i.c.id, i.c.pipeline, i.c.entity).where(unused).limit(_PRUNE_CHUNK)
            ).all()
        if not found:
            return deleted
        with db.transaction("pruning incidents") as conn:
            if db.dialect == "postgresql":
                _lock_entities(conn, sorted({(r.pipeline, r.entity) for r in found}))
            deleted += conn.execute(
                delete(i).where(i.c.id.in_([r.id for r in found]), unused)
            ).rowcount
        if len(found) < _PRUNE_CHUNK:
            return deleted


def grant_read_only(db: Database, role: str, password: str | None) -> None:
    """See ``AlertStore.grant_read_only``."""
    if db.dialect != "postgresql":
        raise InvalidArgumentError("a read-only role needs PostgreSQL (SQLite has no roles)")
    from storage.grafana import grant_sql

    with db.transaction(f"creating the read-only role {role!r}") as conn:
        raw = conn.connection.driver_connection
        with raw.cursor() as cur:
            for statement in grant_sql(role, password):
                cur.execute(statement)
