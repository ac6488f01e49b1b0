"""The operations HTTP server: /health, /ready, /metrics, the status page at / and /status.json.

It runs in the supervisor (`python main.py --workers`) or in the single process (`python
main.py`), only when `HTTP_PORT` is set, bound to `HTTP_HOST` (default 127.0.0.1). It is a
small HTTP/1.1 server on asyncio streams (GET and HEAD, one request per connection), so it adds
no dependency and never runs on the message path: it reads the numbers the processes already keep
(see `core.operations.metrics`).

- `/health`: 200 while the process serves; 503 once the supervisor gave up (a crash loop).
- `/ready`: 200 when every process is connected to the broker and subscribed, and Redis / the
  database answer (when enabled; also the Redis of a `RateLimit(redis_url=...)`); 503 otherwise,
  with the reasons, also while stopping.
- `/metrics`: Prometheus text format, aggregated over all processes.
- `/`: a status page that refreshes itself (`?refresh=SECONDS`, default 2); `/status.json`: its data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence
from urllib.parse import parse_qsl, urlsplit

from core.foundation.config import Settings
from core.operations.history import History
from core.operations.metrics import Aggregator, RuntimeSource, StatusSource, SupervisorSource, SystemView, render_metrics
from core.operations.status_page import render_charts, render_fragment, render_page, status_data

if TYPE_CHECKING:
    from core.routing.router import Route
    from core.runtime.runtime import Runtime
    from core.processes.supervisor import Supervisor

log = logging.getLogger("core.http")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}
_MAX_HEAD = 16 * 1024
_READ_TIMEOUT = 10.0


class OpsServerError(RuntimeError):
    """The operations server could not start (the message names HTTP_HOST / HTTP_PORT)."""


# -- a minimal HTTP server --------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200) -> "Response":
        return cls(status, json.dumps(data, indent=1).encode(), "application/json")


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """GET/HEAD on fixed paths; each connection carries one request (`Connection: close`)."""

    def __init__(self, host: str, port: int, routes: dict[str, Handler]) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=_MAX_HEAD,
                                                      reuse_address=True)
        except OSError as exc:
            raise OpsServerError(
                f"cannot listen on HTTP_HOST={self.host} HTTP_PORT={self.port}: {exc.strerror or exc} "
                "(choose another HTTP_PORT, or unset it to run without the operations server)"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            response, head_only = await self._respond(reader)
            status_line = f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}\r\n"
            headers = {
                "Content-Type": response.content_type,
                "Content-Length": str(len(response.body)),
                "Cache-Control": "no-store",
                "Connection": "close",
                **response.headers,
            }
            head = status_line + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            writer.write(head.encode("latin-1") + (b"" if head_only else response.body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
        except (asyncio.LimitOverrunError, ValueError):
            return Response(400, b"request head too large\n"), False
        except asyncio.TimeoutError:
            return Response(400, b"request incomplete\n"), False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return Response(400, b"malformed request line\n"), False
        method, target, _version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        url = urlsplit(target)
        request = Request(method, url.path or "/", dict(parse_qsl(url.query)), headers)
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n", headers={"Allow": "GET, HEAD"}), False
        handler = self.routes.get(request.path)
        if handler is None:
            return Response(404, f"not found; try {', '.join(sorted(self.routes))}\n".encode()), method == "HEAD"
        try:
            return await handler(request), method == "HEAD"
        except Exception:
            log.exception("HTTP %s %s failed", method, request.path)
            return Response(500, b"internal error (see the log)\n"), method == "HEAD"


# -- readiness checks -------------------------------------------------------------------------------


class ReadinessCheck:
    """A named dependency check: `await check()` raises when the dependency is not usable."""

    name = "check"

    async def __call__(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class RedisCheck(ReadinessCheck):
    name = "redis"

    def __init__(self, url: str, name: str | None = None) -> None:
        self.url = url
        if name is not None:
            self.name = name
        self._client: Any = None

    async def __call__(self) -> None:
        if self._client is None:
            import redis.asyncio as redis_asyncio

            self._client = redis_asyncio.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)
        await self._client.ping()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class DatabaseCheck(ReadinessCheck):
    name = "database"

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Any = None

    async def __call__(self) -> None:
        from sqlalchemy import text

        if self._engine is None:
            from sqlalchemy.ext.asyncio import create_async_engine

            self._engine = create_async_engine(self.url, pool_size=1, max_overflow=0, pool_pre_ping=True) \
                if not self.url.startswith("sqlite") else create_async_engine(self.url)
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None


def default_checks(settings: Settings) -> list[ReadinessCheck]:
    """Redis (REDIS_URL) when ENABLE_REDIS is on; the database (DATABASE_URL) when ENABLE_DATABASE is on."""
    checks: list[ReadinessCheck] = []
    redis_url = getattr(settings, "redis_url", None)
    if getattr(settings, "enable_redis", False) and redis_url:
        checks.append(RedisCheck(redis_url))
    database_url = getattr(settings, "database_url", None)
    if database_url and getattr(settings, "enable_database", False):
        checks.append(DatabaseCheck(database_url))
    return checks


def route_checks(routes: Sequence["Route"], settings: Settings) -> list[ReadinessCheck]:
    """Checks the routes need beyond `default_checks`: the Redis of a `RateLimit(redis_url=...)` that is
    not REDIS_URL (a Redis rate limit otherwise uses REDIS_URL, checked when ENABLE_REDIS is on)."""
    from core.integrations.rate_limit import redis_rate_limits, safe_redis_url

    urls: list[str] = []
    for _route, limiter in redis_rate_limits(routes):
        url = limiter.redis_url
        if url is not None and url != settings.redis_url and url not in urls:
            urls.append(url)
    return [RedisCheck(url, name=f"redis {safe_redis_url(url)} (rate limit)") for url in urls]


# -- the operations server --------------------------------------------------------------------------


class OpsServer:
    """HTTP endpoints over a `StatusSource` (one runtime, or the supervisor and its workers)."""

    SAMPLE_INTERVAL = 1.0  # seconds between samples (rates, and noticing replaced worker processes)
    CHECK_CACHE = 1.0  # seconds a readiness check result is reused (the status page polls too)

    def __init__(
        self,
        settings: Settings,
        source: StatusSource,
        *,
        route_patterns: Sequence[str] = (),
        checks: Sequence[ReadinessCheck] | None = None,
    ) -> None:
        if settings.http_port is None:
            raise ValueError("OpsServer needs HTTP_PORT")
        self.settings = settings
        self.aggregator = Aggregator(source, route_patterns)
        self.history = History(settings.status_history_interval, settings.status_history_window)
        self.checks = list(default_checks(settings) if checks is None else checks)
        self.server = HttpServer(settings.http_host, settings.http_port, {
            "/health": self._health, "/ready": self._ready, "/metrics": self._metrics,
            "/": self._page, "/status.json": self._status_json,
        })
        self._sampler: asyncio.Task[None] | None = None
        self._check_results: dict[str, str] = {}
        self._checked_at = 0.0
        self._check_lock: asyncio.Lock | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://{self.settings.http_host}:{self.server.port}"

    async def start(self) -> None:
        self._check_lock = asyncio.Lock()
        await self.server.start()
        self._sampler = asyncio.create_task(self._sample_forever())
        log.info("operations server on %s (/health /ready /metrics, status page at /)", self.url)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        await self.server.stop()
        for check in self.checks:
            try:
                await check.close()
            except Exception:
                log.exception("closing the %s readiness check failed", check.name)

    async def _sample_forever(self) -> None:
        while True:
            try:
                self.history.observe(self.aggregator.collect())
            except Exception:
                log.exception("collecting status failed")
            await asyncio.sleep(min(self.SAMPLE_INTERVAL, self.history.interval))

    # -- readiness --------------------------------------------------------------------------------

    async def run_checks(self) -> dict[str, str]:
        """{check name: "ok" or the error}, reused for CHECK_CACHE seconds."""
        assert self._check_lock is not None
        async with self._check_lock:
            if time.monotonic() - self._checked_at < self.CHECK_CACHE:
                return dict(self._check_results)
            results = await asyncio.gather(*(self._run_one(check) for check in self.checks))
            self._check_results = {check.name: result for check, result in zip(self.checks, results)}
            self._checked_at = time.monotonic()
            return dict(self._check_results)

    async def _run_one(self, check: ReadinessCheck) -> str:
        try:
            await asyncio.wait_for(check(), self.settings.http_check_timeout)
            return "ok"
        except asyncio.TimeoutError:
            return f"no answer within HTTP_CHECK_TIMEOUT={self.settings.http_check_timeout:g} s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    async def readiness(self, view: SystemView | None = None) -> dict[str, Any]:
        view = view or self.aggregator.collect()
        checks = await self.run_checks()
        reasons: list[str] = []
        sample = view.sample
        if sample.stopping:
            reasons.append("stopping")
        if sample.fatal:
            reasons.append(sample.fatal)
        for info in sample.processes:
            if not info.ready:
                what = "not connected to the broker" if not info.connected else "not subscribed yet"
                if info.role == "worker" and info.state != "running":
                    what = f"state {info.state}"
                reasons.append(f"{info.id}: {what}")
        for name, result in checks.items():
            if result != "ok":
                reasons.append(f"{name}: {result}")
        return {"ready": not reasons, "reasons": reasons, "checks": checks,
                "processes": {info.id: info.state for info in sample.processes}}

    # -- endpoints --------------------------------------------------------------------------------

    async def _health(self, request: Request) -> Response:
        sample = self.aggregator.source.sample()
        body = {"status": "failing" if sample.fatal else "ok", "pid": sample.pid, "mode": sample.mode,
                "uptime": round(sample.uptime, 3)}
        if sample.fatal:
            body["reason"] = sample.fatal
        return Response.json(body, 503 if sample.fatal else 200)

    async def _ready(self, request: Request) -> Response:
        result = await self.readiness()
        return Response.json(result, 200 if result["ready"] else 503)

    async def _metrics(self, request: Request) -> Response:
        body, content_type = render_metrics(self.aggregator)
        return Response(200, body, content_type)

    async def _status(self, with_history: bool = True) -> dict[str, Any]:
        view = self.aggregator.collect()
        return status_data(view, await self.readiness(view), self.settings, self.history if with_history else None)

    async def _status_json(self, request: Request) -> Response:
        return Response.json(await self._status())

    async def _page(self, request: Request) -> Response:
        fragment = request.query.get("fragment")
        data = await self._status(with_history=not fragment or fragment == "charts")
        if fragment:
            text = render_charts(data) if fragment == "charts" else render_fragment(data)
            return Response(200, text.encode(), "text/html; charset=utf-8")
        try:
            refresh = min(3600.0, max(0.2, float(request.query.get("refresh", "2"))))
        except ValueError:
            refresh = 2.0
        return Response(200, render_page(data, refresh).encode(), "text/html; charset=utf-8")


# -- wiring -----------------------------------------------------------------------------------------


async def start_for_runtime(settings: Settings, runtime: "Runtime", routes: Sequence["Route"]) -> OpsServer | None:
    """`python main.py`: the server over this process's runtime, or None when HTTP_PORT is unset."""
    if settings.http_port is None:
        return None
    server = OpsServer(settings, RuntimeSource(runtime), route_patterns=[r.pattern for r in routes],
                       checks=default_checks(settings) + route_checks(routes, settings))
    await server.start()
    return server


class SupervisorOps:
    """A `SupervisorService`: the server over the supervisor and its workers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: OpsServer | None = None

    async def start(self, manager: "Supervisor") -> None:
        routes = manager.app.routes
        self.server = OpsServer(self.settings, SupervisorSource(manager), route_patterns=[r.pattern for r in routes],
                                checks=default_checks(self.settings) + route_checks(routes, self.settings))
        await self.server.start()

    async def stop(self, manager: "Supervisor") -> None:
        if self.server is not None:
            await self.server.stop()


def supervisor_services(settings: Settings) -> list[SupervisorOps]:
    """For `run_supervisor(services=...)`: the operations server when HTTP_PORT is set."""
    return [SupervisorOps(settings)] if settings.http_port is not None else []
