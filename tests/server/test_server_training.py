"""Reviewed cells exported as training data round-trip through `leukodiff train`'s readers."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from pathlib import Path

from station_helpers import FIELDS, all_cells, upload, wait_analysed
from typer.testing import CliRunner

from leukodiff.data.sources.generic import read_class_folders, read_voc
from leukodiff.server.cli import export_training_command
from leukodiff.taxonomy import CellType, ObjectKind


def signed_case(station, bccd: Path) -> dict:
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    case = tech.post("/api/cases", json={"accession": "TRAIN/1 x"}).json()
    upload(tech, case["id"], *(bccd / name for name in FIELDS[:2]))
    case = wait_analysed(tech, case["id"])
    cells = all_cells(case)
    # Correct the first cell, mark the second not-a-WBC (if any), classify the unidentified.
    labels = {cells[0]["id"]: "eosinophil"}
    if len(cells) > 1:
        labels[cells[1]["id"]] = "not_wbc"
    for cell in cells:
        label = labels.get(cell["id"], "neutrophil" if cell["label"] == "unidentified" else None)
        if label:
            assert tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                              json={"label": label, "version": cell["version"]}).is_success
    tech.post(f"/api/cases/{case['id']}/cells", json={"field_id": case["fields"][1]["id"],
                                                      "box": [5, 5, 80, 80],
                                                      "label": "monocyte"})
    case = tech.get(f"/api/cases/{case['id']}").json()
    signed = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                           json={"revision": case["revision"], "reason": "test sample"})
    assert signed.status_code == 200, signed.text
    return signed.json()


def expected_counts(case: dict) -> Counter:
    """The cell types of the cells a person reviewed: only those are exported."""
    return Counter(c["label"] for c in all_cells(case)
                   if c["reviewed"] and c["label"] in set(CellType))


def test_training_zip_reads_back(sqlite_station, bccd: Path, tmp_path: Path) -> None:
    case = signed_case(sqlite_station, bccd)
    tech = sqlite_station.client("tom")
    response = tech.get(f"/api/cases/{case['id']}/training.zip")
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        archive.extractall(tmp_path / "export")

    cells = read_class_folders(tmp_path / "export" / "cells")
    assert not cells.skipped
    assert Counter(str(c.cell_type) for c in cells.records) == expected_counts(case)

    fields = read_voc(tmp_path / "export" / "fields")
    assert not fields.skipped and len(fields.records) == 2
    boxes = [b for f in fields.records for b in f.boxes]
    assert all(b.kind is ObjectKind.WBC for b in boxes)
    assert Counter(str(b.cell_type) for b in boxes) == expected_counts(case)
    for field in fields.records:
        assert (field.width, field.height) == (640, 480)


def test_export_training_command_writes_a_folder(sqlite_station, bccd: Path,
                                                 tmp_path: Path) -> None:
    import typer

    case = signed_case(sqlite_station, bccd)
    app = typer.Typer()
    app.command()(export_training_command)
    out = tmp_path / "training"
    result = CliRunner().invoke(app, ["--out", str(out), "--data-dir",
                                      str(sqlite_station.settings.data_dir)])
    assert result.exit_code == 0, result.output
    loaded = read_class_folders(out / "cells")
    assert Counter(str(c.cell_type) for c in loaded.records) == expected_counts(case)
    again = CliRunner().invoke(app, ["--out", str(out), "--data-dir",
                                     str(sqlite_station.settings.data_dir)])
    assert again.exit_code == 1 and "empty --out folder" in again.output


def test_adapt_reads_a_stations_signed_cases(sqlite_station, bccd: Path, tmp_path: Path
                                             ) -> None:
    """`leukodiff adapt --station`: the signed cases' reviewed cells, grouped by case; one
    case is too little to hold any out, and says so; no database is a clear error."""
    from leukodiff.cli import app

    signed_case(sqlite_station, bccd)
    data_dir = str(sqlite_station.settings.data_dir)
    result = CliRunner().invoke(app, ["adapt", "--station", data_dir,
                                      "--out", str(tmp_path / "set")])
    said = " ".join(result.output.split())
    assert result.exit_code == 1, said
    assert "from 1 signed case(s)" in said and "at least two cases" in said
    assert not (tmp_path / "set").exists()
    missing = CliRunner().invoke(app, ["adapt", "--station", str(tmp_path / "nothing"),
                                       "--out", str(tmp_path / "set")])
    assert missing.exit_code == 1
    assert "no review station database" in " ".join(missing.output.split())
    assert not (tmp_path / "nothing").exists()


def test_training_zip_holds_only_reviewed_cells(sqlite_station, bccd: Path,
                                                tmp_path: Path) -> None:
    """Cells nobody reviewed (the model's calls, left as they were) went into training.zip.

    Field A: its cell confirmed; field B: left alone; field C: a missed cell drawn, the
    model's cell left alone. Only A's cell and C's drawn cell are exported as crops, only
    field A (every cell reviewed) as a VOC pair; README.txt says what was left out.
    """
    tech = sqlite_station.client("tess")
    reviewer = sqlite_station.client("rita", "reviewer")
    case = tech.post("/api/cases", json={"accession": "REV-1"}).json()
    upload(tech, case["id"], *(bccd / name for name in FIELDS))
    case = wait_analysed(tech, case["id"])
    field_a, field_b, field_c = case["fields"]
    model_cells = all_cells(case)
    assert all(c["label"] in set(CellType) for c in model_cells), model_cells
    for cell in field_a["cells"]:
        assert tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                          json={"label": cell["label"], "version": cell["version"]}).is_success
    drawn = tech.post(f"/api/cases/{case['id']}/cells", json={
        "field_id": field_c["id"], "box": [5, 5, 80, 80], "label": "basophil"})
    assert drawn.status_code == 201, drawn.text
    case = tech.get(f"/api/cases/{case['id']}").json()
    signed = reviewer.post(f"/api/cases/{case['id']}/sign-off",
                           json={"revision": case["revision"], "reason": "test sample"})
    assert signed.status_code == 200, signed.text

    response = tech.get(f"/api/cases/{case['id']}/training.zip")
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        archive.extractall(tmp_path / "export")
    reviewed = {field_a["cells"][0]["id"], drawn.json()["cell"]["id"]}
    crops = sorted(p.name for p in (tmp_path / "export" / "cells").rglob("*.png"))
    assert crops == sorted(f"REV-1-field{f}-cell{c['id']}.png"
                           for f, c in [(field_a["id"], field_a["cells"][0]),
                                        (field_c["id"], drawn.json()["cell"])])
    assert {c["id"] for c in all_cells(case) if c["reviewed"]} == reviewed
    assert not any(f"field{field_b['id']}-" in name for name in crops)
    fields = read_voc(tmp_path / "export" / "fields")
    assert [f.image.name for f in fields.records] == [f"REV-1-field{field_a['id']}.png"]
    readme = (tmp_path / "export" / "README.txt").read_text()
    left_out = len(model_cells) - len(field_a["cells"])
    assert f"{left_out} cell(s) left out" in readme, readme
    assert "2 field(s) left out" in readme, readme
