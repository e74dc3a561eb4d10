"""`leukodiff serve`, the account commands (`create-user`, `set-password`,
`deactivate-user`) and `leukodiff export-training`: thin wrappers.

Wired into the main `leukodiff` command by src/leukodiff/cli/server.py.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from leukodiff.server.settings import Listening, Settings  # the standard library only

if TYPE_CHECKING:  # the server packages are imported only when a command runs
    from sqlalchemy.orm import Session

    from leukodiff.server.db import User

console = Console()

# Every default below is read from `Settings` (or `Listening`): written once, there.
MB, MEGAPIXEL = 1024 * 1024, 1_000_000
DataDir = typer.Option(Settings.data_dir, "--data-dir",
                       help="Folder for the SQLite database, stored images and the session key.")
Username = typer.Argument(..., help="Login name.")
PasswordStdin = typer.Option(False, "--password-stdin", help="Read the password from "
                             "standard input (scripts) instead of prompting.")
Temporary = typer.Option(True, "--temporary/--permanent", help="--temporary: the user must "
                         "choose a new password at their next sign-in (nothing else opens "
                         "until they do); --permanent: the password stays theirs (e.g. your "
                         "own account, typed here by you).")
DatabaseUrl = typer.Option(Settings.database_url, "--database-url",
                           envvar="LEUKODIFF_DATABASE_URL",
                           help="SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db "
                           "[default: SQLite file in --data-dir].")


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=1)


def _require_server_packages() -> None:
    """The server's packages are an extra; say how to get them instead of an ImportError."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "sqlalchemy", "alembic", "argon2",
                                 "multipart", "itsdangerous", "jinja2")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise _fail(f"the review station needs {', '.join(missing)}: "
                    "pip install 'leukodiff[server]'")


def _database(data_dir: Path, database_url: str | None):
    """The migrated database of a data dir, or a clear error."""
    _require_server_packages()
    from sqlalchemy.exc import SQLAlchemyError

    from leukodiff.server.db import Database
    from leukodiff.server.settings import SettingsError

    settings = Settings(data_dir=data_dir, database_url=database_url)
    try:
        settings.prepare()
        db = Database(settings.url)
        db.migrate()
    except (SettingsError, SQLAlchemyError, ImportError) as error:
        raise _fail(f"database {settings.url.split('@')[-1]}: {error}") from None
    return settings, db


def serve(
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
    host: str = typer.Option(Listening.host, help="Address to listen on (0.0.0.0: every "
                             "network)."),
    port: int = typer.Option(Listening.port, help="TCP port."),
    forwarded_allow_ips: str = typer.Option(
        Listening.forwarded_allow_ips, help="Proxies whose X-Forwarded-For names the real "
        "client (comma-separated addresses). Set it to your TLS proxy's address, or sign-in "
        "throttling sees every user as the proxy."),
    max_upload_mb: int = typer.Option(Settings.max_upload_bytes // MB,
                                      help="Largest field image accepted, in MB."),
    max_image_mp: int = typer.Option(Settings.max_image_pixels // MEGAPIXEL,
                                     help="Largest field image accepted, in megapixels "
                                     "(judged from the header, before decoding)."),
    max_files: int = typer.Option(Settings.max_files_per_request, help="Most field images "
                                  "in one upload."),
    secure_cookies: bool = typer.Option(Settings.secure_cookies,
                                        "--secure-cookies/--no-secure-cookies",
                                        help="Send the session cookie over HTTPS only (set "
                                        "this behind a TLS proxy)."),
    session_hours: float = typer.Option(Settings.session_hours, help="A sign-in lasts this "
                                        "many hours."),
    login_max_failures: int = typer.Option(Settings.login_max_failures, help="Failed "
                                           "sign-ins allowed per account in the window "
                                           "before tries are refused."),
    login_window_minutes: float = typer.Option(Settings.login_window_minutes, help="The "
                                               "window of --login-max-failures, in minutes."),
    data_root: Path | None = typer.Option(Settings.data_root, help="Where the Models page's "
                                          "adapt job finds the base models' training data "
                                          "to replay [default: the usual data roots]."),
) -> None:
    """Start the review station (web UI + API); the schema is migrated on start."""
    _require_server_packages()
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from leukodiff.server import SettingsError, create_app

    settings = Settings(data_dir=data_dir, database_url=database_url,
                        max_upload_bytes=max_upload_mb * MB,
                        max_image_pixels=max_image_mp * MEGAPIXEL,
                        max_files_per_request=max_files, secure_cookies=secure_cookies,
                        session_hours=session_hours, login_max_failures=login_max_failures,
                        login_window_minutes=login_window_minutes, data_root=data_root)
    try:
        app = create_app(settings)
    except (SettingsError, SQLAlchemyError, ImportError) as error:
        raise _fail(f"cannot start: {error}") from None
    console.print(f"leukodiff review station on http://{host}:{port} (data: {settings.data_dir})")
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=True,
                forwarded_allow_ips=forwarded_allow_ips)


