"""``aivh-ens serve``: a fitted blend as an HTTP service with a web page (FastAPI and uvicorn, extra ``serve``).

``import aivh_ens.serve`` imports neither torch nor FastAPI: a public name's module loads on first use.
"""

from __future__ import annotations

from aivh_ens._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "Batcher": ".batcher",
        "Ensemble": ".ensemble",
        "ServeSettings": ".app",
        "create_app": ".app",
        "serve": ".server",
        "running_server": ".server",
    },
)
