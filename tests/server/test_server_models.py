"""Model sets in the station (issue #15, "in the station"), on the real app, database,
models and shared data: the registry and its admin page, every analysis recording its set
(case, audit trail, exports), "adapt from signed cases" as a background job (refused with
the library's reasons, then a new set with before/after figures), promote and roll back,
and re-analysis with another set keeping reviewed labels and showing disagreements.

The whole loop runs on BCCD test fields whose eosinophils the shipped models call
neutrophil: a technologist corrects them, the cases are signed, the adapt job learns from
them (level-2 models only, a small configuration: the detector's adaptation takes minutes
on 2 CPU cores and is covered by tests/test_adapt_detector.py), the set is promoted, the
cases are reopened and re-analysed with it, and the corrected cells now come out right.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path

import pytest
from station_helpers import FIELDS, all_cells, new_case, upload, wait_analysed
from test_server_api import _alembic

from leukodiff.models.files import sha256_of, shipped
from leukodiff.server.model_sets import ROLES, set_digest

# `leukodiff adapt`'s own settings (8 passes over the lab's cells and 100 replay cells a
# type: each lab cell is seen about 60 times, about what the lesson needs at lr 1e-4;
# 20 replay cells a type over 20 passes took 4 of the 8 corrections instead of 6, and
# lr 1e-3 took 7 but turned 3 of the 12 confirmed neutrophils).
ADAPT_JOB = {"level2": {"epochs": 8, "replay_per_class": 100}, "detector": False}
# BCCD VOC test fields (never trained on), each holding one white cell as the shipped
# models find it. Found by running the shipped Analyzer once, offline, over the BCCD test
# list and matching its cells to the VOC boxes and labels.csv's types (last with the
# detector that has the other-cell class, 2026-12-07: 00088's eosinophil now goes to the
# mononuclear model, and 00041's is called neutrophil): of the single-cell test fields'
# eosinophils it calls 10 right, 8 neutrophil and 1 lymphocyte; CORRECTED are those 8,
# EOSINOPHILS 8 it calls right, NEUTROPHILS 12 of the neutrophils it calls right
# (00041 took 00088's place: the other cases are as they were).
CORRECTED = ["BloodImage_00058.jpg", "BloodImage_00068.jpg", "BloodImage_00075.jpg",
             "BloodImage_00041.jpg", "BloodImage_00093.jpg", "BloodImage_00137.jpg",
             "BloodImage_00149.jpg", "BloodImage_00208.jpg"]
EOSINOPHILS = ["BloodImage_00062.jpg", "BloodImage_00180.jpg", "BloodImage_00184.jpg",
               "BloodImage_00220.jpg", "BloodImage_00253.jpg", "BloodImage_00271.jpg",
               "BloodImage_00284.jpg", "BloodImage_00319.jpg"]
NEUTROPHILS = ["BloodImage_00007.jpg", "BloodImage_00011.jpg", "BloodImage_00016.jpg",
               "BloodImage_00018.jpg", "BloodImage_00019.jpg", "BloodImage_00033.jpg",
               "BloodImage_00063.jpg", "BloodImage_00067.jpg", "BloodImage_00074.jpg",
               "BloodImage_00077.jpg", "BloodImage_00098.jpg", "BloodImage_00136.jpg"]
MISSED = dict.fromkeys(CORRECTED, "neutrophil")  # what the shipped models call them
CASES = 4  # each: 2 corrected eosinophils, 2 confirmed eosinophils, 3 confirmed neutrophils


def lab_cases() -> list[list[tuple[str, str]]]:
    """The cases' fields with the technologist's label of each field's cell."""
    return [[(name, "eosinophil") for name in CORRECTED[2 * c:2 * c + 2]]
            + [(name, "eosinophil") for name in EOSINOPHILS[2 * c:2 * c + 2]]
            + [(name, "neutrophil") for name in NEUTROPHILS[3 * c:3 * c + 3]]
            for c in range(CASES)]


