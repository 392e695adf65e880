"""A stand-in for Confluent Schema Registry: the part of its REST API that serializers and the
service use, on a loopback port.

No Schema Registry can run on the test machine (it is a JVM service; Karapace is not on its
package index), so, as for Grafana, the client code is tested against a local HTTP server that
answers as the registry's documented API does and records what it was asked:

- ``POST /subjects/{subject}/versions`` (register; the same schema text gets the same id),
- ``GET /schemas/ids/{id}`` (the schema text, ``schemaType`` when not Avro; 404 with
  ``error_code`` 40403 for an unknown id).

``available = False`` makes it answer 503 (error_code 50003), as a registry whose backing store
is down does.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class SchemaRegistryStandIn:
    def __init__(self) -> None:
        self.schemas: dict[int, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.available = True
        self._lock = threading.Lock()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:  # quiet test output
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                registry.requests.append(("GET", path))
                if not registry.available:
                    return self._answer(503, {"error_code": 50003, "message": "store is down"})
                parts = path.strip("/").split("/")
                if parts[:2] == ["schemas", "ids"] and len(parts) == 3 and parts[2].isdigit():
                    found = registry.schemas.get(int(parts[2]))
                    if found is None:
                        return self._answer(
                            404, {"error_code": 40403, "message": f"Schema {parts[2]} not found"}
                        )
                    return self._answer(200, found)
                return self._answer(404, {"error_code": 404, "message": "not served here"})

            def do_POST(self) -> None:
                path = self.path.split("?", 1)[0]
                registry.requests.append(("POST", path))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                parts = path.strip("/").split("/")
                if len(parts) == 3 and parts[0] == "subjects" and parts[2] == "versions":
                    schema_id = registry.register(body["schema"], body.get("schemaType"))
                    return self._answer(200, {"id": schema_id})
                return self._answer(404, {"error_code": 404, "message": "not served here"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def register(self, schema: str, schema_type: str | None = None) -> int:
        """Register a schema text (as a producer's serializer would); its id."""
        kind = None if schema_type in (None, "AVRO") else schema_type  # Avro is the default
        with self._lock:
            for schema_id, known in self.schemas.items():
                if known["schema"] == schema and known.get("schemaType") == kind:
                    return schema_id
            schema_id = len(self.schemas) + 1
            entry: dict[str, Any] = {"schema": schema}
            if kind:
                entry["schemaType"] = kind
            self.schemas[schema_id] = entry
            return schema_id

    def asked_for(self, schema_id: int) -> int:
        return self.requests.count(("GET", f"/schemas/ids/{schema_id}"))

    def __enter__(self) -> SchemaRegistryStandIn:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
