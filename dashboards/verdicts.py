"""Panels from analyst verdicts (the verdicts table, `anomaly alerts ack ID --verdict ...`, one
verdict per alert): precision among reviewed alerts, on the Alerts dashboard (overall and per
pipeline) and the Models dashboard (per model version). The time range selects alerts by ingest
time, whenever they were reviewed.
"""

from __future__ import annotations

from dashboards.builder import Panel, SQLTarget
from dashboards.panels import by_name, stat, table

VERDICTS_NOTE = (
    "Among the alerts analysts reviewed (anomaly alerts ack --verdict): true positives / "
    "reviewed. Says nothing about anomalies that raised no alert (recall), and reviewed "
    "alerts may not be a random sample of all alerts."
)

VERDICT_COLUMNS = ("alerts", "reviewed", "true_positives", "false_positives", "precision")
# The SELECT list's verdict counts (VERDICT_COLUMNS) and their FROM/WHERE: every alert in the range
# with its verdict, if any; the panels prepend their GROUP BY columns and append the GROUP BY.
VERDICT_COUNTS_SQL = """  count(*) AS alerts,
  count(v.alert_id) AS reviewed,
  count(*) FILTER (WHERE v.verdict = 'true_positive') AS true_positives,
  count(*) FILTER (WHERE v.verdict = 'false_positive') AS false_positives,
  (count(*) FILTER (WHERE v.verdict = 'true_positive'))::float8 / NULLIF(count(v.alert_id), 0)
    AS precision
FROM alerts a
LEFT JOIN verdicts v ON v.alert_id = a.id
WHERE $__timeFilter(a.ingest_time) AND a.pipeline IN (${pipeline:sqlstring})
"""


def precision_unit_override() -> dict:
    unit = {"id": "unit", "value": "percentunit"}
    return by_name("precision", unit, {"id": "decimals", "value": 1})


PRECISION_FROM_VERDICTS_SQL = """
SELECT
  (count(*) FILTER (WHERE v.verdict = 'true_positive'))::float8 / NULLIF(count(*), 0)
    AS precision
FROM alerts a
JOIN verdicts v ON v.alert_id = a.id
WHERE $__timeFilter(a.ingest_time) AND a.pipeline IN (${pipeline:sqlstring})
"""


def precision_from_verdicts_stat() -> Panel:
    return stat(
        "Precision from verdicts",
        SQLTarget(PRECISION_FROM_VERDICTS_SQL, columns=("precision",)),
        unit="percentunit",
        decimals=1,
        width=6,
        description=VERDICTS_NOTE + " Empty when no alert in the range has a verdict.",
    )


VERDICTS_BY_PIPELINE_SQL = f"""
SELECT
  a.pipeline,
{VERDICT_COUNTS_SQL}GROUP BY a.pipeline
ORDER BY a.pipeline
"""


def verdicts_by_pipeline() -> Panel:
    return table(
        "Verdicts and precision by pipeline",
        VERDICTS_BY_PIPELINE_SQL,
        ("pipeline", *VERDICT_COLUMNS),
        width=18,
        description=VERDICTS_NOTE,
        overrides=[precision_unit_override()],
    )


PRECISION_BY_VERSION_SQL = f"""
SELECT
  a.pipeline,
  a.model_version,
{VERDICT_COUNTS_SQL}GROUP BY a.pipeline, a.model_version
ORDER BY a.pipeline, a.model_version
"""


def precision_by_version() -> Panel:
    return table(
        "Precision from verdicts by model version",
        PRECISION_BY_VERSION_SQL,
        ("pipeline", "model_version", *VERDICT_COLUMNS),
        width=24,
        description=VERDICTS_NOTE,
        overrides=[precision_unit_override()],
    )
