"""Access control, CSRF, and hostile uploads."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from station_helpers import FIELDS, PASSWORD, login, upload, wait_analysed

# the style sheet and scripts are public: the sign-in page uses them (no secret in them)
PUBLIC = {("GET", "/login"), ("POST", "/login"), ("GET", "/health"), ("GET", "/static/{name}")}


def routes(app) -> list[tuple[str, str]]:
    found = [(method, route.path) for route in app.routes if isinstance(route, APIRoute)
             for method in sorted(route.methods)]
    assert len(found) > 20, "app.routes should list every endpoint"
    return found


def test_anonymous_refused_on_every_route(sqlite_station) -> None:
    """Every route but login, health and the static files refuses a request without a
    session."""
    app = sqlite_station.app
    assert {route.__class__ for route in app.routes} == {APIRoute}, "no unchecked mounts"
    anonymous = TestClient(app)
    checked = 0
    for method, path in routes(app):
        if (method, path) in PUBLIC:
            continue
        url = re.sub(r"\{[^}]+\}", "1", path)
        response = anonymous.request(method, url, follow_redirects=False,
                                     params={"version": 1})
        if path.startswith("/api/"):
            assert response.status_code == 401, (method, path, response.status_code)
        else:
            assert response.status_code == 303, (method, path, response.status_code)
            assert response.headers["location"] == "/login"
        checked += 1
    assert checked == len(routes(app)) - len(PUBLIC)
    assert anonymous.get("/health").json() == {"status": "ok"}


def test_wrong_password_and_session_cookie_flags(sqlite_station) -> None:
    sqlite_station.add_user("tess", "technologist")
    client = TestClient(sqlite_station.app)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    bad = client.post("/login", data={"username": "tess", "password": "wrong password",
                                      "csrf_token": token})
    assert bad.status_code == 401 and "Wrong username or password" in bad.text
    unknown = client.post("/login", data={"username": "nobody", "password": PASSWORD,
                                          "csrf_token": token})
    assert unknown.status_code == 401
    good = client.post("/login", data={"username": "tess", "password": PASSWORD,
                                       "csrf_token": token}, follow_redirects=False)
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    with sqlite_station.app.state.leukodiff.db.reading() as session:
        from leukodiff.server.db import User

        stored = session.query(User).filter_by(username="tess").one().password_hash
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


def test_failed_sign_ins_are_throttled(sqlite_station) -> None:
    """Five wrong passwords lock the account (even the right one is refused) until the
    window passes; another account from the same address is unaffected."""
    sqlite_station.add_user("tess", "technologist")
    sqlite_station.add_user("olga", "technologist")
    throttle = sqlite_station.app.state.leukodiff.logins
    now = [1000.0]
    throttle.clock = lambda: now[0]
    client = TestClient(sqlite_station.app)

    def attempt(username: str, password: str):
        """One try from the form (a sign-in starts a new session, hence a new token)."""
        page = client.get("/login").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        return client.post("/login", data={"username": username, "password": password,
                                           "csrf_token": token}, follow_redirects=False)

    assert [attempt("tess", f"guess {i}").status_code for i in range(5)] == [401] * 5
    locked = attempt("tess", PASSWORD)
    assert locked.status_code == 429 and "Too many failed sign-ins" in locked.text
    assert 0 < int(locked.headers["Retry-After"]) <= 15 * 60
    # Another name (names are case-sensitive) is not this account: no account, no lock.
    assert attempt("TESS", PASSWORD).status_code == 401
    assert attempt("olga", PASSWORD).status_code == 303
    now[0] += 15 * 60 + 1
    assert attempt("tess", PASSWORD).status_code == 303
    # A success clears the account's count: four more misses do not lock it again.
    assert [attempt("tess", "wrong").status_code for _ in range(4)] == [401] * 4
    assert attempt("tess", PASSWORD).status_code == 303


def test_login_throttle_limits(monkeypatch) -> None:
    """Per (account, address), per address over all names, per account over all addresses;
    a try counts from its start; junk names make no keys; the key count is capped."""
    from leukodiff.server import auth

    now = [0.0]
    throttle = auth.LoginThrottle(max_failures=2, window_s=60, clock=lambda: now[0])
    assert [throttle.begin("tess", "10.0.0.1") for _ in range(3)] == [0, 0, 60]
    assert throttle.begin("tess", "10.0.0.2") == 0  # the pair is locked, not the account
    throttle.succeeded("tess", "10.0.0.2")  # a right password uncounts its try
    for i in range(6):  # many names from one address: 4 n = 8 tries in all
        assert throttle.begin(f"user{i}", "10.0.0.1") == 0
        now[0] += 1
    assert throttle.begin("someone", "10.0.0.1") == pytest.approx(54)
    now[0] += 60
    for i in range(20):  # one account from many addresses: 10 n = 20 tries
        assert throttle.begin("olga", f"10.1.0.{i}") == 0
    assert throttle.begin("olga", "10.1.0.99") == 60
    assert throttle.begin("x" * 70_000, "10.2.0.1") == 0
    assert not any(key.startswith(("user:x", "pair:x")) for key in throttle._failures)
    monkeypatch.setattr(auth, "MAX_THROTTLE_KEYS", 10)
    for i in range(30):
        throttle.begin(f"name{i}", "10.3.0.1")
    assert len(throttle._failures) == 10


def test_csrf_required_for_changes(sqlite_station) -> None:
    tech = sqlite_station.client("tess")
    token = tech.headers.pop("X-CSRF-Token")
    assert tech.post("/api/cases", json={"accession": "C-1"}).status_code == 403
    tech.headers["X-CSRF-Token"] = "forged"
    assert tech.post("/api/cases", json={"accession": "C-1"}).status_code == 403
    tech.headers["X-CSRF-Token"] = token
    assert tech.post("/api/cases", json={"accession": "C-1"}).status_code == 201
    # The login form itself needs the token (no login CSRF).
    fresh = TestClient(sqlite_station.app)
    assert fresh.post("/login", data={"username": "tess", "password": PASSWORD}
                      ).status_code == 403


def test_technologist_cannot_sign_off(sqlite_station, bccd: Path) -> None:
    tech = sqlite_station.client("tess", "technologist")
    admin = sqlite_station.client("ada", "admin")
    case = tech.post("/api/cases", json={"accession": "T-1"}).json()
    upload(tech, case["id"], bccd / FIELDS[0])
    case = wait_analysed(tech, case["id"])
    for client in (tech, admin):
        response = client.post(f"/api/cases/{case['id']}/sign-off",
                               json={"revision": case["revision"]})
        assert response.status_code == 403 and "only a reviewer" in response.json()["detail"]
    assert tech.get(f"/api/cases/{case['id']}").json()["status"] == "open"


@pytest.mark.parametrize("name", ["../../../../tmp/evil.jpg", "..\\..\\windows\\evil.jpg",
                                  "/etc/passwd", "a\x00b.jpg", "....//....//x.jpg"])
def test_filenames_are_never_paths(sqlite_station, bccd: Path, tmp_path: Path,
                                   name: str) -> None:
    tech = sqlite_station.client("tess")
    case = tech.post("/api/cases", json={"accession": "PT-1"}).json()
    data = (bccd / FIELDS[0]).read_bytes()
    response = tech.post(f"/api/cases/{case['id']}/fields",
                         files=[("files", (name, data, "image/jpeg"))])
    assert response.status_code == 200, response.text
    shown = response.json()["accepted"][0]["name"]
    assert "/" not in shown and "\\" not in shown and "\x00" not in shown
    data_dir = sqlite_station.settings.data_dir
    stored = [p for p in data_dir.rglob("*") if p.is_file() and p.read_bytes() == data]
    assert len(stored) == 1 and stored[0].parent.parent == sqlite_station.settings.blob_dir
    assert not Path("/tmp/evil.jpg").exists()
    wait_analysed(tech, case["id"])


def test_static_and_ids_are_not_paths(sqlite_station) -> None:
    tech = sqlite_station.client("tess")
    for url in ("/static/..%2Fdb.py", "/static/../db.py", "/static/%2e%2e/app.py",
                "/static/app.css/../../db.py", "/api/fields/..%2F..%2Fetc/image"):
        response = tech.get(url)
        assert response.status_code in (404, 422), (url, response.status_code)
        assert b"sqlalchemy" not in response.content


def test_oversized_uploads_refused(make_station, bccd: Path) -> None:
    station = make_station(None, max_upload_bytes=10_000, max_files_per_request=2)
    tech = station.client("tess")
    case = tech.post("/api/cases", json={"accession": "BIG-1"}).json()
    big = (bccd / FIELDS[0]).read_bytes()
    assert len(big) > 10_000
    response = tech.post(f"/api/cases/{case['id']}/fields",
                         files=[("files", ("big.jpg", big, "image/jpeg"))])
    assert response.status_code == 413
    assert "larger than" in response.json()["rejected"][0]["reason"]
    # A whole request beyond every allowance is refused before its body is read.
    huge = b"\xff\xd8" + b"0" * 100_000
    response = tech.post(f"/api/cases/{case['id']}/fields",
                         files=[("files", ("huge.jpg", huge, "image/jpeg"))])
    assert response.status_code == 413
    assert "request larger than" in response.json()["detail"]
    too_many = [("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(3)]
    response = tech.post(f"/api/cases/{case['id']}/fields", files=too_many)
    assert response.status_code == 400 and "at most 2 files" in response.json()["detail"]
    leftovers = list((station.settings.data_dir / "tmp").iterdir())
    assert leftovers == [] and not any(p.is_file() for p in station.settings.blob_dir.rglob("*"))


def test_security_headers(sqlite_station) -> None:
    response = TestClient(sqlite_station.app).get("/login")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_sign_out_ends_every_session_including_stolen_copies(sqlite_station) -> None:
    tess = sqlite_station.client("tess")
    copy = TestClient(sqlite_station.app)  # someone who copied the cookie earlier
    copy.cookies.set("leukodiff_session", tess.cookies.get("leukodiff_session"))
    assert copy.get("/api/me").json()["username"] == "tess"
    signed_out = tess.post("/logout", data={"csrf_token": tess.headers["X-CSRF-Token"]},
                           follow_redirects=False)
    assert signed_out.status_code == 303
    assert copy.get("/api/me").status_code == 401
    assert tess.get("/api/me").status_code == 401
    login(TestClient(sqlite_station.app), "tess")  # signing in again works


def test_account_changes_are_audited_and_deactivation_locks_out(sqlite_station) -> None:
    admin = sqlite_station.client("ada", "admin")
    tess = sqlite_station.client("tess")
    body = {"username": "newbie", "password": "long enough pw", "role": "reviewer"}
    assert admin.post("/api/users", json=body).status_code == 201
    assert tess.post("/api/users/newbie/active", json={"active": False}).status_code == 403
    assert tess.get("/api/users/audit").status_code == 403
    assert admin.post("/api/users/ada/active", json={"active": False}).status_code == 400
    assert admin.post("/api/users/nobody/active", json={"active": False}).status_code == 404

    off = admin.post("/api/users/tess/active", json={"active": False})
    assert off.status_code == 200 and off.json()["active"] is False
    assert tess.get("/api/me").status_code == 401  # the open session ends at once
    again = TestClient(sqlite_station.app)
    token = re.search(r'name="csrf_token" value="([^"]+)"', again.get("/login").text).group(1)
    refused = again.post("/login", data={"username": "tess", "password": PASSWORD,
                                         "csrf_token": token})
    assert refused.status_code == 401
    assert admin.post("/api/users/tess/active", json={"active": True}).status_code == 200
    login(TestClient(sqlite_station.app), "tess")

    events = [(e["action"], e["user"], (e["after"] or {}).get("username"))
              for e in admin.get("/api/users/audit").json()]
    assert events == [("create_user", "command line", "ada"),
                      ("create_user", "command line", "tess"),
                      ("create_user", "ada", "newbie"),
                      ("deactivate_user", "ada", "tess"),
                      ("activate_user", "ada", "tess")]


def test_password_change_page_and_api(sqlite_station) -> None:
    tess = sqlite_station.client("tess")
    other_browser = sqlite_station.client()
    login(other_browser, "tess")
    page = tess.get("/account")
    assert page.status_code == 200 and "Change password" in page.text
    form = {"csrf_token": tess.headers["X-CSRF-Token"], "current_password": PASSWORD,
            "new_password": "a new long password", "repeat_password": "typo"}
    assert tess.post("/account/password", data=form).status_code == 400
    wrong = tess.post("/account/password", data={**form, "current_password": "not it",
                                                 "repeat_password": form["new_password"]})
    assert wrong.status_code == 403 and "current password is wrong" in wrong.text
    done = tess.post("/account/password", data={**form,
                                                 "repeat_password": form["new_password"]})
    assert done.status_code == 200 and "Password changed" in done.text
    assert tess.get("/api/me").status_code == 200  # this session goes on
    assert other_browser.get("/api/me").status_code == 401  # the other one has ended
    login(TestClient(sqlite_station.app), "tess", "a new long password")

    # The API: short passwords refused; a change returns the session's new CSRF token.
    tess.headers["X-CSRF-Token"] = tess.get("/api/me").json()["csrf"]
    body = {"current_password": "a new long password", "new_password": "short"}
    assert tess.post("/api/me/password", json=body).status_code == 400
    changed = tess.post("/api/me/password", json={**body, "new_password": "third password"})
    assert changed.status_code == 200
    tess.headers["X-CSRF-Token"] = changed.json()["csrf"]
    assert tess.get("/api/me").status_code == 200

    # Wrong current passwords are throttled like sign-ins (5 per account and address; the
    # form's wrong one above was the first).
    wrong = {"current_password": "not it", "new_password": "whatever long"}
    assert [tess.post("/api/me/password", json=wrong).status_code
            for _ in range(4)] == [403] * 4
    locked = tess.post("/api/me/password", json={**wrong, "current_password": "third password"})
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    sqlite_station.app.state.leukodiff.logins.clock = lambda: time.monotonic() + 3600

    # An admin resets it; the user's sessions end; the reset and the changes are audited.
    admin = sqlite_station.client("ada", "admin")
    sqlite_station.add_user("olga", "technologist")
    for target in ("ada", "olga"):
        assert tess.post(f"/api/users/{target}/password",
                         json={"password": "x" * 12}).status_code == 403
    reset = admin.post("/api/users/tess/password", json={"password": "from the admin"})
    assert reset.status_code == 200 and tess.get("/api/me").status_code == 401
    login(TestClient(sqlite_station.app), "tess", "from the admin")
    actions = [(e["action"], e["user"]) for e in admin.get("/api/users/audit").json()
               if e["action"] != "create_user"]
    assert actions == [("change_password", "tess"), ("change_password", "tess"),
                       ("reset_password", "ada")]
    assert all("password" not in str(e["after"]) for e in admin.get("/api/users/audit").json())
    # Account events stay out of every case's trail.
    case = admin.post("/api/cases", json={"accession": "ACC-1", "target_count": 100}).json()
    trail = admin.get(f"/api/cases/{case['id']}/audit").json()
    assert [e["action"] for e in trail] == ["create_case"]


def test_sign_in_page_links_the_style_sheet_and_pages_show_local_times(sqlite_station) -> None:
    """The sign-in page once inlined app.css through Jinja's autoescape (`>` became `&gt;`,
    breaking rules): it now links the public style sheet. Times the server writes in UTC
    are <time datetime> elements that local-time.js shows in the browser's zone."""
    anonymous = TestClient(sqlite_station.app)
    page = anonymous.get("/login")
    assert '<link rel="stylesheet" href="/static/app.css">' in page.text
    assert "&gt;" not in page.text.split("<main>")[0]
    for name, kind in (("app.css", "text/css"), ("local-time.js", "text/javascript")):
        served = anonymous.get(f"/static/{name}")
        assert served.status_code == 200 and served.headers["content-type"].startswith(kind)
    tech = sqlite_station.client("tess")
    tech.post("/api/cases", json={"accession": "TIME-1"})
    cases = tech.get("/").text
    assert '<script src="/static/local-time.js" defer></script>' in cases
    created = re.search(r'<time datetime="([^"]+)">[^<]+ UTC</time>', cases)
    assert created and created.group(1).endswith("+00:00")
    assert re.search(r'class="dot" style="background:#[0-9a-f]{6}"', cases)
