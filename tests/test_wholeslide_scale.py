"""A whole slide's scale and counting area: microns per pixel from the file resize the
windows to the detector's scale (the same synthetic slide written at twice the
magnification finds the same cells); without them the red-cell ruler estimates the scale
and the result says so; thick and thin areas are told from the monolayer by red-cell
coverage, and the monolayer's area and cells reported (or counted alone)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tifffile = pytest.importorskip("tifffile")

from slide_helpers import MPP, build_slide  # noqa: E402

from leukodiff.pipeline.boxes import box_iou  # noqa: E402
from leukodiff.pipeline.monolayer import MONOLAYER  # noqa: E402
from leukodiff.pipeline.scale import DETECTOR_MPP, RED_CELL_PIXELS  # noqa: E402
from leukodiff.pipeline.wholeslide import analyze_whole_slide  # noqa: E402


@pytest.fixture(scope="module")
def bccd(shared_data: Path) -> Path:
    return shared_data / "bccd" / "BCCD"


@pytest.fixture(scope="module")
def analyzer():
    from leukodiff.pipeline import Analyzer

    with Analyzer.load(threads=1) as loaded:
        yield loaded


def boxes_of(result) -> np.ndarray:
    return np.array([c.box for c in result.field.cells], dtype=np.float32).reshape(-1, 4)


def test_detector_scale_is_bccd_red_cells(bccd):
    """RED_CELL_PIXELS: the median side of BCCD's whole, round red-cell boxes."""
    sides = []
    for xml in (bccd / "Annotations").glob("*.xml"):
        for obj in ET.parse(xml).getroot().iter("object"):
            if obj.findtext("name") != "RBC":
                continue
            x0, y0, x1, y1 = (float(obj.find("bndbox").findtext(k))
                              for k in ("xmin", "ymin", "xmax", "ymax"))
            if x0 > 2 and y0 > 2 and x1 < 638 and y1 < 478 and 0.8 < (x1 - x0) / max(
                    y1 - y0, 1) < 1.25:
                sides.append((x1 - x0 + y1 - y0) / 2)
    assert len(sides) > 2000
    assert np.median(sides) == pytest.approx(RED_CELL_PIXELS, rel=0.02)
    assert pytest.approx(7.5 / RED_CELL_PIXELS) == DETECTOR_MPP


def test_twice_the_magnification_finds_the_same_cells(bccd, analyzer, tmp_path):
    one = tmp_path / "one.tif"
    known = build_slide(bccd, one, levels=2)
    canvas = tifffile.imread(one)
    two = tmp_path / "two.tif"  # the same slide scanned at twice the magnification
    larger = Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2),
                                            Image.Resampling.BICUBIC)
    tifffile.imwrite(two, np.asarray(larger), tile=(256, 256), compression="zlib",
                     photometric="rgb", resolution=(2e4 / MPP, 2e4 / MPP),
                     resolutionunit="CENTIMETER")
    native, zoomed = analyze_whole_slide(analyzer, one), analyze_whole_slide(analyzer, two)
    assert native.shrink == 1.0 and zoomed.shrink == pytest.approx(2.0)
    assert zoomed.mpp == pytest.approx(MPP / 2) and zoomed.mpp_source == "TIFF resolution tags"
    assert zoomed.windows == native.windows  # windows of the same extent in micrometres
    a, b = boxes_of(native), boxes_of(zoomed) / 2
    assert len(a) == len(b) >= len(known)
    iou = box_iou(a, b)
    assert (iou.max(1) >= 0.8).all() and (iou.max(0) >= 0.8).all()
    assert ((box_iou(known, b) >= 0.5).sum(1) == 1).all()
    types = {c.cell_type for c in native.field.cells}, {c.cell_type for c in zoomed.field.cells}
    assert types[0] == types[1]
    # the areas are the same in mm^2 (four times the pixels)
    area = native.counting_area.area_mm2, zoomed.counting_area.area_mm2
    assert sum(area[1].values()) == pytest.approx(sum(area[0].values()), rel=1e-3)


def test_without_microns_per_pixel_the_ruler_measures_and_says_so(bccd, analyzer, tmp_path):
    from typer.testing import CliRunner

    from leukodiff.cli import app

    path = tmp_path / "no_mpp.tif"
    known = build_slide(bccd, path, mpp=None, levels=2)
    result = analyze_whole_slide(analyzer, path)
    assert result.mpp_source == "red-cell ruler (no microns per pixel in the file)"
    assert result.ruler_ratio is not None and result.mpp == pytest.approx(
        DETECTOR_MPP / result.ruler_ratio)
    assert any("no microns per pixel in the file" in note for note in result.notes)
    assert ((box_iou(known, boxes_of(result)) >= 0.5).sum(1) == 1).all()
    given = analyze_whole_slide(analyzer, path, shrink=1.0)  # the caller's scale: no ruler
    assert given.ruler_ratio is None and given.mpp is None and given.shrink == 1.0
    assert "as asked" in " ".join(given.notes)
    assert np.allclose(boxes_of(given), boxes_of(result))
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["analyze", str(path), "--out", str(out), "--threads", "1"])
    assert done.exit_code == 0, done.output
    assert "no microns per pixel in the file" in " ".join(done.output.split())
    notes = json.loads((out / "differential.json").read_text())["notes"]
    assert any("red-cell ruler estimates" in n["note"] for n in notes)
    # no scale in the file and no red cells to measure: analysed at its own pixels, said
    bare = np.full((1200, 1600, 3), 214, dtype=np.uint8)
    bare[500:560, 600:660] = (120, 60, 140)  # something, but no red cells
    plain = tmp_path / "plain.tif"
    with tifffile.TiffWriter(plain) as tif:
        tif.write(bare, tile=(256, 256), photometric="rgb", subifds=1)
        tif.write(np.ascontiguousarray(bare[::2, ::2]), tile=(256, 256), photometric="rgb",
                  subfiletype=1)
    unknown = analyze_whole_slide(analyzer, plain)
    assert unknown.mpp is None and unknown.shrink == 1.0
    assert "ruler found too few red cells" in " ".join(unknown.notes)
    assert unknown.counting_area.area_mm2 is None


