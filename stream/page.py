"""The live page at `/` (serve mode): one static HTML file that follows a license through
EventSource. No build step; the page reads the same API a desktop app does."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

PAGE = Path(__file__).parent / "static" / "index.html"


async def live_page(request: Request) -> Response:
    return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})


routes = [Route("/", live_page, methods=["GET"])]
