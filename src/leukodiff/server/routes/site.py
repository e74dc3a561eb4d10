"""What every page needs without a session: the health check and the static files."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from leukodiff.server.review import ReviewError
from leukodiff.server.state import PACKAGE

public = APIRouter()


STATIC = {"app.css": "text/css", "app.js": "text/javascript",
          "local-time.js": "text/javascript"}


@public.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/static/{name}")  # public: the sign-in page uses the same style sheet
def static_file(name: str) -> Response:
    if name not in STATIC:  # a fixed list: no path from the request reaches the filesystem
        raise ReviewError("no such file", status=404)
    return Response((PACKAGE / "static" / name).read_bytes(), media_type=STATIC[name],
                    headers={"Cache-Control": "private, max-age=300"})
