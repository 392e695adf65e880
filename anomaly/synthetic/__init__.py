"""Synthetic example datasets (card fraud, manufacturing sensors) with labelled anomalies, behind
``anomaly generate``, the demo and the tests."""
