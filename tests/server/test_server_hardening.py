"""Regression tests from the security and correctness review of the review station.

Each test pins one bug that was found and fixed; see docs/SERVER.md (Security notes).
"""

from __future__ import annotations

import csv
import re
import threading
import time
import zipfile
from datetime import datetime
from io import BytesIO, StringIO
from pathlib import Path
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from station_helpers import FIELDS, PASSWORD, all_cells, upload, wait_analysed

from leukodiff.server import Settings, SettingsError, create_app
from leukodiff.server.analysis import AnalysisQueue
from leukodiff.server.case_summary import differential
from leukodiff.server.db import CaseStatus, FieldImage, Image, User
from leukodiff.server.storage import StoredImage


def _aware(text: str) -> bool:
    """FHIR dateTime with a time, and instant, need a UTC offset."""
    return datetime.fromisoformat(text).utcoffset() is not None


def test_csrf_token_with_non_ascii_is_refused_not_a_crash(sqlite_station) -> None:
    """hmac.compare_digest raises TypeError on non-ASCII str: a 500 instead of a 403."""
    tech = sqlite_station.client("tess")
    del tech.headers["X-CSRF-Token"]
    latin1 = [(b"X-CSRF-Token", "\xe9t\xe9".encode("latin-1"))]  # Starlette decodes latin-1
    assert tech.post("/api/cases", json={"accession": "U-1"}, headers=latin1).status_code == 403
    form = tech.post("/cases", data={"accession": "U-2", "csrf_token": "\u00e9\u4e2d"},
                     follow_redirects=False)
    assert form.status_code == 403


def test_login_rotates_the_session_and_its_csrf_token(sqlite_station) -> None:
    """No session fixation: the pre-login token (and session) is not the signed-in one."""
    sqlite_station.add_user("tess", "technologist")
    client = TestClient(sqlite_station.app)
    before = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    cookie_before = client.cookies["leukodiff_session"]
    client.post("/login", data={"username": "tess", "password": PASSWORD,
                                "csrf_token": before}, follow_redirects=False)
    assert client.cookies["leukodiff_session"] != cookie_before
    assert client.get("/api/me").json()["csrf"] != before


