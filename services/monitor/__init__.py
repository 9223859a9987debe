"""Read-only web monitor of the Redis memory bank (FastAPI app + a self-contained web page).

    qualiteacher monitor --redis redis://127.0.0.1:6379/0          # http://127.0.0.1:8000/

:func:`create_app` builds the app; see :mod:`qualiteacher.services.monitor.app` for the endpoints.
"""

from qualiteacher.services.monitor.app import create_app, is_loopback, serve

__all__ = ["create_app", "is_loopback", "serve"]
