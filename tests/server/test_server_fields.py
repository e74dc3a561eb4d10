"""Issue #16 item 4, field management: a field excluded (with a reason, audited) leaves the
differential, the counts and the exports; its cells and image are kept and it can be
included again. Signed cases, admins and requests without a CSRF token are refused."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

from PIL import Image as PILImage
from station_helpers import FIELDS, name_unidentified, new_case, upload, wait_analysed


def white(field: dict) -> int:
    """The white cells a field adds to the count (every live cell but not-a-white-cell)."""
    return sum(c["label"] != "not_wbc" for c in field["cells"])


def exclude(client, field_id: int, reason: str | None):
    return client.post(f"/api/fields/{field_id}/exclude",
                       json={} if reason is None else {"reason": reason})


def test_excluded_field_leaves_the_differential_and_exports(station, bccd: Path) -> None:
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    admin = station.client("ada", "admin")
    case = new_case(tech, "EXCL-1")
    assert upload(tech, case["id"], bccd / FIELDS[0], bccd / FIELDS[1]).status_code == 200
    case = name_unidentified(tech, wait_analysed(tech, case["id"]))
    kept, dropped = case["fields"]
    assert white(kept) and white(dropped)
    before = case["differential"]
    assert before["counted"] == white(kept) + white(dropped) and before["fields"] == 2

    # A reason is required; admins may not; the CSRF token is checked.
    for blank in (None, "", "  \n"):
        refused = exclude(tech, dropped["id"], blank)
        assert refused.status_code == 422
        assert refused.json()["detail"] == "a reason is required to exclude a field"
    forbidden = exclude(admin, dropped["id"], "blurred")
    assert forbidden.status_code == 403 and "technologist or reviewer" in forbidden.json()[
        "detail"]
    token = tech.headers.pop("X-CSRF-Token")
    assert exclude(tech, dropped["id"], "blurred").status_code == 403
    tech.headers["X-CSRF-Token"] = token
    assert exclude(tech, 2**31 - 1, "blurred").status_code == 404
    assert tech.get(f"/api/cases/{case['id']}").json()["differential"] == before

    reason = "Out of focus: the cells cannot be told apart."
    done = exclude(tech, dropped["id"], f" {reason} ")
    assert done.status_code == 200, done.text
    case = done.json()
    field = next(f for f in case["fields"] if f["id"] == dropped["id"])
    assert field["excluded"] and field["exclude_reason"] == reason
    assert field["excluded_by"] == "tess" and field["excluded_at"]
    assert field["cells"] == dropped["cells"]  # kept, shown greyed on the page
    diff = case["differential"]
    assert diff["counted"] == white(kept) and diff["fields"] == 1
    assert diff["excluded_fields"] == 1 and diff["failed_fields"] == 0
    check = case["sign_off_check"]
    assert check["counted"] == white(kept) and check["excluded_fields"] == 1
    assert check["excluded"] == [{"id": dropped["id"], "name": FIELDS[1], "reason": reason,
                                  "by": "tess"}]
    assert exclude(reviewer, dropped["id"], "again").status_code == 409  # already excluded

    # Its cells are frozen (they count nowhere), their crops still served for the gallery.
    cell = dropped["cells"][0]
    frozen = tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                        json={"label": "basophil", "version": cell["version"]})
    assert frozen.status_code == 409 and "is excluded" in frozen.json()["detail"]
    drawn = tech.post(f"/api/cases/{case['id']}/cells", json={
        "field_id": dropped["id"], "box": [10, 10, 60, 60], "label": "lymphocyte"})
    assert drawn.status_code == 409
    assert tech.get(f"/api/cells/{cell['id']}/crop").status_code == 200

    # Included again, then excluded again by the reviewer: every step audited.
    back = reviewer.post(f"/api/fields/{dropped['id']}/include", json={"reason": "mistake"})
    assert back.status_code == 200, back.text
    assert back.json()["differential"]["counted"] == before["counted"]
    assert reviewer.post(f"/api/fields/{dropped['id']}/include", json={}).status_code == 409
    assert exclude(reviewer, dropped["id"], "Wrong slide.").status_code == 200
    events = [e for e in tech.get(f"/api/cases/{case['id']}/audit").json()
              if e["action"] in ("exclude_field", "include_field")]
    assert [(e["action"], e["user"], e["field_id"], e["after"]["reason"]) for e in events] == [
        ("exclude_field", "tess", dropped["id"], reason),
        ("include_field", "rita", dropped["id"], "mistake"),
        ("exclude_field", "rita", dropped["id"], "Wrong slide.")]
    assert events[1]["before"]["reason"] == reason and events[1]["before"]["by"] == "tess"

    # Sign-off: the audited check names the excluded field; the reports leave it out.
    case = tech.get(f"/api/cases/{case['id']}").json()
    signed = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                           json={"revision": case["revision"], "reason": "small sample"})
    assert signed.status_code == 200, signed.text
    sign_event = [e for e in tech.get(f"/api/cases/{case['id']}/audit").json()
                  if e["action"] == "sign_off"][-1]
    assert sign_event["after"]["check"]["excluded"][0]["reason"] == "Wrong slide."
    assert sign_event["after"]["differential"]["counted"] == white(kept)

    rows = list(csv.DictReader(io.StringIO(tech.get(
        f"/api/cases/{case['id']}/export.csv").text)))
    assert {int(r["field_id"]) for r in rows} == {kept["id"]}
    assert len(rows) == len(kept["cells"])
    exported = tech.get(f"/api/cases/{case['id']}/export.json").json()
    assert exported["differential"]["counted"] == white(kept)
    assert [f["excluded"] for f in exported["fields"]] == [False, True]
    conclusion = tech.get(f"/api/cases/{case['id']}/fhir.json").json()["entry"][0][
        "resource"]["conclusion"]
    assert conclusion.startswith(f"{white(kept)} white cells counted over 1 analysed field(s) "
                                 "(1 field(s) excluded by a person: none of their cells is "
                                 "counted);")
    assert exported["conclusion"] == conclusion
    training = zipfile.ZipFile(io.BytesIO(tech.get(
        f"/api/cases/{case['id']}/training.zip").content))
    assert not [n for n in training.namelist() if f"field{dropped['id']}" in n]
    assert "1 field(s) excluded" in training.read("README.txt").decode()

    # Signed: locked.
    for action, body in (("exclude", {"reason": "late"}), ("include", {})):
        locked = reviewer.post(f"/api/fields/{kept['id'] if action == 'exclude' else dropped['id']}"
                               f"/{action}", json=body)
        assert locked.status_code == 423
        assert "signed off and locked" in locked.json()["detail"]


def dark_field() -> tuple[str, bytes, str]:
    """A black photograph: stored (a valid JPEG) but its analysis fails (too dark)."""
    buffer = io.BytesIO()
    PILImage.new("RGB", (640, 480)).save(buffer, format="JPEG")
    return ("lamp-off.jpg", buffer.getvalue(), "image/jpeg")


def test_failed_and_excluded_fields_in_the_sign_off_confirmation(sqlite_station,
                                                                 bccd: Path) -> None:
    """A failed field is listed (and needs a sign-off reason) until someone excludes it,
    with a reason of its own: then it is listed as excluded and needs none."""
    tech = sqlite_station.client("tess")
    case = new_case(tech, "EXCL-2", target=10)
    response = tech.post(f"/api/cases/{case['id']}/fields", files=[
        ("files", (FIELDS[0], (bccd / FIELDS[0]).read_bytes(), "image/jpeg")),
        ("files", dark_field())])
    assert response.status_code == 200
    case = name_unidentified(tech, wait_analysed(tech, case["id"]))
    good, dark = case["fields"]
    assert dark["status"] == "failed"
    check = case["sign_off_check"]
    assert check["failed"] == [{"id": dark["id"], "name": "lamp-off.jpg",
                                "error": dark["error"]}]
    assert "1 field failed analysis" in check["problems"]

    case = exclude(tech, dark["id"], "Lamp was off.").json()
    check = case["sign_off_check"]
    assert check["failed_fields"] == 0 and check["failed"] == []
    assert check["excluded"][0]["name"] == "lamp-off.jpg"
    assert not any("failed" in p for p in check["problems"])
    assert case["differential"]["fields"] == 1 and case["progress"]["failed"] == 1

    # The case page carries the confirmation's rows and the script that fills them.
    page = tech.get(f"/cases/{case['id']}").text
    assert 'id="confirm-excluded"' in page and 'id="confirm-fields"' in page
    script = tech.get("/static/app.js").text
    assert "/api/fields/${field.id}/${action}" in script and '"exclude"' in script

    # Same image uploaded again: the refusal points at the excluded field.
    again = upload(tech, case["id"], bccd / FIELDS[0])
    assert again.status_code == 409
    tech.post(f"/api/fields/{good['id']}/exclude", json={"reason": "test"})
    again = upload(tech, case["id"], bccd / FIELDS[0])
    assert "excluded: include it again instead" in again.json()["rejected"][0]["reason"]
    # Every field excluded: nothing to sign off.
    reviewer = sqlite_station.client("rita", "reviewer")
    case = tech.get(f"/api/cases/{case['id']}").json()
    assert case["differential"]["counted"] == 0
    refused = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                            json={"revision": case["revision"], "reason": "x"})
    assert refused.status_code == 409 and "no white cells counted" in refused.json()["detail"]
