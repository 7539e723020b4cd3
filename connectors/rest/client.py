"""The shared HTTP client of the REST connectors (urllib3).

Every write carries ``Idempotency-Key`` = the event id, so a redelivered event is applied once
by a careful target; ``X-Request-Id`` and the event's ``traceparent`` are propagated. Answers
are classified for the worker runtime:

    2xx, or a status the route lists as ``skip``  → done
    408, 425, 429, 5xx, timeouts, connection errors → TargetError (transient: retry tiers;
                                                      Retry-After honoured by pausing)
    a status the route lists as ``retry``          → TargetError (e.g. 409 "unknown order")
    other 4xx                                      → TargetRefused (permanent: DLQ, with the
                                                      target's error body in the DLQ headers)
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Collection, Mapping
from typing import Any

import urllib3

from pipeline import telemetry
from pipeline.errors import PermanentError, TransientError

_RETRYABLE = frozenset({408, 425, 429})

# A route's ``skip``/``retry`` entry: a status (``409``) or a status with the error code the
# target puts in its JSON body's ``error`` (or ``code``) field (``"409:unknown_order"``), so
# that one status with several meanings is told apart.
StatusRule = tuple[int, str | None]


def status_rules(values: Collection[int | str]) -> tuple[StatusRule, ...]:
    """``[409, "404", "409:unknown_order"]`` → rules; a malformed entry is a ValueError."""
    rules: list[StatusRule] = []
    for v in values:
        text = str(v).strip()
        status, _, code = text.partition(":")
        if not status.isdigit() or not 100 <= int(status) <= 599 or (_ and not code):
            raise ValueError(
                f"bad status rule {v!r}: give a status (409) or status:error_code "
                "(\"409:unknown_order\")"
            )
        rules.append((int(status), code or None))
    return tuple(rules)


def _error_code(response: urllib3.BaseHTTPResponse) -> str | None:
    try:
        body = json.loads(response.data)
    except ValueError:
        return None
    if isinstance(body, dict):
        code = body.get("error", body.get("code"))
        return str(code) if isinstance(code, str | int) else None
    return None


def _matches(rules: Collection[StatusRule], response: urllib3.BaseHTTPResponse) -> bool:
    status = response.status
    hits = [code for st, code in rules if st == status]
    if not hits:
        return False
    return None in hits or _error_code(response) in hits


class TargetError(TransientError):
    """The target failed in a way worth retrying; ``retry_after_s`` when it said so."""

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None, body: str | None = None,
                 target_alive: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.target_error_body = body
        # "Not yet" (a route's retry status): the target is up, the event is early. The
        # worker retries it without counting it against the target's circuit breaker.
        self.target_alive = target_alive


class TargetRefused(PermanentError):
    """The target refused the request for good (4xx); ``target_error_body`` says why."""

    def __init__(self, message: str, *, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.target_error_body = body


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            import datetime as dt

            when = parsedate_to_datetime(value)
            return max(0.0, (when - dt.datetime.now(when.tzinfo)).total_seconds())
        except (TypeError, ValueError):
            return None


class RestTarget:
    """A connection pool to one target, with its auth, timeouts and default headers.

    urllib3, not httpx: from the 64 handler threads of a worker, an httpx call cost ~1 ms of the
    worker's CPU (httpx's request and response models, httpcore's pool, h11), an urllib3 call
    ~0.4 ms; on two cores the worker's calls/s are bound by that CPU (measured against the
    reference WMS, docs/benchmarks.md). The connections are one pool of ``max_connections``
    (a LIFO queue: taking a free connection costs the same however many there are); a call
    waits up to ``timeout_s`` for one. ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` are honoured
    as httpx did."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        bearer_token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 64,
    ) -> None:
        default_headers = {"User-Agent": "erp-pipeline", "Accept": "*/*",
                           **dict(headers or {})}
        if bearer_token:
            default_headers["Authorization"] = f"Bearer {bearer_token}"
        elif username is not None:
            basic = urllib3.make_headers(basic_auth=f"{username}:{password or ''}")
            default_headers["Authorization"] = basic["authorization"]
        self.base_url = base_url.rstrip("/")
        parsed = urllib3.util.parse_url(self.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"bad base_url {base_url!r}: give http(s)://host[:port][/path]")
        self.host = parsed.host
        self._prefix = (parsed.path or "").rstrip("/")
        self.timeout_s = timeout_s
        self._headers = default_headers
        pool_kw: dict[str, Any] = {
            "maxsize": max(1, max_connections),
            "block": True,  # at most max_connections open; a call waits for a free one
            "timeout": urllib3.Timeout(connect=connect_timeout_s, read=timeout_s),
            "retries": False,  # the worker's retry tiers retry; a failure is raised as it is
        }
        proxy = _proxy_for(parsed.scheme, parsed.host)
        self._manager: urllib3.PoolManager | None = None
        if proxy:
            self._manager = urllib3.ProxyManager(proxy, num_pools=1, **pool_kw)
            self._pool = self._manager.connection_from_url(self.base_url)
        else:
            self._pool = urllib3.connection_from_url(self.base_url, **pool_kw)

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        idempotency_key: str,
        traceparent: str | None = None,
        skip: Collection[int | str] = (),
        retry: Collection[int | str] = (),
    ) -> urllib3.BaseHTTPResponse:
        """``skip``/``retry``: statuses or ``"status:error_code"`` rules (:func:`status_rules`).
        The answer (its body read) when it is a success or a skipped status."""
        where = f"{method} {self.base_url}{path}"
        attrs = {"http.request.method": method, "url.full": f"{self.base_url}{path}",
                 "server.address": self.host}
        with telemetry.client_span(method, attrs) as span:
            headers = {"Idempotency-Key": idempotency_key, "X-Request-Id": str(uuid.uuid4())}
            # the call's own span when tracing, else the event's context as it came
            parent = telemetry.current_traceparent() or traceparent
            if parent:
                headers["traceparent"] = parent
            data = None
            if body is not None:
                data = _json_bytes(body)
                headers["Content-Type"] = "application/json"
            try:
                r = self._send(method, path, data, {**self._headers, **headers})
            except urllib3.exceptions.EmptyPoolError as exc:
                raise TargetError(f"{where}: no free connection to the target within "
                                  f"{self.timeout_s:g}s (all {self._pool.num_connections} in "
                                  "use): the target answers too slowly") from exc
            except urllib3.exceptions.NewConnectionError as exc:
                raise TargetError(f"{where} failed: cannot connect: {exc}") from exc
            except urllib3.exceptions.TimeoutError as exc:
                raise TargetError(f"{where} timed out ({type(exc).__name__})") from exc
            except urllib3.exceptions.HTTPError as exc:
                raise TargetError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
            if span is not None:
                span.set_attribute("http.response.status_code", r.status)
        status = r.status
        if status < 300 or (skip and _matches(status_rules(skip), r)):
            return r
        text = r.data[:8000].decode("utf-8", "replace")
        if retry and _matches(status_rules(retry), r):
            raise TargetError(f"{where} answered {status} (not yet: retried): {text[:300]}",
                              status=status, body=text, target_alive=True)
        if status in _RETRYABLE or status >= 500:
            raise TargetError(f"{where} answered {status}: {text[:300]}", status=status,
                              retry_after_s=_retry_after(r.headers.get("Retry-After"))
                              if status in (429, 503) else None, body=text)
        raise TargetRefused(f"{where} refused the request with {status}: {text[:300]}",
                            status=status, body=text)

    def _send(self, method: str, path: str, data: bytes | None,
              headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        # a float works as the pool's timeout (queue.get's); urllib3 types it int
        wait: Any = self.timeout_s
        if self._manager is not None:  # through a proxy: it needs the absolute URL
            return self._manager.urlopen(method, self.base_url + path, redirect=False,
                                         body=data, headers=headers, pool_timeout=wait)
        return self._pool.urlopen(method, self._prefix + path, body=data, headers=headers,
                                  pool_timeout=wait)

    def close(self) -> None:
        if self._manager is not None:
            self._manager.clear()
        self._pool.close()


def _json_bytes(body: Any) -> bytes:
    """The body as httpx's ``json=`` wrote it: compact, UTF-8, no NaN."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy the environment names for this URL (``HTTPS_PROXY`` …, ``NO_PROXY``)."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(host):  # NO_PROXY
        return None
    return proxy if "://" in proxy else f"http://{proxy}"