def zones_slide(bccd: Path, path: Path) -> np.ndarray:
    """A 3840x960 slide in three parts of 2x2 BCCD fields: the fields as they are (a
    monolayer), three fields laid over one another (thick: overlapping red cells), and
    fields with four in five of their blocks blanked to glass (thin). Its known white
    cells (the monolayer's fields' own)."""
    jpegs = sorted((bccd / "JPEGImages").glob("*.jpg"))
    monolayer = ["BloodImage_00017", "BloodImage_00022", "BloodImage_00040",
                 "BloodImage_00048"]
    others = [p for p in jpegs if p.stem not in monolayer][:8]

    def field(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)

    glass = np.array([201.0, 200.0, 195.0])
    canvas = np.empty((960, 3840, 3), dtype=np.uint8)
    rows, columns = np.mgrid[:480, :640]
    known = []
    for i, stem in enumerate(monolayer):
        y, x = 480 * (i // 2), 640 * (i % 2)
        canvas[y:y + 480, x:x + 640] = field(bccd / "JPEGImages" / f"{stem}.jpg")
        for obj in ET.parse(bccd / "Annotations" / f"{stem}.xml").getroot().iter("object"):
            if obj.findtext("name") == "WBC":
                box = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin",
                                                                       "xmax", "ymax")]
                known.append([box[0] + x, box[1] + y, box[2] + x, box[3] + y])
        layers = field(others[i]) * field(others[i + 4])[::-1] * field(others[i - 1])[:, ::-1]
        canvas[y:y + 480, 1280 + x:1920 + x] = np.clip(layers / glass ** 2, 0, 255)
        sparse = field(others[i + 4])
        sparse[(rows // 120 + 2 * (columns // 160)) % 5 != 0] = glass
        canvas[y:y + 480, 2560 + x:3200 + x] = sparse
    with tifffile.TiffWriter(path) as tif:  # pyramidal: read as a whole slide
        tif.write(canvas, tile=(256, 256), compression="zlib", photometric="rgb", subifds=1,
                  resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
        tif.write(np.ascontiguousarray(canvas[::2, ::2]), tile=(256, 256), subfiletype=1,
                  compression="zlib", photometric="rgb")
    return np.array(known, dtype=np.float32)


def test_counting_area_is_the_monolayer(bccd, analyzer, tmp_path):
    path = tmp_path / "zones.tif"
    known = zones_slide(bccd, path)
    result = analyze_whole_slide(analyzer, path)
    area = result.counting_area
    # windows wholly inside one part: 640x480, starting every 400 px across
    assert area.windows["monolayer"] >= 6 and area.windows["thick"] >= 3
    assert area.windows["thin"] >= 3 and area.windows["background"] == 0
    assert sum(area.area_px.values()) == pytest.approx(3840 * 960)
    assert area.area_px["monolayer"] == pytest.approx(1280 * 960, rel=0.35)
    assert area.area_mm2["monolayer"] == pytest.approx(area.area_px["monolayer"] * (MPP / 1e3)
                                                       ** 2)
    assert sum(area.cells.values()) == len(result.field.cells)
    assert area.cells["thick"] > 0  # the three overlaid fields' white cells
    inside = boxes_of(result)
    centres = (inside[:, 0] + inside[:, 2]) / 2
    # the monolayer's cells: its own fields' (and, at most, some a window straddling the
    # thick part's edge holds: the window counts as monolayer when it is mostly that)
    assert len(known) <= area.cells["monolayer"] <= (centres < 1280 + 440).sum()
    summary = " ".join(result.summary())
    assert f"{area.cells['monolayer']} white cells inside it" in summary
    assert tuple(result.to_dict()["counting_area"]["band"]) == MONOLAYER

    only = analyze_whole_slide(analyzer, path, monolayer_only=True)
    boxes = boxes_of(only)
    assert len(boxes) == area.cells["monolayer"] and only.counting_area.restricted
    assert ((box_iou(known, boxes) >= 0.5).sum(1) == 1).all()
    assert ((boxes[:, 0] + boxes[:, 2]) / 2 < 1280 + 200).all()
    assert "only these counted" in " ".join(only.summary())

    from typer.testing import CliRunner

    from leukodiff.cli import app

    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["analyze", str(path), "--out", str(out), "--threads", "1",
                                    "--monolayer-only"])
    assert done.exit_code == 0, done.output
    assert "only these counted" in " ".join(done.output.split())
    (record,) = (out / "fields").glob("*.json")
    counted = json.loads(record.read_text())["whole_slide"]["counting_area"]
    assert counted["counted"] == "monolayer only"
    assert counted["cells"]["monolayer"] == len(boxes)
    assert json.loads((out / "differential.json").read_text())["total"] == len(boxes)
    refused = CliRunner().invoke(app, ["analyze", str(tmp_path), "--slides", "--out",
                                       str(tmp_path / "slides"), "--monolayer-only"])
    assert refused.exit_code == 1 and "--monolayer-only works on whole-slide files" in \
        " ".join(refused.output.split())
