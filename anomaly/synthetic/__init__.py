"""Synthetic example datasets (card fraud, manufacturing sensors) with labelled anomalies, behind
``anomaly generate``, the demo and the tests: the generators (``datasets``) and the fraud
example's per-card timeline features (``timelines``)."""
