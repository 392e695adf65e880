"""The three dashboards: Alerts, Service and Models.

SQL panels read the tables of docs/architecture.md ("SQL schema") through the read-only role;
Prometheus panels use the metric names of streams/metrics.py. Text variables go into SQL only as
``${name:sqlstring}`` (each value single-quoted, inner quotes doubled: ``pipeline IN
(${pipeline:sqlstring})``, ``CASE ${detector:sqlstring}``), never as a bare ``$name``, which Grafana
inserts without quotes for a single-value variable; in PromQL multi-value variables expand to a
regex (``pipeline=~"$pipeline"``).
Every query that shows data from the dashboard's time range filters with ``$__timeFilter``.
"""

from __future__ import annotations

from dashboards.alerts import alerts_dashboard
from dashboards.builder import Dashboard, Panel, PromTarget, SQLTarget, row
from dashboards.datasources import POSTGRES, PROMETHEUS
from dashboards.panels import (
    DETECTOR,
    DETECTOR_SCORE,
    LINKS,
    PIPELINE_PROM,
    PIPELINE_SQL,
    TAGS,
    count_bars,
    table,
    timeseries,
)

# --------------------------------------------------------------------------------------- service

_PROM_PIPE = '{pipeline=~"$pipeline"}'


def _rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{_PROM_PIPE}[$__rate_interval]))"


def _quantile(q: float, metric: str, by: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (le, {by}) "
        f"(rate({metric}_bucket{_PROM_PIPE}[$__rate_interval])))"
    )


def _info_stat(title: str, metric: str, label: str, description: str) -> Panel:
    return Panel(
        title=title,
        type="stat",
        datasource=PROMETHEUS,
        targets=[
            PromTarget(
                f"max by (pipeline, {label}) ({metric}{_PROM_PIPE})",
                legend="{{pipeline}}",
                instant=True,
                format="table",
            )
        ],
        width=6,
        height=4,
        description=description,
        options={
            "colorMode": "none",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": f"/^{label}$/", "values": True},
            "textMode": "value_and_name",
        },
    )


def _up_stat(title: str, metric: str, description: str) -> Panel:
    """A red/green stat of a 0/1 gauge per pipeline."""
    return Panel(
        title=title,
        type="stat",
        datasource=PROMETHEUS,
        targets=[PromTarget(f"min by (pipeline) ({metric}{_PROM_PIPE})", "{{pipeline}}")],
        width=6,
        height=4,
        defaults={
            "mappings": [
                {
                    "options": {
                        "0": {"color": "red", "index": 0, "text": "down"},
                        "1": {"color": "green", "index": 1, "text": "up"},
                    },
                    "type": "value",
                }
            ]
        },
        options={
            "colorMode": "background",
            "graphMode": "none",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "value_and_name",
        },
        description=description,
    )


