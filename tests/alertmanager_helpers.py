"""A real Alertmanager for tests, and the webhook receiver that records what it delivers."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


class Webhook:
    """An HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        lock = self.lock = threading.Lock()
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                body["received_at"] = time.time()
                with lock:
                    bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self) -> list[dict]:
        """Every alert of every notification received."""
        with self.lock:
            return [a for body in self.bodies for a in body["alerts"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_alertmanager(
    tmp_path: Path, port: int, webhook_url: str, group_by: tuple[str, ...] = ("incident",)
) -> subprocess.Popen:
    """Debian's Alertmanager on ``port``: one route to the webhook, grouped by ``group_by``, with
    short waits (1 s) so that a test sees a notification within seconds."""
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        json.dumps(
            {
                "route": {
                    "receiver": "webhook",
                    "group_by": list(group_by),
                    "group_wait": "1s",
                    "group_interval": "1s",
                    "repeat_interval": "1h",
                },
                "receivers": [
                    {
                        "name": "webhook",
                        "webhook_configs": [{"url": webhook_url, "send_resolved": True}],
                    }
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=open(tmp_path / "alertmanager.log", "ab"),  # noqa: SIM115 - the child keeps it
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    ready = f"http://127.0.0.1:{port}/-/ready"
    deadline = time.monotonic() + 30
    while not _answers(ready):
        assert time.monotonic() < deadline, "alertmanager did not get ready in 30 s"
        assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()[-2000:]
        time.sleep(0.2)
    return proc


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
