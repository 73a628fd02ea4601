"""``/healthz``, ``/readyz`` and ``/metrics`` over HTTP, served from a background thread.

- ``/healthz``: 200 while the daemon's loop is alive (a liveness probe restarts it otherwise).
- ``/readyz``: 200 while it can take runs (Redis reachable, not shutting down, ComfyUI not
  failing to start through the worker's own fault: ``run.fitness``), else 503; the body's
  ``warnings`` list what the operator must know (``RUNFLOW_SANDBOX=none``: the worker is
  unsandboxed), without making it unready.
- ``/metrics``: the Prometheus text format.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Callable, Sequence

from runflow_worker.serve.metrics import Metrics

log = logging.getLogger(__name__)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # stdlib signature
        pass  # probes every few seconds would flood the structured log

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        owner = self.server.owner
        if path == "/metrics":
            self._send(200, owner.metrics.render(), owner.metrics.content_type)
        elif path == "/healthz":
            ok = owner.alive()
            self._send(200 if ok else 503, _status_body(ok), "application/json")
        elif path == "/readyz":
            ok = owner.ready()
            self._send(200 if ok else 503, _status_body(ok, owner.warnings), "application/json")
        else:
            self._send(404, b'{"error": "not found"}', "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _status_body(ok: bool, warnings: Sequence[str] = ()) -> bytes:
    body: dict[str, object] = {"status": "ok" if ok else "unavailable"}
    if warnings:
        body["warnings"] = list(warnings)
    return json.dumps(body).encode()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: HealthServer


class HealthServer:
    """The probe and metrics endpoint; ``port=0`` binds a free port (see ``.port``)."""

    def __init__(self, metrics: Metrics, *, alive: Callable[[], bool],
                 ready: Callable[[], bool], port: int, host: str = "0.0.0.0",
                 warnings: Sequence[str] = ()) -> None:
        self.metrics = metrics
        self.warnings = tuple(warnings)
        """Shown in ``/readyz``'s body (``RUNFLOW_SANDBOX=none``)."""
        self.alive = alive
        self.ready = ready
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.5},
                                        name="runflow-health", daemon=True)

    def start(self) -> HealthServer:
        """Serve in a daemon thread."""
        self._thread.start()
        log.info("health and metrics on port %d", self.port,
                 extra={"event": "http_listening", "port": self.port})
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
