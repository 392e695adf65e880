"""A small builder for Grafana dashboard JSON: dataclasses for panels, targets and variables.

Why our own: grafanalib is barely maintained and the Foundation SDK's Python builders have no
PostgreSQL query type. This covers exactly what our dashboards use, and its output is
deterministic: keys sorted, panel ids numbered in order, grid positions computed by a simple
left-to-right flow, so regenerating gives the committed files byte for byte.

Each target also records what a test needs to check it: the columns its panel expects back and
whether the query is bound to the dashboard's time range (then it must use ``$__timeFilter``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

GRID_WIDTH = 24
SCHEMA_VERSION = 39


@dataclass(frozen=True)
class Datasource:
    type: str
    uid: str

    def ref(self) -> dict[str, str]:
        return {"type": self.type, "uid": self.uid}


@dataclass
class SQLTarget:
    """A raw SQL query for the PostgreSQL datasource.

    ``columns``: the columns the panel expects (its field overrides and transformations refer to
    them). ``time_bound``: whether the query shows data from the dashboard's time range; such
    queries must filter with ``$__timeFilter``. Current-state queries (the active model version)
    set it to False.
    """

    sql: str
    columns: tuple[str, ...]
    format: str = "table"  # "table" | "time_series"
    time_bound: bool = True
    hide: bool = False

    def to_json(self, ref_id: str, datasource: Datasource) -> dict[str, Any]:
        return {
            "datasource": datasource.ref(),
            "editorMode": "code",
            "format": self.format,
            "hide": self.hide,
            "rawQuery": True,
            "rawSql": _dedent(self.sql),
            "refId": ref_id,
        }


@dataclass
class PromTarget:
    expr: str
    legend: str = ""
    instant: bool = False
    format: str = "time_series"  # "time_series" | "table"

    def to_json(self, ref_id: str, datasource: Datasource) -> dict[str, Any]:
        return {
            "datasource": datasource.ref(),
            "editorMode": "code",
            "expr": self.expr,
            "format": self.format,
            "instant": self.instant,
            "legendFormat": self.legend or "__auto",
            "range": not self.instant,
            "refId": ref_id,
        }


Target = SQLTarget | PromTarget


@dataclass
class Panel:
    title: str
    type: str  # timeseries, table, stat, histogram, barchart, bargauge, text, row
    datasource: Datasource | None
    targets: list[Target] = field(default_factory=list)
    width: int = 12
    height: int = 8
    description: str = ""
    unit: str | None = None
    decimals: int | None = None
    min: float | None = None
    max: float | None = None
    # Extra fieldConfig.defaults / options / custom settings, merged over the defaults below.
    defaults: dict[str, Any] = field(default_factory=dict)
    custom: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    transformations: list[dict[str, Any]] = field(default_factory=list)
    thresholds: list[tuple[float | None, str]] | None = None

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        if self.type == "row":
            return {
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "id": panel_id,
                "panels": [],
                "title": self.title,
                "type": "row",
            }
        defaults: dict[str, Any] = {"custom": dict(self.custom)}
        for key in ("unit", "decimals", "min", "max"):
            if getattr(self, key) is not None:
                defaults[key] = getattr(self, key)
        defaults["thresholds"] = thresholds(self.thresholds or [(None, "green")])
        defaults.update(self.defaults)
        out: dict[str, Any] = {
            "description": self.description,
            "fieldConfig": {"defaults": defaults, "overrides": list(self.overrides)},
            "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "id": panel_id,
            "options": dict(self.options),
            "targets": [
                t.to_json(chr(ord("A") + i), self.datasource)  # type: ignore[arg-type]
                for i, t in enumerate(self.targets)
            ],
            "title": self.title,
            "transformations": list(self.transformations),
            "type": self.type,
        }
        if self.datasource is not None:
            out["datasource"] = self.datasource.ref()
        return out


def thresholds(levels: list[tuple[float | None, str]]) -> dict[str, Any]:
    """Absolute thresholds: each (value, colour) from that value up, the first from None."""
    steps = [{"color": color, "value": value} for value, color in levels]
    return {"mode": "absolute", "steps": steps}


def row(title: str) -> Panel:
    return Panel(title=title, type="row", datasource=None, width=GRID_WIDTH, height=1)


@dataclass
class QueryVariable:
    name: str
    label: str
    datasource: Datasource
    query: str
    multi: bool = True
    include_all: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "current": {},
            "datasource": self.datasource.ref(),
            "definition": self.query,
            "hide": 0,
            "includeAll": self.include_all,
            "label": self.label,
            "multi": self.multi,
            "name": self.name,
            "options": [],
            "query": self.query,
            "refresh": 2,  # on time range change: new pipelines appear without a reload
            "regex": "",
            "skipUrlSync": False,
            "sort": 1,
            "type": "query",
        }


@dataclass
class CustomVariable:
    name: str
    label: str
    values: list[str]
    default: str | None = None

    def to_json(self) -> dict[str, Any]:
        default = self.default or self.values[0]
        return {
            "current": {"selected": True, "text": default, "value": default},
            "hide": 0,
            "includeAll": False,
            "label": self.label,
            "multi": False,
            "name": self.name,
            "options": [{"selected": v == default, "text": v, "value": v} for v in self.values],
            "query": ",".join(self.values),
            "skipUrlSync": False,
            "type": "custom",
        }


Variable = QueryVariable | CustomVariable


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel]
    variables: list[Variable] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    time_from: str = "now-6h"
    refresh: str = "30s"
    links: list[dict[str, Any]] = field(default_factory=list)

    def layout(self) -> list[tuple[Panel, int, int, int]]:
        """(panel, id, x, y) in a left-to-right flow; a row or a panel that does not fit wraps."""
        placed = []
        x = y = line_height = 0
        for i, panel in enumerate(self.panels, start=1):
            if panel.type == "row" or x + panel.width > GRID_WIDTH:
                y += line_height
                x = line_height = 0
            placed.append((panel, i, x, y))
            if panel.type == "row":
                y += 1
                continue
            x += panel.width
            line_height = max(line_height, panel.height)
        return placed

    def to_json(self) -> dict[str, Any]:
        return {
            "annotations": {
                "list": [
                    {
                        "builtIn": 1,
                        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                        "enable": True,
                        "hide": True,
                        "iconColor": "rgba(0, 211, 255, 1)",
                        "name": "Annotations & Alerts",
                        "type": "dashboard",
                    }
                ]
            },
            "description": self.description,
            "editable": True,
            "graphTooltip": 1,
            "links": list(self.links),
            "panels": [p.to_json(i, x, y) for p, i, x, y in self.layout()],
            "refresh": self.refresh,
            "schemaVersion": SCHEMA_VERSION,
            "tags": list(self.tags),
            "templating": {"list": [v.to_json() for v in self.variables]},
            "time": {"from": self.time_from, "to": "now"},
            "timepicker": {},
            "timezone": "utc",
            "title": self.title,
            "uid": self.uid,
        }

    def targets(self) -> list[tuple[Panel, Target]]:
        return [(p, t) for p in self.panels for t in p.targets]


def dumps(data: Any) -> str:
    """Deterministic JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _dedent(sql: str) -> str:
    import textwrap

    return textwrap.dedent(sql).strip() + "\n"
