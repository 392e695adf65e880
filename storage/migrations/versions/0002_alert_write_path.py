"""The alert write path: JSON columns as ``json`` on PostgreSQL, partial entity/incident indexes.

- fired_detectors, top_features, record: ``json`` instead of ``jsonb`` on PostgreSQL. ``jsonb``
  converts every value into its binary form on insert, about a third of the server's work per
  alert row (bench/storage.py); ``json`` validates the text and stores it as is. Nothing filters
  or indexes these columns: the dashboards cast them (``::jsonb``) where they take them apart, and
  the store reads them whole. SQLite keeps its JSON text columns.
- ix_alerts_entity and ix_alerts_incident_id only index rows that have an entity / an incident:
  alerts of pipelines without an entity field cost two index insertions less. Every lookup on
  these columns is an equality (``alerts list --entity``, the prune's NOT EXISTS, the foreign
  key's ON DELETE SET NULL), which implies NOT NULL, so both dialects still use the indexes.

The type change rewrites the alerts table under an exclusive lock (minutes on a big table): run
it in a quiet moment, or prune first.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_JSON_COLUMNS = ("fired_detectors", "top_features", "record")
_PARTIAL = (("ix_alerts_entity", "entity"), ("ix_alerts_incident_id", "incident_id"))


def _json_type(to: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "ALTER TABLE alerts "
        + ", ".join(f"ALTER COLUMN {c} TYPE {to} USING {c}::{to}" for c in _JSON_COLUMNS)
    )


def _indexes(partial: bool) -> None:
    for name, column in _PARTIAL:
        op.drop_index(name, table_name="alerts")
        where = sa.text(f"{column} IS NOT NULL") if partial else None
        op.create_index(name, "alerts", [column], postgresql_where=where, sqlite_where=where)


def upgrade() -> None:
    _json_type("json")
    _indexes(partial=True)


def downgrade() -> None:
    _indexes(partial=False)
    _json_type("jsonb")
