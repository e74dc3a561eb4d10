"""Cases: the case list and a case's page, and the API to create, read, re-target,
sign off, reopen a case and read its audit trail."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from leukodiff.server import case_summary, review
from leukodiff.server.auth import csrf_token
from leukodiff.server.db import Case, CaseStatus, Role, User
from leukodiff.server.exports import audit_dict
from leukodiff.server.model_sets import list_sets
from leukodiff.server.review import ReviewError
from leukodiff.server.routes.common import (
    Id,
    UserDep,
    api_router,
    case_events,
    case_response,
    pages_router,
)
from leukodiff.server.state import state_of
from leukodiff.taxonomy import REVIEW_CLASSES, review_taxonomy

pages = pages_router()
api = api_router()


@pages.get("/", response_class=HTMLResponse)
def cases_page(request: Request, user: UserDep) -> Response:
    return _cases_page(request, user, None)


def _cases_page(request: Request, user: User, message: str | None, status: int = 200,
                form: dict[str, Any] | None = None) -> Response:
    """The case list and new-case form; `form`: what was typed, kept after a refusal."""
    state = state_of(request)
    with state.db.reading() as session:
        cases = session.scalars(select(Case).options(selectinload(Case.fields))
                                .order_by(Case.created_at.desc())).all()
        rows = [{"id": c.id, "accession": c.accession, "status": c.status,
                 "fields": len(c.fields), "created": f"{c.created_at:%Y-%m-%d %H:%M}",
                 "created_iso": c.created_at.isoformat()}
                for c in cases]
        adaptation = case_summary.adaptation_progress(session)
    return state.templates.TemplateResponse(
        request, "cases.html", {"user": user, "cases": rows, "csrf": csrf_token(request),
                                "message": message, "adaptation": adaptation,
                                "colours": {c.name: c.colour for c in REVIEW_CLASSES},
                                "form": form or {"accession": "", "target_count": 100}},
        status_code=status)


@pages.post("/cases")
def create_case_form(request: Request, user: UserDep, accession: Annotated[str, Form()],
                     target_count: Annotated[int, Form()] = 100) -> Response:
    try:
        with state_of(request).db.writing() as session:
            case = review.create_case(session, user, accession, target_count)
    except ReviewError as error:
        return _cases_page(request, user, error.message, error.status,
                           form={"accession": accession, "target_count": target_count})
    return RedirectResponse(f"/cases/{case.id}", status_code=303)


@pages.get("/cases/{case_id}", response_class=HTMLResponse)
def case_page(request: Request, user: UserDep, case_id: Id) -> Response:
    state = state_of(request)
    with state.db.reading() as session:
        case = review.load_case(session, case_id)
        accession, signed = case.accession, case.status == CaseStatus.SIGNED
        reason = case.sign_off_reason
        used = case_summary.model_sets_used(case)
        sets = [s for s in list_sets(session) if not s["retired"]]
    # A signed case is locked: its edit controls are not shown (the API refuses edits too).
    return state.templates.TemplateResponse(
        request, "case.html", {"user": user, "case_id": case_id, "accession": accession,
                               "signed": signed, "sign_off_reason": reason,
                               "model_sets_used": used, "model_sets": sets,
                               "can_reanalyse": user.role in (Role.REVIEWER, Role.ADMIN),
                               "csrf": csrf_token(request), "classes": REVIEW_CLASSES,
                               "taxonomy": review_taxonomy(),
                               "max_mb": state.settings.max_upload_bytes // (1024 * 1024)})


# --- api ---------------------------------------------------------------------------------

class NewCase(BaseModel):
    accession: str = Field(max_length=review.ACCESSION_MAX)
    target_count: int = 100


class CaseUpdate(BaseModel):
    target_count: int
    revision: int


class SignOff(BaseModel):
    revision: int
    # Required (non-empty) below the target, with unreviewed cells or failed fields.
    reason: str | None = None


class Reopen(BaseModel):
    revision: int
    reason: str | None = None  # required: why the signed case is amended


@api.get("/taxonomy")
def taxonomy() -> dict[str, Any]:
    """Every class a reviewer may assign: name, title, key, colour and how it is counted
    (the case page carries the same JSON; `taxonomy.REVIEW_CLASSES` is the one source)."""
    return review_taxonomy()


@api.get("/adaptation")
def adaptation(request: Request) -> dict[str, Any]:
    """Reviewed cells per type across signed cases, and how many more each type needs
    before `leukodiff adapt` will learn it (the cases page shows the same table)."""
    with state_of(request).db.reading() as session:
        return case_summary.adaptation_progress(session)


@api.get("/cases")
def list_cases(request: Request) -> list[dict[str, Any]]:
    with state_of(request).db.reading() as session:
        cases = session.scalars(select(Case).order_by(Case.id)).all()
        return [{"id": c.id, "accession": c.accession, "status": c.status} for c in cases]


@api.post("/cases", status_code=201)
def create_case(request: Request, user: UserDep, body: NewCase) -> dict[str, Any]:
    state = state_of(request)
    with state.db.writing() as session:
        case = review.create_case(session, user, body.accession, body.target_count)
    return case_response(request, case.id)


@api.get("/cases/{case_id}")
def get_case(request: Request, case_id: Id) -> dict[str, Any]:
    return case_response(request, case_id)


@api.patch("/cases/{case_id}")
def update_case(request: Request, user: UserDep, case_id: Id, body: CaseUpdate
                ) -> dict[str, Any]:
    with state_of(request).db.writing() as session:
        review.set_target(session, user, case_id, body.target_count, body.revision)
    return case_response(request, case_id)


@api.post("/cases/{case_id}/sign-off")
def sign_off(request: Request, user: UserDep, case_id: Id, body: SignOff) -> dict[str, Any]:
    """Sign off and lock the case; `case.sign_off_check` says beforehand whether a
    reason is required (and why)."""
    with state_of(request).db.writing() as session:
        review.sign_off(session, user, case_id, body.revision, body.reason)
    return case_response(request, case_id)


@api.post("/cases/{case_id}/reopen")
def reopen(request: Request, user: UserDep, case_id: Id, body: Reopen) -> dict[str, Any]:
    """Unlock a signed case to amend it (a reviewer, with a reason); the next sign-off
    issues an amended report."""
    with state_of(request).db.writing() as session:
        review.reopen(session, user, case_id, body.revision, body.reason)
    return case_response(request, case_id)


@api.get("/cases/{case_id}/audit")
def case_audit(request: Request, case_id: Id) -> list[dict[str, Any]]:
    with state_of(request).db.reading() as session:
        review.load_case(session, case_id)
        return [audit_dict(e) for e in case_events(session, case_id)]
