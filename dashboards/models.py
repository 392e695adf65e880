"""The Models dashboard: active model versions, their evaluation, and drift of live scores, from
PostgreSQL (model_versions, stream_stats, alerts, drift_windows).

Each panel is a function below its query; ``models_dashboard`` lists them in layout order. The
rules for SQL (``${name:sqlstring}``, ``$__timeFilter``) are in dashboards/panels.py.
"""

from __future__ import annotations

from dashboards.builder import Dashboard, Panel, row, thresholds
from dashboards.panels import (
    DETECTOR,
    DETECTOR_SCORE,
    LINKS,
    PIPELINE_SQL,
    TAGS,
    by_name,
    count_bars,
    dashed_override,
    sql_timeseries,
    table,
)
from dashboards.verdicts import precision_by_version

# ------------------------------------------------------------------------------- active models

ACTIVE_MODELS_SQL = """
SELECT
  pipeline,
  version,
  activated_at,
  created_at,
  (metrics ->> 'target_fpr')::float8 AS target_fpr,
  (metrics ->> 'threshold')::float8 AS threshold,
  left(bundle_sha256, 12) AS bundle_sha256,
  bundle_path
FROM model_versions
WHERE active AND pipeline IN (${pipeline:sqlstring})
ORDER BY pipeline
"""

ACTIVE_MODELS_COLUMNS = (
    "pipeline",
    "version",
    "activated_at",
    "created_at",
    "target_fpr",
    "threshold",
    "bundle_sha256",
    "bundle_path",
)


def active_models() -> Panel:
    return table(
        "Active model per pipeline",
        ACTIVE_MODELS_SQL,
        ACTIVE_MODELS_COLUMNS,
        time_bound=False,  # what is serving now
        width=14,
        height=6,
    )


# Numbers at the top level of model_versions.metrics, then those one level down ("a.b").
EVALUATION_METRICS_SQL = """
SELECT m.pipeline, m.version, kv.key AS metric, kv.value::text::float8 AS value
FROM model_versions m
CROSS JOIN LATERAL jsonb_each(m.metrics::jsonb) AS kv(key, value)
WHERE m.active
  AND m.pipeline IN (${pipeline:sqlstring}) AND jsonb_typeof(kv.value) = 'number'
UNION ALL
SELECT m.pipeline, m.version, kv.key || '.' || sub.key, sub.value::text::float8
FROM model_versions m
CROSS JOIN LATERAL jsonb_each(m.metrics::jsonb) AS kv(key, value)
CROSS JOIN LATERAL jsonb_each(
  CASE WHEN jsonb_typeof(kv.value) = 'object' THEN kv.value ELSE '{}'::jsonb END
) AS sub(key, value)
WHERE m.active
  AND m.pipeline IN (${pipeline:sqlstring}) AND jsonb_typeof(sub.value) = 'number'
ORDER BY 1, 3
"""


def evaluation_metrics() -> Panel:
    return table(
        "Evaluation metrics of the active model",
        EVALUATION_METRICS_SQL,
        ("pipeline", "version", "metric", "value"),
        time_bound=False,
        width=10,
        height=12,
        description="Every number recorded with the version (model_versions.metrics), one "
        "level of nesting flattened: target_fpr, threshold, calibration quantiles and the "
        "evaluation results on held-out data.",
        decimals=4,
    )


SCORE_DRIFT_SQL = """
WITH live AS (
  SELECT
    pipeline,
    sum(score_p50 * records_scored) / NULLIF(sum(records_scored), 0) AS p50,
    sum(score_p90 * records_scored) / NULLIF(sum(records_scored), 0) AS p90,
    sum(score_p99 * records_scored) / NULLIF(sum(records_scored), 0) AS p99
  FROM stream_stats
  WHERE $__timeFilter(minute) AND pipeline IN (${pipeline:sqlstring})
  GROUP BY pipeline
)
SELECT
  l.pipeline,
  q.quantile,
  q.live,
  q.calibration,
  q.live / NULLIF(q.calibration, 0) AS ratio
FROM live l
JOIN model_versions m ON m.pipeline = l.pipeline AND m.active
CROSS JOIN LATERAL (
  VALUES
    ('p50', l.p50, (m.metrics -> 'calibration_quantiles' ->> 'p50')::float8),
    ('p90', l.p90, (m.metrics -> 'calibration_quantiles' ->> 'p90')::float8),
    ('p99', l.p99, (m.metrics -> 'calibration_quantiles' ->> 'p99')::float8)
) AS q(quantile, live, calibration)
ORDER BY 1, 2
"""


