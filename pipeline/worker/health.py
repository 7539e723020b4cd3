"""``/healthz`` (process alive, loop not stuck), ``/readyz`` (partitions assigned, broker
reachable) for Kubernetes probes, and ``/metrics`` (Prometheus text format, see
:mod:`pipeline.telemetry`), on a small background HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Check = Callable[[], tuple[bool, dict[str, Any]]]


def loop_alive(heartbeat: float, max_age_s: float = 30.0) -> tuple[bool, dict[str, Any]]:
    """``/healthz`` of a loop that stamps ``heartbeat`` (time.monotonic()) on every turn."""
    age = time.monotonic() - heartbeat
    return age < max_age_s, {"loop_age_s": round(age, 3)}


class HealthServer:
    def __init__(self, port: int, healthz: Check, readyz: Check, host: str = "0.0.0.0") -> None:
        checks = {"/healthz": healthz, "/readyz": readyz}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    from pipeline.telemetry import prometheus_text

                    text = prometheus_text()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                check = checks.get(self.path.split("?")[0])
                if check is None:
                    ok, body = False, {"error": f"no such endpoint {self.path}"}
                    status = 404
                else:
                    ok, body = check()
                    status = 200 if ok else 503
                data = json.dumps({"ok": ok, **body}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
