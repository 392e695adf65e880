"""Analyst verdicts: one row per reviewed alert (``anomaly alerts ack ID --verdict ...``).

A table of its own, keyed by the alert's id, rather than columns on ``alerts``: the alert write
path (storage/writes.py, alert_rows.py) inserts exactly what it did, with no extra column or index
to maintain, and the table only grows with what analysts review. Deleting an alert (``db prune``)
deletes its verdict (ON DELETE CASCADE; SQLite enforces it, the store turns foreign keys on).

Creating an empty table takes no lock on ``alerts`` beyond the foreign key's brief SHARE ROW
EXCLUSIVE on PostgreSQL. The downgrade drops the table and the verdicts in it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verdicts",
        sa.Column(
            "alert_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("verdict_by", sa.String(128), nullable=False),
        sa.Column("verdict_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.Text()),
        sa.CheckConstraint(
            "verdict IN ('true_positive', 'false_positive')", name="ck_verdicts_verdict"
        ),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["alerts.id"],
            name="fk_verdicts_alert_id_alerts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("alert_id", name="pk_verdicts"),
    )


def downgrade() -> None:
    op.drop_table("verdicts")