def form_token(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def shipped_digest() -> str:
    return set_digest({role: {"sha256": sha256_of(shipped(role))} for role in ROLES})


def sign(reviewer, case_id: int) -> dict:
    case = reviewer.get(f"/api/cases/{case_id}").json()
    response = reviewer.post(f"/api/cases/{case_id}/sign-off",
                             json={"revision": case["revision"], "reason": "test sample"})
    assert response.status_code == 200, response.text
    return response.json()


def wait_job(client, job_id: int, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/model-jobs/{job_id}").json()
        if not job["running"]:
            return job
        time.sleep(0.5)
    raise AssertionError(f"model job {job_id} still running after {timeout} s")


def reviewed_lab_case(tech, bccd: Path, accession: str, fields: list[tuple[str, str]]) -> dict:
    """A case of BCCD fields whose one cell each a technologist names: the shipped models'
    eosinophils-called-neutrophil reclassified, the right calls confirmed."""
    case = new_case(tech, accession, target=10)
    assert upload(tech, case["id"], *(bccd / name for name, _ in fields)).status_code == 200
    case = wait_analysed(tech, case["id"], timeout=120)
    truth = dict(fields)
    for field in case["fields"]:
        (cell,) = field["cells"]
        expected = MISSED.get(field["name"], truth[field["name"]])
        assert cell["model_label"] == expected, (field["name"], cell["model_label"])
        response = tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                              json={"label": truth[field["name"]], "version": cell["version"]})
        assert response.status_code == 200, response.text
    return tech.get(f"/api/cases/{case['id']}").json()


def test_registry_lists_shipped_and_the_models_page_is_for_admins(station) -> None:
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    admin = station.client("ada", "admin")
    sets = tech.get("/api/model-sets").json()
    assert [(s["name"], s["source"], s["is_default"]) for s in sets] == [
        ("shipped", "shipped", True)]
    assert sets[0]["sha256"] == shipped_digest()
    assert {role: f["sha256"] for role, f in sets[0]["files"].items()} == {
        role: sha256_of(shipped(role)) for role in ROLES}
    for client in (tech, reviewer):
        assert client.get("/admin/models").status_code == 403
        assert client.post("/api/model-jobs").status_code == 403
        assert client.post("/api/model-sets/shipped/promote").status_code == 403
        assert client.post("/api/model-sets/rollback").status_code == 403
        assert 'href="/admin/models"' not in client.get("/").text
    page = admin.get("/admin/models")
    assert page.status_code == 200 and 'data-set="shipped"' in page.text
    assert "validation macro-F1" in page.text  # the shipped models' own figures
    assert 'href="/admin/models"' in admin.get("/").text
    # Forms need the CSRF token; nothing to roll back yet; the shipped set is the default.
    no_token = admin.post("/admin/models/rollback", headers={"X-CSRF-Token": ""},
                          data={"csrf_token": "wrong"})
    assert no_token.status_code == 403
    refused = admin.post("/admin/models/rollback", data={"csrf_token": form_token(page.text)})
    assert refused.status_code == 409 and "nothing to roll back" in refused.text
    assert admin.post("/api/model-sets/shipped/promote").status_code == 409
    assert admin.post("/api/model-sets/nothing/promote").status_code == 404


def test_each_analysis_records_its_model_set_and_exports_name_it(station, bccd: Path) -> None:
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    case = new_case(tech, "SET-1", target=10)
    assert upload(tech, case["id"], bccd / FIELDS[0]).status_code == 200
    case = wait_analysed(tech, case["id"])
    field = case["fields"][0]
    assert (field["model_set"], field["model_set_sha256"]) == ("shipped", shipped_digest())
    assert case["model_sets"] == ["shipped"] and case["disagreements"] == 0
    analysis = [e for e in tech.get(f"/api/cases/{case['id']}/audit").json()
                if e["action"] == "analysis"]
    assert analysis[0]["after"]["model_set"] == "shipped"
    assert analysis[0]["after"]["model_set_sha256"] == shipped_digest()
    assert "Analysed with model set: <span id=\"model-sets-used\">shipped" in tech.get(
        f"/cases/{case['id']}").text
    for cell in all_cells(case):
        if cell["label"] == "unidentified":
            tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                       json={"label": "neutrophil", "version": cell["version"]})
    sign(reviewer, case["id"])

    rows = list(csv.DictReader(io.StringIO(
        tech.get(f"/api/cases/{case['id']}/export.csv").text)))
    assert rows and {(r["model_set"], r["model_set_sha256"]) for r in rows} == {
        ("shipped", shipped_digest())}
    exported = tech.get(f"/api/cases/{case['id']}/export.json").json()
    assert exported["model_sets"] == ["shipped"]
    assert exported["fields"][0]["model_set_sha256"] == shipped_digest()
    assert "model set shipped" in exported["conclusion"]
    bundle = tech.get(f"/api/cases/{case['id']}/fhir.json").json()
    observations = [e["resource"] for e in bundle["entry"][1:]]
    assert observations and all(o["resourceType"] == "Observation" for o in observations)
    for observation in observations:
        device = observation["contained"][0]
        assert device["resourceType"] == "Device"
        assert observation["device"]["reference"] == f"#{device['id']}"
        assert device["version"][0]["value"] == shipped_digest()
        assert device["deviceName"][0]["name"] == "leukodiff model set shipped"
        assert "shipped" in observation["method"]["text"]


