"""The web page (``/``) and its assets (``/static``): self-contained, no external asset. A
``?token=`` the page was opened with is passed on to its assets and API calls."""

from __future__ import annotations

import html
from importlib import resources
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = resources.files("qualiteacher.services.monitor").joinpath("static")


def add_page(app: FastAPI, token: str | None) -> None:
    index_template = STATIC.joinpath("index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> HTMLResponse:
        qs = ""
        supplied = request.query_params.get("token")
        if token and supplied:  # already checked by the middleware: pass it on to the assets
            qs = "?token=" + quote(supplied, safe="")
        page = index_template.replace("__QS__", html.escape(qs, quote=True))
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
