"""The FastAPI application: `create_app(settings)` wires storage, database, auth and routes."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leukodiff.pipeline import Analyzer
from leukodiff.server.adapt_job import ModelJobs
from leukodiff.server.analysis import AnalysisQueue
from leukodiff.server.auth import (
    Forbidden,
    LoginThrottle,
    NotAuthenticated,
    PasswordChangeRequired,
)
from leukodiff.server.db import Database
from leukodiff.server.exports import ExportError
from leukodiff.server.model_sets import ModelSetError, ensure_shipped
from leukodiff.server.review import ReviewError
from leukodiff.server.routes import ROUTES
from leukodiff.server.settings import Settings
from leukodiff.server.state import PACKAGE, ServerState
from leukodiff.server.storage import BlobStore, UploadError, ViewCache

log = logging.getLogger(__name__)
# Room for the multipart framing around the largest allowed set of files.
MULTIPART_OVERHEAD = 64 * 1024
# Every body but an image upload's (JSON, forms; without a signed-in session, any body):
# a few hundred bytes in practice.
BODY_LIMIT = 64 * 1024
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}


def create_app(settings: Settings, analyzer: Analyzer | None = None) -> FastAPI:
    """A ready app: data dir made, schema migrated to head; analysis starts with the lifespan.

    `analyzer`: an already loaded Analyzer to share for the shipped model set (tests);
    None loads the shipped models on the first upload. Other model sets are loaded when
    an analysis first needs them.
    """
    settings.prepare()
    db = Database(settings.url)
    db.migrate()
    with db.writing() as session:  # the shipped set is always in the registry
        ensure_shipped(session)
    blobs = BlobStore(settings.blob_dir, settings.data_dir / "tmp", settings.max_image_pixels)
    views = ViewCache(blobs, settings.cache_dir)
    state = ServerState(settings, db, blobs, views,
                        AnalysisQueue(db, views, analyzer, settings),
                        Jinja2Templates(directory=PACKAGE / "templates"),
                        LoginThrottle(settings.login_max_failures,
                                      60 * settings.login_window_minutes),
                        ModelJobs(settings, db, views))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.queue.resume()
        state.jobs.resume()
        try:
            yield
        finally:
            state.jobs.shutdown()
            state.queue.shutdown()
            db.dispose()

    # The routers' routes go in flat (prefix and dependencies are already applied to each),
    # so `app.routes` lists every endpoint: the security tests walk it.
    app = FastAPI(title="leukodiff review station", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None, routes=list(ROUTES))
    app.state.leukodiff = state
    _add_handlers(app)
    _add_middleware(app, settings)
    return app


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get(
        "accept", "")


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Response:
        """A path that names no possible row (an id beyond the database's integers, or not a
        number) is a 404, like an id that is merely unused; other invalid input stays a 422."""
        if any(e.get("loc", ())[:1] == ("path",) for e in error.errors()):
            return JSONResponse({"detail": "not found"}, status_code=404)
        # FastAPI's own answer, but in ASCII: the errors echo the input, and a JSON string
        # may hold a lone surrogate ("\ud800"), which no UTF-8 response can (was a 500).
        return AsciiJSONResponse({"detail": jsonable_encoder(error.errors())},
                                 status_code=422)

    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, _error: NotAuthenticated) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": "sign in first"}, status_code=401)
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(PasswordChangeRequired)
    async def password_change_required(request: Request, error: PasswordChangeRequired
                                       ) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": error.message, "must_change_password": True},
                                status_code=403)
        return RedirectResponse("/account", status_code=303)

    @app.exception_handler(Forbidden)
    async def forbidden(_request: Request, error: Forbidden) -> Response:
        return JSONResponse({"detail": error.message}, status_code=403)

    @app.exception_handler(ReviewError)
    async def review_error(_request: Request, error: ReviewError) -> Response:
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        return JSONResponse({"detail": error.message}, status_code=error.status,
                            headers=headers)

    @app.exception_handler(ModelSetError)
    async def model_set_error(_request: Request, error: ModelSetError) -> Response:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    @app.exception_handler(UploadError)
    async def upload_error(_request: Request, error: UploadError) -> Response:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(ExportError)
    async def export_error(_request: Request, error: ExportError) -> Response:
        return JSONResponse({"detail": str(error)}, status_code=409)


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    limit = settings.max_upload_bytes * settings.max_files_per_request + MULTIPART_OVERHEAD
    uploads = [route for route in app.routes
               if getattr(getattr(route, "endpoint", None), "large_body", False)]
    app.add_middleware(RequestGuard, upload_routes=uploads, upload_limit=limit,
                       body_limit=min(limit, BODY_LIMIT))
    # Added last, so it runs first: the session is decoded before the guard and routes need it.
    app.add_middleware(SessionMiddleware, secret_key=settings.secret_key,
                       session_cookie="leukodiff_session", same_site="lax",
                       https_only=settings.secure_cookies,
                       max_age=int(settings.session_hours * 3600))


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped, lone surrogates included."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes its limit; FastAPI turns it into a 413."""

    def __init__(self, limit: int) -> None:
        mb = limit / (1024 * 1024)
        super().__init__(413, f"request larger than {mb:.0f} MB" if mb >= 1
                         else f"request larger than {limit // 1024} kB")


class RequestGuard:
    """Body limits enforced while the body streams in, and security headers on every answer.

    A Content-Length over the limit is refused before anything is read; a chunked
    body (no Content-Length) is counted as it arrives and cut off at the limit, so
    nothing is spooled to disk beyond it. Only a signed-in request to one of
    `upload_routes` (image uploads) gets `upload_limit`; every other body (JSON, forms,
    anything from strangers) gets `body_limit`, so no one can fill memory or disk.
    Plain ASGI: Starlette's BaseHTTPMiddleware cannot stop a body mid-stream.
    """

    def __init__(self, app: ASGIApp, upload_routes: list[BaseRoute], upload_limit: int,
                 body_limit: int) -> None:
        self.app = app
        self.upload_routes = upload_routes
        self.upload_limit, self.body_limit = upload_limit, body_limit

    def _limit(self, scope: Scope) -> int:
        session = scope.get("session")
        signed_in = isinstance(session, dict) and isinstance(session.get("uid"), int)
        if signed_in and any(route.matches(scope)[0] == Match.FULL
                             for route in self.upload_routes):
            return self.upload_limit
        return self.body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        length = Headers(scope=scope).get("content-length")
        if length is not None and not length.isdigit():
            await JSONResponse({"detail": "malformed Content-Length"}, status_code=400)(
                scope, receive, send_with_headers)
            return
        if length is not None and int(length) > limit:
            await JSONResponse({"detail": BodyTooLarge(limit).detail}, status_code=413)(
                scope, receive, send_with_headers)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counted_receive, send_with_headers)
        except BodyTooLarge as error:  # read outside FastAPI's handlers (none today): still 413
            if started:
                raise
            await JSONResponse({"detail": error.detail}, status_code=413)(
                scope, receive, send_with_headers)
