"""Alert JSON columns (fired_detectors, top_features, record) as ``json`` on PostgreSQL.

``jsonb`` converts every value into its binary form on insert, about a third of the server's work
per alert row (bench/storage.py); ``json`` stores the validated text as is. Nothing filters or
indexes these columns: the dashboards cast them (``::jsonb``) where they take them apart, and the
store reads them whole. SQLite keeps its JSON text columns: nothing to do there.

The type change rewrites the alerts table under an exclusive lock (minutes on a big table):
run it in a quiet moment, or prune first.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = ("fired_detectors", "top_features", "record")


def _alter(to: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "ALTER TABLE alerts "
        + ", ".join(f"ALTER COLUMN {c} TYPE {to} USING {c}::{to}" for c in _COLUMNS)
    )


def upgrade() -> None:
    _alter("json")


def downgrade() -> None:
    _alter("jsonb")