def test_adapt_promote_reanalyse_and_the_corrected_cells_come_out_right(
        make_station, database_url, bccd: Path, shared_data: Path, monkeypatch) -> None:
    """The issue's loop: signed cases with a technologist's corrections -> adapt (first
    refused: one case is too few) -> promote -> new analyses use the new set -> the signed
    cases reopened and re-analysed with it: reviewed labels kept, and the eosinophils the
    shipped models called neutrophil now come out as the technologist said, the cells she
    confirmed still right -> roll back."""
    # The replay sample comes from the base models' training labs present on the machine:
    # the shared data only, as on CI (a machine that also holds Chula would replay it too
    # and learn a little differently: 5 of 8 corrected cells instead of 4).
    monkeypatch.setenv("LEUKODIFF_DATA", str(shared_data))
    station = make_station(database_url, adapt_job=ADAPT_JOB)
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    admin = station.client("ada", "admin")
    lab = lab_cases()

    # One signed case: the job starts, runs in the background and is refused with the
    # library's reason, shown on the page; no set is made.
    cases = [reviewed_lab_case(tech, bccd, "LAB-0", lab[0])]
    sign(reviewer, cases[0]["id"])
    started = admin.post("/api/model-jobs")
    assert started.status_code == 202, started.text
    assert admin.get("/api/cases").status_code == 200  # requests are served meanwhile
    job = wait_job(admin, started.json()["id"])
    assert job["status"] == "refused", job
    assert "at least two cases" in job["message"]
    assert job["message"] in admin.get("/admin/models").text.replace("&#39;", "'")
    assert [s["name"] for s in admin.get("/api/model-sets").json()] == ["shipped"]

    for c in range(1, CASES):
        cases.append(reviewed_lab_case(tech, bccd, f"LAB-{c}", lab[c]))
        sign(reviewer, cases[-1]["id"])
    page = admin.get("/admin/models")
    response = admin.post("/admin/models/adapt", data={"csrf_token": form_token(page.text)},
                          follow_redirects=False)
    assert response.status_code == 303
    job_id = max(j["id"] for j in [admin.get(f"/api/model-jobs/{i}").json()
                                   for i in range(1, 3)])
    assert admin.post("/api/model-jobs").status_code in (202, 409)  # one job at a time
    job = wait_job(admin, job_id)
    assert job["status"] == "done", job["message"]
    name = job["model_set"]
    sets = {s["name"]: s for s in admin.get("/api/model-sets").json()}
    adapted = sets[name]
    assert adapted["source"] == "adapted" and adapted["base"] == "shipped"
    assert adapted["created_by"] == "ada" and not adapted["is_default"]
    poly = adapted["figures"]["polymorphonuclear"]
    assert 0 <= poly["before"]["macro_f1"] <= poly["after"]["macro_f1"] <= 1
    assert set(poly["after"]["recall"]) <= {"neutrophil", "eosinophil"}
    assert adapted["figures"]["mononuclear"] == {"skipped": "no reviewed cells of this group"}
    # Only the adapted model is new; the others are the base set's files, unchanged.
    folder = station.settings.data_dir / "models" / name
    assert adapted["files"]["polymorphonuclear"] == {
        "set": name, "file": "polymorphonuclear.pt",
        "sha256": sha256_of(folder / "polymorphonuclear.pt")}
    assert adapted["files"]["detector"]["set"] == "shipped"
    assert adapted["files"]["mononuclear"]["set"] == "shipped"
    assert (folder / "polymorphonuclear.onnx").exists()
    assert not (folder / ".adapting").exists()  # the checkpoints are not part of the set
    manifest = json.loads((folder / "polymorphonuclear.json").read_text())
    assert manifest["adapted"]["command"] == f"review station adapt job {job_id} from shipped"
    assert manifest["adapted"]["base"]["sha256"] == sha256_of(shipped("polymorphonuclear"))
    assert manifest["adapted"]["cells"]["replay_only"] == ["basophil"]
    assert all(p.stat().st_mode & 0o777 == 0o400 for p in folder.iterdir())
    page = admin.get("/admin/models").text
    assert f'data-set="{name}"' in page and "macro-F1" in page and "ada" in page

    # Promote (the page's form): new analyses run the adapted set and record it.
    response = admin.post(f"/admin/models/{name}/promote",
                          data={"csrf_token": form_token(page)}, follow_redirects=False)
    assert response.status_code == 303
    assert [s["name"] for s in admin.get("/api/model-sets").json() if s["is_default"]] == [name]
    fresh = new_case(tech, "AFTER-1", target=10)
    upload(tech, fresh["id"], bccd / CORRECTED[0], bccd / FIELDS[0])
    fresh = wait_analysed(tech, fresh["id"], timeout=120)
    assert {f["model_set"] for f in fresh["fields"]} == {name}
    assert {f["model_set_sha256"] for f in fresh["fields"]} == {adapted["sha256"]}
    trail = tech.get(f"/api/cases/{fresh['id']}/audit").json()
    assert {e["after"]["model_set"] for e in trail if e["action"] == "analysis"} == {name}

    # Re-analyse the signed cases with the promoted set: a signed case is locked until a
    # reviewer reopens it to amend it; only a reviewer or admin re-analyses, with a set
    # that exists.
    reviewed = {c["id"]: c["label"] for case in cases for c in all_cells(case)}
    field_of = {c["id"]: f["name"] for case in cases for f in case["fields"]
                for c in f["cells"]}
    assert reviewer.post(f"/api/cases/{cases[0]['id']}/reanalyse",
                         json={"model_set": name}).status_code == 423
    for case in cases:
        case = reviewer.get(f"/api/cases/{case['id']}").json()
        response = reviewer.post(f"/api/cases/{case['id']}/reopen",
                                 json={"revision": case["revision"],
                                       "reason": "re-analysed with the lab's model set"})
        assert response.status_code == 200, response.text
    assert tech.post(f"/api/cases/{cases[0]['id']}/reanalyse",
                     json={"model_set": name}).status_code == 403
    assert reviewer.post(f"/api/cases/{cases[0]['id']}/reanalyse",
                         json={"model_set": "nothing"}).status_code == 404
    for case in cases:
        response = reviewer.post(f"/api/cases/{case['id']}/reanalyse",
                                 json={"model_set": name})
        assert response.status_code == 202, response.text
    again = [wait_analysed(tech, case["id"], timeout=120) for case in cases]
    cells = {c["id"]: c for case in again for c in all_cells(case)}
    assert set(cells) == set(reviewed)  # the same cells, matched
    for cell_id, label in reviewed.items():
        assert cells[cell_id]["label"] == label and cells[cell_id]["reviewed"]
    for case in again:
        assert {f["model_set"] for f in case["fields"]} == {name}
        disagreeing = [c for c in all_cells(case) if c["model_label"]
                       and c["model_label"] not in (c["label"], "unidentified")]
        assert case["disagreements"] == len(disagreeing)
        assert all(c["disagrees"] == (c in disagreeing) for c in all_cells(case))
        trail = tech.get(f"/api/cases/{case['id']}/audit").json()
        assert [e["after"]["model_set"] for e in trail if e["action"] == "reanalyse"] == [name]

    corrected = [c for c in cells.values() if field_of[c["id"]] in CORRECTED]
    confirmed = [c for c in cells.values() if field_of[c["id"]] not in CORRECTED]
    now_right = [field_of[c["id"]] for c in corrected if c["model_label"] == c["label"]]
    still_right = [field_of[c["id"]] for c in confirmed if c["model_label"] == c["label"]]
    summary = (f"corrected eosinophils now called eosinophil: {len(now_right)} of "
               f"{len(corrected)} (shipped: 0); confirmed cells still right: "
               f"{len(still_right)} of {len(confirmed)}; calls: "
               f"{ {field_of[c['id']]: c['model_label'] for c in cells.values()} }")
    print(summary)
    # Not all: one of the four cases is held out to judge the adaptation (it is not learnt
    # from), and a few cells resist. Measured with the shared data's replay: 5 of 8 (00058,
    # 00068, 00075, 00041, 00093 now eosinophil; 00137, 00149, 00208 stay neutrophil), all
    # 20 confirmed still right.
    assert len(corrected) == len(CORRECTED) and len(now_right) >= 4, summary
    assert len(still_right) == len(confirmed) == len(EOSINOPHILS) + len(NEUTROPHILS), summary

    # Roll back: the shipped set is the default again.
    assert admin.post("/api/model-sets/rollback").json() == {"default": "shipped"}
    older = new_case(tech, "ROLLED-1", target=10)
    upload(tech, older["id"], bccd / FIELDS[1])
    older = wait_analysed(tech, older["id"])
    assert older["fields"][0]["model_set"] == "shipped"
    events = [(e["action"], e["after"].get("model_set"))
              for e in admin.get("/api/model-sets/audit").json()]
    assert ("model_promote", name) in events and ("model_rollback", "shipped") in events
    assert not any(e["action"].startswith("model_")
                   for e in admin.get("/api/users/audit").json())


