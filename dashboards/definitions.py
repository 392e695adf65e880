"""The three dashboards: Alerts, Service and Models.

One module per dashboard (dashboards/alerts.py, service.py, models.py), each a function per panel
with the panel's SQL in a named constant; what they share (panel constructors, variables, links,
SQL fragments and the rules for SQL) is in dashboards/panels.py.
"""

from __future__ import annotations

from dashboards.alerts import alerts_dashboard
from dashboards.builder import Dashboard
from dashboards.models import models_dashboard
from dashboards.service import service_dashboard

__all__ = [
    "alerts_dashboard",
    "all_dashboards",
    "models_dashboard",
    "service_dashboard",
]


def all_dashboards() -> list[Dashboard]:
    return [alerts_dashboard(), service_dashboard(), models_dashboard()]
