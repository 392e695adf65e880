"""Grafana dashboards generated from code, their provisioning, and the push to a Grafana server."""
