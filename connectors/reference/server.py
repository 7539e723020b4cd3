"""The base of the reference target servers: a careful REST target, standard library only.

:class:`ReferenceServer` runs a :class:`http.server.ThreadingHTTPServer` in a daemon thread and
gives every subclass the same behaviour (``connectors/<name>/openapi.yaml`` describes it):

* JSON in and out. Every write (POST/PUT/DELETE) carries ``Idempotency-Key``: the same key with
  the same method, path and body replays the stored answer (``Idempotent-Replayed: true``); the
  same key with anything else is ``422 idempotency_key_reused``. Only successful (2xx) answers
  are stored: an error (404 "not there yet", 409 "unknown order", 429, 503) is not a result, so
  a retry under the same key is executed afresh.
* ``X-Request-Id``, ``traceparent`` and ``tracestate`` are echoed; the last 1000 requests are
  kept for tests (``GET /_requests``).
* Version guard: :meth:`ReferenceServer.check_version` rejects a write whose ``version`` is not
  newer than the stored one (``409 stale_version``), so a redelivered old event never overwrites
  newer state.
* Faults, at construction or at runtime (``POST /_faults``): ``error_rate``/``error_status``
  (decided before any state change), ``error_after_apply_rate`` (the write is applied, the answer
  is lost: a retry must be replayed), ``latency_ms``, ``rate_limit_per_s``/``rate_limit_burst``
  (token bucket, ``429`` + ``Retry-After``) and ``down``. ``POST /_reset`` clears state and
  faults; ``GET /_stats`` counts what happened.

Subclasses declare their API in :meth:`ReferenceServer.routes`, keep their state in
:meth:`ReferenceServer.reset_state` and raise :class:`ApiError` (or use :class:`Validator`).
Handlers run under one lock, so state needs no further synchronisation.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import random
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, ClassVar, Self

JSON = Any
WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
ECHO_HEADERS = ("X-Request-Id", "traceparent", "tracestate")
RECORDED_HEADERS = ("idempotency-key", "x-request-id", "traceparent", "tracestate",
                    "content-type", "user-agent")
REQUEST_LOG_SIZE = 1000
IDEMPOTENCY_CAPACITY = 100_000
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_KEY_LENGTH = 255

STAT_KEYS = (
    "requests",             # non-admin requests received
    "writes_applied",       # writes that changed state
    "idempotent_replays",   # answers replayed from the idempotency store
    "duplicates",           # writes recognised by their natural key (no state change)
    "rate_limited",         # 429s
    "injected_errors",      # error_rate / error_after_apply_rate answers
    "unavailable",          # 503s while down
    "validation_errors",    # 422 validation
    "stale_rejections",     # 409 stale_version
    "idempotency_errors",   # 400 missing/invalid key, 422 key reused
    "not_found",            # 404s
    "conflicts",            # other 409s
    "bad_requests",         # other 4xx (invalid JSON, unknown route, wrong method)
    "internal_errors",      # 500s (a bug in the server)
)


# -- requests, answers, errors --------------------------------------------------------------


@dataclass
class Request:
    """One parsed request as a handler sees it."""

    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    headers: Mapping[str, str]
    body: JSON

    def json_object(self) -> dict[str, Any]:
        """The body, which must be a JSON object (422 otherwise)."""
        if not isinstance(self.body, dict):
            raise ValidationFailed([{"field": "body", "message": "must be a JSON object"}])
        return self.body


@dataclass
class Response:
    """A handler's answer. ``applied=False`` marks a successful write that changed nothing (a
    duplicate recognised by its natural key)."""

    status: int
    body: JSON = None
    headers: dict[str, str] = field(default_factory=dict)
    applied: bool = True


class ApiError(Exception):
    """An error answer; ``counter`` names the ``/_stats`` entry it bumps."""

    def __init__(self, status: int, body: JSON, *, counter: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body
        self.counter = counter or _default_counter(status)
        self.headers = dict(headers or {})


class ValidationFailed(ApiError):
    def __init__(self, details: list[dict[str, str]]) -> None:
        super().__init__(422, {"error": "validation", "details": details},
                         counter="validation_errors")


def _default_counter(status: int) -> str:
    if status == 404:
        return "not_found"
    if status == 409:
        return "conflicts"
    if status == 422:
        return "validation_errors"
    if status >= 500:
        return "internal_errors"
    return "bad_requests"


def not_found() -> ApiError:
    return ApiError(404, {"error": "not_found"}, counter="not_found")


class Validator:
    """Collects validation problems of a JSON object; :meth:`check` raises them together.

    Each accessor returns the value when it is valid, else ``None`` (and records the problem
    under its field path, e.g. ``lines[0].qty``)."""

    def __init__(self) -> None:
        self.details: list[dict[str, str]] = []

    def error(self, path: str, message: str) -> None:
        self.details.append({"field": path, "message": message})

    def check(self) -> None:
        if self.details:
            raise ValidationFailed(self.details)

    @staticmethod
    def _path(prefix: str, key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    def string(self, data: Mapping[str, Any], key: str, prefix: str = "", *,
               required: bool = True, nullable: bool = False, max_length: int = 200,
               pattern: str | None = None, pattern_message: str | None = None) -> str | None:
        path = self._path(prefix, key)
        if key not in data:
            if required:
                self.error(path, "is required")
            return None
        value = data[key]
        if value is None:
            if not nullable:
                self.error(path, "must be a non-empty string")
            return None
        if not isinstance(value, str) or not value.strip():
            self.error(path, "must be a non-empty string")
            return None
        if len(value) > max_length:
            self.error(path, f"must be at most {max_length} characters")
            return None
        if pattern is not None and re.fullmatch(pattern, value) is None:
            self.error(path, pattern_message or f"must match {pattern}")
            return None
        return value

    def choice(self, data: Mapping[str, Any], key: str, options: Sequence[str],
               prefix: str = "") -> str | None:
        path = self._path(prefix, key)
        value = data.get(key)
        if key not in data:
            self.error(path, "is required")
            return None
        if value not in options:
            self.error(path, "must be one of " + "|".join(options))
            return None
        return str(value)

    def integer(self, data: Mapping[str, Any], key: str, prefix: str = "", *,
                minimum: int = 1, message: str = "must be a positive integer") -> int | None:
        path = self._path(prefix, key)
        if key not in data:
            self.error(path, "is required")
            return None
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.error(path, message)
            return None
        return value

    def version(self, data: Mapping[str, Any]) -> int | None:
        return self.integer(data, "version", minimum=0,
                            message="must be a non-negative integer")

    def array(self, data: Mapping[str, Any], key: str, prefix: str = "", *,
              max_items: int = 1000) -> list[Any] | None:
        path = self._path(prefix, key)
        if key not in data:
            self.error(path, "is required")
            return None
        value = data[key]
        if not isinstance(value, list) or not value:
            self.error(path, "must be a non-empty array")
            return None
        if len(value) > max_items:
            self.error(path, f"must have at most {max_items} items")
            return None
        return value

    def objects(self, data: Mapping[str, Any], key: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(path, item)`` for each item of a non-empty array of objects."""
        items = self.array(data, key) or []
        for i, item in enumerate(items):
            path = f"{key}[{i}]"
            if not isinstance(item, dict):
                self.error(path, "must be an object")
                continue
            yield path, item


