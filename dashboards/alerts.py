"""The Alerts dashboard: alerts, incidents and dead letters, from PostgreSQL.

Each panel is a function below its query; ``alerts_dashboard`` lists them in layout order. The
rules for SQL (``${name:sqlstring}``, ``$__timeFilter``) are in dashboards/panels.py.
"""

from __future__ import annotations

from dashboards.builder import Dashboard, Panel, SQLTarget, row
from dashboards.datasources import POSTGRES
from dashboards.panels import (
    DETECTOR,
    DETECTOR_SCORE,
    LINKS,
    PIPELINE_SQL,
    SEVERITY_RANK,
    TAGS,
    by_name,
    count_bars,
    dashed_override,
    severity_overrides,
    sql_timeseries,
    stat,
    table,
)
from dashboards.verdicts import precision_from_verdicts_stat, verdicts_by_pipeline

# ------------------------------------------------------------------------------------ top stats

ALERTS_SQL = """
SELECT count(*) AS alerts
FROM alerts
WHERE $__timeFilter(ingest_time) AND pipeline IN (${pipeline:sqlstring})
"""


def alerts_stat() -> Panel:
    return stat(
        "Alerts",
        SQLTarget(ALERTS_SQL, columns=("alerts",)),
        description="Alerts raised in the time range.",
    )


RECORDS_SCORED_SQL = """
SELECT coalesce(sum(records_scored), 0) AS records
FROM stream_stats
WHERE $__timeFilter(minute) AND pipeline IN (${pipeline:sqlstring})
"""


def records_scored_stat() -> Panel:
    return stat("Records scored", SQLTarget(RECORDS_SCORED_SQL, columns=("records",)))


ALERT_RATE_SQL = """
SELECT sum(records_alerted)::float8 / NULLIF(sum(records_scored), 0) AS alert_rate
FROM stream_stats
WHERE $__timeFilter(minute) AND pipeline IN (${pipeline:sqlstring})
"""


def alert_rate_stat() -> Panel:
    return stat(
        "Alert rate",
        SQLTarget(ALERT_RATE_SQL, columns=("alert_rate",)),
        unit="percentunit",
        decimals=3,
        description="Alerted records / scored records. With few true anomalies it should be "
        "close to the target false-positive rate of the active model.",
    )


OPEN_INCIDENTS_COUNT_SQL = """
SELECT count(*) AS open_incidents
FROM incidents
WHERE status = 'open' AND $__timeFilter(last_seen)
  AND pipeline IN (${pipeline:sqlstring})
"""


def open_incidents_stat() -> Panel:
    return stat(
        "Open incidents",
        SQLTarget(OPEN_INCIDENTS_COUNT_SQL, columns=("open_incidents",)),
        thresholds=[(None, "green"), (1, "orange"), (10, "red")],
    )


CRITICAL_ALERTS_SQL = """
SELECT count(*) AS critical
FROM alerts
WHERE $__timeFilter(ingest_time) AND pipeline IN (${pipeline:sqlstring})
  AND severity = 'critical'
"""


def critical_alerts_stat() -> Panel:
    return stat(
        "Critical alerts",
        SQLTarget(CRITICAL_ALERTS_SQL, columns=("critical",)),
        thresholds=[(None, "green"), (1, "red")],
    )


DEAD_LETTERS_COUNT_SQL = """
SELECT count(*) AS dead_letters
FROM dead_letters
WHERE $__timeFilter(created_at) AND pipeline IN (${pipeline:sqlstring})
"""


def dead_letters_stat() -> Panel:
    return stat(
        "Dead letters",
        SQLTarget(DEAD_LETTERS_COUNT_SQL, columns=("dead_letters",)),
        thresholds=[(None, "green"), (1, "orange")],
    )


# ------------------------------------------------------------------------------ alerts over time


def alerts_by_severity() -> Panel:
    return count_bars(
        "Alerts by pipeline and severity",
        "pipeline || ' ' || severity",
        "Alerts per time bucket, stacked by pipeline and severity.",
    )


ALERT_RATE_VS_TARGET_SQL = """
SELECT
  $__timeGroupAlias(s.minute, $__interval),
  s.pipeline || ' observed' AS metric,
  sum(s.records_alerted)::float8 / NULLIF(sum(s.records_scored), 0) AS rate
FROM stream_stats s
WHERE $__timeFilter(s.minute) AND s.pipeline IN (${pipeline:sqlstring})
GROUP BY 1, 2
UNION ALL
SELECT
  $__timeGroupAlias(s.minute, $__interval),
  s.pipeline || ' expected (target FPR)' AS metric,
  max((m.metrics ->> 'target_fpr')::float8) AS rate
FROM stream_stats s
JOIN model_versions m ON m.pipeline = s.pipeline AND m.active
WHERE $__timeFilter(s.minute) AND s.pipeline IN (${pipeline:sqlstring})
GROUP BY 1, 2
ORDER BY 1, 2
"""


