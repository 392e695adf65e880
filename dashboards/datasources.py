"""The two datasources, the folder, and their fixed uids: one source for the dashboards' JSON, the
provisioning files and ``anomaly dashboards push``."""

from __future__ import annotations

from typing import Any

from dashboards.builder import Datasource

POSTGRES = Datasource(type="grafana-postgresql-datasource", uid="anomaly-postgres")
PROMETHEUS = Datasource(type="prometheus", uid="anomaly-prometheus")

FOLDER_UID = "anomaly-monitor"
FOLDER_TITLE = "Anomaly monitor"

# The read-only database role Grafana connects as (deploy/postgres/grafana-role.sql creates it).
GRAFANA_DB_USER = "anomaly_grafana"
# Where its password comes from: never from a committed file.
GRAFANA_DB_PASSWORD_ENV = "ANOMALY_GRAFANA_DB_PASSWORD"


def postgres_datasource(
    host: str = "postgres:5432",
    database: str = "anomaly",
    user: str = GRAFANA_DB_USER,
    password: str | None = None,
    sslmode: str = "disable",
) -> dict[str, Any]:
    """The PostgreSQL datasource as Grafana's HTTP API takes it (the password only when given)."""
    ds: dict[str, Any] = {
        "access": "proxy",
        "isDefault": True,
        "jsonData": {
            "connMaxLifetime": 14400,
            "database": database,
            "maxIdleConns": 4,
            "maxOpenConns": 10,
            "postgresVersion": 1600,
            "sslmode": sslmode,
            "timescaledb": False,
        },
        "name": "anomaly-postgres",
        "type": POSTGRES.type,
        "uid": POSTGRES.uid,
        "url": host,
        "user": user,
    }
    if password is not None:
        ds["secureJsonData"] = {"password": password}
    return ds


def prometheus_datasource(url: str = "http://prometheus:9090") -> dict[str, Any]:
    return {
        "access": "proxy",
        "isDefault": False,
        "jsonData": {"httpMethod": "POST", "timeInterval": "15s"},
        "name": "anomaly-prometheus",
        "type": PROMETHEUS.type,
        "uid": PROMETHEUS.uid,
        "url": url,
    }
