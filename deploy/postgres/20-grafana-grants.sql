-- Read-only access for Grafana's PostgreSQL datasource (role anomaly_grafana).
-- Run in the anomaly database, as the role that owns the tables (the one `anomaly db upgrade`
-- connects as), after the role exists. tests/dashboards runs every panel query under this role.
DO $$
BEGIN
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO anomaly_grafana', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO anomaly_grafana;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO anomaly_grafana;
-- Tables that migrations create later are readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO anomaly_grafana;