def service_dashboard() -> Dashboard:
    panels = [
        _info_stat(
            "Scoring device",
            "anomaly_scoring_device_info",
            "device",
            "Where each pipeline's scorer runs: cuda, mps or cpu.",
        ),
        _info_stat(
            "Model version",
            "anomaly_model_version_info",
            "version",
            "The model version each scorer is serving.",
        ),
        _up_stat(
            "Database up",
            "anomaly_database_up",
            "0 while the scorer cannot reach the database (it backs off and retries; Kafka "
            "offsets are not committed meanwhile, so nothing is lost).",
        ),
        Panel(
            title="Total consumer lag",
            type="stat",
            datasource=PROMETHEUS,
            targets=[
                PromTarget(f"sum by (pipeline) (anomaly_consumer_lag{_PROM_PIPE})", "{{pipeline}}")
            ],
            width=6,
            height=4,
            thresholds=[(None, "green"), (10000, "orange"), (100000, "red")],
            options={
                "colorMode": "value",
                "graphMode": "area",
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "textMode": "value_and_name",
            },
        ),
        _up_stat(
            "Schema registry up",
            "anomaly_schema_registry_up",
            "Pipelines reading Avro with kafka.schema_registry_url only (no data for the "
            "others): 0 while the registry cannot be asked; the scorer holds the batch and "
            "retries instead of dead-lettering it.",
        ),
        row("Throughput"),
        timeseries(
            "Records per second",
            [
                PromTarget(
                    _rate("anomaly_records_consumed_total", "pipeline"), "{{pipeline}} consumed"
                ),
                PromTarget(
                    _rate("anomaly_records_scored_total", "pipeline"), "{{pipeline}} scored"
                ),
            ],
            datasource=PROMETHEUS,
            unit="reqps",
            width=8,
        ),
        timeseries(
            "Alerts per second by severity",
            [
                PromTarget(
                    _rate("anomaly_records_alerted_total", "pipeline, severity"),
                    "{{pipeline}} {{severity}}",
                )
            ],
            datasource=PROMETHEUS,
            unit="reqps",
            stacking="normal",
            width=8,
        ),
        timeseries(
            "Dead letters per second by reason",
            [
                PromTarget(
                    _rate("anomaly_records_dead_lettered_total", "pipeline, reason"),
                    "{{pipeline}} {{reason}}",
                )
            ],
            datasource=PROMETHEUS,
            unit="reqps",
            stacking="normal",
            width=8,
        ),
        row("Lag and latency"),
        timeseries(
            "Consumer lag per partition",
            [
                PromTarget(
                    f"max by (pipeline, topic, partition) (anomaly_consumer_lag{_PROM_PIPE})",
                    "{{pipeline}} {{topic}}[{{partition}}]",
                )
            ],
            datasource=PROMETHEUS,
            unit="short",
            description="Records behind the end of each partition. A lag that keeps growing means "
            "the scorer cannot keep up: add partitions and scorers, or score on a GPU.",
        ),
        timeseries(
            "Stage latency (p50, p99)",
            [
                PromTarget(
                    _quantile(0.5, "anomaly_stage_seconds", "pipeline, stage"),
                    "{{pipeline}} {{stage}} p50",
                ),
                PromTarget(
                    _quantile(0.99, "anomaly_stage_seconds", "pipeline, stage"),
                    "{{pipeline}} {{stage}} p99",
                ),
            ],
            datasource=PROMETHEUS,
            unit="s",
            description="Per micro-batch: decode, score, write (one database transaction) and "
            "commit (Kafka offsets).",
        ),
        timeseries(
            "End-to-end latency (p50, p99)",
            [
                PromTarget(
                    _quantile(0.5, "anomaly_end_to_end_seconds", "pipeline"), "{{pipeline}} p50"
                ),
                PromTarget(
                    _quantile(0.99, "anomaly_end_to_end_seconds", "pipeline"), "{{pipeline}} p99"
                ),
            ],
            datasource=PROMETHEUS,
            unit="s",
            description="From a record's Kafka timestamp to its alert being committed.",
        ),
        timeseries(
            "Mean batch size",
            [
                PromTarget(
                    f"{_rate('anomaly_batch_size_sum', 'pipeline')} / "
                    f"{_rate('anomaly_batch_size_count', 'pipeline')}",
                    "{{pipeline}}",
                )
            ],
            datasource=PROMETHEUS,
            unit="short",
            description="Records per micro-batch: small batches under load mean max_wait_s is "
            "cutting them short.",
        ),
        row("From the database (works without Prometheus)"),
        timeseries(
            "Records per second (stream_stats)",
            [
                SQLTarget(
                    """
                    SELECT
                      $__timeGroupAlias(minute, $__interval),
                      pipeline AS metric,
                      sum(records_seen)::float8 / greatest($__interval_ms / 1000.0, 60) AS records
                    FROM stream_stats
                    WHERE $__timeFilter(minute) AND pipeline IN (${pipeline:sqlstring})
                    GROUP BY 1, 2
                    ORDER BY 1, 2
                    """,
                    columns=("time", "metric", "records"),
                    format="time_series",
                )
            ],
            datasource=POSTGRES,
            unit="reqps",
            width=8,
        ),
        timeseries(
            "Batch latency (stream_stats)",
            [
                SQLTarget(
                    """
                    SELECT
                      $__timeGroupAlias(minute, $__interval),
                      pipeline AS metric,
                      sum(latency_ms_sum) / NULLIF(sum(latency_count), 0) AS mean_ms,
                      max(latency_ms_max) AS max_ms
                    FROM stream_stats
                    WHERE $__timeFilter(minute) AND pipeline IN (${pipeline:sqlstring})
                    GROUP BY 1, 2
                    ORDER BY 1, 2
                    """,
                    columns=("time", "metric", "mean_ms", "max_ms"),
                    format="time_series",
                )
            ],
            datasource=POSTGRES,
            unit="ms",
            width=8,
        ),
        table(
            "Committed offsets",
            SQLTarget(
                """
                SELECT
                  pipeline,
                  kafka_topic AS topic,
                  kafka_partition AS partition,
                  next_offset,
                  updated_at
                FROM consumer_offsets
                WHERE pipeline IN (${pipeline:sqlstring})
                ORDER BY pipeline, kafka_topic, kafka_partition
                """,
                columns=("pipeline", "topic", "partition", "next_offset", "updated_at"),
                time_bound=False,  # the current position of each partition
            ),
            width=8,
            description="Next offset to read per partition, as stored with the alerts in the "
            "same transaction.",
        ),
    ]
    # This dashboard's pipeline list comes from Prometheus, but its SQL panels use it too: a
    # multi-value variable expands to a quoted list in SQL whatever datasource filled it.
    return Dashboard(
        uid="anomaly-service",
        title="Anomaly monitor / Service",
        description="Throughput, lag, latency and scoring device of the anomaly-monitor scorers.",
        panels=panels,
        variables=[PIPELINE_PROM],
        tags=TAGS,
        time_from="now-1h",
        refresh="10s",
        links=LINKS,
    )


