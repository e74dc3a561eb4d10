"""What the route modules share: the routers' guards (a session, and CSRF on anything
but GET), the id type of a path, and the answers several areas give (a case as JSON)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from leukodiff.server import case_summary, review
from leukodiff.server.auth import check_csrf, check_password_changed, session_user
from leukodiff.server.db import AuditEvent, User
from leukodiff.server.review import ReviewError
from leukodiff.server.state import state_of

# Row ids are Integer columns: 32-bit on PostgreSQL ("integer out of range" beyond) and
# 64-bit rowids on SQLite (OverflowError beyond), both a 500 once sent to the database.
# No row can have an id outside the narrower, 32-bit range (SQLite would need 2**31 rows),
# so an id in a path outside it is refused by validation, which app.py answers with a 404.
ID_MIN, ID_MAX = -(2**31), 2**31 - 1
Id = Annotated[int, Path(ge=ID_MIN, le=ID_MAX)]


def large_body(endpoint: Callable) -> Callable:
    """Mark a route whose body may be up to the upload limit (image files); every other
    route's body is capped at `app.BODY_LIMIT` (64 KiB) before it is read."""
    endpoint.large_body = True
    return endpoint


def current_user(request: Request) -> User:
    with state_of(request).db.reading() as session:
        user = session_user(request, session)
    check_password_changed(request, user)
    return user


UserDep = Annotated[User, Depends(current_user)]
# current_user first: an anonymous request is refused as such (401 / login), before CSRF.
SIGNED_IN = [Depends(current_user), Depends(check_csrf)]


def pages_router() -> APIRouter:
    """Server-rendered HTML: a session required, and a CSRF token on anything but GET."""
    return APIRouter(dependencies=SIGNED_IN)


def api_router() -> APIRouter:
    """JSON under /api for the pages' scripts, guarded as the pages are."""
    return APIRouter(prefix="/api", dependencies=SIGNED_IN)


def case_response(request: Request, case_id: int) -> dict[str, Any]:
    """The case as the review page reads it (what most changes answer with)."""
    with state_of(request).db.reading() as session:
        return case_summary.case_dict(review.load_case(session, case_id))


def case_events(session: Session, case_id: int) -> list[AuditEvent]:
    return list(session.scalars(select(AuditEvent).where(AuditEvent.case_id == case_id)
                                .options(selectinload(AuditEvent.user)).order_by(AuditEvent.id)))


def found(session: Session, model: type, row_id: int, what: str) -> Any:
    """The row with this id, or a 404 naming what was asked for."""
    row = session.get(model, row_id)
    if row is None:
        raise ReviewError(f"no {what} {row_id}", status=404)
    return row
