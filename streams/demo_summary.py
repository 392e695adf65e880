"""The summary ``anomaly demo`` prints: per pipeline, from the database, what the run did and how
well the alerts matched the injected anomalies."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PipelineSummary:
    pipeline: str
    model_version: str
    records: int = 0
    scored: int = 0
    dead_letters: int = 0
    alerts: int = 0
    incidents: int = 0
    injected: int = 0
    true_alerts: int = 0
    recall_by_kind: dict[str, float] = field(default_factory=dict)
    throughput: float | None = None  # records/s scored while records flowed
    report: str = ""

    @property
    def precision(self) -> float | None:
        return self.true_alerts / self.alerts if self.alerts else None

    @property
    def recall(self) -> float | None:
        return self.true_alerts / self.injected if self.injected else None


@dataclass
class DemoResult:
    out_dir: Path
    database_url: str
    pipelines: dict[str, PipelineSummary]
    dashboards_dir: Path


def _summarize(
    cfg: Any, version: str, labels: Any, scored: int, rate: float | None
) -> PipelineSummary:
    """The pipeline's line of the summary, from the database: this run's rows only (a
    PostgreSQL database given with --db may hold earlier runs)."""
    from sqlalchemy import create_engine, func, select

    from storage import schema as s

    # This run's alerts and dead letters are those on its topic, which is new for each run. Its
    # incidents are the ones those alerts were grouped into. Not the incidents whose first_seen
    # is after the run started: first_seen is event time, and the replayed stream's event times
    # end at "now", so nearly all of them lie before the start (0 counted where 119 were made).
    name, topic = cfg.name, cfg.kafka.topic
    alerts, dead_letters = s.alerts.c, s.dead_letters.c
    run_alerts = (alerts.pipeline == name, alerts.kafka_topic == topic)
    run_dead = (dead_letters.pipeline == name, dead_letters.kafka_topic == topic)
    engine = create_engine(cfg.database.url)
    with engine.connect() as conn:
        alerted_ids = set(conn.execute(select(alerts.record_id).where(*run_alerts)).scalars())
        count_incidents = select(func.count(alerts.incident_id.distinct())).where(*run_alerts)
        incidents = conn.execute(count_incidents).scalar_one()
        count_dead = select(func.count()).select_from(s.dead_letters).where(*run_dead)
        dead = conn.execute(count_dead).scalar_one()
    engine.dispose()
    injected = labels[labels["is_anomaly"] == 1]
    hit = injected.index.isin(list(alerted_ids))
    by_kind = {
        kind: float(hit[(injected["anomaly_kind"] == kind).to_numpy()].mean())
        for kind in sorted(set(injected["anomaly_kind"]))
    }
    return PipelineSummary(
        pipeline=name,
        model_version=version,
        records=len(labels),
        scored=int(scored),
        dead_letters=int(dead),
        alerts=len(alerted_ids),
        incidents=int(incidents),
        injected=len(injected),
        true_alerts=int(hit.sum()),
        recall_by_kind=by_kind,
        throughput=rate,
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_summary(result: DemoResult) -> str:
    from sqlalchemy.engine import make_url

    lines = [
        "",
        "summary",
        f"{'pipeline':<15}{'records':>9}{'scored':>9}{'alerts':>8}{'incidents':>11}"
        f"{'precision':>11}{'recall':>8}{'records/s':>11}",
    ]
    for p in result.pipelines.values():
        rate = f"{p.throughput:,.0f}" if p.throughput else "n/a"
        lines.append(
            f"{p.pipeline:<15}{p.records:>9}{p.scored:>9}{p.alerts:>8}{p.incidents:>11}"
            f"{_pct(p.precision):>11}{_pct(p.recall):>8}{rate:>11}"
        )
    lines.append("")
    lines.append("recall by injected anomaly kind")
    for p in result.pipelines.values():
        kinds = ", ".join(f"{k} {_pct(v)}" for k, v in p.recall_by_kind.items())
        lines.append(f"  {p.pipeline}: {kinds}")
    lines.append("")
    lines.append(f"output:      {result.out_dir}")
    shown = make_url(result.database_url).render_as_string(hide_password=True)
    lines.append(f"database:    {shown}")
    lines.append(f"             (anomaly alerts list --db {shown} --limit 10)")
    for p in result.pipelines.values():
        lines.append(f"report:      {p.report}   ({p.pipeline}, model {p.model_version})")
    lines.append(f"dashboards:  {result.dashboards_dir} (Grafana JSON and provisioning;")
    lines.append("             `docker compose up` serves them on PostgreSQL, see README)")
    return "\n".join(lines)
