"""HTTP routes: thin translations of requests into `review`, `storage` and `exports` calls.

Three routers: `public` (login, health: the only routes without a session),
`pages` (server-rendered HTML) and `api` (JSON for the review page's script).
Every route of `pages` and `api` requires a session, and a CSRF token on
anything but GET; an account with a temporary password reaches only the password
change (`auth.PASSWORD_CHANGE_PATHS`) until it picks its own.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from PIL import Image as PILImage
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from leukodiff.reports.outputs import cell_thumbnail
from leukodiff.server import models, review
from leukodiff.server.app import PACKAGE, state_of
from leukodiff.server.auth import (
    AccountError,
    NoSuchUser,
    authenticate,
    check_csrf,
    check_password_changed,
    create_user,
    csrf_token,
    end_sessions,
    require_role,
    session_user,
    set_active,
    set_password,
    start_session,
)
from leukodiff.server.db import (
    AuditEvent,
    Case,
    CaseStatus,
    CellRecord,
    FieldImage,
    ModelJob,
    Role,
    User,
    utcnow,
)
from leukodiff.server.exports import (
    ExportError,
    TrainingSummary,
    audit_dict,
    case_json,
    cases_csv,
    fhir_report,
    training_files,
)
from leukodiff.server.models import (
    MODEL_ACTIONS,
    ModelSetError,
    job_dict,
    list_sets,
    promote,
    rollback,
)
from leukodiff.server.review import ReviewError
from leukodiff.server.storage import UploadError, display_name
from leukodiff.taxonomy import REVIEW_CLASSES, review_taxonomy

THUMBNAIL = 128
CROP_MAX = 384  # the hover enlargement's crops
IMAGE_CACHE = "private, max-age=86400"  # field views and crops never change for an id
STATIC = {"app.css": "text/css", "app.js": "text/javascript",
          "local-time.js": "text/javascript"}
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
public = APIRouter()
# current_user first: an anonymous request is refused as such (401 / login), before CSRF.
pages = APIRouter(dependencies=[Depends(current_user), Depends(check_csrf)])
api = APIRouter(prefix="/api", dependencies=[Depends(current_user), Depends(check_csrf)])


# --- public -------------------------------------------------------------------------------

@public.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    return _login_page(request, None)


def _login_page(request: Request, message: str | None, status: int = 200,
                username: str = "") -> Response:
    """The sign-in form; after a failed try it keeps the username typed (never the password)."""
    return state_of(request).templates.TemplateResponse(
        request, "login.html", {"csrf": csrf_token(request), "message": message,
                                "username": username}, status_code=status)


@public.post("/login", dependencies=[Depends(check_csrf)])
def login(request: Request, username: Annotated[str, Form()],
          password: Annotated[str, Form()]) -> Response:
    state = state_of(request)
    address = _client_address(request)
    wait = state.logins.begin(username, address)
    if wait > 0:  # refused before the password is checked: guessing gains nothing
        response = _login_page(request, "Too many failed sign-ins for this account or "
                               f"address: try again in {math.ceil(wait / 60)} min.",
                               status=429, username=username)
        response.headers["Retry-After"] = str(math.ceil(wait))
        return response
    with state.db.reading() as session:
        user = authenticate(session, username, password)
    if user is None:
        return _login_page(request, "Wrong username or password.", status=401,
                           username=username)
    state.logins.succeeded(username, address)
    with state.db.writing() as session:
        session.get(User, user.id).last_login_at = utcnow()
    start_session(request, user)
    # A temporary password (set by an admin): straight to choosing one's own.
    return RedirectResponse("/account" if user.must_change_password else "/",
                            status_code=303)


def _client_address(request: Request) -> str:
    """The client's address as uvicorn sees it (behind a proxy: see --forwarded-allow-ips)."""
    return request.client.host if request.client else "unknown"


# --- pages --------------------------------------------------------------------------------