# -- faults -----------------------------------------------------------------------------------


@dataclass
class Faults:
    """What the server does wrong on purpose (non-admin requests only)."""

    error_rate: float = 0.0
    error_status: int = 503
    error_after_apply_rate: float = 0.0
    latency_ms: float = 0.0
    rate_limit_per_s: float | None = None
    rate_limit_burst: int | None = None
    down: bool = False

    def updated(self, changes: Mapping[str, Any]) -> Faults:
        """A copy with ``changes`` applied; 422 (all problems at once) when one is invalid."""
        v = Validator()
        known = {f.name for f in fields(self)}
        for key in changes:
            if key not in known:
                v.error(key, "unknown fault; known: " + ", ".join(sorted(known)))
        out = Faults(**asdict(self))
        for key, value in changes.items():
            if key not in known:
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if key in ("error_rate", "error_after_apply_rate"):
                if not number or not 0.0 <= value <= 1.0:
                    v.error(key, "must be a number between 0 and 1")
                    continue
                value = float(value)
            elif key == "error_status":
                if not number or int(value) != value or not 400 <= value <= 599:
                    v.error(key, "must be an HTTP error status (400..599)")
                    continue
                value = int(value)
            elif key == "latency_ms":
                if not number or not 0 <= value <= 60_000:
                    v.error(key, "must be a number of milliseconds (0..60000)")
                    continue
                value = float(value)
            elif key == "rate_limit_per_s":
                if value is not None and (not number or value <= 0):
                    v.error(key, "must be a positive number or null")
                    continue
                value = None if value is None else float(value)
            elif key == "rate_limit_burst":
                if value is not None and (not number or int(value) != value or value < 1):
                    v.error(key, "must be a positive integer or null")
                    continue
                value = None if value is None else int(value)
            elif key == "down" and not isinstance(value, bool):
                v.error(key, "must be a boolean")
                continue
            setattr(out, key, value)
        v.check()
        return out


