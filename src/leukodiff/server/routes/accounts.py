"""Accounts: sign-in and sign-out, one's own password, and the admins' accounts page
and API (create, deactivate, reset a password, the account events)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from leukodiff.server.auth import (
    AccountError,
    NoSuchUser,
    authenticate,
    check_csrf,
    create_user,
    csrf_token,
    end_sessions,
    require_role,
    set_active,
    set_password,
    start_session,
)
from leukodiff.server.db import AuditEvent, Role, User, utcnow
from leukodiff.server.exports import audit_dict
from leukodiff.server.model_sets import MODEL_ACTIONS
from leukodiff.server.review import ReviewError
from leukodiff.server.routes.common import UserDep, api_router, pages_router
from leukodiff.server.state import state_of

public = APIRouter()
pages = pages_router()
api = api_router()


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


# --- api ---------------------------------------------------------------------------------

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