@pages.post("/logout")
def logout(request: Request, user: UserDep) -> Response:
    """Ends every session of the user, here and in any other browser (or stolen cookie)."""
    with state_of(request).db.writing() as session:
        end_sessions(session.get(User, user.id))
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


@pages.get("/account", response_class=HTMLResponse)
def account_page(request: Request, user: UserDep) -> Response:
    return _account_page(request, user, None)


def _account_page(request: Request, user: User, message: str | None, status: int = 200,
                  done: bool = False) -> Response:
    return state_of(request).templates.TemplateResponse(
        request, "account.html", {"user": user, "csrf": csrf_token(request),
                                  "message": message, "done": done,
                                  "forced": user.must_change_password and not done},
        status_code=status)


@pages.post("/account/password")
def change_password_form(request: Request, user: UserDep,
                         current_password: Annotated[str, Form()],
                         new_password: Annotated[str, Form()],
                         repeat_password: Annotated[str, Form()]) -> Response:
    if new_password != repeat_password:
        return _account_page(request, user, "The new passwords differ.", status=400)
    try:
        _change_own_password(request, user, current_password, new_password)
    except ReviewError as error:
        response = _account_page(request, user, error.message, status=error.status)
        if error.retry_after:
            response.headers["Retry-After"] = str(error.retry_after)
        return response
    return _account_page(request, user, None, done=True)


def _change_own_password(request: Request, user: User, current: str, new: str) -> None:
    """Checks the current password (throttled like sign-in), sets the new one, ends every
    other session and starts a fresh one here."""
    state = state_of(request)
    address = _client_address(request)
    wait = state.logins.begin(user.username, address)
    if wait > 0:
        raise ReviewError(f"too many wrong passwords: try again in {math.ceil(wait / 60)} "
                          "min", status=429, retry_after=math.ceil(wait))
    with state.db.reading() as session:
        if authenticate(session, user.username, current) is None:
            raise ReviewError("the current password is wrong", status=403)
    state.logins.succeeded(user.username, address)
    if new == current:
        raise ReviewError("the new password must differ from the current one"
                          + (" (the temporary one an admin set)"
                             if user.must_change_password else ""))
    start_session(request, _change_account(request, lambda session: set_password(
        session, user.username, new, by=user)))


# --- pages: accounts (admins) -------------------------------------------------------------

ACCOUNT_EVENTS_SHOWN = 50
# Events without a case are account events, but for the model-set ones (the Models page's).
ACCOUNT_EVENT = AuditEvent.case_id.is_(None) & AuditEvent.action.not_in(MODEL_ACTIONS)
MODEL_EVENT = AuditEvent.case_id.is_(None) & AuditEvent.action.in_(MODEL_ACTIONS)
ADMIN_DONE = {  # ?done= after a change (post/redirect/get): a fixed message, never echoed text
    "created": "Account {user} created. Its password is temporary: it must be changed at "
               "the first sign-in.",
    "deactivated": "{user} is deactivated; any open session has ended.",
    "activated": "{user} is active again.",
    "reset": "A temporary password is set for {user}: every session of theirs has ended, "
             "and they must choose a new password at their next sign-in.",
}


@pages.get("/admin/accounts", response_class=HTMLResponse)
def accounts_page(request: Request, user: UserDep, done: str | None = None,
                  name: str | None = None) -> Response:
    require_role(user, Role.ADMIN)
    shown = ADMIN_DONE[done].format(user=repr((name or "")[:64])) if done in ADMIN_DONE else None
    return _accounts_page(request, user, None, done=shown)