def alert_rate_vs_target() -> Panel:
    return sql_timeseries(
        "Observed alert rate vs expected false-positive rate",
        ALERT_RATE_VS_TARGET_SQL,
        ("time", "metric", "rate"),
        unit="percentunit",
        fill=0,
        description="Share of scored records that alerted, against the target false-positive "
        "rate the active model was calibrated for (model_versions.metrics.target_fpr). A "
        "rate far above the target with no incident behind it means the traffic drifted.",
        overrides=[dashed_override(".*expected.*", {"id": "custom.lineWidth", "value": 2})],
    )


SCORE_QUANTILES_SQL = """
SELECT
  $__timeGroupAlias(s.minute, $__interval),
  s.pipeline AS metric,
  sum(s.score_p50 * s.records_scored) / NULLIF(sum(s.records_scored), 0) AS p50,
  sum(s.score_p90 * s.records_scored) / NULLIF(sum(s.records_scored), 0) AS p90,
  sum(s.score_p99 * s.records_scored) / NULLIF(sum(s.records_scored), 0) AS p99,
  max((m.metrics ->> 'threshold')::float8) AS threshold
FROM stream_stats s
LEFT JOIN model_versions m ON m.pipeline = s.pipeline AND m.active
WHERE $__timeFilter(s.minute) AND s.pipeline IN (${pipeline:sqlstring})
GROUP BY 1, 2
ORDER BY 1, 2
"""


def score_quantiles() -> Panel:
    return sql_timeseries(
        "Ensemble score quantiles and alert threshold",
        SCORE_QUANTILES_SQL,
        ("time", "metric", "p50", "p90", "p99", "threshold"),
        fill=0,
        description="Distribution of the ensemble score of all scored records (per-minute "
        "quantiles, averaged over each bucket weighted by records) and the active model's "
        "alert threshold (dashed).",
        overrides=[
            dashed_override(
                ".*threshold.*", {"id": "color", "value": {"fixedColor": "red", "mode": "fixed"}}
            )
        ],
    )


# The queries that embed DETECTOR_SCORE or SEVERITY_RANK keep the indentation they had when they
# were written inline: the fragment's own lines (2 spaces) set what the dedent removes, so this
# indentation is what the committed JSON's rawSql carries. Re-indenting them changes the output.

ALERT_SCORES_SQL = f"""
                    SELECT {DETECTOR_SCORE} AS score
                    FROM alerts a
                    WHERE $__timeFilter(a.ingest_time) AND a.pipeline IN (${{pipeline:sqlstring}})
                    """


def alert_score_histogram() -> Panel:
    return Panel(
        title="Alert score distribution ($detector)",
        type="histogram",
        datasource=POSTGRES,
        targets=[SQLTarget(ALERT_SCORES_SQL, columns=("score",))],
        description="Histogram of the chosen detector's score over the alerts in range.",
        options={"bucketCount": 30, "combine": False, "legend": {"showLegend": False}},
        custom={"fillOpacity": 80, "lineWidth": 1},
    )


# --------------------------------------------------------------------------------- who and what

TOP_ENTITIES_SQL = """
SELECT
  entity,
  pipeline,
  count(*) AS alerts,
  max(ensemble_score) AS max_score,
  max(ingest_time) AS last_alert
FROM alerts
WHERE $__timeFilter(ingest_time) AND pipeline IN (${pipeline:sqlstring})
  AND entity IS NOT NULL
GROUP BY entity, pipeline
ORDER BY alerts DESC, max_score DESC
LIMIT 15
"""


def top_entities() -> Panel:
    return table(
        "Top entities",
        TOP_ENTITIES_SQL,
        ("entity", "pipeline", "alerts", "max_score", "last_alert"),
        width=8,
        height=9,
        description="Cards or machines with the most alerts in range.",
    )


OPEN_INCIDENTS_SQL = f"""
                SELECT
                  id AS incident,
                  pipeline,
                  entity,
                  max_severity AS severity,
                  alert_count AS alerts,
                  first_seen,
                  last_seen
                FROM incidents
                WHERE status = 'open' AND $__timeFilter(last_seen)
                  AND pipeline IN (${{pipeline:sqlstring}})
                ORDER BY {SEVERITY_RANK.format(col="max_severity")} DESC, last_seen DESC
                LIMIT 100
                """


def open_incidents_table() -> Panel:
    columns = ("incident", "pipeline", "entity", "severity", "alerts", "first_seen", "last_seen")
    return table(
        "Open incidents",
        OPEN_INCIDENTS_SQL,
        columns,
        width=8,
        height=9,
        overrides=severity_overrides(),
        description="Alerts on the same entity close together form one incident.",
    )


FIRED_DETECTORS_SQL = """
SELECT d.detector, count(*) AS alerts
FROM alerts a
CROSS JOIN LATERAL jsonb_array_elements_text(a.fired_detectors::jsonb)
  AS d(detector)
WHERE $__timeFilter(a.ingest_time) AND a.pipeline IN (${pipeline:sqlstring})
GROUP BY d.detector
ORDER BY d.detector
"""


