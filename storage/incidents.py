"""Incidents: the new alerts of each (pipeline, entity) join the open incident whose time span
they fall into, widened by the incident window on both sides, or open a new one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, select, text, update

from storage import schema as s
from storage.alert_rows import (
    ENTITY,
    EVENT_TIME,
    INCIDENT_ID,
    INGEST_TIME,
    PIPELINE,
    SEVERITY,
    SEVERITY_RANK,
)
from storage.engine import Database, utc

_IN_CHUNK = 5000  # entities per IN (...) list; SQLite allows 32766 variables
# Alerts to group, per (pipeline, entity): (time, index in the batch, alert row), sorted by
# (time, index); the index is unique, so sorting never compares two rows.
_Pending = tuple[datetime, int, list[Any]]


@dataclass(slots=True)
class Incident:
    id: int | None  # None until inserted
    pipeline: str
    entity: str
    first_seen: datetime
    last_seen: datetime
    alert_count: int
    max_severity: str
    dirty: bool = False  # a stored incident this batch changed

    def add(self, when: datetime, severity: str) -> None:
        self.first_seen = min(self.first_seen, when)
        self.last_seen = max(self.last_seen, when)
        self.alert_count += 1
        if SEVERITY_RANK[severity] > SEVERITY_RANK[self.max_severity]:
            self.max_severity = severity


def assign_incidents(
    db: Database, conn: Connection, rows: list[list[Any]], window: timedelta
) -> int:
    """Group new alert rows into incidents per (pipeline, entity); sets each row's
    ``incident_id``; returns the number of incidents opened."""
    by_entity: dict[tuple[str, str], list[_Pending]] = defaultdict(list)
    for i, row in enumerate(rows):
        row[INCIDENT_ID] = None
        entity = row[ENTITY]
        if entity is None:
            continue  # no entity: nothing to group by
        when = row[EVENT_TIME] or row[INGEST_TIME]
        by_entity[(row[PIPELINE], entity)].append((when, i, row))
    if not by_entity:
        return 0
    keys = sorted(by_entity)
    if db.dialect == "postgresql":
        _lock_entities(conn, keys)
    earliest = min(item[0] for items in by_entity.values() for item in items)
    candidates = _open_incidents(conn, keys, earliest - window)
    new: list[Incident] = []
    assignment: list[tuple[list[Any], Incident]] = []
    for key in keys:
        pool = candidates[key]
        for when, _i, row in sorted(by_entity[key]):
            match = _latest_holding(pool, when, window)
            if match is None:
                match = Incident(None, key[0], key[1], when, when, 0, row[SEVERITY])
                pool.append(match)
                new.append(match)
            else:
                match.dirty = match.id is not None
            match.add(when, row[SEVERITY])
            assignment.append((row, match))
    if new:
        _insert_incidents(db, conn, new)
    dirty = [inc for pool in candidates.values() for inc in pool if inc.dirty]
    if dirty:
        _update_incidents(db, conn, dirty)
    for row, inc in assignment:
        row[INCIDENT_ID] = inc.id
    return len(new)


def _latest_holding(pool: list[Incident], when: datetime, window: timedelta) -> Incident | None:
    """The latest incident whose span, widened by ``window``, holds ``when``."""
    match = None
    for inc in pool:
        if inc.first_seen - window <= when <= inc.last_seen + window and (
            match is None or inc.last_seen > match.last_seen
        ):
            match = inc
    return match


def _lock_entities(conn: Connection, keys: list[tuple[str, str]]) -> None:
    """PostgreSQL: writers of the same entity (e.g. two consumers after a rebalance) take turns;
    the locks are taken in one sorted order, so two batches cannot deadlock on them."""
    conn.execute(
        text(
            "SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT "
            "hashtextextended(x, 7301) AS k FROM unnest(CAST(:keys AS text[])) AS x "
            "ORDER BY 1) AS locks"
        ),
        {"keys": [f"{p}\x1f{e}" for p, e in keys]},
    )


def _open_incidents(
    conn: Connection, keys: list[tuple[str, str]], since: datetime
) -> dict[tuple[str, str], list[Incident]]:
    """The open incidents of these (pipeline, entity) keys last seen at ``since`` or later."""
    t = s.incidents
    by_pipeline: dict[str, list[str]] = defaultdict(list)
    for p, e in keys:
        by_pipeline[p].append(e)
    found: dict[tuple[str, str], list[Incident]] = defaultdict(list)
    for pipeline, entities in by_pipeline.items():
        for chunk in _chunks(entities, _IN_CHUNK):
            query = select(
                t.c.id,
                t.c.entity,
                t.c.first_seen,
                t.c.last_seen,
                t.c.alert_count,
                t.c.max_severity,
            ).where(
                t.c.pipeline == pipeline,
                t.c.entity.in_(chunk),
                t.c.status == "open",
                t.c.last_seen >= since,
            )
            for r in conn.execute(query):
                found[(pipeline, r.entity)].append(
                    Incident(
                        r.id,
                        pipeline,
                        r.entity,
                        r.first_seen,
                        r.last_seen,
                        r.alert_count,
                        r.max_severity,
                    )
                )
    return found


def _insert_incidents(db: Database, conn: Connection, new: list[Incident]) -> None:
    """Insert new incidents and set their ids (matched back on pipeline, entity and
    first_seen, which are unique among the incidents one batch opens)."""
    t = s.incidents
    if db.dialect == "postgresql":
        returned = conn.execute(
            text(
                "INSERT INTO incidents (pipeline, entity, first_seen, last_seen, "
                "alert_count, max_severity) SELECT * FROM unnest(CAST(:p AS text[]), "
                "CAST(:e AS text[]), CAST(:f AS timestamptz[]), CAST(:l AS timestamptz[]), "
                "CAST(:c AS int[]), CAST(:s AS text[])) "
                "RETURNING id, pipeline, entity, first_seen"
            ),
            {
                "p": [i.pipeline for i in new],
                "e": [i.entity for i in new],
                "f": [i.first_seen for i in new],
                "l": [i.last_seen for i in new],
                "c": [i.alert_count for i in new],
                "s": [i.max_severity for i in new],
            },
        ).all()
    else:
        returned = conn.execute(
            db.insert(t).returning(t.c.id, t.c.pipeline, t.c.entity, t.c.first_seen),
            [
                {
                    "pipeline": i.pipeline,
                    "entity": i.entity,
                    "first_seen": i.first_seen,
                    "last_seen": i.last_seen,
                    "alert_count": i.alert_count,
                    "max_severity": i.max_severity,
                    "status": "open",
                }
                for i in new
            ],
        ).all()
    ids = {(r.pipeline, r.entity, utc(r.first_seen)): r.id for r in returned}
    for inc in new:
        inc.id = ids[(inc.pipeline, inc.entity, inc.first_seen)]


def _update_incidents(db: Database, conn: Connection, dirty: list[Incident]) -> None:
    t = s.incidents
    if db.dialect == "postgresql":
        conn.execute(
            text(
                "UPDATE incidents SET first_seen = v.f, last_seen = v.l, alert_count = v.c, "
                "max_severity = v.s FROM unnest(CAST(:id AS bigint[]), "
                "CAST(:f AS timestamptz[]), CAST(:l AS timestamptz[]), CAST(:c AS int[]), "
                "CAST(:s AS text[])) AS v(id, f, l, c, s) WHERE incidents.id = v.id"
            ),
            {
                "id": [i.id for i in dirty],
                "f": [i.first_seen for i in dirty],
                "l": [i.last_seen for i in dirty],
                "c": [i.alert_count for i in dirty],
                "s": [i.max_severity for i in dirty],
            },
        )
        return
    conn.execute(
        update(t)
        .where(t.c.id == bindparam("b_id"))
        .values(
            first_seen=bindparam("b_first"),
            last_seen=bindparam("b_last"),
            alert_count=bindparam("b_count"),
            max_severity=bindparam("b_severity"),
        ),
        [
            {
                "b_id": i.id,
                "b_first": i.first_seen,
                "b_last": i.last_seen,
                "b_count": i.alert_count,
                "b_severity": i.max_severity,
            }
            for i in dirty
        ],
    )


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
