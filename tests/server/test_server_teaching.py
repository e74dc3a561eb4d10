"""Teaching the models a lab (issue #15, part 3): the model's confidence on every cell (the
review page orders by it) and the reviewed cells per type `leukodiff adapt` needs, counted
over signed cases, on the real app, database and Analyzer."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from pathlib import Path

from station_helpers import FIELDS, all_cells, new_case, upload, wait_analysed

from leukodiff.server.db import CellRecord
from leukodiff.taxonomy import MIN_REVIEWED_PER_TYPE, CellType

TYPES = [str(t) for t in CellType]


def draw(client, case: dict, label: str, n: int = 1) -> list[dict]:
    """`n` boxes drawn on the case's first field (a person's cells: reviewed, no confidence)."""
    field = case["fields"][0]
    drawn = []
    for i in range(n):
        x = 10 + 30 * i
        response = client.post(f"/api/cases/{case['id']}/cells",
                               json={"field_id": field["id"], "box": [x, 10, x + 25, 35],
                                     "label": label})
        assert response.status_code == 201, response.text
        drawn.append(response.json()["cell"])
    return drawn


def relabel(client, case: dict, cell: dict, label: str) -> None:
    response = client.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                            json={"label": label, "version": cell["version"]})
    assert response.status_code == 200, response.text


def expected_progress(reviewed: Counter, signed_cases: int) -> dict:
    return {"minimum": MIN_REVIEWED_PER_TYPE, "signed_cases": signed_cases,
            "types": {t: {"reviewed": reviewed[t],
                          "needed": max(0, MIN_REVIEWED_PER_TYPE - reviewed[t])}
                      for t in TYPES},
            "ready": all(reviewed[t] >= MIN_REVIEWED_PER_TYPE for t in TYPES)}


def table_row(page: str, label: str) -> str:
    """The HTML of one type's row in the cases page's adaptation table."""
    return page.split(f'<tr data-label="{label}">', 1)[1].split("</tr>", 1)[0]


def test_cells_carry_the_models_type_confidence(sqlite_station, bccd: Path) -> None:
    """Each model cell's confidence in its type is the analysis's top probability; a drawn
    cell has none."""
    tech = sqlite_station.client("tess")
    case = new_case(tech, "CONF-1")
    assert upload(tech, case["id"], bccd / FIELDS[0]).status_code == 200
    case = wait_analysed(tech, case["id"])
    model = all_cells(case)
    assert model, "the Analyzer found no white cell in a BCCD field"
    with sqlite_station.app.state.leukodiff.db.reading() as session:
        for cell in model:
            stored = session.get(CellRecord, cell["id"])
            assert 0 < cell["model_confidence"] <= 1
            assert cell["model_confidence"] == max(stored.probabilities.values())
    assert draw(tech, case, "monocyte")[0]["model_confidence"] is None


def test_adaptation_counts_reviewed_cells_of_signed_cases_only(station, bccd: Path) -> None:
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    assert tech.get("/api/adaptation").json() == expected_progress(Counter(), 0)

    # The case to be signed: model cells reviewed (relabelled, or marked not a
    # white cell) or left as the model's call, drawn cells, and a drawn cell deleted.
    case = new_case(tech, "TEACH-1")
    assert upload(tech, case["id"], *(bccd / f for f in FIELDS)).status_code == 200
    case = wait_analysed(tech, case["id"])
    model = sorted(all_cells(case), key=lambda c: c["id"])
    reviewed: Counter = Counter()
    relabel(tech, case, model[0], "eosinophil")
    reviewed["eosinophil"] += 1
    relabel(tech, case, model[1], "not_wbc")  # reviewed, but not a white cell
    left = 0
    for cell in model[2:]:
        if cell["label"] == "unidentified":  # sign-off needs every cell named
            relabel(tech, case, cell, "neutrophil")
            reviewed["neutrophil"] += 1
        else:
            left += 1  # the model's call, never looked at: not a label
    assert left, "the test needs a model cell left unreviewed"
    draw(tech, case, "lymphocyte", MIN_REVIEWED_PER_TYPE + 1)
    draw(tech, case, "basophil", 2)
    reviewed.update({"lymphocyte": MIN_REVIEWED_PER_TYPE + 1, "basophil": 2})
    gone = draw(tech, case, "monocyte")[0]
    assert tech.delete(f"/api/cases/{case['id']}/cells/{gone['id']}",
                       params={"version": gone["version"]}).status_code == 200

    # An open case with reviewed cells of its own.
    other = new_case(tech, "TEACH-2")
    assert upload(tech, other["id"], bccd / FIELDS[0]).status_code == 200
    other = wait_analysed(tech, other["id"])
    draw(tech, other, "monocyte", MIN_REVIEWED_PER_TYPE)

    # Nothing is signed yet: nothing counts.
    assert tech.get("/api/adaptation").json() == expected_progress(Counter(), 0)

    case = tech.get(f"/api/cases/{case['id']}").json()
    signed = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                           json={"revision": case["revision"], "reason": "test sample"})
    assert signed.status_code == 200, signed.text
    progress = tech.get("/api/adaptation").json()
    assert progress == expected_progress(reviewed, 1)
    assert progress["types"]["lymphocyte"] == {"reviewed": MIN_REVIEWED_PER_TYPE + 1,
                                               "needed": 0}
    assert progress["types"]["monocyte"] == {"reviewed": 0, "needed": MIN_REVIEWED_PER_TYPE}
    assert not progress["ready"]

    # The same cells `leukodiff adapt --station` learns from: the training export's crops.
    archive = zipfile.ZipFile(io.BytesIO(
        tech.get(f"/api/cases/{case['id']}/training.zip").content))
    exported = Counter(name.split("/")[1] for name in archive.namelist()
                       if name.startswith("cells/"))
    assert {t: exported[t] for t in TYPES} == {t: reviewed[t] for t in TYPES}

    # The cases page shows the same table.
    page = tech.get("/").text
    assert 'id="adaptation"' in page and "1 signed case(s)" in page
    for t in TYPES:
        row = table_row(page, t)
        assert f'<td class="reviewed">{progress["types"][t]["reviewed"]}</td>' in row
        assert f'<td class="needed">{progress["types"][t]["needed"] or "none"}</td>' in row