def alerts_by_detector() -> Panel:
    return Panel(
        title="Alerts by detector that fired",
        type="barchart",
        datasource=POSTGRES,
        targets=[SQLTarget(FIRED_DETECTORS_SQL, columns=("detector", "alerts"))],
        width=8,
        height=9,
        description="How often each detector's own p-value was below the target rate on an "
        "alert: detectors that agree make an alert more credible.",
        options={"orientation": "horizontal", "showValue": "auto", "xField": "detector"},
    )


LATEST_ALERTS_SQL = f"""
                SELECT
                  a.ingest_time AS time,
                  a.pipeline,
                  a.entity,
                  a.record_id,
                  a.severity,
                  a.ensemble_score AS score,
                  a.ensemble_p AS p_value,
                  {DETECTOR_SCORE} AS detector_score,
                  (
                    SELECT string_agg(
                      (f.item ->> 'feature') || '=' || coalesce(f.item ->> 'value', 'null')
                        || ' (' || coalesce(round((f.item ->> 'contribution')::numeric, 2)::text,
                                            'null') || ')',
                      ', ' ORDER BY f.n)
                    FROM jsonb_array_elements(a.top_features::jsonb) WITH ORDINALITY AS f(item, n)
                  ) AS top_features,
                  (
                    SELECT string_agg(d.name, ',' ORDER BY d.name)
                    FROM jsonb_array_elements_text(a.fired_detectors::jsonb) AS d(name)
                  ) AS fired,
                  a.status,
                  a.incident_id AS incident,
                  a.model_version
                FROM alerts a
                WHERE $__timeFilter(a.ingest_time) AND a.pipeline IN (${{pipeline:sqlstring}})
                ORDER BY a.ingest_time DESC, a.id DESC
                LIMIT 200
                """

LATEST_ALERTS_COLUMNS = (
    "time",
    "pipeline",
    "entity",
    "record_id",
    "severity",
    "score",
    "p_value",
    "detector_score",
    "top_features",
    "fired",
    "status",
    "incident",
    "model_version",
)


def latest_alerts() -> Panel:
    return table(
        "Latest alerts",
        LATEST_ALERTS_SQL,
        LATEST_ALERTS_COLUMNS,
        width=24,
        height=10,
        description="Newest alerts first. top_features: feature=value (contribution to the "
        "score); detector_score: the score of the detector chosen above.",
        overrides=[
            *severity_overrides(),
            by_name("p_value", {"id": "unit", "value": "sci"}),
            by_name("top_features", {"id": "custom.width", "value": 420}),
        ],
    )


# --------------------------------------------------------------------------------- dead letters


def dead_letters_by_reason() -> Panel:
    return count_bars(
        "Dead letters by reason",
        "error_kind",
        "Records that could not be decoded or validated, by reason; each is kept "
        "with its raw bytes in the dead_letters table and topic.",
        table="dead_letters",
        time_column="created_at",
        value="dead_letters",
        width=10,
    )


LATEST_DEAD_LETTERS_SQL = """
SELECT
  created_at AS time,
  pipeline,
  error_kind AS reason,
  error_message,
  kafka_topic AS topic,
  kafka_partition AS partition,
  kafka_offset AS "offset"
FROM dead_letters
WHERE $__timeFilter(created_at) AND pipeline IN (${pipeline:sqlstring})
ORDER BY created_at DESC, id DESC
LIMIT 100
"""


def latest_dead_letters() -> Panel:
    columns = ("time", "pipeline", "reason", "error_message", "topic", "partition", "offset")
    return table(
        "Latest dead letters",
        LATEST_DEAD_LETTERS_SQL,
        columns,
        width=14,
    )


# ------------------------------------------------------------------------------------ dashboard


def alerts_dashboard() -> Dashboard:
    return Dashboard(
        uid="anomaly-alerts",
        title="Anomaly monitor / Alerts",
        description="Alerts, incidents and dead letters of the anomaly-monitor pipelines.",
        panels=[
            alerts_stat(),
            records_scored_stat(),
            alert_rate_stat(),
            open_incidents_stat(),
            critical_alerts_stat(),
            dead_letters_stat(),
            row("Alerts over time"),
            alerts_by_severity(),
            alert_rate_vs_target(),
            score_quantiles(),
            alert_score_histogram(),
            row("Who and what"),
            top_entities(),
            open_incidents_table(),
            alerts_by_detector(),
            latest_alerts(),
            row("Analyst verdicts"),
            precision_from_verdicts_stat(),
            verdicts_by_pipeline(),
            row("Dead letters"),
            dead_letters_by_reason(),
            latest_dead_letters(),
        ],
        variables=[PIPELINE_SQL, DETECTOR],
        tags=TAGS,
        links=LINKS,
    )
