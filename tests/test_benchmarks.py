"""The benchmark suite runs: quick mode end to end, and a report of nothing measured.

No timing is asserted (CI machines are shared and slow); what is checked is
that every section produces rows, that nothing crashes (a missing backend or
ultralytics is a "skipped" row, never a failure) and that the page is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK_SECTIONS = {"latency", "onnx", "level2", "coldstart", "scaling", "slides", "wholeslide",
                  "profile"}


@pytest.mark.slow
def test_quick_run_writes_page_figure_and_rows(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "bench"
    # two timed runs (quick: 3) are enough to show --runs is honoured and summarised
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--runs", "2",
                           "--out", str(out), "--data-root", str(shared_data)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    page = (out / "BENCHMARKS.md").read_text()
    assert (out / "figures" / "benchmarks.png").stat().st_size > 0
    rows = json.loads((out / "figures" / "benchmarks.json").read_text())["rows"]
    assert {row["section"] for row in rows} == QUICK_SECTIONS
    assert not [row for row in rows if row["status"] == "failed"], done.stdout
    by_name = {row["name"]: row for row in rows}
    assert {"leukodiff onnx", "leukodiff torch", "fasterrcnn_mobilenet_v3_large_320_fpn",
            "fasterrcnn_mobilenet_v3_large_fpn", "yolov8n"} <= set(by_name)
    torch_row = by_name["leukodiff torch"]
    assert torch_row["status"] == "ok"
    assert torch_row["metrics"]["runs"] == 2 and torch_row["peak_rss_mb"] > 0
    assert by_name["fasterrcnn_mobilenet_v3_large_320_fpn"]["status"] == "ok"
    assert all(not row.get("network_attempts") for row in rows)
    onnx = {row["name"]: row for row in rows if row["section"] == "onnx"}
    for threads in ("1 thread", "2 threads"):
        assert onnx[f"leukodiff onnx, {threads}"]["status"] == "ok"
        assert onnx[f"fasterrcnn_mobilenet_v3_large_320_fpn onnx, {threads}"]["status"] == "ok"
        assert {f"yolov8n onnx, {threads}", f"yolo11n onnx, {threads}"} <= set(onnx)
    workers, memory = [row for row in rows if row["section"] == "slides"]
    assert set(workers["metrics"]["configs"]) >= {"1 worker", "2 workers"}
    assert all(r["slides_finished"] == 2 for r in workers["metrics"]["configs"].values())
    assert set(memory["metrics"]["sizes"]) == {"4", "40"}
    wsi = by_name["analyze the synthetic slide"]["metrics"]
    assert wsi["known_cells"] > 0 and wsi["slide_peak_rss_mb"] > 0
    for heading in ("## Targets", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.",
                    "## 7.", "## 8.", "## 9.", "Quick run", "leukodiff torch",
                    "Targets (issue #17)"):
        assert heading in page


def test_report_of_a_run_where_everything_was_skipped(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import report, run

    args = run.parse_args(["--quick"])
    rows = [{"section": job.section, "name": job.name, "status": "skipped",
             "reason": "not here"} for job in run.plan(args)]
    meta = report.machine(args, None, None, 1.0, ["BloodImage_00001.jpg"])
    paths = report.write(rows, meta, tmp_path)
    assert all(path.exists() for path in paths)
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert "skipped: not here" in page and "**met**" not in page


def test_summary_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.common import summarize

    stats = summarize([float(v) for v in range(1, 11)])
    assert stats["runs"] == 10 and stats["median_ms"] == 5.5
    assert stats["p90_ms"] == pytest.approx(9.1)
    assert summarize([]) == {"runs": 0}


def test_synthetic_slide_levels_and_known_cells(tmp_path: Path, shared_data: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's whole slide: every pyramid level is level 0 subsampled, the
    resolution tags say its microns per pixel, and each known cell lies on a pasted field
    whose pixels are the BCCD field's own."""
    tifffile = pytest.importorskip("tifffile")
    monkeypatch.syspath_prepend(str(REPO))
    from PIL import Image

    from benchmarks import wholeslide

    path = tmp_path / "slide.tif"
    made = wholeslide.build({"side": 3000, "grid": 2, "path": str(path),
                             "data_root": str(shared_data)})
    assert made["pasted_fields"] == 4 and made["levels"][1] == (1500, 1500)
    layout = json.loads(Path(f"{path}.json").read_text())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        level0 = page.asarray()
        assert level0.shape == (3000, 3000, 3)
        assert np.array_equal(page.pages[0].asarray(), level0[::2, ::2])
        assert page.tags["XResolution"].value[0] / page.tags["XResolution"].value[1] == \
            pytest.approx(1e4 / wholeslide.MPP)
    assert (level0[:100, :100] == wholeslide.PLAIN).all()
    for (index, x, y), known in zip(layout["placements"], layout["known"], strict=True):
        field = np.asarray(Image.open(layout["fields"][index]).convert("RGB"))
        assert np.array_equal(level0[y:y + 480, x:x + 640], field)
        assert x + wholeslide.INSIDE <= known[0] < known[2] <= x + 640 - wholeslide.INSIDE


def test_slide_tree_links_fields(tmp_path: Path, make_image, monkeypatch) -> None:
    """25 fields from 3 images: slides of 10, every field a hard link to one of 3 copies."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.slides import slide_tree

    sources = [make_image(f"src/{n}.jpg", seed=n) for n in range(3)]
    root = slide_tree(tmp_path / "work", sources, 25, 10)
    folders = sorted(p.name for p in root.iterdir())
    assert folders == ["slide_00000", "slide_00001", "slide_00002"]
    fields = sorted(root.glob("*/*.jpg"))
    assert len(fields) == 25 and len(list((root / "slide_00002").iterdir())) == 5
    assert {f.stat().st_ino for f in fields} == {
        p.stat().st_ino for p in (tmp_path / "work" / "sources").iterdir()}


def test_quick_synthetic_slide_counts_each_known_cell_once(tmp_path: Path, shared_data: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The quick run's 6,000 px slide (3x3 pasted fields), analysed whole: its microns
    per pixel are the fields' own (no resizing), and each known cell is found once; its
    cell at 3443..3601 x 3533..3671 was once counted twice (a piece boxed short of a
    window's edge; tests/test_tiling.py pins that case's boxes)."""
    pytest.importorskip("tifffile")
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import wholeslide
    from leukodiff.pipeline import Analyzer
    from leukodiff.pipeline.boxes import box_iou
    from leukodiff.pipeline.wholeslide import analyze_whole_slide

    path = tmp_path / "slide.ome.tif"
    wholeslide.build({"side": 6000, "grid": 3, "path": str(path),
                      "data_root": str(shared_data)})
    known = np.array(json.loads(Path(f"{path}.json").read_text())["known"], dtype=np.float32)
    with Analyzer.load(threads=1) as analyzer:
        result = analyze_whole_slide(analyzer, path)
    assert result.shrink == 1.0
    boxes = np.array([c.box for c in result.field.cells], dtype=np.float32).reshape(-1, 4)
    iou = box_iou(known, boxes)
    assert ((iou >= 0.5).sum(1) == 1).all(), iou.max(1)
    assert (np.sort(iou, axis=1)[:, -2] < 0.1).all(), np.sort(iou, axis=1)[:, -2]