def _accounts_page(request: Request, user: User, message: str | None, status: int = 200,
                   done: str | None = None, form: dict[str, str] | None = None,
                   failed_user: str | None = None) -> Response:
    """Accounts, the new-account form and recent account events; `form`: what was typed in
    the new-account form (never the password), kept after a refusal; `failed_user`: the
    row whose change was refused."""
    state = state_of(request)
    with state.db.reading() as session:
        users = session.scalars(select(User).order_by(User.username)).all()
        rows = [{"username": u.username, "role": u.role, "active": u.active,
                 "must_change": u.must_change_password, "self": u.id == user.id,
                 "created": f"{u.created_at:%Y-%m-%d %H:%M}",
                 "created_iso": u.created_at.isoformat(),
                 "last_login": f"{u.last_login_at:%Y-%m-%d %H:%M}" if u.last_login_at
                 else "never",
                 "last_login_iso": u.last_login_at.isoformat() if u.last_login_at else ""}
                for u in users]
        events = session.scalars(select(AuditEvent).where(ACCOUNT_EVENT)
                                 .options(selectinload(AuditEvent.user))
                                 .order_by(AuditEvent.id.desc()).limit(ACCOUNT_EVENTS_SHOWN))
        history = [audit_dict(e) for e in events]
    return state.templates.TemplateResponse(
        request, "accounts.html",
        {"user": user, "accounts": rows, "events": history, "csrf": csrf_token(request),
         "message": message, "done": done, "roles": [str(r) for r in Role],
         "failed_user": failed_user,
         "form": form or {"username": "", "role": str(Role.TECHNOLOGIST)}},
        status_code=status)


def _admin_change(request: Request, user: User, change: Callable[[Session], User],
                  done: str, **kept: Any) -> Response:
    """An account change from the accounts page: back to the page with what happened,
    or the page again with the refusal (and what was typed) if it was refused."""
    try:
        changed = _change_account(request, change)
    except ReviewError as error:
        return _accounts_page(request, user, error.message, status=error.status, **kept)
    return RedirectResponse(f"/admin/accounts?done={done}&name={quote(changed.username)}",
                            status_code=303)


@pages.post("/admin/accounts")
def create_account_form(request: Request, user: UserDep, username: Annotated[str, Form()],
                        role: Annotated[str, Form()], password: Annotated[str, Form()]
                        ) -> Response:
    """A new account with a temporary password (changed at its first sign-in)."""
    require_role(user, Role.ADMIN)
    return _admin_change(request, user, lambda session: create_user(
        session, username.strip(), password, role, by=user, temporary=True), "created",
        form={"username": username, "role": role})


@pages.post("/admin/accounts/{username}/active")
def set_active_form(request: Request, user: UserDep, username: str,
                    active: Annotated[bool, Form()]) -> Response:
    """Deactivate (not oneself, not the last active admin) or reactivate an account."""
    require_role(user, Role.ADMIN)
    return _admin_change(request, user, lambda session: set_active(
        session, username, active, by=user), "activated" if active else "deactivated",
        failed_user=username)


@pages.post("/admin/accounts/{username}/password")
def reset_password_form(request: Request, user: UserDep, username: str,
                        password: Annotated[str, Form()]) -> Response:
    """Set a temporary password for someone (forgotten); they change it at next sign-in."""
    require_role(user, Role.ADMIN)
    if username == user.username:
        return _accounts_page(request, user, "Change your own password on the Account page.",
                              status=400, failed_user=username)
    return _admin_change(request, user, lambda session: set_password(
        session, username, password, by=user, temporary=True), "reset",
        failed_user=username)


# --- pages: model sets (admins) -----------------------------------------------------------

MODEL_EVENTS_SHOWN = 50
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
        stack = models.default_stack(session)
        adaptation = review.adaptation_progress(session)
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
        ids = review.reanalyse(session, user, case_id, model_set)
    state.queue.submit(ids)


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
        adaptation = review.adaptation_progress(session)
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
        used = review.model_sets_used(case)
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


@public.get("/static/{name}")  # public: the sign-in page uses the same style sheet
def static_file(name: str) -> Response:
    if name not in STATIC:  # a fixed list: no path from the request reaches the filesystem
        raise ReviewError("no such file", status=404)
    return Response((PACKAGE / "static" / name).read_bytes(), media_type=STATIC[name],
                    headers={"Cache-Control": "private, max-age=300"})


