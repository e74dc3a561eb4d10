"""Issue #16 item 3, fast review, through the API: bulk confirm of one class, undo of a
confirm (back to unreviewed), restore of a deleted cell, and the larger crops and
scaled-down fields the review page's enlargement and field navigator ask for."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image as PILImage
from station_helpers import FIELDS, all_cells, new_case, upload, wait_analysed


def analysed_case(client, bccd: Path, accession: str, fields: int = 3) -> dict:
    """A case of `fields` BCCD fields (each with at least one white cell), analysed."""
    case = new_case(client, accession)
    assert upload(client, case["id"], *(bccd / n for n in FIELDS[:fields])).status_code == 200
    case = wait_analysed(client, case["id"])
    assert len(all_cells(case)) >= fields, "the Analyzer found too few white cells"
    return case


def label(client, case_id: int, cell: dict, name: str, reviewed: bool = True):
    return client.patch(f"/api/cases/{case_id}/cells/{cell['id']}",
                        json={"label": name, "version": cell["version"], "reviewed": reviewed})


def events(client, case_id: int) -> list[dict]:
    return client.get(f"/api/cases/{case_id}/audit").json()


def test_bulk_confirm_of_a_class_and_its_undo(station, bccd: Path) -> None:
    tech = station.client("tess")
    case = analysed_case(tech, bccd, "FAST-1")
    cid = case["id"]
    first, second, third = all_cells(case)[:3]

    # Two cells put in a class, left unreviewed (as the model's call would be): the
    # page's undo of a label on an unreviewed cell; audited as a reclassification.
    for cell in (first, second):
        response = label(tech, cid, cell, "blast", reviewed=False)
        assert response.status_code == 200, response.text
        assert response.json()["cell"]["reviewed"] is False
    # A third blast, reviewed: bulk confirm leaves it alone.
    assert label(tech, cid, third, "blast").json()["cell"]["reviewed"]
    case = tech.get(f"/api/cases/{cid}").json()
    blasts = {c["id"]: c for c in all_cells(case) if c["label"] == "blast"}
    assert {i for i, c in blasts.items() if not c["reviewed"]} == {first["id"], second["id"]}
    reviewed_before = case["differential"]["reviewed"]

    # Confirm every unreviewed blast: one audit event with the count.
    response = tech.post(f"/api/cases/{cid}/confirm", json={"label": "blast"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert sorted(result["changed"]) == sorted([first["id"], second["id"]])
    after = {c["id"]: c for c in all_cells(result["case"])}
    assert all(after[i]["reviewed"] for i in blasts)
    assert result["case"]["differential"]["reviewed"] == reviewed_before + 2
    event = events(tech, cid)[-1]
    assert event["action"] == "confirm_class" and event["user"] == "tess"
    assert event["after"]["count"] == 2 and event["after"]["label"] == "blast"
    assert sorted(event["after"]["cells"]) == sorted(result["changed"])

    # Nothing left to confirm: no change, no event.
    again = tech.post(f"/api/cases/{cid}/confirm", json={"label": "blast"})
    assert again.status_code == 200 and again.json()["changed"] == []
    assert events(tech, cid)[-1]["id"] == event["id"]

    # Undo: the cells confirmed, back to unreviewed, each at the version it now has.
    listed = [{"id": i, "version": after[i]["version"]} for i in result["changed"]]
    undone = tech.post(f"/api/cases/{cid}/confirm",
                       json={"label": "blast", "cells": listed, "reviewed": False})
    assert undone.status_code == 200, undone.text
    cells = {c["id"]: c for c in all_cells(undone.json()["case"])}
    assert not cells[first["id"]]["reviewed"] and not cells[second["id"]]["reviewed"]
    assert cells[third["id"]]["reviewed"]
    assert events(tech, cid)[-1]["action"] == "unconfirm_class"

    # A stale version or a cell no longer of that class: refused whole, nothing applied.
    stale = tech.post(f"/api/cases/{cid}/confirm", json={"label": "blast", "cells": listed})
    assert stale.status_code == 409 and "since you loaded it" in stale.json()["detail"]
    wrong = tech.post(f"/api/cases/{cid}/confirm", json={"label": "monocyte", "cells": [
        {"id": first["id"], "version": cells[first["id"]]["version"]}]})
    assert wrong.status_code == 409
    now = {c["id"]: c for c in all_cells(tech.get(f"/api/cases/{cid}").json())}
    assert not now[first["id"]]["reviewed"] and now[first["id"]]["label"] == "blast"

    # Unknown label: 400; no CSRF token: 403.
    assert tech.post(f"/api/cases/{cid}/confirm", json={"label": "dragon"}).status_code == 400
    token = tech.headers.pop("X-CSRF-Token")
    assert tech.post(f"/api/cases/{cid}/confirm", json={"label": "blast"}).status_code == 403
    tech.headers["X-CSRF-Token"] = token

    # The undo of a single confirm: the same label, back to unreviewed (`unconfirm`).
    cell = now[first["id"]]
    confirmed = label(tech, cid, cell, "blast").json()["cell"]
    assert confirmed["reviewed"] and events(tech, cid)[-1]["action"] == "confirm"
    back = label(tech, cid, confirmed, "blast", reviewed=False).json()["cell"]
    assert not back["reviewed"] and events(tech, cid)[-1]["action"] == "unconfirm"


def test_bulk_confirm_leaves_excluded_fields_and_signed_cases_alone(station, bccd: Path
                                                                    ) -> None:
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    case = analysed_case(tech, bccd, "FAST-2", fields=2)
    cid = case["id"]
    kept, dropped = case["fields"]
    assert kept["cells"] and dropped["cells"]
    for cell in kept["cells"] + dropped["cells"]:
        assert label(tech, cid, cell, "neutrophil", reviewed=False).status_code == 200
    assert tech.post(f"/api/fields/{dropped['id']}/exclude",
                     json={"reason": "blurred"}).status_code == 200
    result = tech.post(f"/api/cases/{cid}/confirm", json={"label": "neutrophil"}).json()
    assert sorted(result["changed"]) == sorted(c["id"] for c in kept["cells"])
    frozen = next(f for f in result["case"]["fields"] if f["id"] == dropped["id"])
    assert not any(c["reviewed"] for c in frozen["cells"])

    case = result["case"]
    signed = reviewer.post(f"/api/cases/{cid}/sign-off",
                           json={"revision": case["revision"], "reason": "test"})
    assert signed.status_code == 200, signed.text
    locked = tech.post(f"/api/cases/{cid}/confirm", json={"label": "neutrophil"})
    assert locked.status_code == 423


def test_a_deleted_cell_restored(station, bccd: Path) -> None:
    tech = station.client("tess")
    case = analysed_case(tech, bccd, "FAST-3", fields=1)
    cid = case["id"]
    cell = all_cells(case)[0]
    counted = case["differential"]["counted"]
    gone = tech.delete(f"/api/cases/{cid}/cells/{cell['id']}",
                       params={"version": cell["version"]}).json()
    assert gone["deleted"] and gone["differential"]["counted"] == counted - (
        cell["label"] != "not_wbc")
    # The crop of a deleted cell is gone; restore needs the version the delete returned.
    assert tech.get(f"/api/cells/{cell['id']}/crop").status_code == 404
    stale = tech.post(f"/api/cases/{cid}/cells/{cell['id']}/restore",
                      json={"version": cell["version"]})
    assert stale.status_code == 409
    back = tech.post(f"/api/cases/{cid}/cells/{cell['id']}/restore",
                     json={"version": gone["cell"]["version"]})
    assert back.status_code == 200, back.text
    restored = back.json()
    assert not restored["deleted"] and restored["differential"]["counted"] == counted
    # Each edit's answer carries the sign-off check too (the page's open panel follows it).
    assert restored["sign_off_check"] == tech.get(f"/api/cases/{cid}").json()["sign_off_check"]
    assert restored["cell"]["label"] == cell["label"] and restored["cell"]["box"] == cell["box"]
    assert cell["id"] in {c["id"] for c in all_cells(tech.get(f"/api/cases/{cid}").json())}
    event = events(tech, cid)[-1]
    assert event["action"] == "restore_cell" and event["cell_id"] == cell["id"]
    # Not deleted: nothing to restore; another case's cell or no cell: 404.
    again = tech.post(f"/api/cases/{cid}/cells/{cell['id']}/restore",
                      json={"version": restored["cell"]["version"]})
    assert again.status_code == 409 and "not deleted" in again.json()["detail"]
    other = new_case(tech, "FAST-3b")
    assert tech.post(f"/api/cases/{other['id']}/cells/{cell['id']}/restore",
                     json={"version": 1}).status_code == 404
    assert tech.post(f"/api/cases/{cid}/cells/999999/restore",
                     json={"version": 1}).status_code == 404

    # A drawn box undone (deleted) and redone (restored) keeps its id.
    field = case["fields"][0]
    drawn = tech.post(f"/api/cases/{cid}/cells", json={
        "field_id": field["id"], "box": [5, 5, 60, 60], "label": "unidentified"}).json()["cell"]
    undone = tech.delete(f"/api/cases/{cid}/cells/{drawn['id']}",
                         params={"version": drawn["version"]}).json()
    redone = tech.post(f"/api/cases/{cid}/cells/{drawn['id']}/restore",
                       json={"version": undone["cell"]["version"]}).json()
    assert redone["cell"]["id"] == drawn["id"] and redone["cell"]["origin"] == "user"

    # A signed case refuses a restore like every edit (423).
    reviewer = station.client("rita", "reviewer")
    gone = tech.delete(f"/api/cases/{cid}/cells/{drawn['id']}",
                       params={"version": redone["cell"]["version"]}).json()
    case = tech.get(f"/api/cases/{cid}").json()
    for c in all_cells(case):
        if c["label"] == "unidentified":
            label(tech, cid, c, "neutrophil")
    case = tech.get(f"/api/cases/{cid}").json()
    assert reviewer.post(f"/api/cases/{cid}/sign-off", json={
        "revision": case["revision"], "reason": "test"}).status_code == 200
    locked = tech.post(f"/api/cases/{cid}/cells/{drawn['id']}/restore",
                       json={"version": gone["cell"]["version"]})
    assert locked.status_code == 423


def test_enlarged_crops_and_scaled_down_fields(sqlite_station, bccd: Path) -> None:
    tech = sqlite_station.client("tess")
    case = analysed_case(tech, bccd, "FAST-4", fields=1)
    cell = all_cells(case)[0]
    field = case["fields"][0]

    def size(response) -> tuple[int, int]:
        assert response.status_code == 200, response.text
        with PILImage.open(io.BytesIO(response.content)) as image:
            return image.size

    small = size(tech.get(f"/api/cells/{cell['id']}/crop"))
    large = size(tech.get(f"/api/cells/{cell['id']}/crop", params={"size": 384}))
    assert max(small) <= 128 and max(large) <= 384 and max(large) >= max(small)
    assert tech.get(f"/api/cells/{cell['id']}/crop", params={"size": 5000}).status_code == 422
    full = size(tech.get(f"/api/fields/{field['id']}/image"))
    assert full == (field["width"], field["height"])
    thumb = size(tech.get(f"/api/fields/{field['id']}/image", params={"max_side": 200}))
    assert max(thumb) == 200
    assert size(tech.get(f"/api/fields/{field['id']}/image",
                         params={"max_side": 4096})) == full
    assert tech.get(f"/api/fields/{field['id']}/image",
                    params={"max_side": 1}).status_code == 422
