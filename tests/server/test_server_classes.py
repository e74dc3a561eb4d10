"""Issue #16 item 2, the full class list: every class a reviewer may assign, through the
API, the differential (lab convention), sign-off, the exports and the page's taxonomy."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from station_helpers import FIELDS, upload, wait_analysed

from leukodiff.data.sources.generic import read_class_folders, read_voc
from leukodiff.server.db import LABELS
from leukodiff.server.exports import LOINC_PER_100_WBC, LOINC_PERCENT, LOINC_PERCENT_OTHER
from leukodiff.server.state import PACKAGE
from leukodiff.taxonomy import REVIEW_CLASSES, CellType, Counting, ObjectKind

TYPES = [str(t) for t in CellType]
# One cell of each class (two neutrophils and two NRBC): 8 white cells, 5 cells outside.
LABELLED = (["neutrophil"] * 2 + ["lymphocyte", "band_neutrophil", "immature_granulocyte",
            "blast", "reactive_lymphocyte", "plasma_cell"]
            + ["nucleated_red_cell"] * 2 + ["smudge_cell", "artefact", "not_wbc"])


def add(client, case_id: int, field_id: int, i: int, label: str) -> dict:
    x, y = 10 + 60 * (i % 10), 10 + 60 * (i // 10)
    response = client.post(f"/api/cases/{case_id}/cells", json={
        "field_id": field_id, "box": [x, y, x + 50, y + 50], "label": label})
    assert response.status_code == 201, response.text
    return response.json()


def test_every_class_is_assigned_counted_signed_and_exported(sqlite_station, bccd: Path,
                                                             tmp_path: Path) -> None:
    tech = sqlite_station.client("tess")
    reviewer = sqlite_station.client("rita", "reviewer")
    case = tech.post("/api/cases", json={"accession": "CLASSES-1", "target_count": 10}).json()
    assert upload(tech, case["id"], bccd / FIELDS[0]).status_code == 200
    field = wait_analysed(tech, case["id"])["fields"][0]
    for cell in field["cells"]:  # only the cells placed below
        assert tech.delete(f"/api/cases/{case['id']}/cells/{cell['id']}",
                           params={"version": cell["version"]}).is_success

    # Each class through the API: drawn as a neutrophil, then relabelled (PATCH).
    for i, label in enumerate(LABELLED):
        cell = add(tech, case["id"], field["id"], i, "neutrophil")["cell"]
        edit = tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                          json={"label": label, "version": cell["version"]})
        assert edit.status_code == 200, edit.text
        assert edit.json()["cell"]["label"] == label
    refused = tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                         json={"label": "megakaryocyte", "version": cell["version"] + 1})
    assert refused.status_code == 400 and "blast" in refused.json()["detail"]

    case = tech.get(f"/api/cases/{case['id']}").json()
    diff = case["differential"]
    assert diff["counts"] == {c.name: LABELLED.count(c.name) for c in REVIEW_CLASSES}
    # The WBC count: blast, band, IG, reactive lymphocyte and plasma cell are white cells;
    # NRBC, smudge cells, artefacts and not-a-white-cell objects are not in it.
    assert diff["counted"] == diff["identified"] == diff["reviewed"] == 8
    assert diff["percentages"]["blast"] == 12.5 and diff["percentages"]["neutrophil"] == 25.0
    assert set(diff["percentages"]) == {c.name for c in REVIEW_CLASSES
                                        if c.counting is Counting.DIFFERENTIAL}
    assert sum(diff["percentages"].values()) == pytest.approx(100, abs=0.2)
    assert diff["per_100_wbc"] == {"nucleated_red_cell": 25.0, "smudge_cell": 12.5}
    assert diff["not_wbc"] == 1 and diff["unidentified"] == 0
    # Sign-off compares the WBC count with the target: 8 of 10, not 13 live cells.
    check = case["sign_off_check"]
    assert check["counted"] == 8 and check["unreviewed"] == 0
    assert check["problems"] == ["8 of 10 target cells"]

    for i in (13, 14):  # two more white cells reach the target: no reason needed
        add(tech, case["id"], field["id"], i, "neutrophil")
    case = tech.get(f"/api/cases/{case['id']}").json()
    diff, check = case["differential"], case["sign_off_check"]
    assert check["counted"] == 10 and check["problems"] == []
    assert diff["percentages"]["neutrophil"] == 40.0 and diff["percentages"]["blast"] == 10.0
    assert diff["per_100_wbc"] == {"nucleated_red_cell": 20.0, "smudge_cell": 10.0}
    signed = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                           json={"revision": case["revision"]})
    assert signed.status_code == 200, signed.text
    assert signed.json()["differential"] == diff

    # CSV: one row per cell, each with how its class is counted.
    rows = list(csv.DictReader(io.StringIO(
        tech.get(f"/api/cases/{case['id']}/export.csv").text)))
    assert Counter(r["label"] for r in rows) == Counter([*LABELLED, "neutrophil", "neutrophil"])
    counting = {c.name: str(c.counting) for c in REVIEW_CLASSES}
    assert all(r["counting"] == counting[r["label"]] for r in rows)
    assert sum(r["counting"] in ("differential", "unclassified") for r in rows) == 10

    # JSON: the same differential.
    exported = tech.get(f"/api/cases/{case['id']}/export.json").json()
    assert exported["differential"] == diff

    # FHIR: a % of WBC per white-cell class seen (the five types always), NRBC and smudge
    # cells per 100 WBC; the conclusion names what was reported apart.
    bundle = tech.get(f"/api/cases/{case['id']}/fhir.json").json()
    report = bundle["entry"][0]["resource"]
    observations = [e["resource"] for e in bundle["entry"][1:]]
    assert len(report["result"]) == len(observations) == 12
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    assert by_code["26446-5"]["valueQuantity"]["value"] == 10.0  # blasts
    assert by_code["26446-5"]["valueQuantity"]["code"] == "%"
    assert by_code["26511-6"]["valueQuantity"]["value"] == 40.0  # neutrophils
    assert by_code["30180-4"]["valueQuantity"]["value"] == 0.0  # basophils: 0 is a result
    nrbc = by_code["19048-8"]["valueQuantity"]
    assert nrbc["value"] == 20.0 and nrbc["code"] == "/100{WBCs}"
    assert by_code["34992-8"]["valueQuantity"]["value"] == 10.0  # smudge cells
    assert by_code["26508-2"]["note"][0]["text"] == "1 of 10 white cells counted"  # bands
    conclusion = report["conclusion"]
    assert conclusion.startswith("10 white cells counted over 1 analysed field(s); "
                                 "2 nucleated red cell(s) (20.0 per 100 white cells) "
                                 "reported apart; 1 smudge cell(s) (10.0 per 100 white "
                                 "cells) reported apart; 1 objects marked not a white cell "
                                 "and 1 artefact(s), not counted."), conclusion

    # Training data: only what the models learn (the five types; other white cells as
    # plain WBC boxes, NRBC / smudge / artefact / not-a-white-cell unboxed).
    archive = zipfile.ZipFile(io.BytesIO(
        tech.get(f"/api/cases/{case['id']}/training.zip").content))
    archive.extractall(tmp_path / "export")
    crops = read_class_folders(tmp_path / "export" / "cells")
    assert not crops.skipped
    assert Counter(str(c.cell_type) for c in crops.records) == {"neutrophil": 4,
                                                                 "lymphocyte": 1}
    voc = read_voc(tmp_path / "export" / "fields")
    assert not voc.skipped and len(voc.records) == 1
    boxes = voc.records[0].boxes
    assert len(boxes) == 10 and all(b.kind is ObjectKind.WBC for b in boxes)
    assert sum(b.cell_type is None for b in boxes) == 5  # band, IG, blast, reactive, plasma
    readme = (tmp_path / "export" / "README.txt").read_text()
    assert "9 reviewed cell(s) of the station's other classes" in readme, readme

    # The adaptation counters stay on the five types the models learn.
    adaptation = tech.get("/api/adaptation").json()
    assert list(adaptation["types"]) == TYPES
    assert adaptation["types"]["neutrophil"]["reviewed"] == 4


def test_fhir_codes_cover_every_reported_class() -> None:
    """Every white-cell class has a % code, every per-100-WBC class a ratio code."""
    percent = {str(t) for t in LOINC_PERCENT} | set(LOINC_PERCENT_OTHER)
    assert percent == {c.name for c in REVIEW_CLASSES if c.counting is Counting.DIFFERENTIAL}
    assert set(LOINC_PER_100_WBC) == {c.name for c in REVIEW_CLASSES if c.counting.per_100_wbc}
    codes = [code for code, _ in [*LOINC_PERCENT.values(), *LOINC_PERCENT_OTHER.values(),
                                  *LOINC_PER_100_WBC.values()]]
    assert len(codes) == len(set(codes)) == 12


def test_the_page_gets_every_class_from_the_taxonomy(sqlite_station) -> None:
    tech = sqlite_station.client("tess")
    served = tech.get("/api/taxonomy").json()
    classes = served["classes"]
    assert [c["name"] for c in classes] == LABELS
    keys = [c["key"] for c in classes]
    assert len(set(keys)) == len(keys) and {"1", "u", "x", "8"} <= set(keys)
    assert len({c["colour"] for c in classes}) == len(classes)
    assert [c["name"] for c in classes if c["model_type"]] == TYPES
    assert set(served["counting"]) == {str(c) for c in Counting}

    # The case page carries the same JSON (escaped for a script block) and lists the keys.
    case = tech.post("/api/cases", json={"accession": "<PAGE>-1"}).json()
    page = tech.get(f"/cases/{case['id']}").text
    block = re.search(r'<script type="application/json" id="taxonomy">(.*?)</script>', page,
                      re.S).group(1)
    assert json.loads(block) == served
    for c in classes:
        assert f"<kbd>{c['key'].upper()}</kbd> {html.escape(c['title'])}," in page

    # No class list or colour copied into the page's script or style sheet.
    script = (PACKAGE / "static" / "app.js").read_text()
    style = (PACKAGE / "static" / "app.css").read_text()
    for c in classes:
        assert c["colour"] not in script and c["colour"] not in style
        if c["name"] not in ("unidentified",):  # app.js draws new boxes as unidentified
            assert f'"{c["name"]}"' not in script, c["name"]