def test_anonymous_body_refused_while_streaming(sqlite_station) -> None:
    """A chunked body (no Content-Length) from nobody is cut off, not spooled to disk."""
    anonymous = TestClient(sqlite_station.app)
    chunks = (b"x" * 65_536 for _ in range(32))  # 2 MB, Transfer-Encoding: chunked
    response = anonymous.post("/api/cases/1/fields", content=chunks,
                              headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "request larger" in response.json()["detail"]
    big = anonymous.post("/login", content=b"a=" + b"x" * 200_000,
                         headers={"content-type": "application/x-www-form-urlencoded"})
    assert big.status_code == 413


def test_signed_in_chunked_upload_bounded_by_the_request_limit(make_station, bccd) -> None:
    """Without Content-Length the request limit used to be skipped entirely."""
    station = make_station(None, max_upload_bytes=10_000, max_files_per_request=2)
    tech = station.client("tess")
    case = tech.post("/api/cases", json={"accession": "CH-1"}).json()
    head = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    chunks = iter([head, *(b"0" * 65_536 for _ in range(8)), b"\r\n--b--\r\n"])
    response = tech.post(f"/api/cases/{case['id']}/fields", content=chunks,
                         headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert "request larger" in response.json()["detail"]
    assert list((station.settings.data_dir / "tmp").iterdir()) == []
    # A normal upload still goes through the same guard.
    ok = upload(tech, case["id"], bccd / FIELDS[0])
    assert ok.status_code == 413  # the BCCD field is over this station's 10 kB per-file limit
    assert "larger than" in ok.json()["rejected"][0]["reason"]


def test_security_headers_on_refusals_too(sqlite_station) -> None:
    response = TestClient(sqlite_station.app).get("/api/cases")
    assert response.status_code == 401
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"


def test_field_over_the_pixel_cap_refused_before_decoding(make_station, bccd) -> None:
    station = make_station(None, max_image_pixels=100_000)
    tech = station.client("tess")
    case = tech.post("/api/cases", json={"accession": "PX-1"}).json()
    response = upload(tech, case["id"], bccd / FIELDS[0])  # 640 x 480 = 307,200 pixels
    assert response.status_code == 413
    assert "pixels" in response.json()["rejected"][0]["reason"]


def test_nan_box_refused(sqlite_station, bccd) -> None:
    """A NaN coordinate used to be stored, and then every read of the case failed (500)."""
    tech = sqlite_station.client("tess")
    case = tech.post("/api/cases", json={"accession": "NAN-1"}).json()
    upload(tech, case["id"], bccd / FIELDS[0])
    field = wait_analysed(tech, case["id"])["fields"][0]
    body = ('{"field_id": ' + str(field["id"])
            + ', "box": [NaN, 10, 90, 90], "label": "lymphocyte"}').encode()
    response = tech.post(f"/api/cases/{case['id']}/cells", content=body,
                         headers={"content-type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert tech.get(f"/api/cases/{case['id']}").status_code == 200


def test_differential_leaves_unidentified_out_of_the_percentages(sqlite_station, bccd) -> None:
    """Unidentified cells are counted as white cells but are not in the percentages' base."""
    tech = sqlite_station.client("tess")
    case = tech.post("/api/cases", json={"accession": "DIFF-1"}).json()
    upload(tech, case["id"], bccd / FIELDS[0])
    field = wait_analysed(tech, case["id"])["fields"][0]
    for cell in field["cells"]:
        tech.delete(f"/api/cases/{case['id']}/cells/{cell['id']}",
                    params={"version": cell["version"]})
    for i, label in enumerate(["neutrophil", "neutrophil", "lymphocyte", "unidentified",
                               "not_wbc"]):
        x = 10 + 60 * i
        added = tech.post(f"/api/cases/{case['id']}/cells", json={
            "field_id": field["id"], "box": [x, 10, x + 50, 60], "label": label})
        assert added.status_code == 201, added.text
    diff = added.json()["differential"]
    assert diff["counted"] == 4 and diff["identified"] == 3 and diff["unidentified"] == 1
    assert diff["not_wbc"] == 1
    assert diff["percentages"]["neutrophil"] == pytest.approx(66.7)
    assert diff["percentages"]["lymphocyte"] == pytest.approx(33.3)
    assert "unidentified" not in diff["percentages"]
    assert sum(diff["percentages"].values()) == pytest.approx(100, abs=0.2)
    with sqlite_station.app.state.leukodiff.db.reading() as session:
        from leukodiff.server.review import load_case

        assert differential(load_case(session, case["id"])).identified == 3


def test_signed_case_exports_valid_fhir_ascii_filenames_inert_csv(station, bccd) -> None:
    """Times carry a UTC offset on SQLite too; a non-ASCII accession still downloads;
    a file name that a spreadsheet would run as a formula is exported inert."""
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    accession = "Z\u00fcrich-\u0394-7"
    case = tech.post("/api/cases", json={"accession": accession}).json()
    assert _aware(case["created_at"])
    formula = "=cmd|'calc'!A0.jpg"  # a file name is user data
    response = tech.post(f"/api/cases/{case['id']}/fields", files=[
        ("files", (formula, (bccd / FIELDS[1]).read_bytes(), "image/jpeg"))])
    assert response.status_code == 200, response.text
    case = wait_analysed(tech, case["id"])
    for cell in all_cells(case):
        if cell["label"] == "unidentified":
            tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                       json={"label": "neutrophil", "version": cell["version"]})
    case = tech.get(f"/api/cases/{case['id']}").json()
    signed = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                           json={"revision": case["revision"], "reason": "test sample"})
    assert signed.status_code == 200, signed.text
    assert _aware(signed.json()["signed_at"])

    for path in ("export.csv", "export.json", "fhir.json", "training.zip"):
        response = tech.get(f"/api/cases/{case['id']}/{path}")
        assert response.status_code == 200, (path, response.status_code)
        disposition = response.headers["content-disposition"]
        assert disposition.isascii()
        assert unquote(disposition.split("filename*=UTF-8''")[1]).startswith(accession)
    rows = list(csv.DictReader(StringIO(tech.get(f"/api/cases/{case['id']}/export.csv").text)))
    assert rows and {row["field_name"] for row in rows} == {"'" + formula}
    assert zipfile.ZipFile(BytesIO(tech.get(
        f"/api/cases/{case['id']}/training.zip").content)).testzip() is None

    bundle = tech.get(f"/api/cases/{case['id']}/fhir.json").json()
    full_urls = {entry["fullUrl"] for entry in bundle["entry"]}
    assert _aware(bundle["timestamp"])
    report = bundle["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "final"
    assert report["code"]["coding"][0]["system"] == "http://loinc.org"
    assert _aware(report["effectiveDateTime"]) and _aware(report["issued"])
    assert all(ref["reference"] in full_urls for ref in report["result"])
    for entry in bundle["entry"][1:]:
        observation = entry["resource"]
        assert observation["resourceType"] == "Observation"
        assert observation["status"] == "final"
        assert _aware(observation["effectiveDateTime"]) and _aware(observation["issued"])
        quantity = observation["valueQuantity"]
        assert quantity["unit"] == "%" and quantity["code"] == "%"
        assert quantity["system"] == "http://unitsofmeasure.org"
    diff = signed.json()["differential"]
    # The conclusion states how many cells a person looked at, not "every cell".
    assert f"{diff['reviewed']} of {diff['counted']}" in report["conclusion"]


def test_same_image_to_two_cases_at_once_is_not_a_crash(station, bccd) -> None:
    """Two uploads of the same bytes to two cases raced on the images row (PostgreSQL: 500)."""
    from leukodiff.server.edits import add_field

    tech = station.client("tess")
    first = tech.post("/api/cases", json={"accession": "RACE-1"}).json()
    db = station.app.state.leukodiff.db
    data = (bccd / FIELDS[0]).read_bytes()
    stored = StoredImage("ab" * 32, len(data), "JPEG", 640, 480)
    outcome: list[object] = []

    def other_upload() -> None:
        try:
            with db.writing() as session:
                user = session.scalar(select(User).where(User.username == "tess"))
                outcome.append(add_field(session, user, first["id"], "b.jpg", stored))
        except Exception as error:  # the test reports what went wrong
            outcome.append(error)

    with db.writing() as session:  # an upload to another case, not yet committed
        session.add(Image(sha256=stored.sha256, size_bytes=stored.size_bytes, format="JPEG",
                          width=640, height=480))
        session.flush()
        thread = threading.Thread(target=other_upload)
        thread.start()
        time.sleep(1.0)  # PostgreSQL: the other insert now waits on this row's key
    thread.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], int), outcome
    with db.reading() as session:
        assert session.get(FieldImage, outcome[0]).image_sha256 == stored.sha256


def test_short_session_key_refused(tmp_path: Path) -> None:
    """An empty key file (a crash while writing it) would sign sessions with an empty key."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "secret_key").write_text("\n")
    with pytest.raises(SettingsError, match="secret_key"):
        create_app(Settings(data_dir=data_dir))
    with pytest.raises(SettingsError, match="secret"):
        Settings(data_dir=tmp_path / "other", secret_key="short").prepare()


class _FakeAnalyzer:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_analyzer_loaded_by_the_server_is_closed_on_shutdown(tmp_path: Path,
                                                             monkeypatch) -> None:
    """The queue's own Analyzer (its thread pool) is closed; a shared one is left open."""
    import leukodiff.server.analysis as analysis

    owned = _FakeAnalyzer()
    monkeypatch.setattr(analysis.Analyzer, "load", classmethod(lambda cls: owned))
    app = create_app(Settings(data_dir=tmp_path / "data"))
    with TestClient(app):
        assert app.state.leukodiff.queue.analyzer() is owned
    assert owned.closed == 1

    shared = _FakeAnalyzer()
    state = app.state.leukodiff
    queue = AnalysisQueue(state.db, state.views, shared)
    queue.shutdown()
    assert shared.closed == 0
    state.db.dispose()


def test_sign_off_refused_for_a_case_already_signed(sqlite_station, bccd) -> None:
    """A second sign-off (double click, two reviewers) is refused, not re-signed."""
    tech = sqlite_station.client("tess")
    reviewer = sqlite_station.client("rita", "reviewer")
    case = tech.post("/api/cases", json={"accession": "SIGN-2"}).json()
    upload(tech, case["id"], bccd / FIELDS[2])
    case = wait_analysed(tech, case["id"])
    for cell in all_cells(case):
        if cell["label"] == "unidentified":
            tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                       json={"label": "lymphocyte", "version": cell["version"]})
    case = tech.get(f"/api/cases/{case['id']}").json()
    assert reviewer.post(f"/api/cases/{case['id']}/sign-off", json={
        "revision": case["revision"], "reason": "test sample"}).status_code == 200
    again = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                          json={"revision": case["revision"] + 1})
    assert again.status_code == 423
    assert tech.patch(f"/api/cases/{case['id']}", json={
        "target_count": 200, "revision": case["revision"] + 1}).status_code == 423
    assert tech.get(f"/api/cases/{case['id']}").json()["status"] == CaseStatus.SIGNED


