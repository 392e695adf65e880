"""The Service dashboard: throughput, lag, latency and scoring device, from Prometheus, with a row
of the same from PostgreSQL (stream_stats, consumer_offsets) for when Prometheus is not there.

Each panel is a function (an SQL panel's query a named constant above it); ``service_dashboard``
lists them in layout order. PromQL uses the metric names of streams/metrics.py; the rules for
SQL are in dashboards/panels.py.
"""

from __future__ import annotations

from typing import Any

from dashboards.builder import Dashboard, Panel, PromTarget, row
from dashboards.datasources import PROMETHEUS
from dashboards.panels import LINKS, PIPELINE_PROM, TAGS, sql_timeseries, table, timeseries

# ------------------------------------------------------------------------------------- PromQL

# The pipeline variable is multi-value: in PromQL it expands to a regex.
_PROM_PIPE = '{pipeline=~"$pipeline"}'


def _rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{_PROM_PIPE}[$__rate_interval]))"


def _p50_p99(metric: str, by: str, legend: str) -> list[PromTarget]:
    """The median and 99th percentile of a histogram, per ``by``."""
    return [
        PromTarget(
            f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{_PROM_PIPE}[$__rate_interval])))",
            f"{legend} p{round(q * 100)}",
        )
        for q in (0.5, 0.99)
    ]


def _prom_stat(title: str, target: PromTarget, options: dict[str, Any], **kw: Any) -> Panel:
    """A stat of a value per pipeline, its name shown (``options`` over the shared ones)."""
    shared = {
        "graphMode": "none",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "textMode": "value_and_name",
    }
    return Panel(
        title=title,
        type="stat",
        datasource=PROMETHEUS,
        targets=[target],
        width=6,
        height=4,
        options=shared | options,
        **kw,
    )


def _info_stat(title: str, metric: str, label: str, description: str) -> Panel:
    """The ``label`` of an info gauge per pipeline, as text."""
    target = PromTarget(
        f"max by (pipeline, {label}) ({metric}{_PROM_PIPE})",
        legend="{{pipeline}}",
        instant=True,
        format="table",
    )
    options = {
        "colorMode": "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": f"/^{label}$/", "values": True},
    }
    return _prom_stat(title, target, options, description=description)


def _up_stat(title: str, metric: str, description: str) -> Panel:
    """A red/green stat of a 0/1 gauge per pipeline."""
    return _prom_stat(
        title,
        PromTarget(f"min by (pipeline) ({metric}{_PROM_PIPE})", "{{pipeline}}"),
        {"colorMode": "background"},
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
        description=description,
    )


def _prom_timeseries(title: str, targets: list[PromTarget], **kw: Any) -> Panel:
    return timeseries(title, targets, datasource=PROMETHEUS, **kw)


# ------------------------------------------------------------------------------------- top stats


def scoring_device_stat() -> Panel:
    return _info_stat(
        "Scoring device",
        "anomaly_scoring_device_info",
        "device",
        "Where each pipeline's scorer runs: cuda, mps or cpu.",
    )


def model_version_stat() -> Panel:
    return _info_stat(
        "Model version",
        "anomaly_model_version_info",
        "version",
        "The model version each scorer is serving.",
    )


def database_up_stat() -> Panel:
    return _up_stat(
        "Database up",
        "anomaly_database_up",
        "0 while the scorer cannot reach the database (it backs off and retries; Kafka "
        "offsets are not committed meanwhile, so nothing is lost).",
    )


def total_lag_stat() -> Panel:
    return _prom_stat(
        "Total consumer lag",
        PromTarget(f"sum by (pipeline) (anomaly_consumer_lag{_PROM_PIPE})", "{{pipeline}}"),
        {"colorMode": "value", "graphMode": "area"},
        thresholds=[(None, "green"), (10000, "orange"), (100000, "red")],
    )


def schema_registry_up_stat() -> Panel:
    return _up_stat(
        "Schema registry up",
        "anomaly_schema_registry_up",
        "Pipelines reading Avro with kafka.schema_registry_url only (no data for the "
        "others): 0 while the registry cannot be asked; the scorer holds the batch and "
        "retries instead of dead-lettering it.",
    )


def output_topics_up_stat() -> Panel:
    return _up_stat(
        "Output topics up",
        "anomaly_output_topics_up",
        "0 while a batch's dead letters or scores cannot be delivered to their topics: the "
        "scorer holds the batch (nothing written, nothing committed) and retries. No data "
        "before the first batch.",
    )


# ------------------------------------------------------------------------------------ throughput


def records_per_second() -> Panel:
    return _prom_timeseries(
        "Records per second",
        [
            PromTarget(
                _rate("anomaly_records_consumed_total", "pipeline"), "{{pipeline}} consumed"
            ),
            PromTarget(_rate("anomaly_records_scored_total", "pipeline"), "{{pipeline}} scored"),
        ],
        unit="reqps",
        width=8,
    )


def alerts_per_second() -> Panel:
    return _stacked_rate_by(
        "Alerts per second by severity", "anomaly_records_alerted_total", "severity"
    )


def dead_letters_per_second() -> Panel:
    return _stacked_rate_by(
        "Dead letters per second by reason", "anomaly_records_dead_lettered_total", "reason"
    )


