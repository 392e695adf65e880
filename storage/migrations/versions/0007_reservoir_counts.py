"""reservoir_counts: how many reservoir rows each pipeline has.

A batch that samples records needs to know whether the reservoir is full. Without a count it
walked ``reservoir_size`` entries of the (pipeline, priority) index to find out, on every batch
until the reservoir was full: ~3 ms per batch at 5,000 rows on PostgreSQL, most of the write
time of a new service's small batches (docs/benchmarks.md). The count is kept by the batch
transaction that changes the rows (storage.reservoir); this migration, and every ``anomaly db
prune``, counts the rows there.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reservoir_counts",
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("n_rows", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("pipeline", name="pk_reservoir_counts"),
    )
    op.execute(
        "INSERT INTO reservoir_counts (pipeline, n_rows) "
        "SELECT pipeline, count(*) FROM reservoir GROUP BY pipeline"
    )


def downgrade() -> None:
    op.drop_table("reservoir_counts")