def create_user_command(
    username: str = Username,
    password_stdin: bool = PasswordStdin,
    temporary: bool = Temporary,
    role: str = typer.Option("admin", help="technologist | reviewer | admin."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Create a user account (the first admin, or any account) without the web UI."""
    from leukodiff.server.auth import create_user

    user = _with_new_password(data_dir, database_url, password_stdin, lambda session, password:
                              create_user(session, username, password, role, temporary=temporary))
    console.print(f"created {user.role} {user.username!r}" + (
        " (temporary password: to be changed at the first sign-in)" if temporary else ""))


def set_password_command(
    username: str = Username,
    password_stdin: bool = PasswordStdin,
    temporary: bool = Temporary,
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Reset a password (a locked-out admin, a forgotten one): the user's sessions end."""
    from leukodiff.server.auth import set_password

    user = _with_new_password(data_dir, database_url, password_stdin, lambda session, password:
                              set_password(session, username, password, temporary=temporary))
    console.print(f"new password set for {user.username!r}" + (
        " (temporary: to be changed at the next sign-in)" if temporary else ""))


def _with_new_password(data_dir: Path, database_url: str | None, password_stdin: bool,
                       change: Callable[[Session, str], User]) -> User:
    """Read the new password (typed twice, or one line of standard input), then run
    `change(session, password)` as an account change."""
    password = _read_password(password_stdin)
    return _change_account(data_dir, database_url, lambda session: change(session, password))


def _change_account(data_dir: Path, database_url: str | None,
                    change: Callable[[Session], User]) -> User:
    """Run an account change (auth.create_user, set_password, set_active) in one write
    transaction; a refused change is a message, not a traceback."""
    from leukodiff.server.auth import AccountError

    _settings, db = _database(data_dir, database_url)
    try:
        with db.writing() as session:
            return change(session)
    except AccountError as error:
        raise _fail(str(error)) from None
    finally:
        db.dispose()


def _read_password(from_stdin: bool) -> str:
    import sys

    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != password:
        raise _fail("the passwords differ")
    return password


def deactivate_user_command(
    username: str = Username,
    reactivate: bool = typer.Option(False, "--reactivate", help="Let the user in again."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Lock an account out (its open sessions end at their next request), or let it back in.

    Accounts are never deleted: their names stay on the cases and audit events they made.
    Unlike the web page, this may lock out the last active admin: it is the way back in.
    """
    from leukodiff.server.auth import set_active

    user = _change_account(data_dir, database_url, lambda session: set_active(
        session, username, active=reactivate, keep_an_admin=False))
    console.print(f"{user.username!r} is {'active' if user.active else 'deactivated'}")


def export_signed_cases(data_dir: Path, database_url: str | None, out: Path
                        ) -> tuple[int, list[int]]:
    """(files written, case ids): every signed case's reviewed cells and fields under `out`
    (`server.exports.write_training`; FileExistsError rather than replace a file)."""
    from sqlalchemy import select

    from leukodiff.server.db import Case
    from leukodiff.server.exports import write_training
    from leukodiff.server.review import load_case
    from leukodiff.server.storage import BlobStore, ViewCache

    settings, db = _database(data_dir, database_url)
    views = ViewCache(BlobStore(settings.blob_dir, settings.data_dir / "tmp"), settings.cache_dir)
    try:
        with db.reading() as session:
            ids = list(session.scalars(select(Case.id).where(Case.signed_at.is_not(None))))
            return write_training([load_case(session, i) for i in ids], views, out), ids
    finally:
        db.dispose()


def export_training_command(
    out: Path = typer.Option(..., help="Folder to write cells/<type>/ and fields/ (VOC) into."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Write every signed case's reviewed cells as training data `leukodiff train` reads."""
    try:
        written, ids = export_signed_cases(data_dir, database_url, out)
    except FileExistsError as error:
        raise _fail(f"{error}: choose an empty --out folder") from None
    console.print(f"wrote {written} files from {len(ids)} signed case(s) to {out}; train with "
                  f"`leukodiff train classifier --sources {out / 'cells'}`")
