"""Run every SQL panel query of the dashboards against a PostgreSQL database.

What Grafana would run, after expanding its macros and variables for the last hours: catches a
schema change that breaks a panel, or a role without the grants it needs, before anyone opens
a dashboard. Each query runs in a read-only transaction that is rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from dashboards.builder import SQLTarget
from dashboards.definitions import all_dashboards
from dashboards.macros import TimeRange, expand
from dashboards.panels import PIPELINE_SQL


@dataclass
class PanelCheck:
    dashboard: str
    panel: str
    ok: bool
    rows: int = 0
    error: str = ""


def check_panels(
    url: str, hours: float = 24.0, detector: str = "ensemble", role: str | None = None
) -> list[PanelCheck]:
    """``url``: a PostgreSQL SQLAlchemy or libpq URL; ``role``: SET ROLE to it first."""
    import psycopg

    conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
    end = datetime.now(UTC)
    time_range = TimeRange(end - timedelta(hours=hours), end, interval_s=max(60.0, hours * 12))
    results: list[PanelCheck] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if role:
            conn.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(role)))
        pipelines = [r[0] for r in conn.execute(PIPELINE_SQL.query).fetchall()]
        # No pipeline yet: a value that matches nothing still exercises the query.
        variables = {"pipeline": pipelines or ["(none)"], "detector": detector}
        for dashboard in all_dashboards():
            for panel, target in dashboard.targets():
                if not isinstance(target, SQLTarget):
                    continue
                sql = expand(target.sql, time_range, variables)
                try:
                    with conn.transaction(force_rollback=True):
                        conn.execute("SET TRANSACTION READ ONLY")
                        cur = conn.execute(sql)
                        columns = tuple(d.name for d in cur.description or ())
                        rows = len(cur.fetchall())
                except psycopg.Error as exc:
                    results.append(
                        PanelCheck(dashboard.uid, panel.title, False, error=str(exc).strip())
                    )
                    continue
                if columns != target.columns:
                    error = f"columns {columns}, expected {target.columns}"
                    results.append(PanelCheck(dashboard.uid, panel.title, False, error=error))
                else:
                    results.append(PanelCheck(dashboard.uid, panel.title, True, rows=rows))
    return results
