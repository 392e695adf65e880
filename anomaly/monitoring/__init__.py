"""Monitoring of a deployed model on its live stream (drift)."""