def test_reanalysis_keeps_reviewed_labels_and_marks_disagreements(sqlite_station,
                                                                  bccd: Path) -> None:
    """Re-analysing with the shipped set itself: the same calls come back on the same cells,
    the reviewed labels stay, each relabelled cell is a disagreement (marked on the page's
    data), unreviewed cells keep following the model."""
    tech = sqlite_station.client("tess")
    reviewer = sqlite_station.client("rita", "reviewer")
    case = new_case(tech, "RE-1", target=10)
    upload(tech, case["id"], *(bccd / name for name in FIELDS))
    case = wait_analysed(tech, case["id"])
    cells = all_cells(case)
    assert len(cells) >= 2
    changed = cells[0]
    other = "monocyte" if changed["model_label"] != "monocyte" else "lymphocyte"
    tech.patch(f"/api/cases/{case['id']}/cells/{changed['id']}",
               json={"label": other, "version": changed["version"]})
    response = reviewer.post(f"/api/cases/{case['id']}/reanalyse",
                             json={"model_set": "shipped"})
    assert response.status_code == 202
    again = wait_analysed(tech, case["id"])
    after = {c["id"]: c for c in all_cells(again)}
    assert set(after) == {c["id"] for c in cells}  # the same cells, matched
    assert after[changed["id"]]["label"] == other and after[changed["id"]]["disagrees"]
    assert after[changed["id"]]["model_label"] == changed["model_label"]
    assert again["disagreements"] == 1
    for cell in cells[1:]:
        assert after[cell["id"]]["label"] == cell["label"] and not after[cell["id"]]["reviewed"]
    assert all(f["pending_model_set"] is None and f["model_set"] == "shipped"
               for f in again["fields"])


