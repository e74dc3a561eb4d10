"""The FastAPI application: `create_app(settings)` wires storage, database, auth and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from leukodiff.pipeline import Analyzer
from leukodiff.server.analysis import AnalysisQueue
from leukodiff.server.auth import Forbidden, NotAuthenticated
from leukodiff.server.db import Database
from leukodiff.server.exports import ExportError
from leukodiff.server.review import ReviewError
from leukodiff.server.settings import Settings
from leukodiff.server.storage import BlobStore, UploadError, ViewCache

PACKAGE = Path(__file__).parent
log = logging.getLogger(__name__)
# Room for the multipart framing around the largest allowed set of files.
MULTIPART_OVERHEAD = 64 * 1024
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


@dataclass
class ServerState:
    settings: Settings
    db: Database
    blobs: BlobStore
    views: ViewCache
    queue: AnalysisQueue
    templates: Jinja2Templates


def state_of(request: Request) -> ServerState:
    return request.app.state.leukodiff


def create_app(settings: Settings, analyzer: Analyzer | None = None) -> FastAPI:
    """A ready app: data dir made, schema migrated to head; analysis starts with the lifespan.

    `analyzer`: an already loaded Analyzer to share (tests); None loads the shipped
    models on the first upload.
    """
    from leukodiff.server.routes import api, pages, public

    settings.prepare()
    db = Database(settings.url)
    db.migrate()
    blobs = BlobStore(settings.blob_dir, settings.data_dir / "tmp")
    views = ViewCache(blobs, settings.cache_dir)
    state = ServerState(settings, db, blobs, views, AnalysisQueue(db, views, analyzer),
                        Jinja2Templates(directory=PACKAGE / "templates"))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.queue.resume()
        try:
            yield
        finally:
            state.queue.shutdown()
            db.dispose()

    # The routers' routes go in flat (prefix and dependencies are already applied to each),
    # so `app.routes` lists every endpoint: the security tests walk it.
    app = FastAPI(title="leukodiff review station", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None,
                  routes=[*public.routes, *pages.routes, *api.routes])
    app.state.leukodiff = state
    _add_handlers(app)
    _add_middleware(app, settings)
    return app


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get(
        "accept", "")


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, _error: NotAuthenticated) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": "sign in first"}, status_code=401)
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(Forbidden)
    async def forbidden(_request: Request, error: Forbidden) -> Response:
        return JSONResponse({"detail": error.message}, status_code=403)

    @app.exception_handler(ReviewError)
    async def review_error(_request: Request, error: ReviewError) -> Response:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    @app.exception_handler(UploadError)
    async def upload_error(_request: Request, error: UploadError) -> Response:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(ExportError)
    async def export_error(_request: Request, error: ExportError) -> Response:
        return JSONResponse({"detail": str(error)}, status_code=409)


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    limit = settings.max_upload_bytes * settings.max_files_per_request + MULTIPART_OVERHEAD

    @app.middleware("http")
    async def limits_and_headers(request: Request, call_next) -> Response:
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            return JSONResponse({"detail": "malformed Content-Length"}, status_code=400)
        if length is not None and int(length) > limit:
            return JSONResponse({"detail": f"request larger than {limit // (1024 * 1024)} MB"},
                                status_code=413)
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # Added last, so it runs first: the session is decoded before any route needs it.
    app.add_middleware(SessionMiddleware, secret_key=settings.secret_key,
                       session_cookie="leukodiff_session", same_site="lax",
                       https_only=settings.secure_cookies,
                       max_age=int(settings.session_hours * 3600))