# --- issue #16 ----------------------------------------------------------------------------

def _id_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route with an id in its path."""
    from fastapi.routing import APIRoute

    return [(method, route.path) for route in app.routes if isinstance(route, APIRoute)
            if re.search(r"\{\w+_id\}", route.path) for method in sorted(route.methods)]


def test_ids_beyond_the_databases_range_are_not_found(station) -> None:
    """SQLite raised OverflowError on an id past 64 bits, PostgreSQL "integer out of range"
    past 32 bits (both a 500): every route with an id says 404."""
    tech = station.client("tess")
    case = tech.post("/api/cases", json={"accession": "ID-1"}).json()
    routes = _id_routes(station.app)
    assert len(routes) >= 15
    for big in (2**31, 2**63, 2**64 + 5, 10**40, -(2**31) - 1, -(2**63) - 1):
        for method, path in routes:
            url = re.sub(r"\{\w+_id\}", str(big), path)
            response = tech.request(method, url, params={"version": 1}, json={})
            assert response.status_code == 404, (method, url, response.status_code)
        # A real case, an impossible cell or field inside it.
        cell = f"/api/cases/{case['id']}/cells/{big}"
        assert tech.patch(cell, json={"label": "monocyte", "version": 1}).status_code == 404
        assert tech.delete(cell, params={"version": 1}).status_code == 404
        drawn = tech.post(f"/api/cases/{case['id']}/cells",
                          json={"field_id": big, "box": [0, 0, 50, 50], "label": "monocyte"})
        assert drawn.status_code in (404, 422), drawn.text
    # The largest possible id (32-bit: PostgreSQL's integer) is a plain miss, named as such.
    largest = tech.get(f"/api/cases/{2**31 - 1}")
    assert largest.status_code == 404 and "no case" in largest.json()["detail"]
    assert tech.get(f"/api/cases/{case['id']}").status_code == 200


def _try_login(client: TestClient, username: str, password: str):
    page = client.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    return client.post("/login", data={"username": username, "password": password,
                                       "csrf_token": token}, follow_redirects=False)


def test_throttle_does_not_lock_an_account_for_another_names_failures(make_station) -> None:
    """Usernames are case-sensitive, but the throttle lowercased them: TESS's failed
    sign-ins locked out tess."""
    station = make_station(None, login_max_failures=2)
    station.add_user("TESS", "technologist")
    station.add_user("tess", "technologist")
    client = TestClient(station.app)
    assert [_try_login(client, "TESS", "wrong").status_code for _ in range(2)] == [401] * 2
    assert _try_login(client, "TESS", PASSWORD).status_code == 429
    assert _try_login(client, "tess", PASSWORD).status_code == 303


def test_json_bodies_capped_uploads_keep_their_limit(sqlite_station, bccd, tmp_path) -> None:
    """A 300 MB JSON body was accepted by POST /api/cases: JSON routes now take 64 KiB."""
    tech = sqlite_station.client("tess")
    padded = {"accession": "BODY-1", "padding": "x" * 100_000}
    response = tech.post("/api/cases", json=padded)
    assert response.status_code == 413 and "64 kB" in response.json()["detail"]
    chunks = (b" " * 16_384 for _ in range(8))  # chunked (no Content-Length): cut off too
    response = tech.post("/api/cases", content=chunks,
                         headers={"content-type": "application/json"})
    assert response.status_code == 413 and "64 kB" in response.json()["detail"]
    assert tech.get("/api/cases").json() == []
    case = tech.post("/api/cases", json={"accession": "BODY-2"})
    assert case.status_code == 201
    # An image upload keeps its own, larger limit.
    from PIL import Image as PILImage

    big = tmp_path / "field.png"
    PILImage.open(bccd / FIELDS[0]).save(big, format="PNG")
    assert big.stat().st_size > 2 * 65_536
    response = upload(tech, case.json()["id"], big)
    assert response.status_code == 200, response.text
    wait_analysed(tech, case.json()["id"])


def test_data_dir_files_are_private(make_station, bccd) -> None:
    """The database (and its WAL/SHM) was 0644 with password hashes inside: every file the
    station makes is 0600 (images read-only: 0400), every folder 0700, whatever the umask."""
    import os

    previous = os.umask(0o022)
    try:
        station = make_station(None)
        tech = station.client("tess")
        case = tech.post("/api/cases", json={"accession": "PERM-1"}).json()
        assert upload(tech, case["id"], bccd / FIELDS[0]).status_code == 200
        field = wait_analysed(tech, case["id"])["fields"][0]
        assert tech.get(f"/api/fields/{field['id']}/image").status_code == 200
    finally:
        os.umask(previous)
    data_dir = station.settings.data_dir
    names = {p.name for p in data_dir.iterdir()}
    assert {"leukodiff.sqlite3", "leukodiff.sqlite3-wal", "leukodiff.sqlite3-shm",
            "secret_key"} <= names
    paths = [data_dir, *data_dir.rglob("*")]
    assert any(p.parent.parent == station.settings.blob_dir for p in paths)
    assert any(p.parent == station.settings.cache_dir for p in paths)
    for path in paths:
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        else:
            assert mode in (0o600, 0o400), (path, oct(mode))


def test_failed_forms_keep_what_was_typed(sqlite_station) -> None:
    """A failed sign-in or a duplicate accession re-rendered an empty form."""
    sqlite_station.add_user("tess", "technologist")
    client = TestClient(sqlite_station.app)
    failed = _try_login(client, "tess", "wrong password")
    assert failed.status_code == 401
    assert re.search(r'name="username"[^>]*value="tess"', failed.text), failed.text
    assert "wrong password" not in failed.text
    hostile = _try_login(client, '"><script>x</script>', "secret pass")
    assert '"><script>' not in hostile.text and "secret pass" not in hostile.text

    tech = sqlite_station.client("tom")
    form = {"accession": "DUP-7", "target_count": "250",
            "csrf_token": tech.headers["X-CSRF-Token"]}
    assert tech.post("/cases", data=form, follow_redirects=False).status_code == 303
    again = tech.post("/cases", data=form, follow_redirects=False)
    assert again.status_code == 409 and "already exists" in again.text
    assert re.search(r'name="accession"[^>]*value="DUP-7"', again.text), again.text
    assert re.search(r'name="target_count"[^>]*value="250"', again.text), again.text
    fresh = tech.get("/").text
    assert re.search(r'name="target_count"[^>]*value="100"', fresh)
    assert not re.search(r'name="accession"[^>]*value="DUP-7"', fresh)


def test_signed_case_hides_edit_controls_and_refuses_edits(sqlite_station, bccd) -> None:
    """Target and draw controls stayed visible on a signed case; the API refuses edits."""
    tech = sqlite_station.client("tess")
    reviewer = sqlite_station.client("rita", "reviewer")
    case = tech.post("/api/cases", json={"accession": "LOCK-1"}).json()
    upload(tech, case["id"], bccd / FIELDS[0])
    case = wait_analysed(tech, case["id"])
    page = tech.get(f"/cases/{case['id']}").text
    for control in ('id="target-form"', 'id="draw-mode"'):
        tag = re.search(rf"<[^>]*{control}[^>]*>", page).group(0)
        assert " hidden" not in tag, tag
    cell, field = all_cells(case)[0], case["fields"][0]
    if cell["label"] == "unidentified":
        cell = tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                          json={"label": "monocyte", "version": cell["version"]}
                          ).json()["cell"]
    case = tech.get(f"/api/cases/{case['id']}").json()
    signed = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                           json={"revision": case["revision"], "reason": "test sample"})
    assert signed.status_code == 200, signed.text
    revision = signed.json()["revision"]

    page = tech.get(f"/cases/{case['id']}").text
    for control in ('id="target-form"', 'id="draw-mode"'):
        tag = re.search(rf"<[^>]*{control}[^>]*>", page).group(0)
        assert " hidden" in tag, tag
    base = f"/api/cases/{case['id']}"
    edits = [
        tech.patch(base, json={"target_count": 200, "revision": revision}),
        tech.patch(f"{base}/cells/{cell['id']}",
                   json={"label": "basophil", "version": cell["version"]}),
        tech.delete(f"{base}/cells/{cell['id']}", params={"version": cell["version"]}),
        tech.post(f"{base}/cells", json={"field_id": field["id"], "box": [5, 5, 60, 60],
                                         "label": "monocyte"}),
        upload(tech, case["id"], bccd / FIELDS[1]),
    ]
    assert [e.status_code for e in edits] == [423] * 5, [e.text for e in edits]
    after = tech.get(base).json()
    assert after["revision"] == revision and after["target_count"] == case["target_count"]
    assert all_cells(after) == all_cells(signed.json())


def test_deleted_cells_crops_are_not_served(sqlite_station, bccd) -> None:
    """Issue #16: a deleted detection left the case, yet `/api/cells/N/crop` still served it."""
    tech = sqlite_station.client("tess")
    case = tech.post("/api/cases", json={"accession": "GONE-1"}).json()
    upload(tech, case["id"], bccd / FIELDS[0])
    case = wait_analysed(tech, case["id"])
    model = all_cells(case)[0]
    drawn = tech.post(f"/api/cases/{case['id']}/cells",
                      json={"field_id": case["fields"][0]["id"], "box": [5, 5, 60, 60],
                            "label": "monocyte"}).json()["cell"]
    kept = tech.post(f"/api/cases/{case['id']}/cells",
                     json={"field_id": case["fields"][0]["id"], "box": [70, 5, 130, 60],
                           "label": "lymphocyte"}).json()["cell"]
    for cell in (model, drawn, kept):
        assert tech.get(f"/api/cells/{cell['id']}/crop").status_code == 200
    for cell in (model, drawn):
        gone = tech.delete(f"/api/cases/{case['id']}/cells/{cell['id']}",
                           params={"version": cell["version"]})
        assert gone.status_code == 200 and gone.json()["deleted"]
        crop = tech.get(f"/api/cells/{cell['id']}/crop")
        assert crop.status_code == 404 and crop.headers["content-type"] == "application/json"
    assert tech.get(f"/api/cells/{kept['id']}/crop").status_code == 200