@pytest.mark.usefixtures("bccd")
def test_migration_0006_upgrades_a_0005_database(database_url, tmp_path: Path) -> None:
    """A 0005 database with a field upgrades (no set recorded: the field was analysed
    before sets were), takes a model set, and goes back down with the field intact."""
    from sqlalchemy import text

    from leukodiff.server.db import Database

    db = Database(database_url or f"sqlite:///{tmp_path / 'old.sqlite3'}")
    at = "'2026-11-30 10:00:00+00'"
    try:
        _alembic(db, "upgrade", "0005")
        with db.engine.begin() as connection:
            for statement in (
                    "INSERT INTO users (id, username, password_hash, role, active, created_at, "
                    f"session_epoch, must_change_password) VALUES (1, 'tess', 'h', "
                    f"'technologist', true, {at}, 0, false)",
                    "INSERT INTO cases (id, accession, status, target_count, revision, "
                    f"created_at, created_by_id, version, amendments) VALUES (1, 'OLD-1', "
                    f"'open', 100, 1, {at}, 1, 1, 0)",
                    "INSERT INTO images (sha256, size_bytes, format, width, height, created_at)"
                    f" VALUES ('{'a' * 64}', 10, 'JPEG', 640, 480, {at})",
                    "INSERT INTO fields (id, case_id, image_sha256, original_name, status, "
                    f"uploaded_at, uploaded_by_id, unlike_training, excluded) VALUES (1, 1, "
                    f"'{'a' * 64}', 'f.jpg', 'done', {at}, 1, false, false)"):
                connection.execute(text(statement))
        _alembic(db, "upgrade", "head")
        with db.engine.begin() as connection:
            assert connection.execute(text(
                "SELECT model_set, model_set_sha256, pending_model_set FROM fields")).one() \
                == (None, None, None)
            connection.execute(text(
                "INSERT INTO model_sets (name, source, created_at, sha256, files, figures, "
                f"is_default, retired) VALUES ('shipped', 'shipped', {at}, '{'b' * 64}', "
                "'{}', '{}', true, false)"))
            connection.execute(text("UPDATE fields SET model_set = 'shipped'"))
        _alembic(db, "downgrade", "0005")
        with db.engine.begin() as connection:
            assert connection.execute(text("SELECT original_name FROM fields")).scalar_one() \
                == "f.jpg"
        _alembic(db, "upgrade", "head")
    finally:
        db.dispose()
