"""What the three dashboards share: panel constructors, template variables, links, SQL fragments.

SQL panels read the tables of docs/architecture.md ("SQL schema") through the read-only role;
Prometheus panels use the metric names of streams/metrics.py. Text variables go into SQL only as
``${name:sqlstring}`` (each value single-quoted, inner quotes doubled: ``pipeline IN
(${pipeline:sqlstring})``, ``CASE ${detector:sqlstring}``), never as a bare ``$name``, which Grafana
inserts without quotes for a single-value variable; in PromQL multi-value variables expand to a
regex (``pipeline=~"$pipeline"``).
Every query that shows data from the dashboard's time range filters with ``$__timeFilter``.
"""

from __future__ import annotations

from typing import Any

from dashboards.builder import CustomVariable, Panel, QueryVariable, SQLTarget
from dashboards.datasources import POSTGRES, PROMETHEUS

TAGS = ["anomaly-monitor"]
DETECTORS = ["ensemble", "vae", "flow", "gan"]

SEVERITY_COLORS = {"low": "blue", "medium": "yellow", "high": "orange", "critical": "red"}

PIPELINE_SQL = QueryVariable(
    name="pipeline",
    label="Pipeline",
    datasource=POSTGRES,
    # model_versions and stream_stats are small (a row per version, a row per pipeline-minute);
    # alerts can be large, so they are not scanned for the list.
    query="SELECT pipeline FROM model_versions UNION SELECT pipeline FROM stream_stats ORDER BY 1",
)
PIPELINE_PROM = QueryVariable(
    name="pipeline",
    label="Pipeline",
    datasource=PROMETHEUS,
    query="label_values(anomaly_records_consumed_total, pipeline)",
)
DETECTOR = CustomVariable(name="detector", label="Detector", values=DETECTORS)

# The chosen detector's score column. sqlstring quotes the value itself: a bare '$detector' would
# let a value with a quote (from the URL, var-detector=...) end the string and append SQL.
DETECTOR_SCORE = """CASE ${detector:sqlstring}
    WHEN 'vae' THEN a.vae_score
    WHEN 'flow' THEN a.flow_score
    WHEN 'gan' THEN a.gan_score
    ELSE a.ensemble_score
  END"""

SEVERITY_RANK = """CASE {col}
    WHEN 'critical' THEN 4 WHEN 'high' THEN 3 WHEN 'medium' THEN 2 ELSE 1
  END"""

LINKS = [
    {
        "asDropdown": False,
        "icon": "external link",
        "includeVars": True,
        "keepTime": True,
        "tags": TAGS,
        "targetBlank": False,
        "title": "Anomaly monitor",
        "type": "dashboards",
    }
]

# Row counts of {table} per time bucket, one series per value of {series} (an SQL expression).
COUNT_BY_SERIES_SQL = """
SELECT
  $__timeGroupAlias({time_column}, $__interval),
  {series} AS metric,
  count(*) AS {value}
FROM {table}
WHERE $__timeFilter({time_column}) AND pipeline IN (${{pipeline:sqlstring}})
GROUP BY 1, 2
ORDER BY 1, 2
"""


def by_name(column: str, *properties: dict[str, Any]) -> dict[str, Any]:
    """A field override: the column named ``column`` gets ``properties``."""
    return {"matcher": {"id": "byName", "options": column}, "properties": list(properties)}


def severity_overrides() -> list[dict]:
    """The ``severity`` column's text coloured by severity."""
    colors = {sev: {"color": c, "index": i} for i, (sev, c) in enumerate(SEVERITY_COLORS.items())}
    return [
        by_name(
            "severity",
            {"id": "custom.cellOptions", "value": {"type": "color-text"}},
            {"id": "mappings", "value": [{"options": colors, "type": "value"}]},
        )
    ]


def dashed_override(pattern: str, *properties: dict[str, Any]) -> dict[str, Any]:
    """Series whose name matches the regex ``pattern`` drawn dashed, plus ``properties``."""
    return {
        "matcher": {"id": "byRegexp", "options": pattern},
        "properties": [
            {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
            *properties,
        ],
    }


def stat(title: str, target: SQLTarget, unit: str = "short", **kw) -> Panel:
    return Panel(
        title=title,
        type="stat",
        datasource=POSTGRES,
        targets=[target],
        width=kw.pop("width", 4),
        height=4,
        unit=unit,
        options={
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
        **kw,
    )


def timeseries(title: str, targets: list, **kw) -> Panel:
    custom = {
        "drawStyle": "line",
        "fillOpacity": kw.pop("fill", 10),
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": kw.pop("stacking", "none")},
    }
    custom.update(kw.pop("custom", {}))
    return Panel(
        title=title,
        type="timeseries",
        targets=targets,
        custom=custom,
        options={
            "legend": {"calcs": [], "displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        **kw,
    )


def sql_timeseries(title: str, sql: str, columns: tuple[str, ...], **kw: Any) -> Panel:
    """A time series of one SQL query (in Grafana's time_series format)."""
    target = SQLTarget(sql, columns=columns, format="time_series")
    return timeseries(title, [target], datasource=POSTGRES, **kw)


def count_bars(
    title: str,
    series: str,
    description: str,
    *,
    table: str = "alerts",
    time_column: str = "ingest_time",
    value: str = "alerts",
    **kw: Any,
) -> Panel:
    """Stacked bars of row counts of ``table`` per time bucket, one series per value of
    ``series`` (an SQL expression)."""
    sql = COUNT_BY_SERIES_SQL.format(
        time_column=time_column, series=series, value=value, table=table
    )
    return sql_timeseries(
        title,
        sql,
        ("time", "metric", value),
        stacking="normal",
        fill=60,
        custom={"drawStyle": "bars"},
        description=description,
        **kw,
    )


def table(title: str, sql: str, columns: tuple[str, ...], time_bound: bool = True, **kw) -> Panel:
    return Panel(
        title=title,
        type="table",
        datasource=POSTGRES,
        targets=[SQLTarget(sql, columns=columns, time_bound=time_bound)],
        options={"cellHeight": "sm", "footer": {"show": False}, "showHeader": True},
        custom={"align": "auto", "filterable": True},
        **kw,
    )
