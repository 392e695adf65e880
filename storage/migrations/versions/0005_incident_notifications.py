"""incident_notifications: what the Alertmanager notifier last sent for each incident.

Also ``ix_incidents_open`` and ``ix_incident_notifications_firing``: the open incidents of a
pipeline and those sent firing, which the notifier reads every few seconds, found without
scanning the closed ones.

One row per incident sent at least once (streams/alertmanager.py): the state sent (firing or
resolved), the label set sent, the incident's alert count at that send, and when it was first and
last sent. The notifier reads what is due from here, so a restart or an Alertmanager outage
catches up. Deleting an incident (``anomaly db prune``) deletes its row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "incident_notifications",
        sa.Column("incident_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite")),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column(
            "labels", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("alert_count", sa.Integer(), nullable=False),
        sa.Column("first_sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('firing', 'resolved')", name="ck_incident_notifications_state"
        ),
        sa.ForeignKeyConstraint(
            ["incident_id"],
            ["incidents.id"],
            name="fk_incident_notifications_incident_id_incidents",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("incident_id", name="pk_incident_notifications"),
    )
    firing = sa.text("state = 'firing'")
    op.create_index(
        "ix_incident_notifications_firing",
        "incident_notifications",
        ["incident_id"],
        postgresql_where=firing,
        sqlite_where=firing,
    )
    where = sa.text("status = 'open'")
    op.create_index(
        "ix_incidents_open", "incidents", ["pipeline"], postgresql_where=where, sqlite_where=where
    )


def downgrade() -> None:
    op.drop_index("ix_incidents_open", table_name="incidents")
    op.drop_table("incident_notifications")
