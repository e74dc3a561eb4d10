"""Issue #16 item 5 (part): the accounts page for admins (create, deactivate, reactivate,
reset) and the forced password change at the first sign-in after an admin chose it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select
from station_helpers import PASSWORD, login
from typer.testing import CliRunner

from leukodiff.server import Settings, create_app
from leukodiff.server.auth import PASSWORD_CHANGE_PATHS, AccountError, set_active
from leukodiff.server.cli import create_user_command, deactivate_user_command, set_password_command
from leukodiff.server.db import User

TEMPORARY = "temporary pass 1"


def form(client: TestClient, **fields: str) -> dict[str, str]:
    return {"csrf_token": client.headers["X-CSRF-Token"], **fields}


def sign_in(station, username: str, password: str) -> tuple[TestClient, str]:
    """A fresh client signed in through the form; where the sign-in sent it."""
    client = TestClient(station.app)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    response = client.post("/login", data={"username": username, "password": password,
                                           "csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303, response.text
    client.headers["X-CSRF-Token"] = client.get("/api/me").json()["csrf"]
    return client, response.headers["location"]


def account_row(page: str, username: str) -> str:
    match = re.search(rf'<tr data-username="{re.escape(username)}".*?</tr>', page, re.S)
    assert match, f"no row for {username}"
    return match.group(0)


def test_accounts_page_is_for_admins_only(station) -> None:
    admin = station.client("ada", "admin")
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    page = admin.get("/admin/accounts")
    assert page.status_code == 200
    for name in ("ada", "tess", "rita"):
        assert name in account_row(page.text, name)
    assert "never" not in account_row(page.text, "ada")  # signed in: the time is shown
    assert 'href="/admin/accounts"' in admin.get("/").text
    for client in (tech, reviewer):
        assert client.get("/admin/accounts").status_code == 403
        assert 'href="/admin/accounts"' not in client.get("/").text
        for path, data in (("/admin/accounts", {"username": "x1", "role": "admin",
                                                "password": TEMPORARY}),
                           ("/admin/accounts/tess/active", {"active": "false"}),
                           ("/admin/accounts/tess/password", {"password": TEMPORARY})):
            assert client.post(path, data=form(client, **data)).status_code == 403
    anonymous = TestClient(station.app).get("/admin/accounts", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/login"


def test_create_account_then_forced_password_change(station) -> None:
    admin = station.client("ada", "admin")
    new = {"username": "bob", "role": "reviewer", "password": TEMPORARY}
    no_token = admin.post("/admin/accounts", data=new, headers={"X-CSRF-Token": ""})
    assert no_token.status_code == 403 and "CSRF" in no_token.json()["detail"]

    weak = admin.post("/admin/accounts", data=form(admin, **{**new, "password": "short"}))
    assert weak.status_code == 400 and "at least 8 characters" in weak.text
    assert 'name="username" value="bob"' in weak.text  # what was typed is kept...
    assert '<option value="reviewer" selected>' in weak.text
    assert "short" not in re.sub(r"<p class=\"error\".*?</p>", "", weak.text, flags=re.S)
    duplicate = admin.post("/admin/accounts", data=form(admin, **{**new, "username": "ada"}))
    assert duplicate.status_code == 400 and "already exists" in duplicate.text
    assert 'name="username" value="ada"' in duplicate.text

    created = admin.post("/admin/accounts", data=form(admin, **new), follow_redirects=False)
    assert created.status_code == 303
    page = admin.get(created.headers["location"])
    assert "Account &#39;bob&#39; created" in page.text
    row = account_row(page.text, "bob")
    assert "reviewer" in row and "temporary password" in row and "never" in row
    event = admin.get("/api/users/audit").json()[-1]
    assert (event["action"], event["user"], event["after"]["username"],
            event["after"]["temporary"]) == ("create_user", "ada", "bob", True)

    # bob's first sign-in: only the password change is open.
    bob, landed = sign_in(station, "bob", TEMPORARY)
    assert landed == "/account"
    me = bob.get("/api/me").json()
    assert me["must_change_password"] is True
    for path in ("/", "/cases/1", "/admin/accounts"):
        response = bob.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/account"
    for method, path, body in (("GET", "/api/cases", None), ("GET", "/api/adaptation", None),
                               ("POST", "/api/cases", {"accession": "B-1"})):
        response = bob.request(method, path, json=body)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["must_change_password"] is True
        assert "must be changed" in response.json()["detail"]
    assert bob.get("/static/app.css").status_code == 200
    account = bob.get("/account")
    assert account.status_code == 200 and "set by an administrator" in account.text

    same = bob.post("/account/password", data=form(
        bob, current_password=TEMPORARY, new_password=TEMPORARY, repeat_password=TEMPORARY))
    assert same.status_code == 400 and "must differ" in same.text
    assert bob.get("/api/cases").status_code == 403
    done = bob.post("/account/password", data=form(
        bob, current_password=TEMPORARY, new_password="bob's own secret",
        repeat_password="bob's own secret"))
    assert done.status_code == 200 and "Password changed" in done.text
    assert "set by an administrator" not in done.text
    assert bob.get("/api/me").json()["must_change_password"] is False
    assert bob.get("/api/cases").status_code == 200
    assert bob.get("/", follow_redirects=False).status_code == 200
    _, landed = sign_in(station, "bob", "bob's own secret")
    assert landed == "/"


def test_forced_change_covers_every_route(sqlite_station) -> None:
    """Like the anonymous walk in test_server_security: with a temporary password, every
    route but the password change, sign-out and static files is refused."""
    admin = sqlite_station.client("ada", "admin")
    assert admin.post("/api/users", json={"username": "tmp", "password": TEMPORARY,
                                          "role": "technologist"}).status_code == 201
    client, _ = sign_in(sqlite_station, "tmp", TEMPORARY)
    open_paths = PASSWORD_CHANGE_PATHS | {"/static/{name}", "/login", "/health"}
    checked = 0
    for route in sqlite_station.app.routes:
        assert isinstance(route, APIRoute)
        if route.path in open_paths:
            continue
        for method in route.methods:
            url = re.sub(r"\{[^}]+\}", "1", route.path)
            response = client.request(method, url, follow_redirects=False,
                                      params={"version": 1})
            if route.path.startswith("/api/"):
                assert response.status_code == 403, (method, route.path, response.status_code)
                assert response.json()["must_change_password"] is True
            else:
                assert response.status_code == 303, (method, route.path, response.status_code)
                assert response.headers["location"] == "/account"
            checked += 1
    assert checked > 20

    # The API way out: POST /api/me/password (the token from /api/me).
    same = client.post("/api/me/password", json={"current_password": TEMPORARY,
                                                 "new_password": TEMPORARY})
    assert same.status_code == 400 and "must differ" in same.json()["detail"]
    changed = client.post("/api/me/password", json={"current_password": TEMPORARY,
                                                    "new_password": "my own password"})
    assert changed.status_code == 200
    client.headers["X-CSRF-Token"] = changed.json()["csrf"]
    assert client.post("/api/cases", json={"accession": "T-1"}).status_code == 201
    # Signing out works while the change is pending too.
    pending, _ = sign_in(sqlite_station, "ada", PASSWORD)
    assert pending.post("/logout", data=form(pending), follow_redirects=False).status_code == 303


def test_deactivate_reactivate_and_admin_limits(station) -> None:
    admin = station.client("ada", "admin")
    tess = station.client("tess")
    page = admin.get("/admin/accounts").text
    assert 'action="/admin/accounts/ada/active"' not in page  # no button for oneself
    assert 'action="/admin/accounts/tess/active"' in page

    off = admin.post("/admin/accounts/tess/active", data=form(admin, active="false"),
                     follow_redirects=False)
    assert off.status_code == 303
    assert "deactivated" in account_row(admin.get(off.headers["location"]).text, "tess")
    assert tess.get("/api/me").status_code == 401  # the open session has ended
    on = admin.post("/admin/accounts/tess/active", data=form(admin, active="true"),
                    follow_redirects=False)
    assert on.status_code == 303
    login(TestClient(station.app), "tess")

    itself = admin.post("/admin/accounts/ada/active", data=form(admin, active="false"))
    assert itself.status_code == 400 and "cannot deactivate their own account" in itself.text
    unknown = admin.post("/admin/accounts/nobody/active", data=form(admin, active="false"))
    assert unknown.status_code == 404 and "no user" in unknown.text
    assert admin.post("/api/users/ada/active", json={"active": False}).status_code == 400

    # A second admin may deactivate the first; the last active admin is never deactivated.
    station.add_user("bea", "admin")
    assert admin.post("/admin/accounts/bea/active",
                      data=form(admin, active="false")).status_code == 200
    # Only ada is an active admin now: no one (she cannot herself) may deactivate her.
    with (station.app.state.leukodiff.db.writing() as session,
          pytest.raises(AccountError, match="last active admin")):
        set_active(session, "ada", False)
    events = [(e["action"], e["user"], e["after"]["username"])
              for e in admin.get("/api/users/audit").json()
              if e["action"] in ("deactivate_user", "activate_user")]
    assert events == [("deactivate_user", "ada", "tess"), ("activate_user", "ada", "tess"),
                      ("deactivate_user", "ada", "bea")]


def test_reset_password_forces_a_change(sqlite_station) -> None:
    admin = sqlite_station.client("ada", "admin")
    tess = sqlite_station.client("tess")
    weak = admin.post("/admin/accounts/tess/password", data=form(admin, password="short"))
    assert weak.status_code == 400 and "tess: password: at least 8" in weak.text
    own = admin.post("/admin/accounts/ada/password", data=form(admin, password=TEMPORARY))
    assert own.status_code == 400 and "Account page" in own.text
    reset = admin.post("/admin/accounts/tess/password", data=form(admin, password=TEMPORARY),
                       follow_redirects=False)
    assert reset.status_code == 303
    assert "must choose a new password" in admin.get(reset.headers["location"]).text
    assert tess.get("/api/me").status_code == 401  # every session of tess has ended
    fresh, landed = sign_in(sqlite_station, "tess", TEMPORARY)
    assert landed == "/account" and fresh.get("/api/cases").status_code == 403
    event = admin.get("/api/users/audit").json()[-1]
    assert (event["action"], event["user"], event["after"]["username"]) == (
        "reset_password", "ada", "tess")

    # The API reset forces the change too.
    assert fresh.post("/api/me/password", json={"current_password": TEMPORARY,
                                                "new_password": "tess again 2"}).is_success
    assert admin.post("/api/users/tess/password", json={"password": "another temp"}
                      ).json()["must_change_password"] is True
    _, landed = sign_in(sqlite_station, "tess", "another temp")
    assert landed == "/account"


def commands() -> typer.Typer:
    app = typer.Typer()
    app.command("create-user")(create_user_command)
    app.command("set-password")(set_password_command)
    app.command("deactivate-user")(deactivate_user_command)
    return app


def test_command_line_passwords_are_temporary_unless_permanent(tmp_path: Path) -> None:
    data = tmp_path / "data"
    runner = CliRunner()

    def run(*args: str, password: str = "a long password"):
        result = runner.invoke(commands(), [*args, "--data-dir", str(data), "--password-stdin"],
                               input=f"{password}\n")
        assert result.exit_code == 0, result.output
        return result.output

    assert "temporary password" in run("create-user", "ada")
    assert "temporary" not in run("create-user", "bob", "--role", "reviewer", "--permanent")
    app = create_app(Settings(data_dir=data))
    db = app.state.leukodiff.db
    try:
        with db.reading() as session:
            flags = {u.username: u.must_change_password for u in session.scalars(select(User))}
        assert flags == {"ada": True, "bob": False}
        assert "temporary" in run("set-password", "bob", password="reset by cli")
        assert "temporary" not in run("set-password", "ada", "--permanent",
                                      password="ada chose it")
        with db.reading() as session:
            flags = {u.username: u.must_change_password for u in session.scalars(select(User))}
        assert flags == {"ada": False, "bob": True}
        # The command line is the way back in: it may lock out even the last admin.
        result = runner.invoke(commands(), ["deactivate-user", "ada", "--data-dir", str(data)])
        assert result.exit_code == 0 and "deactivated" in result.output
    finally:
        db.dispose()


def test_a_username_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    """`$` would let "bob\\n" through (regex `$` matches before a final newline): names are
    matched whole."""
    from leukodiff.server.auth import create_user

    app = create_app(Settings(data_dir=tmp_path / "data"))
    db = app.state.leukodiff.db
    try:
        with db.writing() as session:
            for name in ("bob\n", "b", "bo b", "x" * 65):
                with pytest.raises(AccountError, match="username"):
                    create_user(session, name, "a long password", "reviewer")
            create_user(session, "bob", "a long password", "reviewer")
    finally:
        db.dispose()