def _ratio_override() -> dict:
    """The ratio column (live / calibration): green near 1, orange then red further away."""
    steps = thresholds([(None, "red"), (0.8, "green"), (1.25, "orange"), (2, "red")])
    return by_name(
        "ratio",
        {"id": "custom.cellOptions", "value": {"type": "color-background"}},
        {"id": "thresholds", "value": steps},
    )


def score_drift() -> Panel:
    return table(
        "Score drift: live traffic vs calibration",
        SCORE_DRIFT_SQL,
        ("pipeline", "quantile", "live", "calibration", "ratio"),
        width=14,
        height=6,
        decimals=3,
        description="Ensemble-score quantiles of live traffic in the time range against the "
        "same quantiles on the calibration set. A ratio well away from 1 means the traffic "
        "no longer looks like the training data: retrain or investigate.",
        overrides=[_ratio_override()],
    )


# ------------------------------------------------------------------------------ drift over time

QUANTILES_OVER_TIME_SQL = """
SELECT
  $__timeGroupAlias(s.minute, $__interval),
  s.pipeline AS metric,
  sum(s.score_p50 * s.records_scored) / NULLIF(sum(s.records_scored), 0)
    AS live_p50,
  sum(s.score_p90 * s.records_scored) / NULLIF(sum(s.records_scored), 0)
    AS live_p90,
  sum(s.score_p99 * s.records_scored) / NULLIF(sum(s.records_scored), 0)
    AS live_p99,
  max((m.metrics -> 'calibration_quantiles' ->> 'p50')::float8)
    AS calibration_p50,
  max((m.metrics -> 'calibration_quantiles' ->> 'p90')::float8)
    AS calibration_p90,
  max((m.metrics -> 'calibration_quantiles' ->> 'p99')::float8)
    AS calibration_p99
FROM stream_stats s
LEFT JOIN model_versions m ON m.pipeline = s.pipeline AND m.active
WHERE $__timeFilter(s.minute) AND s.pipeline IN (${pipeline:sqlstring})
GROUP BY 1, 2
ORDER BY 1, 2
"""

QUANTILES_OVER_TIME_COLUMNS = (
    "time",
    "metric",
    "live_p50",
    "live_p90",
    "live_p99",
    "calibration_p50",
    "calibration_p90",
    "calibration_p99",
)


def quantiles_over_time() -> Panel:
    return sql_timeseries(
        "Live score quantiles vs calibration quantiles",
        QUANTILES_OVER_TIME_SQL,
        QUANTILES_OVER_TIME_COLUMNS,
        fill=0,
        width=24,
        overrides=[dashed_override(".*calibration.*")],
    )


def alerts_by_model_version() -> Panel:
    return count_bars(
        "Alerts by model version",
        "pipeline || ' ' || model_version",
        "A new version rolling out shows as a change of colour.",
    )


# This query embeds DETECTOR_SCORE and keeps the indentation it had when written inline: the
# fragment's own lines (2 spaces) set what the dedent removes, so this indentation is what the
# committed JSON's rawSql carries. Re-indenting it changes the output.
DETECTOR_SCORE_BY_VERSION_SQL = f"""
                    SELECT
                      $__timeGroupAlias(a.ingest_time, $__interval),
                      a.pipeline || ' ' || a.model_version AS metric,
                      avg({DETECTOR_SCORE}) AS score
                    FROM alerts a
                    WHERE $__timeFilter(a.ingest_time) AND a.pipeline IN (${{pipeline:sqlstring}})
                    GROUP BY 1, 2
                    ORDER BY 1, 2
                    """


def detector_score_by_version() -> Panel:
    return sql_timeseries(
        "Mean $detector score of alerts by model version",
        DETECTOR_SCORE_BY_VERSION_SQL,
        ("time", "metric", "score"),
        fill=0,
    )


