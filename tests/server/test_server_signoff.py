"""Issue #16, safe sign-off: a confirmation of counted vs target, unreviewed cells and failed
fields, enforced by the API (a reason is required for any shortfall) and carried into the
audit trail, the case page and the reports."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image as PILImage
from station_helpers import FIELDS, all_cells, name_unidentified, new_case, upload, wait_analysed


def sign(client, case: dict, reason: str | None = None):
    body = {"revision": case["revision"]} | ({"reason": reason} if reason is not None else {})
    return client.post(f"/api/cases/{case['id']}/sign-off", json=body)


def dark_field() -> tuple[str, bytes, str]:
    """A black photograph: stored (a valid JPEG) but its analysis fails (too dark)."""
    buffer = io.BytesIO()
    PILImage.new("RGB", (640, 480)).save(buffer, format="JPEG")
    return ("lamp-off.jpg", buffer.getvalue(), "image/jpeg")


def test_sign_off_below_target_with_unreviewed_cells_needs_a_reason(station, bccd: Path
                                                                    ) -> None:
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    case = new_case(tech, "SHORT-1")
    assert upload(tech, case["id"], bccd / FIELDS[0]).status_code == 200
    case = name_unidentified(tech, wait_analysed(tech, case["id"]))
    diff, check = case["differential"], case["sign_off_check"]
    assert check["counted"] == diff["counted"] < 100 and check["target"] == 100
    assert check["unreviewed"] == diff["counted"] - diff["reviewed"]
    assert check["failed_fields"] == 0 and check["reason_required"]
    assert check["problems"][0] == f"{diff['counted']} of 100 target cells"

    for reason in (None, "", "   \n"):
        refused = sign(reviewer, case, reason)
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"]
        assert detail.startswith(f"{diff['counted']} of 100 target cells")
        assert detail.endswith("a reason is required to sign off")
        if check["unreviewed"]:
            assert f"{check['unreviewed']} cell" in detail and "unreviewed" in detail
    too_long = sign(reviewer, case, "x" * 1001)
    assert too_long.status_code == 422 and "too long" in too_long.json()["detail"]
    assert tech.get(f"/api/cases/{case['id']}").json()["status"] == "open"

    reason = "Leukopenic sample: only one field available, counted what there was."
    signed = sign(reviewer, case, f"  {reason} ")
    assert signed.status_code == 200, signed.text
    assert signed.json()["sign_off_reason"] == reason
    assert signed.json()["sign_off_check"] == check

    # The audit trail, the case page, the FHIR conclusion and the JSON export carry it.
    event = [e for e in tech.get(f"/api/cases/{case['id']}/audit").json()
             if e["action"] == "sign_off"][-1]
    assert event["user"] == "rita" and event["after"]["reason"] == reason
    assert event["after"]["check"]["problems"] == check["problems"]
    page = tech.get(f"/cases/{case['id']}").text
    assert 'id="signed-reason"' in page and reason in page
    bundle = tech.get(f"/api/cases/{case['id']}/fhir.json").json()
    conclusion = bundle["entry"][0]["resource"]["conclusion"]
    assert f"Sign-off reason ({', '.join(check['problems'])}): {reason}" in conclusion
    exported = tech.get(f"/api/cases/{case['id']}/export.json").json()
    assert exported["sign_off_reason"] == reason and exported["conclusion"] == conclusion


def test_sign_off_at_target_with_every_cell_reviewed_needs_no_reason(sqlite_station,
                                                                     bccd: Path) -> None:
    tech = sqlite_station.client("tess")
    reviewer = sqlite_station.client("rita", "reviewer")
    case = new_case(tech, "FULL-1", target=10)
    assert upload(tech, case["id"], bccd / FIELDS[0]).status_code == 200
    case = wait_analysed(tech, case["id"])
    model = all_cells(case)
    assert model and all(c["label"] != "unidentified" for c in model)
    field = case["fields"][0]
    for i in range(max(0, 10 - len(model))):  # drawn cells are reviewed by their drawer
        x = 20 + 40 * i
        assert tech.post(f"/api/cases/{case['id']}/cells", json={
            "field_id": field["id"], "box": [x, 20, x + 30, 50],
            "label": "lymphocyte"}).status_code == 201
    for cell in model[1:]:  # confirm all but one of the model's calls
        assert tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                          json={"label": cell["label"], "version": cell["version"]}).is_success
    case = tech.get(f"/api/cases/{case['id']}").json()
    assert case["sign_off_check"]["problems"] == ["1 cell unreviewed"]
    refused = sign(reviewer, case)
    assert refused.status_code == 422
    assert refused.json()["detail"] == "1 cell unreviewed: a reason is required to sign off"

    last = model[0]
    assert tech.patch(f"/api/cases/{case['id']}/cells/{last['id']}",
                      json={"label": last["label"], "version": last["version"]}).is_success
    case = tech.get(f"/api/cases/{case['id']}").json()
    check = case["sign_off_check"]
    assert check["counted"] >= 10 and check["unreviewed"] == 0
    assert check["problems"] == [] and not check["reason_required"]
    signed = sign(reviewer, case)
    assert signed.status_code == 200, signed.text
    assert signed.json()["sign_off_reason"] is None
    conclusion = tech.get(f"/api/cases/{case['id']}/fhir.json").json()["entry"][0][
        "resource"]["conclusion"]
    assert "Sign-off reason" not in conclusion
    assert f"{check['counted']} of {check['counted']} white cells individually reviewed" \
        in conclusion
    page = tech.get(f"/cases/{case['id']}").text
    assert 'id="signed-reason" hidden' in page


def test_failed_fields_need_a_reason_and_are_not_counted_as_analysed(sqlite_station,
                                                                     bccd: Path) -> None:
    """Regression (issue #16): the conclusion said "over 2 field(s)" for one analysed field
    and one whose analysis failed."""
    tech = sqlite_station.client("tess")
    reviewer = sqlite_station.client("rita", "reviewer")
    case = new_case(tech, "FAIL-1")
    response = tech.post(f"/api/cases/{case['id']}/fields", files=[
        ("files", (FIELDS[0], (bccd / FIELDS[0]).read_bytes(), "image/jpeg")),
        ("files", dark_field())])
    assert response.status_code == 200 and len(response.json()["accepted"]) == 2
    case = name_unidentified(tech, wait_analysed(tech, case["id"]))
    assert case["progress"]["done"] == 1 and case["progress"]["failed"] == 1
    assert case["differential"]["fields"] == 1
    assert case["differential"]["failed_fields"] == 1
    assert case["sign_off_check"]["failed_fields"] == 1
    assert "1 field failed analysis" in case["sign_off_check"]["problems"]

    refused = sign(reviewer, case)
    assert refused.status_code == 422
    assert "1 field failed analysis" in refused.json()["detail"]
    signed = sign(reviewer, case, "Second field was photographed with the lamp off.")
    assert signed.status_code == 200, signed.text

    conclusion = tech.get(f"/api/cases/{case['id']}/fhir.json").json()["entry"][0][
        "resource"]["conclusion"]
    counted = case["differential"]["counted"]
    assert conclusion.startswith(f"{counted} white cells counted over 1 analysed field(s) "
                                 "(1 more field(s) failed analysis: none of their cells is "
                                 "counted);")
    assert "over 2" not in conclusion
    assert "1 field failed analysis" in conclusion and "lamp off" in conclusion


def test_reopen_with_a_reason_then_sign_off_issues_an_amended_report(sqlite_station,
                                                                     bccd: Path) -> None:
    tech = sqlite_station.client("tess")
    reviewer = sqlite_station.client("rita", "reviewer")
    other = sqlite_station.client("rob", "reviewer")
    case = new_case(tech, "AMEND-1")
    assert upload(tech, case["id"], bccd / FIELDS[1]).status_code == 200
    case = name_unidentified(tech, wait_analysed(tech, case["id"]))
    first = sign(reviewer, case, "small sample")
    assert first.status_code == 200, first.text
    case = first.json()
    first_report = tech.get(f"/api/cases/{case['id']}/fhir.json").json()
    assert first_report["entry"][0]["resource"]["status"] == "final"

    def reopen(client, revision: int, reason: str | None = None):
        body = {"revision": revision} | ({"reason": reason} if reason is not None else {})
        return client.post(f"/api/cases/{case['id']}/reopen", json=body)

    assert reopen(tech, case["revision"], "wrong cell").status_code == 403
    for blank in (None, "", "  "):
        refused = reopen(reviewer, case["revision"], blank)
        assert refused.status_code == 422
        assert "a reason is required to reopen" in refused.json()["detail"]
    assert reopen(reviewer, case["revision"] - 1, "wrong cell").status_code == 409
    reopened = reopen(other, case["revision"], "Cell 1 is a monocyte, not a lymphocyte.")
    assert reopened.status_code == 200, reopened.text
    case = reopened.json()
    assert case["status"] == "open" and case["signed_by"] is None
    assert case["amendments"] == 1 and case["sign_off_reason"] is None
    assert case["amend_reason"] == "Cell 1 is a monocyte, not a lymphocyte."
    assert reopen(reviewer, case["revision"], "again").status_code == 409  # not signed
    assert tech.get(f"/api/cases/{case['id']}/fhir.json").status_code == 409

    # Open again: edits are allowed; the next sign-off issues an amended report.
    cell = all_cells(case)[0]
    new_label = "monocyte" if cell["label"] != "monocyte" else "lymphocyte"
    assert tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                      json={"label": new_label, "version": cell["version"]}).is_success
    case = tech.get(f"/api/cases/{case['id']}").json()
    assert sign(reviewer, case).status_code == 422  # the reason rules hold as before
    second = sign(reviewer, case, "small sample, corrected")
    assert second.status_code == 200, second.text
    assert second.json()["status"] == "signed" and second.json()["amendments"] == 1

    bundle = tech.get(f"/api/cases/{case['id']}/fhir.json").json()
    report = bundle["entry"][0]["resource"]
    assert report["status"] == "amended"
    assert {e["resource"]["status"] for e in bundle["entry"][1:]} == {"amended"}
    assert report["conclusion"].startswith(
        "Amended report (amendment 1; reopened because: Cell 1 is a monocyte, not a "
        "lymphocyte.).")
    assert "Sign-off reason" in report["conclusion"] and "corrected" in report["conclusion"]

    events = tech.get(f"/api/cases/{case['id']}/audit").json()
    trail = [(e["action"], e["user"]) for e in events
             if e["action"] in ("sign_off", "reopen")]
    assert trail == [("sign_off", "rita"), ("reopen", "rob"), ("sign_off", "rita")]
    signs = [e for e in events if e["action"] == "sign_off"]
    assert signs[0]["after"]["reason"] == "small sample"
    assert signs[1]["after"]["reason"] == "small sample, corrected"
    assert signs[1]["after"]["amendment"] == 1
    reopened_event = next(e for e in events if e["action"] == "reopen")
    assert reopened_event["before"]["signed_by"] == "rita"
    assert reopened_event["before"]["sign_off_reason"] == "small sample"
    assert reopened_event["after"]["reason"] == "Cell 1 is a monocyte, not a lymphocyte."