class _TokenBucket:
    def __init__(self, rate_per_s: float, burst: int | None) -> None:
        self.rate = rate_per_s
        self.capacity = float(burst if burst is not None else max(1, math.ceil(rate_per_s)))
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


# -- routing ----------------------------------------------------------------------------------

Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # "/fulfilment-orders/{order_id}/status"
    handler: Handler
    pattern: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{([a-z_]+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.template))
        object.__setattr__(self, "pattern", re.compile(regex))


@dataclass
class _Stored:
    fingerprint: str
    status: int
    headers: dict[str, str]
    payload: bytes


def _encode(body: JSON) -> bytes:
    if body is None:
        return b""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# -- the server -------------------------------------------------------------------------------


class ReferenceServer:
    """A reference REST target on ``host:port`` (0: a free port), served from a daemon thread.

    Use as a context manager or call :meth:`start` / :meth:`stop`. Fault keyword arguments are
    the fields of :class:`Faults`; ``seed`` makes ``error_rate`` decisions reproducible.
    """

    name: ClassVar[str] = "reference"
    extra_stats: ClassVar[tuple[str, ...]] = ()  # a subclass's own ``/_stats`` counters

    def __init__(self, port: int = 0, host: str = "127.0.0.1", *, seed: int | None = None,
                 **faults: Any) -> None:
        self.host = host
        self.port = port
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._stopping = threading.Event()
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._routes = [Route(m, t, h) for m, t, h in self.routes()]
        self._initial_faults = Faults().updated(faults)
        self._reset_all()
        self.faults = self._initial_faults
        self._bucket = self._make_bucket()

    # -- subclass API ---------------------------------------------------------------------

    def routes(self) -> list[tuple[str, str, Handler]]:
        """``(method, path template, handler)`` for every non-admin endpoint."""
        return []

    def reset_state(self) -> None:
        """Forget all business state (called at construction and by ``POST /_reset``)."""

    def check_version(self, current: int | None, incoming: int) -> None:
        """409 ``stale_version`` unless ``incoming`` is newer than ``current``."""
        if current is not None and incoming <= current:
            raise ApiError(409, {"error": "stale_version", "current": current},
                           counter="stale_rejections")

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def route_table(self) -> list[tuple[str, str]]:
        """``(method, template)`` of every endpoint, admin endpoints included."""
        admin = [("GET", "/_health"), ("GET", "/_requests"), ("GET", "/_stats"),
                 ("GET", "/_faults"), ("POST", "/_faults"), ("POST", "/_reset")]
        return [(r.method, r.template) for r in self._routes] + admin

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HttpServer((self.host, self.port), _Handler, self)
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{self.name}-server:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()  # wakes handlers sleeping in injected latency
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- state --------------------------------------------------------------------------------

    def set_faults(self, **changes: Any) -> Faults:
        with self._lock:
            self.faults = self.faults.updated(changes)
            self._bucket = self._make_bucket()
            return self.faults

    def reset(self) -> None:
        with self._lock:
            self._reset_all()

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def _reset_all(self) -> None:
        self._idempotency: collections.OrderedDict[str, _Stored] = collections.OrderedDict()
        self._log: collections.deque[dict[str, Any]] = collections.deque(maxlen=REQUEST_LOG_SIZE)
        self._seq = 0
        self._stats = dict.fromkeys(STAT_KEYS + self.extra_stats, 0)
        self.faults = Faults()
        self._bucket = None
        self.reset_state()

    def _make_bucket(self) -> _TokenBucket | None:
        if self.faults.rate_limit_per_s is None:
            return None
        return _TokenBucket(self.faults.rate_limit_per_s, self.faults.rate_limit_burst)

    def _count(self, key: str) -> None:
        self._stats[key] = self._stats.get(key, 0) + 1

    # -- dispatch -------------------------------------------------------------------------

    def dispatch(self, method: str, target: str, headers: Mapping[str, str],
                 raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Answer one request: ``(status, headers, body bytes)``. ``headers`` has lower-case
        names."""
        path, _, query = target.partition("?")
        echo = {name: headers[name.lower()] for name in ECHO_HEADERS if name.lower() in headers}
        if path.startswith("/_"):
            with self._lock:
                try:
                    response = self._admin(method, path, query, raw)
                except ApiError as exc:
                    response = Response(exc.status, exc.body, exc.headers)
            status, out_headers, payload = response.status, response.headers, _encode(response.body)
        else:
            with self._lock:
                latency = self.faults.latency_ms
            if latency > 0:
                self._stopping.wait(latency / 1000.0)
            with self._lock:
                status, out_headers, payload, replayed, body = self._serve(
                    method, target, path, query, headers, raw)
                self._seq += 1
                self._log.append({
                    "seq": self._seq, "at": time.time(), "method": method, "path": target,
                    "headers": {k: headers[k] for k in RECORDED_HEADERS if k in headers},
                    "body": body, "status": status, "replayed": replayed,
                })
        out = dict(out_headers)
        out.update(echo)
        if payload:
            out["Content-Type"] = "application/json"
        return status, out, payload

    def _serve(self, method: str, target: str, path: str, query: str,
               headers: Mapping[str, str], raw: bytes
               ) -> tuple[int, dict[str, str], bytes, bool, JSON]:
        """Under the lock: faults, routing, idempotency, the handler.
        ``(status, headers, payload, replayed, parsed body)``."""
        self._count("requests")
        faults = self.faults

        def fail(status: int, body: JSON, counter: str, hdrs: dict[str, str] | None = None,
                 parsed: JSON = None) -> tuple[int, dict[str, str], bytes, bool, JSON]:
            self._count(counter)
            return status, hdrs or {}, _encode(body), False, parsed

        if faults.down:
            return fail(503, {"error": "unavailable"}, "unavailable", {"Retry-After": "1"})
        if self._bucket is not None:
            wait = self._bucket.take()
            if wait > 0:
                return fail(429, {"error": "rate_limited"}, "rate_limited",
                            {"Retry-After": str(max(1, math.ceil(wait)))})
        if faults.error_rate > 0 and self._rng.random() < faults.error_rate:
            return fail(faults.error_status, {"error": "injected"}, "injected_errors")

        route, params, allowed = self._match(method, path)
        if route is None:
            if allowed:
                return fail(405, {"error": "method_not_allowed"}, "bad_requests",
                            {"Allow": ", ".join(sorted(allowed))})
            return fail(404, {"error": "not_found"}, "not_found")

        body: JSON = None
        if raw:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                return fail(400, {"error": "invalid_json"}, "bad_requests")

        write = method in WRITE_METHODS
        key = headers.get("idempotency-key")
        fingerprint = ""
        if write:
            if key is None or not key.strip():
                return fail(400, {"error": "missing_idempotency_key"}, "idempotency_errors",
                            parsed=body)
            if len(key) > MAX_KEY_LENGTH:
                return fail(400, {"error": "invalid_idempotency_key"}, "idempotency_errors",
                            parsed=body)
            fingerprint = json.dumps([method, target, body], sort_keys=True,
                                     separators=(",", ":"))
            stored = self._idempotency.get(key)
            if stored is not None:
                if stored.fingerprint != fingerprint:
                    return fail(422, {"error": "idempotency_key_reused"}, "idempotency_errors",
                                parsed=body)
                self._count("idempotent_replays")
                return (stored.status, {**stored.headers, "Idempotent-Replayed": "true"},
                        stored.payload, True, body)

        request = Request(method=method, path=path, params=params,
                          query=dict(urllib.parse.parse_qsl(query)), headers=headers, body=body)
        try:
            response = route.handler(request)
        except ApiError as exc:
            return fail(exc.status, exc.body, exc.counter, exc.headers, parsed=body)
        except Exception as exc:  # a bug: answer 500 rather than drop the connection
            return fail(500, {"error": "internal", "message": repr(exc)}, "internal_errors",
                        parsed=body)

        payload = _encode(response.body)
        if write and 200 <= response.status < 300:
            assert key is not None
            self._idempotency[key] = _Stored(fingerprint, response.status,
                                             dict(response.headers), payload)
            while len(self._idempotency) > IDEMPOTENCY_CAPACITY:
                self._idempotency.popitem(last=False)
            self._count("writes_applied" if response.applied else "duplicates")
            if (faults.error_after_apply_rate > 0
                    and self._rng.random() < faults.error_after_apply_rate):
                return fail(faults.error_status, {"error": "injected"}, "injected_errors",
                            parsed=body)
        return response.status, dict(response.headers), payload, False, body

    def _match(self, method: str, path: str
               ) -> tuple[Route | None, dict[str, str], set[str]]:
        allowed: set[str] = set()
        for route in self._routes:
            m = route.pattern.fullmatch(path)
            if m is None:
                continue
            if route.method != method:
                allowed.add(route.method)
                continue
            params = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
            return route, params, allowed
        return None, {}, allowed

    def _admin(self, method: str, path: str, query: str, raw: bytes) -> Response:
        """Under the lock: the ``/_…`` endpoints (no faults, no idempotency key, not logged)."""
        endpoints = {p for m, p in self.route_table if p.startswith("/_")}
        if path not in endpoints:
            raise not_found()
        if (method, path) not in self.route_table:
            raise ApiError(405, {"error": "method_not_allowed"})
        if path == "/_health":
            return Response(200, {"status": "ok", "server": self.name})
        if path == "/_requests":
            return Response(200, {"requests": list(self._log)})
        if path == "/_stats":
            return Response(200, dict(self._stats))
        if path == "/_reset":
            self._reset_all()
            return Response(200, {"status": "reset"})
        if method == "POST":  # /_faults
            try:
                changes = json.loads(raw) if raw else {}
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, {"error": "invalid_json"}) from None
            if not isinstance(changes, dict):
                raise ValidationFailed([{"field": "body", "message": "must be a JSON object"}])
            self.faults = self.faults.updated(changes)
            self._bucket = self._make_bucket()
        return Response(200, asdict(self.faults))


# -- HTTP plumbing ----------------------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's listen backlog is 5: a client opening its 64 pooled connections at once
    # overflowed it, and the connections the kernel had dropped were reset under the client
    # (httpx.ReadError) or waited out a SYN retransmission (1 s). A real target's is larger.
    request_queue_size = 512

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 app: ReferenceServer) -> None:
        self.app = app
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._closing = False
        super().__init__(address, handler)

    def track(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.add(conn)
            closing = self._closing
        if closing:
            _shutdown(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.discard(conn)

    def close_connections(self, timeout_s: float = 5.0) -> None:
        """Unblock every handler thread (idle keep-alive connections) and wait for them."""
        with self._conn_lock:
            self._closing = True
            conns = list(self._connections)
        for conn in conns:
            _shutdown(conn)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._conn_lock:
                if not self._connections:
                    return
            time.sleep(0.01)


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "reference-target/1.0"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stalls
    server: _HttpServer
    timeout = 60  # an idle keep-alive connection is closed after a minute

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._send(411, {"Connection": "close"}, _encode({"error": "length_required"}))
            self.close_connection = True
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self._send(400, {"Connection": "close"}, _encode({"error": "invalid_length"}))
            self.close_connection = True
            return
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, out, payload = self.server.app.dispatch(self.command, self.path, headers, raw)
        self._send(status, out, payload)

    def _send(self, status: int, headers: Mapping[str, str], payload: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Type" not in headers and payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


# -- command line -----------------------------------------------------------------------------


def run_cli(server_cls: type[ReferenceServer], argv: Sequence[str] | None = None) -> int:
    """``python -m connectors.<name>.server --port N``: print the URL, serve until SIGINT or
    SIGTERM."""
    parser = argparse.ArgumentParser(prog=f"python -m connectors.{server_cls.name}.server",
                                     description=f"{server_cls.name.upper()} reference server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--error-status", type=int, default=503)
    parser.add_argument("--error-after-apply-rate", type=float, default=0.0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-limit-per-s", type=float, default=None)
    parser.add_argument("--rate-limit-burst", type=int, default=None)
    parser.add_argument("--down", action="store_true")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        server = server_cls(
            args.port, args.host, seed=args.seed, error_rate=args.error_rate,
            error_status=args.error_status, error_after_apply_rate=args.error_after_apply_rate,
            latency_ms=args.latency_ms, rate_limit_per_s=args.rate_limit_per_s,
            rate_limit_burst=args.rate_limit_burst, down=args.down)
    except ValidationFailed as exc:
        parser.error(json.dumps(exc.body["details"]))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with server:
        print(server.url, flush=True)
        print(f"{server_cls.name} reference server listening on {server.url}",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    return 0
