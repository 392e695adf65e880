"""SQL storage: schema (SQLAlchemy 2 + Alembic) and the alert sink. Knows nothing of Kafka."""
