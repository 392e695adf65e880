#!/usr/bin/env bash
# PostgreSQL image init script (docker-entrypoint-initdb.d): creates the read-only role that
# Grafana connects as, with its password from ANOMALY_GRAFANA_DB_PASSWORD, and grants it SELECT
# on the tables the `migrate` service creates afterwards (20-grafana-grants.sql, run next by the
# image's entrypoint).
set -euo pipefail
: "${ANOMALY_GRAFANA_DB_PASSWORD:?set ANOMALY_GRAFANA_DB_PASSWORD for the read-only Grafana role}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v pw="$ANOMALY_GRAFANA_DB_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE anomaly_grafana LOGIN PASSWORD %L', :'pw')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anomaly_grafana') \gexec
ALTER ROLE anomaly_grafana SET default_transaction_read_only = on;
SQL
