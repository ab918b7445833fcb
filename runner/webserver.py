"""Run a FastAPI app with uvicorn in a background thread (the generation worker's API, the front router, tests)."""

from __future__ import annotations

import threading
import time


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
