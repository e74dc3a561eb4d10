"""Accounts, password hashing (argon2id), session identity and CSRF tokens.

The session is Starlette's signed cookie (itsdangerous); it holds only the user id,
a per-login CSRF token, a fingerprint of the password hash (changing a password
ends every other session of that user) and the user's session epoch (signing out
raises it, which ends every session of that user, stolen cookie copies included).
Account changes go into the audit trail with no case. Failed sign-ins are throttled per
account and per client address (`LoginThrottle`), so a password cannot be guessed
at the speed of the network.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import Request

from leukodiff.server.db import AuditEvent, Role, User

USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{2,64}$")
MIN_PASSWORD = 8
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
MAX_THROTTLE_KEYS = 10_000

_hasher = PasswordHasher()
# Verified against when the username is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class AccountError(ValueError):
    """A user account that cannot be created as asked."""


class NotAuthenticated(Exception):
    """No valid session: API calls get 401, pages redirect to the login form."""


class Forbidden(Exception):
    """Signed in, but this role may not do this."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def password_fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def create_user(session: Session, username: str, password: str, role: str,
                by: User | None = None) -> User:
    """A new account, audited; AccountError on a bad name, short password, role or duplicate.

    `by`: the admin who made it; None: the command line (someone with the server's files).
    """
    if not USERNAME.match(username):
        raise AccountError("username: 2-64 letters, digits or . _ @ -")
    check_password(password)
    try:
        role = Role(role)
    except ValueError:
        raise AccountError(f"role must be one of: {', '.join(Role)}") from None
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise AccountError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role)
    session.add(user)
    session.flush()
    _audit_account(session, by, "create_user", None, user)
    return user


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"password: at least {MIN_PASSWORD} characters")


def set_password(session: Session, username: str, password: str, by: User | None = None
                 ) -> User:
    """A new password (every session of the user ends), audited without the password.

    `by`: the user themself (a change) or an admin (a reset); None: the command line.
    """
    check_password(password)
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise AccountError(f"no user {username!r}")
    user.password_hash = hash_password(password)
    user.session_epoch += 1
    action = "change_password" if by is not None and by.id == user.id else "reset_password"
    _audit_account(session, by, action, None, user)
    return user


def set_active(session: Session, username: str, active: bool, by: User | None = None
               ) -> User:
    """Deactivate (every session of the user ends at its next request) or reactivate."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise AccountError(f"no user {username!r}")
    if user.active != active:
        before = _account(user)
        user.active = active
        user.session_epoch += 1
        _audit_account(session, by, "activate_user" if active else "deactivate_user",
                       before, user)
    return user


def _account(user: User) -> dict[str, object]:
    return {"username": user.username, "role": user.role, "active": user.active}


def _audit_account(session: Session, by: User | None, action: str,
                   before: dict[str, object] | None, user: User) -> None:
    session.add(AuditEvent(case_id=None, user_id=by.id if by else None, action=action,
                           before=before, after=_account(user)))


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with this name and password, else None (same time either way)."""
    user = session.scalar(select(User).where(User.username == username))
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    return user if user is not None and user.active else None


class LoginThrottle:
    """Counts failed sign-ins in a sliding window; over a limit, the next try is refused.

    Per account (`max_failures`, e.g. 5 in 15 min) against guessing one password, and
    per client address (4x that: a lab shares one NAT address) against trying many
    names. A success clears its account's count. Kept in memory: one count per server
    process, gone on restart, which is enough to slow guessing to a crawl.
    """

    def __init__(self, max_failures: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, username: str, address: str) -> tuple[tuple[str, int], ...]:
        return ((f"user:{username.lower()}", self.max_failures),
                (f"addr:{address}", 4 * self.max_failures))

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until this account and address may try again; 0: go ahead."""
        now = self.clock()
        with self._lock:
            waits = [times[-limit] + self.window_s - now
                     for key, limit in self._keys(username, address)
                     if len(times := self._recent(key, now)) >= limit]
        return max(waits, default=0.0)

    def failed(self, username: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            for key, _limit in self._keys(username, address):
                times = self._recent(key, now)
                times.append(now)
                self._failures[key] = times
            if len(self._failures) > MAX_THROTTLE_KEYS:  # many names or addresses: forget old
                for key in list(self._failures):
                    self._recent(key, now)

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(f"user:{username.lower()}", None)


def start_session(request: Request, user: User) -> None:
    request.session.clear()
    request.session.update({"uid": user.id, "pw": password_fingerprint(user.password_hash),
                            "ep": user.session_epoch, "csrf": secrets.token_urlsafe(32)})


def end_sessions(user: User) -> None:
    """Every session of this user ends: signing out revokes stolen cookie copies too."""
    user.session_epoch += 1


def session_user(request: Request, session: Session) -> User:
    """The signed-in user of this request, or NotAuthenticated."""
    uid = request.session.get("uid")
    user = session.get(User, uid) if isinstance(uid, int) else None
    if (user is None or not user.active
            or request.session.get("pw") != password_fingerprint(user.password_hash)
            or request.session.get("ep") != user.session_epoch):
        raise NotAuthenticated()
    return user


def csrf_token(request: Request) -> str:
    """This session's CSRF token (made on first use, e.g. for the login form)."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


async def check_csrf(request: Request) -> None:
    """Unsafe methods must echo the session's token in a header (JS) or form field (forms)."""
    if request.method in SAFE_METHODS:
        return
    expected = request.session.get("csrf")
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    # Bytes: compare_digest raises TypeError on non-ASCII str, and a header can hold any latin-1.
    if not expected or not sent or not hmac.compare_digest(expected.encode(), sent.encode()):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")


def require_role(user: User, *roles: Role) -> None:
    if user.role not in roles:
        raise Forbidden(f"a {user.role} may not do this (needs: {', '.join(roles)})")
