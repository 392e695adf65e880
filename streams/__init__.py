"""Kafka in and out, and the scoring service loop that joins `anomaly` and `storage`."""
