"""The Models page and API (admins): model sets, promote and roll back, the adapt job;
and re-analysing a case with a chosen set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from leukodiff.server import case_summary, edits
from leukodiff.server.adapt_job import job_dict
from leukodiff.server.auth import csrf_token, require_role
from leukodiff.server.db import AuditEvent, FieldImage, ModelJob, Role, User
from leukodiff.server.exports import audit_dict
from leukodiff.server.model_sets import (
    MODEL_ACTIONS,
    ModelSetError,
    default_stack,
    list_sets,
    promote,
    rollback,
)
from leukodiff.server.review import ReviewError
from leukodiff.server.routes.common import Id, UserDep, api_router, case_response, pages_router
from leukodiff.server.state import state_of

pages = pages_router()
api = api_router()


MODEL_EVENTS_SHOWN = 50
# Events without a case are model-set events when their action is one (`MODEL_ACTIONS`).
MODEL_EVENT = AuditEvent.case_id.is_(None) & AuditEvent.action.in_(MODEL_ACTIONS)
MODELS_DONE = {  # ?done= after a change: fixed messages, never echoed text
    "promoted": "Model set {name} is now the default for new analyses.",
    "rolled_back": "Rolled back: model set {name} is the default for new analyses again.",
    "started": "The adapt job has started; this page follows it.",
}


@pages.get("/admin/models", response_class=HTMLResponse)
def models_page(request: Request, user: UserDep, done: str | None = None,
                name: str | None = None) -> Response:
    require_role(user, Role.ADMIN)
    shown = (MODELS_DONE[done].format(name=repr((name or "")[:64])) if done in MODELS_DONE
             else None)
    return _models_page(request, user, None, done=shown)


def _models_page(request: Request, user: User, message: str | None, status: int = 200,
                 done: str | None = None) -> Response:
    """Every model set with its figures, who made it and when, the default; the adapt
    jobs (the page reloads itself while one runs) and the model-set events."""
    state = state_of(request)
    with state.db.reading() as session:
        sets = list_sets(session)
        jobs = [job_dict(j) for j in session.scalars(
            select(ModelJob).options(selectinload(ModelJob.started_by))
            .order_by(ModelJob.id.desc()).limit(10))]
        events = [audit_dict(e) for e in session.scalars(
            select(AuditEvent).where(MODEL_EVENT).options(selectinload(AuditEvent.user))
            .order_by(AuditEvent.id.desc()).limit(MODEL_EVENTS_SHOWN))]
        fields_per_set = dict(session.execute(
            select(FieldImage.model_set, func.count(FieldImage.id))
            .where(FieldImage.model_set.is_not(None)).group_by(FieldImage.model_set)).all())
        stack = default_stack(session)
        adaptation = case_summary.adaptation_progress(session)
    return state.templates.TemplateResponse(
        request, "models.html",
        {"user": user, "sets": sets, "jobs": jobs, "events": events,
         "fields_per_set": fields_per_set, "csrf": csrf_token(request), "message": message,
         "done": done, "running": any(j["running"] for j in jobs),
         "rollback_to": stack[-2] if len(stack) > 1 else None, "adaptation": adaptation},
        status_code=status)


def _models_change(request: Request, user: User, change: Callable[[Session], Any],
                   done: str) -> Response:
    try:
        with state_of(request).db.writing() as session:
            row = change(session)
    except ModelSetError as error:
        return _models_page(request, user, error.message, status=error.status)
    return RedirectResponse(f"/admin/models?done={done}&name={quote(row.name)}",
                            status_code=303)


@pages.post("/admin/models/{name}/promote")
def promote_form(request: Request, user: UserDep, name: str) -> Response:
    """Make a model set the default for new analyses."""
    require_role(user, Role.ADMIN)
    return _models_change(request, user, lambda session: promote(session, user, name),
                          "promoted")


@pages.post("/admin/models/rollback")
def rollback_form(request: Request, user: UserDep) -> Response:
    """Make the previous default the default again."""
    require_role(user, Role.ADMIN)
    return _models_change(request, user, lambda session: rollback(session, user),
                          "rolled_back")


@pages.post("/admin/models/adapt")
def adapt_form(request: Request, user: UserDep) -> Response:
    """Start "adapt from signed cases" from the default set (a background job)."""
    require_role(user, Role.ADMIN)
    try:
        state_of(request).jobs.start(user)
    except ModelSetError as error:
        return _models_page(request, user, error.message, status=error.status)
    return RedirectResponse("/admin/models?done=started", status_code=303)


@pages.post("/cases/{case_id}/reanalyse")
def reanalyse_form(request: Request, user: UserDep, case_id: Id,
                   model_set: Annotated[str, Form()]) -> Response:
    """Re-analyse an open case with a model set (the case page's form)."""
    _reanalyse(request, user, case_id, model_set)
    return RedirectResponse(f"/cases/{case_id}", status_code=303)


def _reanalyse(request: Request, user: User, case_id: int, model_set: str) -> None:
    state = state_of(request)
    with state.db.writing() as session:
        ids = edits.reanalyse(session, user, case_id, model_set)
    state.queue.submit(ids)


# --- api ---------------------------------------------------------------------------------

@api.get("/model-sets")
def model_sets(request: Request) -> list[dict[str, Any]]:
    """Every model set (figures, who made it, default); anyone signed in (re-analysis)."""
    with state_of(request).db.reading() as session:
        return list_sets(session)


@api.post("/model-sets/{name}/promote")
def promote_set(request: Request, user: UserDep, name: str) -> dict[str, Any]:
    require_role(user, Role.ADMIN)
    with state_of(request).db.writing() as session:
        promote(session, user, name)
    return {"default": name}


@api.post("/model-sets/rollback")
def rollback_set(request: Request, user: UserDep) -> dict[str, Any]:
    require_role(user, Role.ADMIN)
    with state_of(request).db.writing() as session:
        row = rollback(session, user)
    return {"default": row.name}


@api.post("/model-jobs", status_code=202)
def start_model_job(request: Request, user: UserDep) -> dict[str, Any]:
    """Start "adapt from signed cases" (from the default set) in the background; poll
    GET /api/model-jobs/{id} for its progress."""
    require_role(user, Role.ADMIN)
    job_id = state_of(request).jobs.start(user)
    return _job(request, job_id)


def _job(request: Request, job_id: int) -> dict[str, Any]:
    with state_of(request).db.reading() as session:
        job = session.get(ModelJob, job_id)
        if job is None:
            raise ReviewError(f"no model job {job_id}", status=404)
        return job_dict(job)


@api.get("/model-jobs/{job_id}")
def model_job(request: Request, user: UserDep, job_id: Id) -> dict[str, Any]:
    require_role(user, Role.ADMIN)
    return _job(request, job_id)


@api.get("/model-sets/audit")
def model_audit_trail(request: Request, user: UserDep) -> list[dict[str, Any]]:
    """Model-set events (promotions, roll backs, adapt jobs), oldest first; admins only."""
    require_role(user, Role.ADMIN)
    with state_of(request).db.reading() as session:
        return [audit_dict(e) for e in session.scalars(
            select(AuditEvent).where(MODEL_EVENT).options(selectinload(AuditEvent.user))
            .order_by(AuditEvent.id))]


class Reanalysis(BaseModel):
    model_set: str = Field(max_length=64)


@api.post("/cases/{case_id}/reanalyse", status_code=202)
def reanalyse(request: Request, user: UserDep, case_id: Id, body: Reanalysis
              ) -> dict[str, Any]:
    """Analyse an open case's fields again with another model set (reviewers, admins):
    the new calls replace the model's on matching cells; reviewed labels stay, and the
    case then shows where the new model disagrees with them."""
    _reanalyse(request, user, case_id, body.model_set)
    return case_response(request, case_id)