VERSIONS_CREATED_SQL = """
SELECT
  created_at AS time,
  pipeline,
  version,
  active,
  activated_at,
  (metrics ->> 'target_fpr')::float8 AS target_fpr,
  (metrics ->> 'threshold')::float8 AS threshold,
  bundle_path
FROM model_versions
WHERE $__timeFilter(created_at) AND pipeline IN (${pipeline:sqlstring})
ORDER BY created_at DESC
"""

VERSIONS_CREATED_COLUMNS = (
    "time",
    "pipeline",
    "version",
    "active",
    "activated_at",
    "target_fpr",
    "threshold",
    "bundle_path",
)


def versions_created() -> Panel:
    return table(
        "Model versions created in range",
        VERSIONS_CREATED_SQL,
        VERSIONS_CREATED_COLUMNS,
        width=24,
    )


# ------------------------------------------------------------------------- drift windows (SQL)

# One row per closed window of the service's DriftMonitor (README, "Drift"), newest first.
DRIFT_WINDOWS_SQL = """
SELECT
  d.window_start AS time,
  d.pipeline,
  d.model_version,
  d.records,
  d.alerts,
  d.alert_rate_p,
  d.ks_stat,
  d.ks_p,
  d.drifted,
  (
    SELECT string_agg(
      (f ->> 'feature') || ' (' || round((f ->> 'psi')::numeric, 3) || ')', ', ' ORDER BY n
    )
    FROM jsonb_array_elements(d.top_features::jsonb) WITH ORDINALITY AS e(f, n)
  ) AS top_features_psi
FROM drift_windows d
WHERE $__timeFilter(d.window_start) AND d.pipeline IN (${pipeline:sqlstring})
ORDER BY d.window_start DESC, d.pipeline
LIMIT 500
"""

DRIFT_WINDOWS_COLUMNS = (
    "time",
    "pipeline",
    "model_version",
    "records",
    "alerts",
    "alert_rate_p",
    "ks_stat",
    "ks_p",
    "drifted",
    "top_features_psi",
)


def drift_windows() -> Panel:
    return table(
        "Drift windows",
        DRIFT_WINDOWS_SQL,
        DRIFT_WINDOWS_COLUMNS,
        width=24,
        height=8,
        decimals=4,
        description="Per closed window: the alert count tested against the model's rate "
        "(alert_rate_p), the uniformity of the ensemble p-values (KS), and the features with "
        "the highest PSI against their training deciles. drifted: a test below its "
        "Bonferroni level or a PSI above drift.psi_threshold (0.2). `anomaly drift` prints "
        "the same.",
    )


DRIFT_SIGNALS_SQL = """
SELECT
  $__timeGroupAlias(d.window_start, $__interval),
  d.pipeline AS metric,
  max(d.ks_stat) AS ks_stat,
  max((d.top_features::jsonb -> 0 ->> 'psi')::float8) AS top_psi,
  max(CASE WHEN d.drifted THEN 1 ELSE 0 END) AS drifted
FROM drift_windows d
WHERE $__timeFilter(d.window_start) AND d.pipeline IN (${pipeline:sqlstring})
GROUP BY 1, 2
ORDER BY 1, 2
"""


def drift_signals() -> Panel:
    return sql_timeseries(
        "Drift signals per window: KS of p-values, highest feature PSI",
        DRIFT_SIGNALS_SQL,
        ("time", "metric", "ks_stat", "top_psi", "drifted"),
        fill=0,
        width=24,
        description="PSI above 0.2 is the usual sign that a feature moved; drifted is 1 in "
        "windows the monitor flagged.",
    )


# ------------------------------------------------------------------------------------ dashboard


def models_dashboard() -> Dashboard:
    return Dashboard(
        uid="anomaly-models",
        title="Anomaly monitor / Models",
        description="Active model versions, their evaluation, and drift of live scores.",
        panels=[
            active_models(),
            evaluation_metrics(),
            score_drift(),
            row("Drift over time"),
            quantiles_over_time(),
            alerts_by_model_version(),
            detector_score_by_version(),
            precision_by_version(),
            versions_created(),
            drift_windows(),
            drift_signals(),
        ],
        variables=[PIPELINE_SQL, DETECTOR],
        tags=TAGS,
        time_from="now-24h",
        refresh="1m",
        links=LINKS,
    )