# ---------------------------------------------------------------------------------------- models


def models_dashboard() -> Dashboard:
    panels = [
        table(
            "Active model per pipeline",
            SQLTarget(
                """
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
                """,
                columns=(
                    "pipeline",
                    "version",
                    "activated_at",
                    "created_at",
                    "target_fpr",
                    "threshold",
                    "bundle_sha256",
                    "bundle_path",
                ),
                time_bound=False,  # what is serving now
            ),
            width=14,
            height=6,
        ),
        table(
            "Evaluation metrics of the active model",
            SQLTarget(
                """
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
                """,
                columns=("pipeline", "version", "metric", "value"),
                time_bound=False,
            ),
            width=10,
            height=12,
            description="Every number recorded with the version (model_versions.metrics), one "
            "level of nesting flattened: target_fpr, threshold, calibration quantiles and the "
            "evaluation results on held-out data.",
            decimals=4,
        ),
        table(
            "Score drift: live traffic vs calibration",
            SQLTarget(
                """
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
                """,
                columns=("pipeline", "quantile", "live", "calibration", "ratio"),
            ),
            width=14,
            height=6,
            decimals=3,
            description="Ensemble-score quantiles of live traffic in the time range against the "
            "same quantiles on the calibration set. A ratio well away from 1 means the traffic "
            "no longer looks like the training data: retrain or investigate.",
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "ratio"},
                    "properties": [
                        {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                        {
                            "id": "thresholds",
                            "value": {
                                "mode": "absolute",
                                "steps": [
                                    {"color": "red", "value": None},
                                    {"color": "green", "value": 0.8},
                                    {"color": "orange", "value": 1.25},
                                    {"color": "red", "value": 2},
                                ],
                            },
                        },
                    ],
                }
            ],
        ),
        row("Drift over time"),
        timeseries(
            "Live score quantiles vs calibration quantiles",
            [
                SQLTarget(
                    """
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
                    """,
                    columns=(
                        "time",
                        "metric",
                        "live_p50",
                        "live_p90",
                        "live_p99",
                        "calibration_p50",
                        "calibration_p90",
                        "calibration_p99",
                    ),
                    format="time_series",
                )
            ],
            datasource=POSTGRES,
            fill=0,
            width=24,
            overrides=[
                {
                    "matcher": {"id": "byRegexp", "options": ".*calibration.*"},
                    "properties": [
                        {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}}
                    ],
                }
            ],
        ),
        count_bars(
            "Alerts by model version",
            "pipeline || ' ' || model_version",
            "A new version rolling out shows as a change of colour.",
        ),
        timeseries(
            "Mean $detector score of alerts by model version",
            [
                SQLTarget(
                    f"""
                    SELECT
                      $__timeGroupAlias(a.ingest_time, $__interval),
                      a.pipeline || ' ' || a.model_version AS metric,
                      avg({DETECTOR_SCORE}) AS score
                    FROM alerts a
                    WHERE $__timeFilter(a.ingest_time) AND a.pipeline IN (${{pipeline:sqlstring}})
                    GROUP BY 1, 2
                    ORDER BY 1, 2
                    """,
                    columns=("time", "metric", "score"),
                    format="time_series",
                )
            ],
            datasource=POSTGRES,
            fill=0,
        ),
        table(
            "Model versions created in range",
            SQLTarget(
                """
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
                """,
                columns=(
                    "time",
                    "pipeline",
                    "version",
                    "active",
                    "activated_at",
                    "target_fpr",
                    "threshold",
                    "bundle_path",
                ),
            ),
            width=24,
        ),
    ]
    return Dashboard(
        uid="anomaly-models",
        title="Anomaly monitor / Models",
        description="Active model versions, their evaluation, and drift of live scores.",
        panels=panels,
        variables=[PIPELINE_SQL, DETECTOR],
        tags=TAGS,
        time_from="now-24h",
        refresh="1m",
        links=LINKS,
    )


def all_dashboards() -> list[Dashboard]:
    return [alerts_dashboard(), service_dashboard(), models_dashboard()]
