"""Scoring a fitted model in batches: ``scorer.BatchScorer`` on the host (numpy) or, on an
accelerator, the same preprocessing, p-values and ensemble as torch ops (``device_scoring``)."""
