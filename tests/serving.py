"""The monitor app served for real (uvicorn on loopback, in a thread) for tests that need a
socket: the browser test and the load test."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from qualiteacher.services.redis_server import free_port


@contextlib.contextmanager
def served_app(app, **uvicorn_options) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL once uvicorn accepts connections."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           **uvicorn_options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