def _stacked_rate_by(title: str, counter: str, label: str) -> Panel:
    """A counter's rate per pipeline and ``label``, the series stacked."""
    return _prom_timeseries(
        title,
        [PromTarget(_rate(counter, f"pipeline, {label}"), f"{{{{pipeline}}}} {{{{{label}}}}}")],
        unit="reqps",
        stacking="normal",
        width=8,
    )


# ------------------------------------------------------------------------------- lag and latency


def lag_per_partition() -> Panel:
    return _prom_timeseries(
        "Consumer lag per partition",
        [
            PromTarget(
                f"max by (pipeline, topic, partition) (anomaly_consumer_lag{_PROM_PIPE})",
                "{{pipeline}} {{topic}}[{{partition}}]",
            )
        ],
        unit="short",
        description="Records behind the end of each partition. A lag that keeps growing means "
        "the scorer cannot keep up: add partitions and scorers, or score on a GPU.",
    )


def stage_latency() -> Panel:
    return _prom_timeseries(
        "Stage latency (p50, p99)",
        _p50_p99("anomaly_stage_seconds", "pipeline, stage", "{{pipeline}} {{stage}}"),
        unit="s",
        description="Per micro-batch: decode, score, write (one database transaction) and "
        "commit (Kafka offsets).",
    )


def end_to_end_latency() -> Panel:
    return _prom_timeseries(
        "End-to-end latency (p50, p99)",
        _p50_p99("anomaly_end_to_end_seconds", "pipeline", "{{pipeline}}"),
        unit="s",
        description="From a record's event time (schema.time_field) to its batch being "
        "committed: producer and broker delays are in it, and so is any lateness of the events.",
    )


def batch_size() -> Panel:
    return _prom_timeseries(
        "Mean batch size",
        [
            PromTarget(
                f"{_rate('anomaly_batch_size_sum', 'pipeline')} / "
                f"{_rate('anomaly_batch_size_count', 'pipeline')}",
                "{{pipeline}}",
            )
        ],
        unit="short",
        description="Records per micro-batch: small batches under load mean max_wait_s is "
        "cutting them short.",
    )


# --------------------------------------------------------------------------- from the database

DB_RECORDS_PER_SECOND_SQL = """
SELECT
  $__timeGroupAlias(minute, $__interval),
  pipeline AS metric,
  sum(records_seen)::float8 / greatest($__interval_ms / 1000.0, 60) AS records
FROM stream_stats
WHERE $__timeFilter(minute) AND pipeline IN (${pipeline:sqlstring})
GROUP BY 1, 2
ORDER BY 1, 2
"""


def db_records_per_second() -> Panel:
    return sql_timeseries(
        "Records per second (stream_stats)",
        DB_RECORDS_PER_SECOND_SQL,
        ("time", "metric", "records"),
        unit="reqps",
        width=8,
    )


DB_BATCH_LATENCY_SQL = """
SELECT
  $__timeGroupAlias(minute, $__interval),
  pipeline AS metric,
  sum(latency_ms_sum) / NULLIF(sum(latency_count), 0) AS mean_ms,
  max(latency_ms_max) AS max_ms
FROM stream_stats
WHERE $__timeFilter(minute) AND pipeline IN (${pipeline:sqlstring})
GROUP BY 1, 2
ORDER BY 1, 2
"""


def db_batch_latency() -> Panel:
    return sql_timeseries(
        "Batch latency (stream_stats)",
        DB_BATCH_LATENCY_SQL,
        ("time", "metric", "mean_ms", "max_ms"),
        unit="ms",
        width=8,
    )


COMMITTED_OFFSETS_SQL = """
SELECT
  pipeline,
  kafka_topic AS topic,
  kafka_partition AS partition,
  next_offset,
  updated_at
FROM consumer_offsets
WHERE pipeline IN (${pipeline:sqlstring})
ORDER BY pipeline, kafka_topic, kafka_partition
"""


def committed_offsets() -> Panel:
    return table(
        "Committed offsets",
        COMMITTED_OFFSETS_SQL,
        ("pipeline", "topic", "partition", "next_offset", "updated_at"),
        time_bound=False,  # the current position of each partition
        width=8,
        description="Next offset to read per partition, as stored with the alerts in the "
        "same transaction.",
    )


# ------------------------------------------------------------------------------------ dashboard


def service_dashboard() -> Dashboard:
    # This dashboard's pipeline list comes from Prometheus, but its SQL panels use it too: a
    # multi-value variable expands to a quoted list in SQL whatever datasource filled it.
    return Dashboard(
        uid="anomaly-service",
        title="Anomaly monitor / Service",
        description="Throughput, lag, latency and scoring device of the anomaly-monitor scorers.",
        panels=[
            scoring_device_stat(),
            model_version_stat(),
            database_up_stat(),
            total_lag_stat(),
            schema_registry_up_stat(),
            output_topics_up_stat(),
            row("Throughput"),
            records_per_second(),
            alerts_per_second(),
            dead_letters_per_second(),
            row("Lag and latency"),
            lag_per_partition(),
            stage_latency(),
            end_to_end_latency(),
            batch_size(),
            row("From the database (works without Prometheus)"),
            db_records_per_second(),
            db_batch_latency(),
            committed_offsets(),
        ],
        variables=[PIPELINE_PROM],
        tags=TAGS,
        time_from="now-1h",
        refresh="10s",
        links=LINKS,
    )
