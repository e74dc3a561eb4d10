"""Slides as the unit of `analyze` (issue #17): grouping by folder and by manifest, a report
per slide and a run summary, --target, --workers, --resume, and bad inputs; real BCCD
fields and the shipped models (3 slides of 2-3 fields: a few seconds a run)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from leukodiff.cli import app
from leukodiff.reports.slides import (
    AnalyzerSpec,
    SlideInputError,
    SlideProgress,
    SlidesInterrupted,
    analyze_slides,
    slides_from_folders,
    slides_from_manifest,
)

runner = CliRunner()
FIELDS = {"A": ["BloodImage_00002.jpg", "BloodImage_00000.jpg", "BloodImage_00001.jpg"],
          "B": ["BloodImage_00010.jpg", "BloodImage_00011.jpg"],
          "C": ["BloodImage_00020.jpg", "BloodImage_00021.jpg"]}


@pytest.fixture(scope="module")
def slides_dir(shared_data, tmp_path_factory) -> Path:
    """SLIDES/A (3 fields), B (2), C (2 + an unreadable file), empty (no images)."""
    root = tmp_path_factory.mktemp("slides") / "in"
    for slide, names in FIELDS.items():
        (root / slide).mkdir(parents=True)
        for name in names:
            shutil.copy(shared_data / "bccd" / "BCCD" / "JPEGImages" / name, root / slide)
    (root / "C" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    return root


def analyze(*args: str):
    result = runner.invoke(app, ["analyze", *args])
    assert "Traceback" not in result.output, result.output
    return result


def flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def summary(out: Path) -> dict[str, dict]:
    with (out / "summary.csv").open() as handle:
        return {row["slide"]: row for row in csv.DictReader(handle)}


def comparable(out: Path) -> dict[str, object]:
    """Everything a run writes per slide, less what depends on the clock."""
    files: dict[str, object] = {}
    for path in sorted((out / "slides").rglob("*")):
        if not path.is_file():
            continue
        key = str(path.relative_to(out))
        if path.name in ("differential.json", "detections.coco.json"):
            data = json.loads(path.read_text())
            for key_ in ("seconds", "note"):  # the run, not the slide
                data.get("slide", {}).pop(key_, None)
            data.pop("info", None)
            files[key] = data
        elif path.name == "report.html":
            files[key] = [line for line in path.read_text().splitlines()
                          if not line.startswith("Generated")]
        else:
            files[key] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def one_worker(slides_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("one") / "out"
    result = analyze(str(slides_dir), "--slides", "--out", str(out), "--workers", "1")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_a_folder_of_slides_gives_a_report_per_slide_and_a_run_summary(one_worker):
    out, output = one_worker
    rows = summary(out)
    assert list(rows) == ["A", "B", "C", "empty"]
    assert {s: rows[s]["status"] for s in rows} == {"A": "done", "B": "done", "C": "done",
                                                    "empty": "no images"}
    assert [rows[s]["fields_analysed"] for s in "ABC"] == ["3", "2", "2"]
    assert rows["C"]["fields_failed"] == "1" and rows["C"]["fields_total"] == "3"
    for slide in "ABC":
        folder = out / "slides" / slide
        for name in ("report.html", "cells.csv", "differential.json", "detections.coco.json"):
            assert (folder / name).is_file(), (slide, name)
        cells = list(csv.DictReader((folder / "cells.csv").open()))
        assert len(cells) == int(rows[slide]["white_cells"]) > 0
        assert {c["slide"] for c in cells} == {slide}
        assert len(list((folder / "cells").glob("*.jpg"))) == len(cells)  # thumbnails
        diff = json.loads((folder / "differential.json").read_text())
        assert diff["total"] == len(cells) and diff["slide"]["status"] == "done"
        percent = sum(float(rows[slide][f"pct_{t}"]) for t in
                      ("lymphocyte", "monocyte", "neutrophil", "eosinophil", "basophil"))
        assert percent == pytest.approx(100, abs=0.05)
        report = (folder / "report.html").read_text()
        assert f"Slide {slide}" in report and "file-name order" in report
        assert "src='cells/" in report and "base64" not in report  # files, not memory
    # fields in file-name order: A's 00002 is the third field whatever the listing order
    assert sorted(p.name for p in (out / "slides" / "A" / "fields").glob("*.png")) == [
        "0001_BloodImage_00000.png", "0002_BloodImage_00001.png", "0003_BloodImage_00002.png"]
    skipped = json.loads((out / "slides" / "C" / "differential.json").read_text())["skipped"]
    assert [Path(s["input"]).name for s in skipped] == ["zz_broken.jpg"]
    assert not (out / "slides" / "empty").exists()
    assert "no image files" in rows["empty"]["note"]
    data = json.loads((out / "summary.json").read_text())
    assert [row["slide"] for row in data["slides"]] == ["A", "B", "C", "empty"]
    assert "Run summary: 4 slide(s)" in output and "slide empty: no images" in output
    if importlib.util.find_spec("pyarrow") is None:
        assert "pyarrow is not installed" in output


def test_cells_parquet_holds_the_csv_rows(one_worker):
    pytest.importorskip("pyarrow")
    import pandas as pd

    out, _ = one_worker
    for slide in "ABC":
        table = pd.read_parquet(out / "slides" / slide / "cells.parquet")
        rows = pd.read_csv(out / "slides" / slide / "cells.csv")
        assert list(table.columns) == list(rows.columns) and len(table) == len(rows)
        assert list(table["label"]) == list(rows["label"])
        assert (table["x0"] - rows["x0"]).abs().max() <= 0.05


def test_two_workers_write_what_one_worker_writes(slides_dir, one_worker, tmp_path):
    out = tmp_path / "out"
    result = analyze(str(slides_dir), "--slides", "--out", str(out), "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "2 worker(s)" in result.output
    assert comparable(out) == comparable(one_worker[0])


@pytest.mark.parametrize("workers", ["1", "2"])  # 2: fields analysed ahead are dropped
def test_target_stops_counting_a_slide_in_file_name_order(slides_dir, one_worker, tmp_path,
                                                          workers):
    out = tmp_path / "out"
    result = analyze(str(slides_dir), "--slides", "--out", str(out), "--target", "2",
                     "--workers", workers)
    assert result.exit_code == 0, result.output
    rows, full = summary(out), summary(one_worker[0])
    a = rows["A"]  # one white cell per field of A
    assert a["status"] == "target reached" and (a["fields_taken"], a["white_cells"]) == ("2", "2")
    fields = sorted(p.name for p in (out / "slides" / "A" / "fields").iterdir())
    assert fields == [f"000{i}_BloodImage_0000{i - 1}.{ext}" for i in (1, 2)
                      for ext in ("geojson", "json", "png")]
    assert len(list((out / "slides" / "A" / "cells").iterdir())) == 2
    report = (out / "slides" / "A" / "report.html").read_text()
    assert "target of 2 white cells reached after 2 of 3 fields" in report
    one = (out / "slides" / "A" / "cells.csv").read_text().splitlines()
    assert one == (one_worker[0] / "slides" / "A" / "cells.csv").read_text().splitlines()[:3]
    for slide in "BC":  # the first field that reaches 2 closes the slide
        assert int(rows[slide]["white_cells"]) >= 2
        assert int(rows[slide]["fields_taken"]) <= int(full[slide]["fields_taken"])
    if workers == "2":  # the same outputs as one worker
        again = tmp_path / "one"
        assert analyze(str(slides_dir), "--slides", "--out", str(again), "--target", "2",
                       "--workers", "1").exit_code == 0
        assert comparable(out) == comparable(again)


def test_a_manifest_groups_fields_by_slide_id(shared_data, tmp_path):
    images = shared_data / "bccd" / "BCCD" / "JPEGImages"
    local = tmp_path / "scans"
    local.mkdir()
    shutil.copy(images / "BloodImage_00011.jpg", local)
    (tmp_path / "folder").mkdir()
    shutil.copy(images / "BloodImage_00020.jpg", tmp_path / "folder")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide_id,path\n"
                        f"P-7,{images / 'BloodImage_00010.jpg'}\n"
                        "S 2,folder\n"  # a folder of the slide's fields, relative
                        "P-7,scans/BloodImage_00011.jpg\n")
    slides = slides_from_manifest(manifest)
    assert [(s.slide_id, [p.name for p in s.fields]) for s in slides] == [
        ("P-7", ["BloodImage_00010.jpg", "BloodImage_00011.jpg"]),
        ("S 2", ["BloodImage_00020.jpg"])]
    out = tmp_path / "out"
    result = analyze("--manifest", str(manifest), "--out", str(out), "--workers", "1")
    assert result.exit_code == 0, result.output
    rows = summary(out)
    assert list(rows) == ["P-7", "S 2"] and rows["P-7"]["fields_analysed"] == "2"
    assert rows["S 2"]["report"] == "slides/S_2/report.html"
    assert (out / "slides" / "S_2" / "report.html").is_file()


def test_manifest_problems_are_all_listed_before_any_work(shared_data, tmp_path):
    image = shared_data / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00010.jpg"
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide_id,path\nP1,{image}\nP1,missing1.jpg\nP2,{image}\n"
                        "P3,gone/missing2.jpg\n")
    out = tmp_path / "out"
    result = analyze("--manifest", str(manifest), "--out", str(out))
    assert result.exit_code == 1
    text = flat(result)
    assert "3 problem(s), nothing was analysed" in text
    assert "line 3: missing1.jpg: no such file or folder" in text
    assert "line 5: gone/missing2.jpg: no such file or folder" in text
    assert "is named twice (first on line 2)" in text
    assert not out.exists()
    manifest.write_text("slide,file\nP1,x.jpg\n")
    result = analyze("--manifest", str(manifest), "--out", str(out))
    assert result.exit_code == 1 and "columns slide_id,path" in flat(result)
    manifest.write_text("slide_id,path\n")
    result = analyze("--manifest", str(manifest), "--out", str(out))
    assert result.exit_code == 1 and "names no slides" in flat(result)


def test_resume_skips_finished_slides_and_redoes_a_partial_one(slides_dir, one_worker,
                                                              tmp_path):
    out = tmp_path / "out"
    shutil.copytree(one_worker[0], out)
    (out / "slides" / "B" / "differential.json").unlink()  # B was cut short
    (out / "slides" / "B" / "fields" / "stray.png").write_bytes(b"half written")
    finished = (out / "slides" / "A" / "differential.json").stat().st_mtime_ns
    refused = analyze(str(slides_dir), "--slides", "--out", str(out), "--workers", "1")
    assert refused.exit_code == 1 and "--resume" in refused.output
    assert "--overwrite" in refused.output
    result = analyze(str(slides_dir), "--slides", "--out", str(out), "--workers", "1",
                     "--resume")
    assert result.exit_code == 0, result.output
    rows = summary(out)
    assert rows["A"]["note"] == rows["C"]["note"] == ("finished by an earlier run: skipped "
                                                      "(--resume)")
    assert "redone from scratch" in rows["B"]["note"] and rows["B"]["status"] == "done"
    assert (out / "slides" / "A" / "differential.json").stat().st_mtime_ns == finished
    assert not (out / "slides" / "B" / "fields" / "stray.png").exists()
    assert comparable(out) == comparable(one_worker[0])
    both = analyze(str(slides_dir), "--slides", "--out", str(out), "--resume", "--overwrite")
    assert both.exit_code == 1 and "give one" in both.output


class CtrlC(SlideProgress):
    """Ctrl-C as the first field of slide B is done (slide A finished before it)."""

    def field_done(self, slide) -> None:
        if slide.slide_id == "B":
            raise KeyboardInterrupt


def test_ctrl_c_keeps_finished_slides_and_resume_finishes_the_run(slides_dir, one_worker,
                                                                  tmp_path):
    slides, _ = slides_from_folders([slides_dir])
    out = tmp_path / "out"
    with pytest.raises(SlidesInterrupted) as interrupted:
        analyze_slides(slides, out, AnalyzerSpec(), progress=CtrlC())
    statuses = {row["slide"]: row["status"] for row in interrupted.value.run.rows}
    assert statuses == {"A": "done", "B": "interrupted", "C": "not started",
                        "empty": "not started"}
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    assert not (out / "slides" / "B" / "differential.json").exists()
    run = analyze_slides(slides, out, AnalyzerSpec(), resume=True)
    assert [row["status"] for row in run.rows] == ["done", "done", "done", "no images"]
    assert comparable(out) == comparable(one_worker[0])


def test_folder_rules_and_bad_slide_inputs(slides_dir, tmp_path):
    slides, notes = slides_from_folders([slides_dir / "B"])  # no subfolders: one slide
    assert [(s.slide_id, len(s.fields)) for s in slides] == [("B", 2)] and not notes
    mixed = tmp_path / "mixed"
    shutil.copytree(slides_dir / "B", mixed / "B")
    shutil.copy(slides_dir / "A" / "BloodImage_00000.jpg", mixed)
    slides, notes = slides_from_folders([mixed])
    assert [s.slide_id for s in slides] == ["B"] and "belong to no slide" in notes[0]
    with pytest.raises(SlideInputError, match="also the id of"):
        slides_from_folders([slides_dir, mixed])
    result = analyze(str(tmp_path / "nowhere"), "--slides", "--out", str(tmp_path / "o"))
    assert result.exit_code == 1 and "no such folder" in flat(result)
    result = analyze(str(slides_dir / "empty"), "--slides", "--out", str(tmp_path / "o"))
    assert result.exit_code == 1 and "no slide could be analysed" in flat(result)
    assert "no images" in flat(result)
    result = analyze(str(slides_dir / "A"), "--out", str(tmp_path / "o2"), "--workers", "2")
    assert result.exit_code == 1 and "--slides" in flat(result)