# --- api: cases ---------------------------------------------------------------------------

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


class NewUser(BaseModel):
    username: str
    password: str
    role: Role


@api.get("/me")
def me(request: Request, user: UserDep) -> dict[str, Any]:
    """Who is signed in, and the CSRF token scripts send back (readable same-origin only);
    `must_change_password`: only the password change is open until it is done."""
    return {"username": user.username, "role": user.role, "csrf": csrf_token(request),
            "must_change_password": user.must_change_password}


@api.post("/users", status_code=201)
def add_user(request: Request, user: UserDep, body: NewUser) -> dict[str, Any]:
    """A new account with a temporary password, changed at its first sign-in; admins only."""
    require_role(user, Role.ADMIN)
    created = _change_account(request, lambda session: create_user(
        session, body.username, body.password, body.role, by=user, temporary=True))
    return {"id": created.id, "username": created.username, "role": created.role,
            "must_change_password": created.must_change_password}


class PasswordChange(BaseModel):
    current_password: str
    new_password: str


@api.post("/me/password")
def change_password(request: Request, user: UserDep, body: PasswordChange) -> dict[str, Any]:
    """Your own password; other sessions end, this one goes on with a new CSRF token."""
    _change_own_password(request, user, body.current_password, body.new_password)
    return {"changed": True, "csrf": csrf_token(request)}


class PasswordReset(BaseModel):
    password: str


@api.post("/users/{username}/password")
def reset_password(request: Request, user: UserDep, username: str, body: PasswordReset
                   ) -> dict[str, Any]:
    """An admin sets someone's password (they forgot it): a temporary one, which they
    must change at their next sign-in; their sessions end."""
    require_role(user, Role.ADMIN)
    if username == user.username:
        raise ReviewError("change your own password with POST /api/me/password")
    changed = _change_account(request, lambda session: set_password(
        session, username, body.password, by=user, temporary=True))
    return {"username": changed.username, "changed": True,
            "must_change_password": changed.must_change_password}


def _change_account(request: Request, change: Callable[[Session], User]) -> User:
    """Run an account change in a write transaction; an unknown name is 404, a refused
    change 400."""
    try:
        with state_of(request).db.writing() as session:
            return change(session)
    except NoSuchUser as error:
        raise ReviewError(str(error), status=404) from None
    except AccountError as error:
        raise ReviewError(str(error)) from None


class Activation(BaseModel):
    active: bool


@api.post("/users/{username}/active")
def set_user_active(request: Request, user: UserDep, username: str, body: Activation
                    ) -> dict[str, Any]:
    """Deactivate an account (its sessions end at once) or reactivate it; admins only."""
    require_role(user, Role.ADMIN)
    changed = _change_account(request, lambda session: set_active(
        session, username, body.active, by=user))
    return {"username": changed.username, "role": changed.role, "active": changed.active}


@api.get("/users/audit")
def account_audit(request: Request, user: UserDep) -> list[dict[str, Any]]:
    """Account events (created, deactivated, reactivated), oldest first; admins only."""
    require_role(user, Role.ADMIN)
    with state_of(request).db.reading() as session:
        events = session.scalars(select(AuditEvent).where(ACCOUNT_EVENT)
                                 .options(selectinload(AuditEvent.user))
                                 .order_by(AuditEvent.id))
        return [audit_dict(e) for e in events]


# --- api: model sets ----------------------------------------------------------------------

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
    return _case(request, case_id)


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
        return review.adaptation_progress(session)


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
    return _case(request, case.id)


def _case(request: Request, case_id: int) -> dict[str, Any]:
    with state_of(request).db.reading() as session:
        return review.case_dict(review.load_case(session, case_id))


@api.get("/cases/{case_id}")
def get_case(request: Request, case_id: Id) -> dict[str, Any]:
    return _case(request, case_id)


