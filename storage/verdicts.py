"""Analyst verdicts on alerts: ``anomaly alerts ack ID|--incident ID [--verdict ...]`` writes
them, the dashboards' precision panels and ``anomaly evaluate --from-db`` read them.

A verdict lives in the ``verdicts`` table (one row per alert, a later verdict replaces the
earlier one), never on the alert write path. Acknowledging with a verdict also acknowledges the
alert, as a plain ``ack`` does: an open alert becomes ``acknowledged``, others keep their status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update

from storage import schema as s
from storage.engine import Database, utc
from storage.errors import InvalidArgumentError, NotFoundError
from storage.incidents import _chunks
from storage.queries import alerts_in_scope

_IDS_PER_STATEMENT = 10_000


@dataclass(slots=True)
class AckResult:
    """What one ``ack`` did: the alerts it covered, those it moved from open to acknowledged,
    and the verdict it recorded on each (None: a plain acknowledgement)."""

    alert_ids: list[int]
    acknowledged: list[int] = field(default_factory=list)
    verdict: str | None = None
    verdict_by: str | None = None
    verdict_at: datetime | None = None


def check_verdict(verdict: str, by: str | None, note: str | None) -> None:
    """Refuse a verdict the table would reject, naming the field (as the CLI writes it)."""
    if verdict not in s.VERDICTS:
        raise InvalidArgumentError(
            f"--verdict {verdict!r}: expected one of {', '.join(s.VERDICTS)}"
        )
    if not by or not by.strip():
        raise InvalidArgumentError("--by: the analyst's name is empty")
    if len(by) > s.VERDICT_BY_LEN:
        raise InvalidArgumentError(f"--by: longer than {s.VERDICT_BY_LEN} characters")
    if note is not None and len(note) > s.VERDICT_NOTE_LEN:
        raise InvalidArgumentError(f"--note: longer than {s.VERDICT_NOTE_LEN} characters")


def ack(
    db: Database,
    alert_id: int | None = None,
    incident_id: int | None = None,
    verdict: str | None = None,
    by: str | None = None,
    note: str | None = None,
    at: datetime | None = None,
) -> AckResult:
    """See ``AlertStore.ack``."""
    if (alert_id is None) == (incident_id is None):
        raise InvalidArgumentError("ack: give an alert id or --incident ID (one of them)")
    if verdict is None:
        if note is not None:
            raise InvalidArgumentError("--note: only with --verdict (a note explains a verdict)")
    else:
        check_verdict(verdict, by, note)
    a, v = s.alerts, s.verdicts
    what = f"alert {alert_id}" if alert_id is not None else f"incident {incident_id}'s alerts"
    with db.transaction(f"acknowledging {what}") as conn:
        if alert_id is not None:
            ids = list(conn.execute(select(a.c.id).where(a.c.id == alert_id)).scalars())
            if not ids:
                raise NotFoundError(f"no alert with id {alert_id}")
        else:
            found = conn.execute(
                select(s.incidents.c.id).where(s.incidents.c.id == incident_id)
            ).first()
            if found is None:
                raise NotFoundError(f"no incident with id {incident_id}")
            ids = list(
                conn.execute(
                    select(a.c.id).where(a.c.incident_id == incident_id).order_by(a.c.id)
                ).scalars()
            )
            if not ids:
                raise NotFoundError(f"incident {incident_id} has no alerts (pruned?)")
        # In blocks: one bound parameter per id, and psycopg refuses more than 65,535 in one
        # statement (an incident can hold more alerts than that).
        acknowledged = [
            alert
            for block in _chunks(ids, _IDS_PER_STATEMENT)
            for alert in conn.execute(
                update(a)
                .where(a.c.id.in_(block), a.c.status == "open")
                .values(status="acknowledged")
                .returning(a.c.id)
            ).scalars()
        ]
        result = AckResult(alert_ids=ids, acknowledged=sorted(acknowledged))
        if verdict is None:
            return result
        when = utc(at) if at is not None else datetime.now(UTC)
        rows = [
            dict(alert_id=i, verdict=verdict, verdict_by=by, verdict_at=when, note=note)
            for i in ids
        ]
        upsert = db.upsert(v, ["alert_id"], ("verdict", "verdict_by", "verdict_at", "note"))
        conn.execute(upsert, rows)
        result.verdict, result.verdict_by, result.verdict_at = verdict, by, when
        return result


REVIEWED_COLUMNS: Sequence[str] = (
    "id",
    "pipeline",
    "model_version",
    "record_id",
    "entity",
    "ingest_time",
    "ensemble_score",
    "ensemble_p",
    "severity",
    "record",
)


def reviewed_alerts(
    db: Database,
    pipeline: str | None = None,
    model_version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """Alerts that have a verdict, oldest first: the alert's columns in ``REVIEWED_COLUMNS``
    (``record`` is the stored record, as the model scored it) and the verdict's."""
    a, v = s.alerts, s.verdicts
    query = (
        select(
            *(a.c[c] for c in REVIEWED_COLUMNS),
            v.c.verdict,
            v.c.verdict_by,
            v.c.verdict_at,
            v.c.note,
        )
        .join_from(a, v, v.c.alert_id == a.c.id)
        .order_by(a.c.ingest_time, a.c.id)
    )
    query = alerts_in_scope(query, since, until, pipeline=pipeline, model_version=model_version)
    return db.rows("reading reviewed alerts", query)


def alert_counts(
    db: Database,
    pipeline: str | None = None,
    model_version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[tuple[str, str], int]:
    """Alerts (reviewed or not) per (pipeline, model version) in the same scope: the
    denominator of review coverage."""
    a = s.alerts
    query = select(a.c.pipeline, a.c.model_version, func.count()).group_by(
        a.c.pipeline, a.c.model_version
    )
    query = alerts_in_scope(query, since, until, pipeline=pipeline, model_version=model_version)
    with db.transaction("counting alerts", write=False) as conn:
        return {(p, mv): int(n) for p, mv, n in conn.execute(query)}


def verdict_data(
    store: Any,
    pipeline: str | None = None,
    model_version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Any:
    """The reviewed alerts of one pipeline as ``anomaly.evaluation.verdicts.VerdictData``: the
    stored records as the frame, the verdicts as 0/1 labels, the alert counts per model version
    for review coverage. Without ``pipeline``, the one pipeline that has verdicts (records of
    different pipelines have different fields)."""
    import numpy as np
    import pandas as pd

    from anomaly.evaluation.verdicts import VerdictData

    rows = store.reviewed_alerts(pipeline, model_version, since, until)
    pipelines = sorted({r["pipeline"] for r in rows})
    if pipeline is None and len(pipelines) > 1:
        raise InvalidArgumentError(
            f"--pipeline: verdicts of several pipelines in scope ({', '.join(pipelines)}); "
            "pass one (their records have different fields)"
        )
    chosen = pipeline if pipeline is not None else (pipelines[0] if pipelines else None)
    counts = store.alert_counts(chosen, model_version, since, until)
    return VerdictData(
        frame=pd.DataFrame([r["record"] for r in rows]),
        labels=np.array([r["verdict"] == "true_positive" for r in rows], dtype=np.int8),
        model_versions=[r["model_version"] for r in rows],
        alerts={mv: n for (p, mv), n in counts.items() if chosen is None or p == chosen},
        scope={
            "database": store.url.render_as_string(hide_password=True),
            "pipeline": chosen,
            "model_version": model_version,
            "since": since.isoformat(timespec="seconds") if since else None,
            "until": until.isoformat(timespec="seconds") if until else None,
            "reviewed_alerts": len(rows),
        },
    )
