"""A local HTTP server that answers like Grafana's HTTP API and records every request.

It keeps folders, datasources and dashboards in memory with Grafana's status codes and response
shapes for the endpoints the push uses, and rejects requests without the expected auth header.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

TOKEN = "glsa_test_token"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGrafana:
    url: str = ""
    token: str = TOKEN
    requests: list[Recorded] = field(default_factory=list)
    folders: dict[str, dict] = field(default_factory=dict)
    datasources: dict[str, dict] = field(default_factory=dict)
    dashboards: dict[str, dict] = field(default_factory=dict)
    next_id: int = 1

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method != "GET"]

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "folders"]:
            if method == "GET" and len(parts) == 3:
                folder = self.folders.get(parts[2])
                return (200, folder) if folder else (404, {"message": "folder not found"})
            if method == "POST" and len(parts) == 2:
                uid = body.get("uid")
                if uid in self.folders:
                    return 409, {"message": "a folder with the same uid already exists"}
                self.folders[uid] = {"id": self._id(), "uid": uid, "title": body["title"]}
                return 200, self.folders[uid]
            if method == "PUT" and len(parts) == 3 and parts[2] in self.folders:
                self.folders[parts[2]]["title"] = body["title"]
                return 200, self.folders[parts[2]]
        if parts[:2] == ["api", "datasources"]:
            if method == "GET" and parts[2:3] == ["uid"]:
                ds = self.datasources.get(parts[3])
                if ds is None:
                    return 404, {"message": "Data source not found"}
                out = {k: v for k, v in ds.items() if k != "secureJsonData"}
                out["secureJsonFields"] = {k: True for k in ds.get("secureJsonData", {})}
                return 200, out
            if method == "POST" and len(parts) == 2:
                if body["uid"] in self.datasources:
                    return 409, {"message": "data source with the same uid already exists"}
                stored = {**body, "id": self._id(), "orgId": 1, "readOnly": False, "version": 1}
                self.datasources[body["uid"]] = stored
                return 200, {
                    "datasource": stored,
                    "id": stored["id"],
                    "message": "Datasource added",
                }
            if method == "PUT" and parts[2:3] == ["uid"] and parts[3] in self.datasources:
                old = self.datasources[parts[3]]
                secrets = {**old.get("secureJsonData", {}), **body.get("secureJsonData", {})}
                new = {**body, "id": old["id"], "orgId": 1, "version": old["version"] + 1}
                if secrets:
                    new["secureJsonData"] = secrets
                self.datasources[parts[3]] = new
                return 200, {"datasource": new, "message": "Datasource updated"}
        if parts[:3] == ["api", "dashboards", "uid"] and method == "GET":
            entry = self.dashboards.get(parts[3])
            if entry is None:
                return 404, {"message": "Dashboard not found"}
            return 200, entry
        if parts == ["api", "dashboards", "db"] and method == "POST":
            dash = dict(body["dashboard"])
            uid = dash["uid"]
            folder_uid = body.get("folderUid")
            if folder_uid and folder_uid not in self.folders:
                return 400, {"message": "folder not found"}
            old = self.dashboards.get(uid)
            if old and not body.get("overwrite"):
                return 412, {"message": "The dashboard has been changed by someone else"}
            dash["id"] = old["dashboard"]["id"] if old else self._id()
            dash["version"] = old["dashboard"]["version"] + 1 if old else 1
            self.dashboards[uid] = {"dashboard": dash, "meta": {"folderUid": folder_uid}}
            return 200, {
                "id": dash["id"],
                "status": "success",
                "uid": uid,
                "version": dash["version"],
            }
        return 404, {"message": "Not found"}


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    state = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            state.requests.append(Recorded(self.command, self.path, dict(self.headers), body))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status, payload = 401, {"message": "Unauthorized"}
            else:
                status, payload = state.handle(self.command, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
