"""Accounts, password hashing (argon2id), session identity and CSRF tokens.

The session is Starlette's signed cookie (itsdangerous); it holds only the user id,
a per-login CSRF token, a fingerprint of the password hash (changing a password
ends every other session of that user) and the user's session epoch (signing out
raises it, which ends every session of that user, stolen cookie copies included).
Account changes go into the audit trail with no case. Failed sign-ins are throttled per
account and per client address (`LoginThrottle`), so a password cannot be guessed
at the speed of the network.

A password an admin chose (a new account, a reset) is temporary: the account is marked
`must_change_password`, and until its owner picks a new one every page and API call but
those in `PASSWORD_CHANGE_PATHS` is refused (`PasswordChangeRequired`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, object_session
from starlette.requests import Request

from leukodiff.server.db import AuditEvent, Role, User

USERNAME = re.compile(r"[A-Za-z0-9_.@-]{2,64}")  # used with fullmatch: no trailing newline
MIN_PASSWORD = 8
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# What an account with a temporary password may reach: the password form and its API,
# who am I (the CSRF token the API change needs), signing out, and the static files.
PASSWORD_CHANGE_PATHS = frozenset({"/account", "/account/password", "/api/me",
                                   "/api/me/password", "/logout"})
PASSWORD_CHANGE_PREFIXES = ("/static/",)
MAX_THROTTLE_KEYS = 10_000

_hasher = PasswordHasher()
# Verified against when the username is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class AccountError(ValueError):
    """A user account that cannot be created or changed as asked."""


class NoSuchUser(AccountError):
    """No account has this name."""


class NotAuthenticated(Exception):
    """No valid session: API calls get 401, pages redirect to the login form."""


class PasswordChangeRequired(Exception):
    """Signed in with a temporary password: pages redirect to the account page, API calls
    get 403, until a new password is chosen."""

    message = ("your password was set by an administrator and must be changed before you "
               "go on: choose a new one on the account page (/account) or with POST "
               "/api/me/password")


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
                by: User | None = None, temporary: bool = False) -> User:
    """A new account, audited; AccountError on a bad name, short password, role or duplicate.

    `by`: the admin who made it; None: the command line (someone with the server's files).
    `temporary`: the password must be changed at the first sign-in.
    """
    if not USERNAME.fullmatch(username):
        raise AccountError("username: 2-64 letters, digits or . _ @ -")
    check_password(password)
    try:
        role = Role(role)
    except ValueError:
        raise AccountError(f"role must be one of: {', '.join(Role)}") from None
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise AccountError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role,
                must_change_password=temporary)
    session.add(user)
    session.flush()
    _audit_account(session, by, "create_user", None, user)
    return user


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"password: at least {MIN_PASSWORD} characters")
    try:  # argon2 hashes UTF-8; a JSON string may hold a lone surrogate, which it cannot
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise AccountError("password: holds a character that is not text (a lone "
                           "surrogate)") from None


def _find_user(session: Session, username: str) -> User | None:
    """The account of this name; a name no account can have (`USERNAME`: every account has
    been created through it) is looked up nowhere: PostgreSQL text cannot hold a NUL."""
    if not USERNAME.fullmatch(username):
        return None
    return session.scalar(select(User).where(User.username == username))


def set_password(session: Session, username: str, password: str, by: User | None = None,
                 temporary: bool = False) -> User:
    """A new password (every session of the user ends), audited without the password.

    `by`: the user themself (a change, which clears a temporary password) or an admin (a
    reset); None: the command line. `temporary` (a reset only): the user must change it
    at their next sign-in.
    """
    check_password(password)
    user = _find_user(session, username)
    if user is None:
        raise NoSuchUser(f"no user {username!r}")
    own = by is not None and by.id == user.id
    user.password_hash = hash_password(password)
    user.must_change_password = temporary and not own
    end_sessions(user)
    action = "change_password" if own else "reset_password"
    _audit_account(session, by, action, None, user)
    return user


def set_active(session: Session, username: str, active: bool, by: User | None = None,
               keep_an_admin: bool = True) -> User:
    """Deactivate (every session of the user ends at its next request) or reactivate.

    An admin cannot deactivate themself, and (`keep_an_admin`) nobody can deactivate the
    last active admin: the command line, the way back in, passes False.
    """
    user = _find_user(session, username)
    if user is None:
        raise NoSuchUser(f"no user {username!r}")
    if not active and by is not None and by.id == user.id:
        raise AccountError("an admin cannot deactivate their own account")
    if (not active and keep_an_admin and user.active and user.role == Role.ADMIN
            and session.scalar(select(func.count(User.id)).where(
                User.role == Role.ADMIN, User.active.is_(True))) <= 1):
        raise AccountError(f"{username!r} is the last active admin: make another admin "
                           "first")
    if user.active != active:
        before = _account(user)
        user.active = active
        end_sessions(user)
        _audit_account(session, by, "activate_user" if active else "deactivate_user",
                       before, user)
    return user


def _account(user: User) -> dict[str, object]:
    # `temporary`: must_change_password (audit rows never name a password, not even a key).
    return {"username": user.username, "role": user.role, "active": user.active,
            "temporary": user.must_change_password}


def _audit_account(session: Session, by: User | None, action: str,
                   before: dict[str, object] | None, user: User) -> None:
    session.add(AuditEvent(case_id=None, user_id=by.id if by else None, action=action,
                           before=before, after=_account(user)))


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with this name and password, else None (same time either way)."""
    user = _find_user(session, username)
    try:  # as argon2 encodes a str, but a lone surrogate (no password has one) is kept
        _hasher.verify(user.password_hash if user else _DUMMY_HASH,
                       password.encode("utf-8", "surrogatepass"))
    except (VerificationError, InvalidHashError):
        return None
    return user if user is not None and user.active else None


class LoginThrottle:
    """Counts password tries in a sliding window; over a limit, the next try is refused.

    A try is counted before its password is checked (`begin`), so parallel requests
    cannot slip past the limit while argon2 runs, and uncounted on success
    (`succeeded`). Limits per window, `max_failures` = n:
      - n per (account, address): guessing one password from one place;
      - 10 n per account, any address: guessing spread over many addresses;
      - 4 n per address, any account: trying many names (a lab shares one NAT address).
    Someone who fails n times for an account from an address locks only that pair; the
    account itself locks only after 10 n failures from everywhere. Kept in memory (one
    count per server process, gone on restart), with at most MAX_THROTTLE_KEYS keys.
    """

    def __init__(self, max_failures: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _keys(self, username: str, address: str) -> tuple[tuple[str, int], ...]:
        # A name that cannot exist is counted by address only (no key per junk string).
        # Exactly as typed: accounts are matched case-sensitively (`authenticate`), so
        # "TESS" and "tess" are two accounts and must not share a lock.
        name = username if USERNAME.fullmatch(username) else None
        keys = [(f"addr:{address[:64]}", 4 * self.max_failures)]
        if name is not None:
            keys += [(f"pair:{name}|{address[:64]}", self.max_failures),
                     (f"user:{name}", 10 * self.max_failures)]
        return tuple(keys)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times

    def begin(self, username: str, address: str) -> float:
        """Seconds to wait before this account may be tried from this address; 0: go
        ahead, and the try is counted as failed until `succeeded` says otherwise."""
        now = self.clock()
        with self._lock:
            keys = self._keys(username, address)
            waits = [times[-limit] + self.window_s - now for key, limit in keys
                     if len(times := self._recent(key, now)) >= limit]
            if waits:
                return max(waits)
            for key, _limit in keys:
                times = self._recent(key, now)
                times.append(now)
                self._failures[key] = times
                self._failures.move_to_end(key)
            while len(self._failures) > MAX_THROTTLE_KEYS:  # forget the longest-quiet key
                self._failures.popitem(last=False)
        return 0.0

    def succeeded(self, username: str, address: str) -> None:
        """The try begun for this account from this address was right: uncount it."""
        with self._lock:
            for key, _limit in self._keys(username, address):
                times = self._failures.get(key)
                if times:
                    times.pop()
                    if not times:
                        del self._failures[key]


def start_session(request: Request, user: User) -> None:
    request.session.clear()
    request.session.update({"uid": user.id, "pw": password_fingerprint(user.password_hash),
                            "ep": user.session_epoch, "csrf": secrets.token_urlsafe(32)})


def end_sessions(user: User) -> None:
    """Every session of this user ends: signing out revokes stolen cookie copies too.

    Raised in SQL (epoch + 1), so two concurrent sign-outs cannot lose an increment;
    read back at once, as a new session of this user must carry the new value."""
    user.session_epoch = User.session_epoch + 1
    session = object_session(user)
    session.flush()
    session.refresh(user, ["session_epoch"])


def session_user(request: Request, session: Session) -> User:
    """The signed-in user of this request, or NotAuthenticated."""
    uid = request.session.get("uid")
    user = session.get(User, uid) if isinstance(uid, int) else None
    if (user is None or not user.active
            or request.session.get("pw") != password_fingerprint(user.password_hash)
            or request.session.get("ep") != user.session_epoch):
        raise NotAuthenticated()
    return user


def check_password_changed(request: Request, user: User) -> None:
    """PasswordChangeRequired if the user still has a temporary password and this
    request is for anything but changing it (or signing out)."""
    path = request.url.path
    if user.must_change_password and path not in PASSWORD_CHANGE_PATHS and not path.startswith(
            PASSWORD_CHANGE_PREFIXES):
        raise PasswordChangeRequired()


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
