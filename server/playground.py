"""GET /: the playground, one static page shipped with the package (server/static).

Plain HTML and JavaScript, no CDN and no build step, so it works offline; it talks to the
server's own /info and /generate_stream. The page is not part of the API schema.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = "playground.html"
"""The page, in server/static (package data)."""


@cache
def page() -> str:
    """The page's text, read once from the installed package."""
    return files("server").joinpath("static", PAGE).read_text(encoding="utf-8")


def register(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        # The page holds no data, only code: a strict policy keeps it to this server.
        headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}
        return HTMLResponse(page(), headers=headers)


CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)
"""Content-Security-Policy of the page: inline code only, requests only to this server."""
