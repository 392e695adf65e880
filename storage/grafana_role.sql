-- Read-only role for Grafana's PostgreSQL data source (run once per database, as its owner):
--   psql "$DATABASE_URL" -f storage/grafana_role.sql
--   psql "$DATABASE_URL" -c "ALTER ROLE anomaly_grafana LOGIN PASSWORD '...'"
-- or, equivalently: anomaly db grafana-role --db URL [--role NAME] [--password-env VAR]
-- The role can SELECT the monitoring tables and nothing else; its sessions are read-only.
-- It is not created by the migrations because roles belong to the whole server, not one database.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anomaly_grafana') THEN
    CREATE ROLE anomaly_grafana NOLOGIN;
  END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
  NULL;  -- created concurrently by another database's run
END
$$;
DO $$
BEGIN
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO anomaly_grafana', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO anomaly_grafana;
GRANT SELECT ON alerts, incidents, verdicts, dead_letters, model_versions, stream_stats,
  consumer_offsets, drift_windows TO anomaly_grafana;
-- Tables added by later migrations (run by the same owner) are readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO anomaly_grafana;
ALTER ROLE anomaly_grafana SET default_transaction_read_only = on;
