"""The `[generation] front_port` front end: one OpenAI-compatible endpoint in front of every serving generation worker,
so an Atropos env (or any OpenAI client) needs one URL however many workers join, leave or restart.

Each request goes to the serving worker with the fewest requests in flight through this router (least outstanding
requests): generation cost varies a lot per request, so counting what is still running balances better than
round-robin. The worker table is re-read on every request, so a worker that joins is used at once and one that
leaves is dropped. If the chosen worker fails before answering (dead, restarting), the request goes to another one
once: generation has no side effects, so resending a request no byte of which reached the client is safe.
SSE streams (`"stream": true`) pass through unchanged, chunk by chunk.

No MLX here: the coordinator runs this in its own process, next to its main loop:

    app = create_router(lambda: coord.status()["workers"], api_token=config.security.api_token)
    server, thread, port = start_router(app, config.generation.host, config.generation.front_port)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from runner.routing import LeastLoaded
from runner.webserver import BodyLimit, BodyTooLarge, error_body

log = logging.getLogger(__name__)

ROUTED_POST = ("/v1/completions", "/v1/chat/completions", "/generate")
ROUTED_GET = ("/v1/models", "/health")
OPEN_PATHS = ("/health",)  # as on the workers: load balancers probe without the token
RETRY_AFTER_SECONDS = 1
# Request headers that describe the client's connection to us, not the request; httpx sets its own.
HOP_BY_HOP = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    }
)
# Failures where the worker cannot have produced anything the client saw: safe to send the request elsewhere.
# Timeouts on reading are not here: a slow generation is not a dead worker, and resending would double the load.
DEAD_WORKER_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


def error_response(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def no_worker_response(message: str = "no generation worker is serving right now; retry shortly") -> JSONResponse:
    return error_response(503, message, code="no_worker", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


class WorkerPool:
    """Serving generation workers from the coordinator's table, chosen by `runner.routing.LeastLoaded`. A worker
    that just failed is avoided by other requests for `cooldown` seconds (the coordinator may take a heartbeat
    timeout to notice a dead remote worker), unless nothing else is serving."""

    def __init__(self, get_workers: Callable[[], list[dict]], cooldown: float = 5.0):
        self.get_workers = get_workers
        self.policy = LeastLoaded(cooldown)

    def serving_urls(self) -> list[str]:
        return [
            str(w["http_url"]).rstrip("/")
            for w in self._rows()
            if w.get("role") == "generate" and w.get("state") == "serving" and w.get("http_url")
        ]

    def _rows(self) -> list[dict]:
        # The coordinator's table may change size while its own thread handles a hello; read it again.
        for _ in range(3):
            try:
                return list(self.get_workers())
            except RuntimeError:
                continue
        log.warning("could not read the worker table; routing to no worker this time")
        return []

    def acquire(self, exclude: set[str] = frozenset()) -> str | None:
        """Choose a worker and count the request against it; None when no worker is serving."""
        urls = [u for u in self.serving_urls() if u not in exclude]
        return self.policy.acquire(urls) if urls else None

    def release(self, url: str, failed: bool = False) -> None:
        self.policy.release(url, failed)


class _ProxiedStream(StreamingResponse):
    """An SSE stream passed through from a worker. Whatever ends it (done, client gone, cancelled), the worker
    connection is closed, which makes the worker stop generating, and the request stops counting against it."""

    def __init__(self, upstream: httpx.Response, done: Callable[[], None], headers: dict):
        super().__init__(upstream.aiter_raw(), status_code=upstream.status_code, headers=headers)
        self.upstream, self.done = upstream, done

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()
            self.done()


class Router:
    """The proxy itself; `create_router` wraps it in a FastAPI app."""

    def __init__(
        self,
        get_workers: Callable[[], list[dict]],
        api_token: str = "",
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        cooldown: float = 5.0,
    ):
        self.pool = WorkerPool(get_workers, cooldown=cooldown)
        self.expected_auth = f"Bearer {api_token}".encode() if api_token else b""
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.client: httpx.AsyncClient | None = None  # made on the server's event loop

    def authorized(self, request: Request) -> bool:
        if not self.expected_auth or request.url.path in OPEN_PATHS:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, self.expected_auth)

    async def forward(self, request: Request) -> Response:
        """Send the request to the least loaded serving worker; on a dead worker, to one other worker."""
        if self.client is None:
            self.client = httpx.AsyncClient(
                timeout=self.timeout, limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256)
            )
        body = await request.body()  # read once: a retry sends the same bytes
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        tried: set[str] = set()
        for _ in range(2):
            url = self.pool.acquire(exclude=tried)
            if url is None:
                break
            tried.add(url)
            upstream_request = self.client.build_request(
                request.method, url + request.url.path, params=request.query_params, headers=headers, content=body
            )
            try:
                upstream = await self._send_unless_client_leaves(request, upstream_request)
            except DEAD_WORKER_ERRORS as e:
                self.pool.release(url, failed=True)
                log.warning("generation worker %s failed (%s: %s); trying another", url, type(e).__name__, e)
                continue
            except httpx.TimeoutException:
                self.pool.release(url)
                return error_response(
                    504, f"the generation worker did not answer within {self.timeout.read:.0f}s", code="worker_timeout"
                )
            except BaseException:  # the client left (cancelled) or something unexpected: stop counting it
                self.pool.release(url)
                raise
            if upstream is None:  # the client disconnected; the worker connection is already closed
                self.pool.release(url)
                return Response(status_code=499)
            return await self._relay(upstream, lambda u=url: self.pool.release(u))
        if tried:
            return no_worker_response(f"no generation worker answered ({len(tried)} tried); retry shortly")
        return no_worker_response()

    async def _send_unless_client_leaves(
        self, request: Request, upstream_request: httpx.Request
    ) -> httpx.Response | None:
        """The worker's response headers, or None if our client went away first (then the worker request is
        cancelled, which closes its connection, so the worker stops generating for nobody)."""
        send = asyncio.ensure_future(self.client.send(upstream_request, stream=True))
        gone = asyncio.ensure_future(_client_disconnected(request))
        try:
            await asyncio.wait({send, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not send.done():
                send.cancel()
                with contextlib.suppress(BaseException):
                    await send
        if send.cancelled():
            return None
        return send.result()

    async def _relay(self, upstream: httpx.Response, done: Callable[[], None]) -> Response:
        headers = {
            k: v
            for k, v in upstream.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("content-length", "date", "server")
        }
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return _ProxiedStream(upstream, done, headers)
        try:
            content = b"".join([chunk async for chunk in upstream.aiter_raw()])
        finally:
            await upstream.aclose()
            done()
        return Response(content, status_code=upstream.status_code, headers=headers)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


async def _client_disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read, so only a disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_router(get_workers: Callable[[], list[dict]], api_token: str = "", **router_kwargs: Any) -> FastAPI:
    """An OpenAI-compatible app routing to the serving generation workers listed by `get_workers()` (rows of the
    coordinator's worker table: name, role, state, http_url, ...). With `api_token`, callers must send it as a
    bearer token (it is forwarded to the workers, which check it too)."""
    router = Router(get_workers, api_token=api_token, **router_kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await router.close()

    app = FastAPI(title="runner router", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.router = router
    app.add_middleware(BodyLimit)
    app.add_exception_handler(BodyTooLarge, lambda _, e: error_response(e.status_code, e.detail))

    async def routed(request: Request) -> Response:
        if not router.authorized(request):
            return error_response(401, "missing or wrong bearer token", code="invalid_api_key")
        return await router.forward(request)

    for path in ROUTED_POST:
        app.add_api_route(path, routed, methods=["POST"], include_in_schema=False)
    for path in ROUTED_GET:
        app.add_api_route(path, routed, methods=["GET"], include_in_schema=False)

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc) -> JSONResponse:
        return error_response(404, f"no route {request.method} {request.url.path} on this router", code="not_found")

    @app.exception_handler(405)
    async def _not_allowed(request: Request, _exc) -> JSONResponse:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    return app


def start_router(app: FastAPI, host: str, port: int, start_timeout: float = 30.0):
    """Serve `app` in a daemon thread; returns (server, thread, actual_port) once it accepts connections."""
    from runner.webserver import start_in_thread

    server, thread, actual_port = start_in_thread(app, host, port, name="router", start_timeout=start_timeout)
    log.info("routing front end on http://%s:%d/v1", host, actual_port)
    return server, thread, actual_port
