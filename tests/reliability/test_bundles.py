"""Model bundles an attacker (or a broken copy) hands to the *service*: refused with a clear error,
and no code of theirs runs.

tests/core/test_bundle.py checks ``AnomalyModel.load`` itself (tampered weights, truncation, a
pickle as an extra file or in place of the weights, shapes, path traversal, symlinks); its
``rewrite`` helper is reused here. This file adds what a deployment meets: a torch.save (zip +
pickle) checkpoint planted as weights, a safetensors header that claims an absurd size, ``anomaly
serve`` started on a poisoned bundle, and a running service asked to switch to each kind of bad
bundle, which must keep scoring with the model it has.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from harness import ROOT, ServeProcess, http_get, records_seen, wait_for
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from anomaly import AnomalyModel
from anomaly.config import load_config
from anomaly.errors import BundleError
from anomaly.estimator.bundle import MANIFEST, seal_manifest
from streams.broker import create_topic, free_port

pytestmark = [pytest.mark.reliability]

_spec = importlib.util.spec_from_file_location(
    "_core_bundle_tests", ROOT / "tests" / "core" / "test_bundle.py"
)
_core = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_core)  # type: ignore[union-attr]
rewrite = _core.rewrite


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def torch_checkpoint(marker: Path, tmp: Path) -> bytes:
    path = tmp / "ckpt.pt"
    torch.save({"weight": torch.zeros(2), "hook": Payload(marker)}, path)
    return path.read_bytes()


def poison(kind: str, bundle: Path, marker: Path) -> str:
    """Damage ``bundle`` in place; return the text the refusal must contain."""
    if kind == "torch_pickle_as_weights":
        rewrite(
            bundle, "vae.safetensors", torch_checkpoint(marker, bundle.parent), fix_manifest=True
        )
        return "not a valid safetensors file"
    if kind == "pickle_as_extra_file":
        (bundle / "model.pt").write_bytes(torch_checkpoint(marker, bundle.parent))
        return "unexpected file"
    if kind == "hash_mismatch":
        data = bytearray((bundle / "flow.safetensors").read_bytes())
        data[-3] ^= 0x55
        (bundle / "flow.safetensors").write_bytes(bytes(data))
        return "sha256 of 'flow.safetensors' does not match"
    if kind == "wrong_shapes":
        tensors = st_load((bundle / "gan.safetensors").read_bytes())
        key = next(iter(tensors))
        tensors[key] = torch.zeros(*(d + 1 for d in tensors[key].shape))
        rewrite(bundle, "gan.safetensors", st_save(tensors), fix_manifest=True)
        return key
    if kind == "truncated":
        data = (bundle / "calibration.safetensors").read_bytes()
        rewrite(bundle, "calibration.safetensors", data[: len(data) // 3], fix_manifest=True)
        return "not a valid safetensors file"
    if kind == "absurd_header_size":
        # safetensors starts with the JSON header's length: claim 2**62 bytes.
        data = (bundle / "vae.safetensors").read_bytes()
        rewrite(bundle, "vae.safetensors", struct.pack("<Q", 2**62) + data[8:], fix_manifest=True)
        return "not a valid safetensors file"
    if kind == "path_traversal":
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["files"]["../../outside.safetensors"] = manifest["files"].pop("vae.safetensors")
        (bundle / MANIFEST).write_bytes(seal_manifest(manifest))  # with its self-check redone
        return "is not allowed"
    raise ValueError(kind)


KINDS = [
    "torch_pickle_as_weights",
    "pickle_as_extra_file",
    "hash_mismatch",
    "wrong_shapes",
    "truncated",
    "absurd_header_size",
    "path_traversal",
]


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    assert not path.exists()
    return path


def poisoned(trained_model, tmp_path: Path, kind: str, marker: Path) -> tuple[Path, str]:
    bundle = Path(shutil.copytree(trained_model.bundle, tmp_path / kind))
    return bundle, poison(kind, bundle, marker)


@pytest.mark.parametrize("kind", KINDS)
def test_each_poisoned_bundle_is_refused_and_runs_nothing(kind, trained_model, tmp_path, marker):
    bundle, needle = poisoned(trained_model, tmp_path, kind, marker)
    with pytest.raises(BundleError, match=r"^bundle ") as info:
        AnomalyModel.load(bundle)
    assert needle in str(info.value)
    assert not marker.exists()
    # The payload does run when unpickled, so the marker would have shown it.
    if "pickle" in kind:
        torch.load(bundle.parent / "ckpt.pt", weights_only=False)
        assert marker.exists()


@pytest.mark.kafka
def test_serve_refuses_to_start_on_a_poisoned_bundle(
    sqlite_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model, marker
):
    bundle, needle = poisoned(trained_model, tmp_path, "torch_pickle_as_weights", marker)
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    config = pipeline_file(sqlite_url, bundle)
    serve = ServeProcess(config, tmp_path / "serve.log")
    assert serve.wait(120) == 2
    text = serve.log_text()
    assert f"error: bundle {bundle}" in text and needle in text
    assert "Traceback" not in text
    assert not marker.exists()


@pytest.mark.kafka
def test_serve_refuses_a_registered_version_whose_directory_was_swapped(
    sqlite_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model
):
    """`models register` recorded the bundle's identity; then the directory was replaced by
    another self-consistent bundle. `anomaly serve` exits 2 with one line naming the bundle and
    both identities, instead of scoring with it under the registered version."""
    from storage.records import ModelVersionRecord
    from storage.store import AlertStore

    create_topic(kafka_bootstrap, topic_name, partitions=1)
    config = pipeline_file(sqlite_url, None)
    cfg = load_config(config)
    bundle = Path(shutil.copytree(trained_model.bundle, tmp_path / "registered"))
    registered = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
    store = AlertStore.from_config(cfg)
    store.upgrade()
    rec = ModelVersionRecord(cfg.name, "v1", str(bundle), registered)
    store.register_model_version(rec, activate=True)
    store.close()
    impostor = AnomalyModel.load(bundle)
    impostor.version = "impostor"
    shutil.rmtree(bundle)
    impostor.save(bundle)
    on_disk = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()

    serve = ServeProcess(config, tmp_path / "serve.log")
    try:
        assert serve.wait(120) == 2  # before the check, it served the impostor until stopped
    finally:
        if serve.alive():
            serve.kill()
    text = serve.log_text()
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: bundle {bundle}: identity (manifest sha256) {on_disk} differs from the "
        f"registered {registered} (model version 'v1' of pipeline {cfg.name!r}); refused "
        "(another bundle, or an edited one, is in its place)"
    ]


@pytest.mark.kafka
@pytest.mark.postgres
def test_running_service_refuses_to_switch_to_poisoned_bundles(
    pg_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model, marker, sql
):
    """Each bad bundle is activated in turn while the service runs: each switch is refused, the
    service stays ready and every alert is scored by the original model version."""
    from harness import StreamProducer, make_stream

    from storage.records import ModelVersionRecord
    from streams.service import ScoringService

    create_topic(kafka_bootstrap, topic_name, partitions=1)
    port = free_port()
    cfg = load_config(
        pipeline_file(
            pg_url, trained_model.bundle, kafka={"batch_size": 100}, serve={"metrics_port": port}
        )
    )
    stream = make_stream(trained_model.model, 300 * len(KINDS), bad_every=0, seed=55)
    service = ScoringService(cfg)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()

    refused: list[str] = []
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 60, "ready")
        for i, kind in enumerate(KINDS):
            bundle, _ = poisoned(trained_model, tmp_path, kind, marker)
            service.store.register_model_version(
                ModelVersionRecord(
                    pipeline=cfg.name,
                    version=f"bad-{kind}",
                    bundle_path=str(bundle),
                    # Its own identity: the refusal must come from the check behind it.
                    bundle_sha256=hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest(),
                ),
                activate=True,
            )
            chunk = stream.values[i * 300 : (i + 1) * 300]
            producer = StreamProducer(kafka_bootstrap, topic_name, chunk)
            producer.start()
            producer.finish()
            wait_for(
                lambda n=(i + 1) * 300: records_seen(pg_url, cfg.name) == n, 60, f"batch {kind}"
            )
            time.sleep(cfg.serve.model_poll_s + 0.2)  # at least one more switch attempt
            assert service.loaded.version == trained_model.version
            assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
            refused.append(kind)
    finally:
        service.stop()
        runner.join(30)
    assert not runner.is_alive()
    assert refused == KINDS
    assert not marker.exists()
    versions = {r[0] for r in sql(pg_url, "SELECT DISTINCT model_version FROM alerts")}
    assert versions == {trained_model.version}
    ids = [r[0] for r in sql(pg_url, "SELECT record_id FROM alerts")]
    assert sorted(ids) == sorted(stream.expected_alert_ids)
