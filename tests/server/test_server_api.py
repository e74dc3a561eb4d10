"""The review workflow through the HTTP API, on the real app, database and Analyzer."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from sqlalchemy import select
from station_helpers import FIELDS, all_cells, new_case, upload, wait_analysed

from leukodiff.server import Settings, create_app
from leukodiff.server.db import Case, Image
from leukodiff.server.exports import LOINC_PERCENT


def test_review_sign_off_and_exports(station, bccd: Path) -> None:
    tech = station.client("tess", "technologist")
    reviewer = station.client("rita", "reviewer")
    case = new_case(tech)

    response = upload(tech, case["id"], bccd / FIELDS[0], bccd / FIELDS[1])
    assert response.status_code == 200, response.text
    assert [a["name"] for a in response.json()["accepted"]] == FIELDS[:2]
    case = wait_analysed(tech, case["id"])
    assert case["progress"] == {"total": 2, "queued": 0, "analysing": 0, "done": 2, "failed": 0}
    cells = all_cells(case)
    assert cells, "the Analyzer found no white cell in two BCCD fields"
    assert all(c["origin"] == "model" and c["model_label"] == c["label"] for c in cells)

    # Reclassify one cell: the differential follows.
    cell = cells[0]
    new_label = "basophil" if cell["label"] != "basophil" else "monocyte"
    before = case["differential"]["counts"][new_label]
    response = tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                          json={"label": new_label, "version": cell["version"]})
    assert response.status_code == 200, response.text
    edit = response.json()
    assert edit["cell"]["label"] == new_label and edit["cell"]["reviewed"]
    assert edit["differential"]["counts"][new_label] == before + 1

    # The same edit again, from the now stale version: refused, nothing overwritten.
    stale = reviewer.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                           json={"label": "eosinophil", "version": cell["version"]})
    assert stale.status_code == 409
    assert "changed by tess" in stale.json()["detail"]

    # Draw a missed cell, mark another as not a white cell, delete a third (if there is one).
    field = case["fields"][0]
    added = tech.post(f"/api/cases/{case['id']}/cells",
                      json={"field_id": field["id"], "box": [10, 10, 90, 90],
                            "label": "lymphocyte"})
    assert added.status_code == 201, added.text
    assert added.json()["cell"]["origin"] == "user"
    counted = added.json()["differential"]["counted"]
    extra = tech.post(f"/api/cases/{case['id']}/cells",
                      json={"field_id": field["id"], "box": [100, 100, 160, 170],
                            "label": "unidentified"}).json()["cell"]
    gone = tech.delete(f"/api/cases/{case['id']}/cells/{extra['id']}",
                       params={"version": extra["version"]})
    assert gone.status_code == 200 and gone.json()["deleted"]
    assert gone.json()["differential"]["counted"] == counted

    # Classify whatever the model left unidentified, then set a target of 200.
    case = tech.get(f"/api/cases/{case['id']}").json()
    for c in all_cells(case):
        if c["label"] == "unidentified":
            assert tech.patch(f"/api/cases/{case['id']}/cells/{c['id']}",
                              json={"label": "neutrophil", "version": c["version"]}).is_success
    case = tech.get(f"/api/cases/{case['id']}").json()
    response = tech.patch(f"/api/cases/{case['id']}",
                          json={"target_count": 200, "revision": case["revision"]})
    assert response.status_code == 200 and response.json()["differential"]["target"] == 200
    case = response.json()

    # Only a reviewer signs off; a stale revision is refused; then the case is locked.
    denied = tech.post(f"/api/cases/{case['id']}/sign-off", json={"revision": case["revision"]})
    assert denied.status_code == 403
    stale = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                          json={"revision": case["revision"] - 1})
    assert stale.status_code == 409
    # Far below the 200 target: sign-off needs a reason (issue #16).
    short = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                          json={"revision": case["revision"]})
    assert short.status_code == 422 and "of 200 target cells" in short.json()["detail"]
    signed = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                           json={"revision": case["revision"], "reason": "test sample"})
    assert signed.status_code == 200, signed.text
    case = signed.json()
    assert case["status"] == "signed" and case["signed_by"] == "rita"
    assert case["sign_off_reason"] == "test sample"
    cell = all_cells(case)[0]
    locked = tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                        json={"label": "monocyte", "version": cell["version"]})
    assert locked.status_code == 423 and "signed off" in locked.json()["detail"]
    assert upload(tech, case["id"], bccd / FIELDS[2]).status_code == 423

    # Exports.
    diff = case["differential"]
    rows = list(csv.DictReader(io.StringIO(tech.get(f"/api/cases/{case['id']}/export.csv").text)))
    assert len(rows) == diff["counted"] + diff["not_wbc"]
    assert {r["accession"] for r in rows} == {"S-2026-0001"}

    exported = tech.get(f"/api/cases/{case['id']}/export.json").json()
    assert exported["differential"] == diff
    actions = [e["action"] for e in exported["audit"]]
    assert actions.count("upload") == 2 and actions.count("analysis") == 2
    assert {"create_case", "reclassify", "add_cell", "delete_cell", "set_target",
            "sign_off"} <= set(actions)
    reclass = next(e for e in exported["audit"] if e["action"] == "reclassify")
    assert reclass["user"] == "tess" and reclass["at"]
    assert reclass["before"]["label"] != reclass["after"]["label"]

    bundle = tech.get(f"/api/cases/{case['id']}/fhir.json").json()
    assert bundle["resourceType"] == "Bundle"
    report = bundle["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "final"
    assert report["identifier"][0]["value"] == "S-2026-0001"
    observations = {e["fullUrl"]: e["resource"] for e in bundle["entry"][1:]}
    assert [r["reference"] for r in report["result"]] == list(observations)
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations.values()}
    for cell_type, (code, _display) in LOINC_PERCENT.items():
        observation = by_code[code]
        assert observation["valueQuantity"]["value"] == diff["percentages"][str(cell_type)]
        assert observation["valueQuantity"]["code"] == "%"
    assert set(by_code) == {"26478-8", "26485-3", "26511-6", "26450-7", "30180-4"}


def test_fields_unlike_the_training_labs_are_flagged_through_to_the_report(
        sqlite_station, bccd, shared_data) -> None:
    """A PBC image (Barcelona: a lab, camera and crop the shipped detector never saw) beside
    a BCCD field: the case says "review every cell", and the signed FHIR report's
    conclusion carries the warning."""
    from leukodiff.data.sources import load_cells

    tech = sqlite_station.client("tess", "technologist")
    reviewer = sqlite_station.client("rita", "reviewer")
    case = new_case(tech, "FOREIGN-1")
    tile = sorted(c.image for c in load_cells("pbc", shared_data).records)[0]
    assert upload(tech, case["id"], bccd / FIELDS[0], tile).status_code == 200
    case = wait_analysed(tech, case["id"])
    flags = {f["name"]: f["unlike_training"] for f in case["fields"]}
    assert flags == {FIELDS[0]: False, tile.name: True}
    assert all(f["familiarity"] > 0 for f in case["fields"])
    diff = case["differential"]
    assert diff["unlike_training"] == 1 and "1 of 2 field(s) look unlike" in diff["warning"]
    for cell in all_cells(case):  # a reviewer names every cell, then signs
        label = cell["label"] if cell["label"] != "unidentified" else "neutrophil"
        assert tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                          json={"label": label, "version": cell["version"]}).is_success
    case = tech.get(f"/api/cases/{case['id']}").json()
    signed = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                           json={"revision": case["revision"], "reason": "test sample"})
    assert signed.status_code == 200, signed.text
    report = tech.get(f"/api/cases/{case['id']}/fhir.json").json()["entry"][0]["resource"]
    assert "Warning: 1 of 2 field(s) look unlike" in report["conclusion"]


def test_exports_refused_before_sign_off(sqlite_station) -> None:
    tech = sqlite_station.client("tess")
    case = new_case(tech)
    for path in ("export.csv", "export.json", "fhir.json", "training.zip"):
        response = tech.get(f"/api/cases/{case['id']}/{path}")
        assert response.status_code == 409 and "not signed off" in response.json()["detail"]


def test_uploads_stored_once_and_bad_files_explained(sqlite_station, bccd: Path) -> None:
    tech = sqlite_station.client("tess")
    first, second = new_case(tech, "A-1"), new_case(tech, "A-2")
    field = bccd / FIELDS[0]
    assert upload(tech, first["id"], field).status_code == 200
    assert upload(tech, second["id"], field).status_code == 200
    duplicate = upload(tech, first["id"], field)
    assert duplicate.status_code == 409
    assert "already in this case" in duplicate.json()["rejected"][0]["reason"]

    # One blob on disk for both cases, read-only, named by its hash.
    blobs = [p for p in sqlite_station.settings.blob_dir.rglob("*") if p.is_file()]
    assert len(blobs) == 1 and blobs[0].stat().st_mode & 0o222 == 0
    assert blobs[0].read_bytes() == field.read_bytes()
    with sqlite_station.app.state.leukodiff.db.reading() as session:
        assert len(session.scalars(select(Image)).all()) == 1

    truncated = field.read_bytes()[: field.stat().st_size // 2]
    files = [("files", ("half.jpg", truncated, "image/jpeg")),
             ("files", ("notes.jpg", b"not an image at all", "image/jpeg")),
             ("files", ("empty.png", b"", "image/png"))]
    response = tech.post(f"/api/cases/{first['id']}/fields", files=files)
    reasons = {r["name"]: r["reason"] for r in response.json()["rejected"]}
    assert response.status_code == 415
    assert "truncated" in reasons["half.jpg"] or "corrupt" in reasons["half.jpg"]
    assert "judged by the file's content" in reasons["notes.jpg"]
    assert "empty" in reasons["empty.png"]
    wait_analysed(tech, first["id"])


def test_png_by_content_whatever_the_name(sqlite_station, bccd: Path) -> None:
    """A PNG named .txt is accepted (content decides); the name is only a label."""
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.open(bccd / FIELDS[1]).save(buffer, format="PNG")
    tech = sqlite_station.client("tess")
    case = new_case(tech)
    response = tech.post(f"/api/cases/{case['id']}/fields",
                         files=[("files", ("field.txt", buffer.getvalue(), "text/plain"))])
    assert response.status_code == 200, response.text
    case = wait_analysed(tech, case["id"])
    assert case["fields"][0]["status"] == "done" and case["fields"][0]["name"] == "field.txt"
    image = tech.get(f"/api/fields/{case['fields'][0]['id']}/image")
    assert image.headers["content-type"] == "image/jpeg"
    crop = tech.get(f"/api/cells/{all_cells(case)[0]['id']}/crop")
    assert crop.status_code == 200 and crop.content[:2] == b"\xff\xd8"


def test_schema_migrates_once_and_restarts_keep_data(make_station) -> None:
    first = make_station(None)
    new_case(first.client("tess"), "KEEP-1")
    # A second app on the same data dir: `upgrade head` is a no-op and the case is still there.
    app = create_app(Settings(data_dir=first.settings.data_dir))
    with app.state.leukodiff.db.reading() as session:
        assert [c.accession for c in session.scalars(select(Case))] == ["KEEP-1"]
        version = session.connection().exec_driver_sql(
            "SELECT version_num FROM alembic_version").scalar_one()
    assert version == "0006"
    app.state.leukodiff.db.dispose()


def test_migration_0003_keeps_fields_and_cells(database_url, tmp_path: Path) -> None:
    """A 0002 database with an analysed field and a cell upgrades (the field was not
    measured: familiarity NULL, not unlike the training labs) and goes back down.
    On SQLite a batch-mode 0003 copied `fields` and failed dropping the old table while
    `cells` held foreign keys on it ("FOREIGN KEY constraint failed")."""
    from sqlalchemy import text

    from leukodiff.server.db import Database

    db = Database(database_url or f"sqlite:///{tmp_path / 'old.sqlite3'}")
    at = "'2026-11-26 10:00:00+00'"
    try:
        _alembic(db, "upgrade", "0002")
        with db.engine.begin() as connection:
            for statement in (
                    "INSERT INTO users (id, username, password_hash, role, active, created_at, "
                    f"session_epoch) VALUES (1, 'tess', 'h', 'technologist', true, {at}, 0)",
                    "INSERT INTO cases (id, accession, status, target_count, revision, "
                    f"created_at, created_by_id, version) VALUES (1, 'OLD-1', 'open', 100, 1, "
                    f"{at}, 1, 1)",
                    "INSERT INTO images (sha256, size_bytes, format, width, height, created_at)"
                    f" VALUES ('{'a' * 64}', 10, 'JPEG', 640, 480, {at})",
                    "INSERT INTO fields (id, case_id, image_sha256, original_name, status, "
                    f"uploaded_at, uploaded_by_id) VALUES (1, 1, '{'a' * 64}', 'f.jpg', 'done', "
                    f"{at}, 1)",
                    "INSERT INTO cells (id, field_id, x0, y0, x1, y1, origin, label, reviewed, "
                    f"deleted, updated_at, version) VALUES (1, 1, 0, 0, 9, 9, 'model', "
                    f"'neutrophil', false, false, {at}, 1)"):
                connection.execute(text(statement))
        _alembic(db, "upgrade", "head")
        joined = ("SELECT f.original_name, c.label FROM fields f "
                  "JOIN cells c ON c.field_id = f.id")
        with db.engine.begin() as connection:
            row = connection.execute(text(
                "SELECT familiarity, unlike_training FROM fields")).one()
            assert row[0] is None and not row[1]
            assert connection.execute(text(joined)).one() == ("f.jpg", "neutrophil")
            assert connection.execute(text("SELECT username FROM users")).scalar_one() == "tess"
            assert connection.execute(text("SELECT accession FROM cases")).scalar_one() \
                == "OLD-1"
            if db.engine.dialect.name == "sqlite":  # the copy would have left no dangling keys
                assert connection.execute(text("PRAGMA foreign_key_check")).all() == []
        _alembic(db, "downgrade", "0002")
        with db.engine.begin() as connection:
            assert connection.execute(text(joined)).one() == ("f.jpg", "neutrophil")
    finally:
        db.dispose()


def test_admin_creates_users_others_cannot(sqlite_station) -> None:
    admin = sqlite_station.client("ada", "admin")
    tech = sqlite_station.client("tess")
    body = {"username": "newbie", "password": "long enough pw", "role": "reviewer"}
    assert tech.post("/api/users", json=body).status_code == 403
    assert admin.post("/api/users", json=body).status_code == 201
    assert admin.post("/api/users", json=body).status_code == 400  # exists
    short = {**body, "username": "other", "password": "short"}
    assert "at least" in admin.post("/api/users", json=short).json()["detail"]


def test_pages_render_for_a_signed_in_user(sqlite_station) -> None:
    tech = sqlite_station.client("tess")
    assert "Create case" in tech.get("/").text
    token = tech.headers["X-CSRF-Token"]
    response = tech.post("/cases", data={"accession": "P-1", "target_count": "200",
                                         "csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303
    page = tech.get(response.headers["location"])
    assert page.status_code == 200 and "P-1" in page.text and 'data-csrf="' in page.text
    assert tech.get("/static/app.js").status_code == 200


def test_duplicate_accession_in_the_form_is_explained(sqlite_station) -> None:
    tech = sqlite_station.client("tess")
    form = {"accession": "DUP-1", "csrf_token": tech.headers["X-CSRF-Token"]}
    assert tech.post("/cases", data=form, follow_redirects=False).status_code == 303
    again = tech.post("/cases", data=form, follow_redirects=False)
    assert again.status_code == 409 and "already exists" in again.text


def _alembic(db, action: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from leukodiff.server.db import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)


def test_migration_0002_keeps_data_and_downgrades(database_url, tmp_path: Path) -> None:
    """A 0001 database with a user, a case and its audit row upgrades (users get epoch 0,
    account events become possible) and goes back down (account events dropped)."""
    from sqlalchemy import text

    from leukodiff.server.db import Database

    db = Database(database_url or f"sqlite:///{tmp_path / 'old.sqlite3'}")
    try:
        _alembic(db, "upgrade", "0001")
        with db.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO users (id, username, password_hash, role, active, created_at) "
                "VALUES (1, 'tess', 'h', 'technologist', true, '2026-11-26 10:00:00+00')"))
            connection.execute(text(
                "INSERT INTO cases (id, accession, status, target_count, revision, "
                "created_at, created_by_id, version) "
                "VALUES (1, 'OLD-1', 'open', 100, 1, '2026-11-26 10:00:00+00', 1, 1)"))
            connection.execute(text(
                "INSERT INTO audit_events (case_id, user_id, at, action) "
                "VALUES (1, 1, '2026-11-26 10:00:00+00', 'create_case')"))
        _alembic(db, "upgrade", "head")
        with db.engine.begin() as connection:
            assert connection.execute(text(
                "SELECT session_epoch FROM users")).scalar_one() == 0
            connection.execute(text(
                "INSERT INTO audit_events (case_id, user_id, at, action) "
                "VALUES (NULL, 1, '2026-11-26 11:00:00+00', 'create_user')"))
            assert connection.execute(text(
                "SELECT count(*) FROM audit_events")).scalar_one() == 2
        _alembic(db, "downgrade", "0001")
        with db.engine.begin() as connection:
            rows = connection.execute(text("SELECT case_id, action FROM audit_events")).all()
            assert [tuple(r) for r in rows] == [(1, "create_case")]
    finally:
        db.dispose()


def test_migration_0004_keeps_signed_cases(database_url, tmp_path: Path) -> None:
    """A 0003 database with a case signed before reasons existed upgrades (no reason:
    NULL), takes a reason, and goes back down with the case intact."""
    from sqlalchemy import text

    from leukodiff.server.db import Database

    db = Database(database_url or f"sqlite:///{tmp_path / 'old.sqlite3'}")
    at = "'2026-11-26 10:00:00+00'"
    try:
        _alembic(db, "upgrade", "0003")
        with db.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO users (id, username, password_hash, role, active, created_at, "
                f"session_epoch) VALUES (1, 'rita', 'h', 'reviewer', true, {at}, 0)"))
            connection.execute(text(
                "INSERT INTO cases (id, accession, status, target_count, revision, "
                "created_at, created_by_id, signed_at, signed_by_id, version) VALUES "
                f"(1, 'OLD-1', 'signed', 100, 3, {at}, 1, {at}, 1, 2)"))
        _alembic(db, "upgrade", "head")
        with db.engine.begin() as connection:
            row = connection.execute(text(
                "SELECT sign_off_reason, amendments, amend_reason FROM cases")).one()
            assert tuple(row) == (None, 0, None)
            connection.execute(text("UPDATE cases SET sign_off_reason = 'short sample'"))
        _alembic(db, "downgrade", "0003")
        with db.engine.begin() as connection:
            row = connection.execute(text("SELECT accession, status FROM cases")).one()
            assert tuple(row) == ("OLD-1", "signed")
    finally:
        db.dispose()


def test_migration_0005_keeps_fields_and_accounts(database_url, tmp_path: Path) -> None:
    """A 0004 database with a user, a case, a field and a cell upgrades (the field counted,
    not excluded; the user's password theirs, never signed in since), takes an exclusion,
    and goes back down with the field and its cell intact."""
    from sqlalchemy import text

    from leukodiff.server.db import Database

    db = Database(database_url or f"sqlite:///{tmp_path / 'old.sqlite3'}")
    at = "'2026-11-26 10:00:00+00'"
    try:
        _alembic(db, "upgrade", "0004")
        with db.engine.begin() as connection:
            for statement in (
                    "INSERT INTO users (id, username, password_hash, role, active, created_at, "
                    f"session_epoch) VALUES (1, 'tess', 'h', 'technologist', true, {at}, 0)",
                    "INSERT INTO cases (id, accession, status, target_count, revision, "
                    f"created_at, created_by_id, version, amendments) VALUES (1, 'OLD-1', "
                    f"'open', 100, 1, {at}, 1, 1, 0)",
                    "INSERT INTO images (sha256, size_bytes, format, width, height, created_at)"
                    f" VALUES ('{'a' * 64}', 10, 'JPEG', 640, 480, {at})",
                    "INSERT INTO fields (id, case_id, image_sha256, original_name, status, "
                    f"uploaded_at, uploaded_by_id, unlike_training) VALUES (1, 1, '{'a' * 64}', "
                    f"'f.jpg', 'done', {at}, 1, false)",
                    "INSERT INTO cells (id, field_id, x0, y0, x1, y1, origin, label, reviewed, "
                    f"deleted, updated_at, version) VALUES (1, 1, 0, 0, 9, 9, 'model', "
                    f"'neutrophil', false, false, {at}, 1)"):
                connection.execute(text(statement))
        _alembic(db, "upgrade", "head")
        with db.engine.begin() as connection:
            row = connection.execute(text(
                "SELECT excluded, exclude_reason, excluded_at, excluded_by FROM fields")).one()
            assert (bool(row[0]), *row[1:]) == (False, None, None, None)
            row = connection.execute(text(
                "SELECT must_change_password, last_login_at FROM users")).one()
            assert (bool(row[0]), row[1]) == (False, None)
            connection.execute(text("UPDATE fields SET excluded = true, "
                                    "exclude_reason = 'blurred', excluded_by = 'tess'"))
            connection.execute(text("UPDATE users SET must_change_password = true"))
        _alembic(db, "downgrade", "0004")
        with db.engine.begin() as connection:
            assert connection.execute(text(
                "SELECT f.original_name, c.label FROM fields f JOIN cells c ON c.field_id = f.id"
            )).one() == ("f.jpg", "neutrophil")
            assert connection.execute(text("SELECT username FROM users")).scalar_one() == "tess"
    finally:
        db.dispose()
