"""Run a FastAPI app with uvicorn in a background thread (the generation worker's API, the front router, tests), and
the request-body bound both apps share."""

from __future__ import annotations

import json
import threading
import time

from starlette.exceptions import HTTPException

# The largest request body the HTTP APIs read: room for the largest legitimate request (a prompt of 2**20 characters
# JSON-escaped, or 2**20 token ids) and far below what would strain the process. uvicorn itself reads any size.
MAX_BODY_BYTES = 32 * 2**20


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the {limit} bytes allowed")


class BodyLimit:
    """Pure ASGI middleware: a body declared (Content-Length) or found (chunked) larger than `limit` bytes is a 413
    in OpenAI's error shape before it is buffered whole. A declared size is answered at once; a chunked body raises
    `BodyTooLarge` (an HTTPException, answered by the app's handler) from `receive` once it passes the limit."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, BodyTooLarge(self.limit))
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        return await self.app(scope, bounded_receive, send)


def error_body(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error shape, as the workers answer it."""
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _send_error(send, error: HTTPException) -> None:
    body = json.dumps(error_body(error.status_code, error.detail)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def start_in_thread(app, host: str, port: int, name: str = "http", start_timeout: float = 60.0):
    """Serve `app` from a daemon thread; returns (server, thread, actual_port) once it accepts connections. Port 0
    picks a free port. The caller's main thread keeps signal handling. Stop with `server.should_exit = True` and
    `thread.join()`."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=3
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the {name} server could not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]