@api.patch("/cases/{case_id}")
def update_case(request: Request, user: UserDep, case_id: Id, body: CaseUpdate
                ) -> dict[str, Any]:
    with state_of(request).db.writing() as session:
        review.set_target(session, user, case_id, body.target_count, body.revision)
    return _case(request, case_id)


@api.post("/cases/{case_id}/sign-off")
def sign_off(request: Request, user: UserDep, case_id: Id, body: SignOff) -> dict[str, Any]:
    """Sign off and lock the case; `case.sign_off_check` says beforehand whether a
    reason is required (and why)."""
    with state_of(request).db.writing() as session:
        review.sign_off(session, user, case_id, body.revision, body.reason)
    return _case(request, case_id)


@api.post("/cases/{case_id}/reopen")
def reopen(request: Request, user: UserDep, case_id: Id, body: Reopen) -> dict[str, Any]:
    """Unlock a signed case to amend it (a reviewer, with a reason); the next sign-off
    issues an amended report."""
    with state_of(request).db.writing() as session:
        review.reopen(session, user, case_id, body.revision, body.reason)
    return _case(request, case_id)


@api.get("/cases/{case_id}/audit")
def case_audit(request: Request, case_id: Id) -> list[dict[str, Any]]:
    with state_of(request).db.reading() as session:
        review.load_case(session, case_id)
        return [audit_dict(e) for e in _events(session, case_id)]


def _events(session, case_id: int) -> list[AuditEvent]:
    return list(session.scalars(select(AuditEvent).where(AuditEvent.case_id == case_id)
                                .options(selectinload(AuditEvent.user)).order_by(AuditEvent.id)))


# --- api: uploads and images --------------------------------------------------------------

@api.post("/cases/{case_id}/fields")
@large_body
def upload_fields(request: Request, user: UserDep, case_id: Id,
                  files: Annotated[list[UploadFile], File()]) -> Response:
    """Store each file (checked by content), add it to the case and queue its analysis."""
    state = state_of(request)
    if len(files) > state.settings.max_files_per_request:
        raise UploadError(f"at most {state.settings.max_files_per_request} files per upload")
    with state.db.reading() as session:
        _found(session, Case, case_id, "case")
    accepted, rejected, statuses = [], [], []
    for upload in files:
        name = display_name(upload.filename)
        try:
            stored = state.blobs.receive(upload.file, state.settings.max_upload_bytes)
            field_id = _add_field(request, user, case_id, name, stored)
        except (UploadError, ReviewError) as error:
            rejected.append({"name": name, "reason": str(error)})
            statuses.append(error.status)
            continue
        accepted.append({"name": name, "field_id": field_id})
    state.queue.submit([a["field_id"] for a in accepted])
    status = 200 if accepted else max(statuses, default=400)
    return Response(json.dumps({"accepted": accepted, "rejected": rejected}),
                    status_code=status, media_type="application/json")


def _add_field(request: Request, user: User, case_id: int, name: str, stored) -> int:
    with state_of(request).db.writing() as session:
        return review.add_field(session, user, case_id, name, stored)


def _found(session, model, row_id: int, what: str):
    """The row with this id, or a 404 naming what was asked for."""
    row = session.get(model, row_id)
    if row is None:
        raise ReviewError(f"no {what} {row_id}", status=404)
    return row


@api.get("/fields/{field_id}/image")
def field_image(request: Request, field_id: Id,
                max_side: Annotated[int | None, Query(ge=64, le=4096)] = None) -> Response:
    """The field as a JPEG, full size (the field viewer's deep zoom); `max_side`: scaled
    down to fit that many pixels (the field navigator's thumbnails of large fields)."""
    state = state_of(request)
    with state.db.reading() as session:
        sha256 = _found(session, FieldImage, field_id, "field").image_sha256
    path = state.views.view_path(sha256)
    content = path.read_bytes()
    if max_side is not None:
        with PILImage.open(path) as image:
            if max(image.size) > max_side:
                image.thumbnail((max_side, max_side))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
                content = buffer.getvalue()
    return Response(content, media_type="image/jpeg", headers={"Cache-Control": IMAGE_CACHE})


