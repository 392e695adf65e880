"""Fixtures of the reliability scenarios.

The trained fraud model, the pipeline-file builder and the Kafka helpers are the streams tests'
own (tests/streams/conftest.py), imported from that file rather than copied (see harness.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import streams_fixtures

# Re-exported fixtures (pytest finds them by name in this module).
fraud_schema = streams_fixtures.fraud_schema
trained_model = streams_fixtures.trained_model
pipeline_file = streams_fixtures.pipeline_file
sql = streams_fixtures.sql


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)