@api.get("/cells/{cell_id}/crop")
def cell_crop(request: Request, cell_id: Id,
              size: Annotated[int, Query(ge=32, le=CROP_MAX)] = THUMBNAIL) -> Response:
    """The cell's crop, `size` pixels square (the page's hover enlargement asks for more)."""
    state = state_of(request)
    with state.db.reading() as session:
        cell = _found(session, CellRecord, cell_id, "cell")
        if cell.deleted:  # a false detection, removed: gone from every view of the case
            raise ReviewError(f"no cell {cell_id}", status=404)
        box, sha256 = cell.box, cell.field.image_sha256
    with PILImage.open(state.views.view_path(sha256)) as image:
        crop = cell_thumbnail(image, box, size, margin=1.4)
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=88)
    return Response(buffer.getvalue(), media_type="image/jpeg",
                    headers={"Cache-Control": IMAGE_CACHE})


# --- api: review --------------------------------------------------------------------------

class LabelChange(BaseModel):
    label: str
    version: int
    reviewed: bool = True  # False: back to unreviewed (the page's undo of a confirm)


class CellVersion(BaseModel):
    id: int = Field(ge=ID_MIN, le=ID_MAX)
    version: int


class ClassConfirm(BaseModel):
    label: str
    # The cells shown (each with the version seen); None: every matching cell of the case.
    cells: list[CellVersion] | None = None
    reviewed: bool = True  # False: the undo of a bulk confirm


class Restore(BaseModel):
    version: int


class NewCell(BaseModel):
    field_id: int = Field(ge=ID_MIN, le=ID_MAX)
    box: list[float]
    label: str


def _edit_response(request: Request, case_id: int, cell_id: int) -> dict[str, Any]:
    with state_of(request).db.reading() as session:
        case = review.load_case(session, case_id)
        cell = session.get(CellRecord, cell_id)
        summary = review.differential(case)
        return {"cell": review.cell_dict(cell), "deleted": cell.deleted,
                "revision": case.revision, "differential": summary.to_dict(),
                # what the page's open sign-off panel shows follows each edit
                "sign_off_check": review.sign_off_check(summary).to_dict()}


@api.patch("/cases/{case_id}/cells/{cell_id}")
def reclassify(request: Request, user: UserDep, case_id: Id, cell_id: Id,
               body: LabelChange) -> dict[str, Any]:
    with state_of(request).db.writing() as session:
        review.set_label(session, user, case_id, cell_id, body.label, body.version,
                         reviewed=body.reviewed)
    return _edit_response(request, case_id, cell_id)


@api.post("/cases/{case_id}/confirm")
def confirm_class(request: Request, user: UserDep, case_id: Id, body: ClassConfirm
                  ) -> dict[str, Any]:
    """Bulk confirm: accept the label of every unreviewed live cell of one class (or of the
    cells listed); one audit event with the count. Returns the ids changed and the case."""
    cells = None if body.cells is None else [(c.id, c.version) for c in body.cells]
    with state_of(request).db.writing() as session:
        changed = [c.id for c in review.confirm_class(session, user, case_id, body.label,
                                                      cells, reviewed=body.reviewed)]
    return {"changed": changed, "case": _case(request, case_id)}


@api.post("/cases/{case_id}/cells/{cell_id}/restore")
def restore_cell(request: Request, user: UserDep, case_id: Id, cell_id: Id, body: Restore
                 ) -> dict[str, Any]:
    """Undo a delete: the cell counts again (audited as `restore_cell`)."""
    with state_of(request).db.writing() as session:
        review.restore_cell(session, user, case_id, cell_id, body.version)
    return _edit_response(request, case_id, cell_id)


@api.post("/cases/{case_id}/cells", status_code=201)
def add_cell(request: Request, user: UserDep, case_id: Id, body: NewCell) -> dict[str, Any]:
    with state_of(request).db.writing() as session:
        cell = review.add_cell(session, user, case_id, body.field_id, body.box, body.label)
    return _edit_response(request, case_id, cell.id)


@api.delete("/cases/{case_id}/cells/{cell_id}")
def delete_cell(request: Request, user: UserDep, case_id: Id, cell_id: Id,
                version: int) -> dict[str, Any]:
    with state_of(request).db.writing() as session:
        review.delete_cell(session, user, case_id, cell_id, version)
    return _edit_response(request, case_id, cell_id)


# --- api: fields --------------------------------------------------------------------------

class Exclusion(BaseModel):
    reason: str | None = None  # required to exclude; optional to include again


@api.post("/fields/{field_id}/exclude")
def exclude_field(request: Request, user: UserDep, field_id: Id, body: Exclusion
                  ) -> dict[str, Any]:
    """Take a field out of the differential, counts and exports, with a reason (audited);
    its cells and image are kept. Technologists and reviewers, open cases only."""
    with state_of(request).db.writing() as session:
        case_id = review.exclude_field(session, user, field_id, body.reason).case_id
    return _case(request, case_id)


@api.post("/fields/{field_id}/include")
def include_field(request: Request, user: UserDep, field_id: Id, body: Exclusion
                  ) -> dict[str, Any]:
    """Count an excluded field again (audited)."""
    with state_of(request).db.writing() as session:
        case_id = review.include_field(session, user, field_id, body.reason).case_id
    return _case(request, case_id)


# --- api: exports -------------------------------------------------------------------------

def _signed_case(session, case_id: int) -> Case:
    case = review.load_case(session, case_id)
    if case.signed_at is None:
        raise ExportError(f"case {case.accession} is not signed off; only signed cases export")
    return case


def _download(content: bytes, media_type: str, filename: str) -> Response:
    """An attachment; HTTP headers are latin-1, so the real name goes in RFC 6266 `filename*`."""
    fallback = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_"
                       for c in filename)
    disposition = f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename)}"
    return Response(content, media_type=media_type,
                    headers={"Content-Disposition": disposition})


def _stem(case: Case) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in case.accession)


@api.get("/cases/{case_id}/export.csv")
def export_csv(request: Request, case_id: Id) -> Response:
    with state_of(request).db.reading() as session:
        case = _signed_case(session, case_id)
        return _download(cases_csv(case).encode(), "text/csv", f"{_stem(case)}.csv")


@api.get("/cases/{case_id}/export.json")
def export_json(request: Request, case_id: Id) -> Response:
    with state_of(request).db.reading() as session:
        case = _signed_case(session, case_id)
        content = json.dumps(case_json(case, _events(session, case_id)), indent=2)
        return _download(content.encode(), "application/json", f"{_stem(case)}.json")


@api.get("/cases/{case_id}/fhir.json")
def export_fhir(request: Request, case_id: Id) -> Response:
    with state_of(request).db.reading() as session:
        case = _signed_case(session, case_id)
        content = json.dumps(fhir_report(case), indent=2)
        return _download(content.encode(), "application/fhir+json", f"{_stem(case)}.fhir.json")


@api.get("/cases/{case_id}/training.zip")
def export_training(request: Request, case_id: Id) -> Response:
    state = state_of(request)
    with state.db.reading() as session:
        case = _signed_case(session, case_id)
        buffer = io.BytesIO()
        summary = TrainingSummary()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path, data in training_files([case], state.views, summary):
                archive.writestr(path, data)
            archive.writestr("README.txt", summary.readme([case]))
        return _download(buffer.getvalue(), "application/zip", f"{_stem(case)}-training.zip")
