"""Whole-slide input (`pipeline.wholeslide`): a synthetic pyramidal TIFF built from BCCD
fields with known white cells; every known cell found once across window borders,
background windows skipped, microns per pixel read from the file, bad files refused
with a clear message; the grid-bucketed merge equals the all-pairs one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tifffile = pytest.importorskip("tifffile")

from slide_helpers import CANVAS, FIELDS, MPP, build_slide  # noqa: E402

from leukodiff.pipeline.boxes import Detections, box_iou  # noqa: E402
from leukodiff.pipeline.tiling import merge_tiles, merge_tiles_local, tile_origins  # noqa: E402
from leukodiff.pipeline.wholeslide import (  # noqa: E402
    DETECT_BLOCKS,
    STRUCTURE_MARGIN,
    SlideError,
    analyze_whole_slide,
    crop_to_structure,
    group_blocks,
    is_whole_slide,
    open_slide,
    plan_windows,
)


@pytest.fixture(scope="module")
def bccd(shared_data: Path) -> Path:
    return shared_data / "bccd" / "BCCD"


@pytest.fixture(scope="module")
def slide_file(bccd: Path, tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("wsi") / "slide.ome.tif"
    return path, build_slide(bccd, path)


@pytest.fixture(scope="module")
def analyzer():
    from leukodiff.pipeline import Analyzer

    with Analyzer.load(threads=1) as loaded:
        yield loaded


def test_reads_levels_regions_and_mpp(slide_file, bccd, tmp_path):
    path, _ = slide_file
    assert is_whole_slide(path)
    full = tifffile.imread(path)
    with open_slide(path) as slide:
        assert (slide.width, slide.height) == CANVAS
        assert slide.levels == [CANVAS, (CANVAS[0] // 2, CANVAS[1] // 2),
                                (CANVAS[0] // 4, CANVAS[1] // 4)]
        assert slide.mpp == pytest.approx(MPP) and slide.mpp_source == "TIFF resolution tags"
        # a region across file tiles, and one past the slide's edge (cut to the slide)
        assert np.array_equal(slide.read(250, 300, 890, 780), full[300:780, 250:890])
        edge = slide.read(2400, 1800, 2700, 2000)
        assert np.array_equal(edge, full[1800:, 2400:])
        assert slide.thumbnail().shape == (CANVAS[1] // 4, CANVAS[0] // 4, 3)
    plain = tmp_path / "no_mpp.tif"
    build_slide(bccd, plain, mpp=None, levels=2)
    with open_slide(plain) as slide:
        assert slide.mpp is None and slide.mpp_source == "none"


def test_background_windows_skipped(slide_file):
    path, _ = slide_file
    with open_slide(path) as slide:
        keep, skip = plan_windows(slide, (640, 480))
    assert skip and keep
    for window in skip:  # a skipped window holds no pasted field
        for x, y in FIELDS.values():
            assert (window.x1 <= x or window.x0 >= x + 640 or window.y1 <= y
                    or window.y0 >= y + 480)


def test_every_known_cell_found_once(slide_file, analyzer):
    path, known = slide_file
    # the known cells straddle window borders: each is cut by some window's inner edge
    xs, ys = tile_origins(CANVAS[0], 640, 240), tile_origins(CANVAS[1], 480, 240)
    edges_x = sorted({*xs, *(x + 640 for x in xs)} - {0, CANVAS[0]})
    edges_y = sorted({*ys, *(y + 480 for y in ys)} - {0, CANVAS[1]})
    assert all(any(b[0] < e < b[2] for e in edges_x) or any(b[1] < e < b[3] for e in edges_y)
               for b in known)
    result = analyze_whole_slide(analyzer, path)
    boxes = np.array([c.box for c in result.field.cells], dtype=np.float32).reshape(-1, 4)
    iou = box_iou(known, boxes)
    assert ((iou >= 0.5).sum(1) == 1).all(), iou.max(1)  # every known cell, once
    # no second box on a known cell (a double count at a border would be one)
    assert (np.sort(iou, axis=1)[:, -2] < 0.1).all() if boxes.shape[0] > 1 else True
    # any other box is a cell cut by a pasted field's own edge (BCCD leaves those unboxed)
    for box in boxes[(iou >= 0.5).sum(0) == 0]:
        assert any(abs(box[0] - x) < 8 or abs(box[1] - y) < 8 or abs(box[2] - x - 640) < 8
                   or abs(box[3] - y - 480) < 8 for x, y in FIELDS.values()), box
    assert result.mpp == pytest.approx(MPP)
    assert result.skipped_windows > 0 and 0 < result.windows < result.blocks
    assert result.shrink == 1.0 and result.retiled == 0


def test_detector_windows_are_groups_of_the_counting_blocks(slide_file):
    """The counting area is decided on field-size blocks, the detector runs on larger
    windows made of them: every block to read lies wholly inside one window, the windows
    still overlap by the blocks' 240 px, and each known cell lies whole in some window,
    clear of its edges (16 px: not a cut piece), after the windows are cut to the
    smear's structure (the plain background right and below is not detected)."""
    from leukodiff.pipeline.monolayer import glass_level
    from leukodiff.pipeline.tiling import EDGE_MARGIN

    path, known = slide_file
    with open_slide(path) as slide:
        thumbnail = slide.thumbnail()
        blocks, skipped = plan_windows(slide, (640, 480), thumbnail=thumbnail)
        grouped = group_blocks(blocks, skipped, DETECT_BLOCKS)
        windows = crop_to_structure([w for w, _ in grouped], thumbnail,
                                    glass_level(thumbnail), CANVAS, STRUCTURE_MARGIN)
    assert sorted(b.box for _, members in grouped for b in members) == sorted(
        b.box for b in blocks)  # each block in exactly one group
    for window, members in grouped:
        assert all(window.x0 <= b.x0 and window.y0 <= b.y0 and b.x1 <= window.x1
                   and b.y1 <= window.y1 for b in members)
        assert window.x1 - window.x0 <= 640 + (DETECT_BLOCKS[0] - 1) * 400  # blocks <= 400 apart
        assert window.y1 - window.y0 <= 480 + (DETECT_BLOCKS[1] - 1) * 240
    assert len(windows) < len(blocks) / 3  # larger windows: fewer runs, less overlap
    area = lambda ws: sum((w.x1 - w.x0) * (w.y1 - w.y0) for w in ws)  # noqa: E731
    assert area(windows) < area(w for w, _ in grouped) < area(blocks)
    for x0, y0, x1, y1 in known:
        assert any(w.x0 + EDGE_MARGIN < x0 and w.y0 + EDGE_MARGIN < y0
                   and x1 < w.x1 - EDGE_MARGIN and y1 < w.y1 - EDGE_MARGIN for w in windows)


def test_a_window_that_fills_the_detectors_cap_is_run_in_tiles(slide_file, analyzer):
    """The network keeps at most `detections_per_image` boxes a run: a window that fills
    it may hold more cells, so it is run again in field-size tiles. With the cap taken
    as 2, most windows are; every known cell is still found once."""
    path, known = slide_file
    cap = analyzer.spec["detections_per_image"]
    analyzer.spec["detections_per_image"] = 2  # what the slide path reads, not the network
    try:
        result = analyze_whole_slide(analyzer, path)
    finally:
        analyzer.spec["detections_per_image"] = cap
    assert result.retiled > 0 and result.to_dict()["windows_retiled"] == result.retiled
    boxes = np.array([c.box for c in result.field.cells], dtype=np.float32).reshape(-1, 4)
    iou = box_iou(known, boxes)
    assert ((iou >= 0.5).sum(1) == 1).all() and (np.sort(iou, axis=1)[:, -2] < 0.1).all()


def test_cli_whole_slide_and_bad_files(slide_file, tmp_path):
    from typer.testing import CliRunner

    from leukodiff.cli import app

    path, known = slide_file
    runner = CliRunner()
    out = tmp_path / "out"
    done = runner.invoke(app, ["analyze", str(path), "--out", str(out), "--threads", "1"])
    assert done.exit_code == 0, done.output
    summary = json.loads((out / "differential.json").read_text())
    assert summary["fields"] == 1 and summary["total"] >= len(known)
    (overview,) = (out / "fields").glob("*.overview.png")
    assert max(Image.open(overview).size) <= 2048
    (record,) = (out / "fields").glob("*.json")
    assert json.loads(record.read_text())["whole_slide"]["mpp"] == pytest.approx(MPP)
    assert not list((out / "fields").glob("*[0-9]_slide.png"))  # no full-size image
    assert (out / "cells.csv").read_text().count("\n") == summary["total"] + 1
    assert (out / "report.html").is_file()

    data = path.read_bytes()
    # names free of the reasons: the reason must come from the message, not the path
    truncated = tmp_path / "cut.ome.tif"
    truncated.write_bytes(data[:len(data) // 2])
    garbage = tmp_path / "junk.ome.tif"
    garbage.write_bytes(b"not a tiff at all" * 100)
    tiny = tmp_path / "tiny.tif"
    tifffile.imwrite(tiny, np.full((20, 20, 3), 200, dtype=np.uint8))
    assert not is_whole_slide(tiny)  # an ordinary (tiny) image, analysed as a field
    with pytest.raises(SlideError, match="truncated"):
        open_slide(truncated)
    with pytest.raises(SlideError, match="corrupt or truncated"):
        open_slide(garbage)
    for bad, reason in ((truncated, "truncated"), (garbage, "corrupt or truncated"),
                        (tiny, "too small")):
        failed = runner.invoke(app, ["analyze", str(bad), "--out", str(tmp_path / bad.stem),
                                     "--threads", "1"])
        assert failed.exit_code == 1
        assert reason in " ".join(failed.output.split()), failed.output


def test_openslide_formats_name_the_package(tmp_path):
    svs = tmp_path / "scan.svs"
    svs.write_bytes(b"II*\x00")
    assert is_whole_slide(svs)
    try:
        import openslide  # noqa: F401
    except ImportError:
        with pytest.raises(SlideError, match="openslide-python"):
            open_slide(svs)
    else:
        with pytest.raises(SlideError):
            open_slide(svs)


def test_local_merge_equals_the_all_pairs_merge():
    """Cells on a 3000x2000 image seen by 640x480 windows with 240 px overlap: each
    window reports the cells it holds (whole, or cut at its edge, with jitter and, now
    and then, a missed or extra box); both merges give the same cells."""
    rng = np.random.default_rng(7)
    size = (3000, 2000)
    windows = [(x, y, x + 640, y + 480) for y in tile_origins(size[1], 480, 240)
               for x in tile_origins(size[0], 640, 240)]
    centres = rng.uniform([0, 0], size, size=(400, 2))
    sides = rng.uniform(60, 300, size=(400, 1))  # some larger than the overlap
    cells = np.concatenate([centres - sides / 2, centres + sides / 2], axis=1)
    found = []
    for x0, y0, x1, y1 in windows:
        clipped = np.concatenate([np.maximum(cells[:, :2], [x0, y0]),
                                  np.minimum(cells[:, 2:], [x1, y1])], axis=1)
        inside = (clipped[:, 2] - clipped[:, 0] > 10) & (clipped[:, 3] - clipped[:, 1] > 10)
        inside &= rng.random(len(cells)) > 0.05
        boxes = clipped[inside] - [x0, y0, x0, y0] + rng.normal(0, 3, (inside.sum(), 4))
        boxes = np.clip(boxes, 0, [640, 480, 640, 480])
        found.append(Detections.of(boxes, rng.integers(1, 3, len(boxes)),
                                   rng.uniform(0.3, 1.0, len(boxes))))
    local = merge_tiles_local(found, windows, size)  # its speed: a benchmark, not a test
    reference = merge_tiles(found, windows, size)
    assert len(reference) > 300
    order = np.lexsort(reference.boxes.T), np.lexsort(local.boxes.T)
    assert np.allclose(reference.boxes[order[0]], local.boxes[order[1]])
    assert np.array_equal(reference.labels[order[0]], local.labels[order[1]])
    assert np.allclose(reference.scores[order[0]], local.scores[order[1]])


def test_reading_window_by_window_keeps_memory_bounded(slide_file, tmp_path):
    """A slide of 118 MB of pixels in one level (the synthetic canvas repeated, written tile
    by tile) read window by window, its thumbnail subsampled block by block: the memory
    held stays a small part of the slide (the tile cache, a band, the thumbnail)."""
    import tracemalloc

    from leukodiff.pipeline.wholeslide import iter_windows

    path, _ = slide_file
    canvas = tifffile.imread(path)
    width, height, tile = 10240, 3840, 256

    def tiles(factor: int):
        for ty in range(0, -(-height // factor), tile):
            for tx in range(0, -(-width // factor), tile):
                ys = (np.arange(ty, ty + tile) * factor) % canvas.shape[0]
                xs = (np.arange(tx, tx + tile) * factor) % canvas.shape[1]
                yield canvas[ys][:, xs]

    big = tmp_path / "big.tif"  # one level: its thumbnail is read block by block
    tifffile.imwrite(big, tiles(1), shape=(height, width, 3), dtype=np.uint8,
                     tile=(tile, tile), compression="zlib", photometric="rgb")
    tracemalloc.start()
    try:
        with open_slide(big) as slide:
            keep, skip = plan_windows(slide, (640, 480))
            assert len(slide.levels) == 1
            seen = sum(image.width for _, image in iter_windows(slide, keep))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == 640 * len(keep) and skip
    assert peak < 0.4 * width * height * 3, peak / 1e6  # ~37 MB: tile cache 24, thumbnail, a block


def test_cells_are_classified_from_the_part_of_their_window_their_crops_take():
    """Of a home window only the part the cells' crops take is read: every crop (at every
    scale, near the window's edges too, where a crop is pushed inside) is the same square
    of pixels as from the whole window."""
    from leukodiff.data.crops import crop_cell
    from leukodiff.data.records import Box
    from leukodiff.pipeline.wholeslide import _crop_extent

    rng = np.random.default_rng(3)
    home = (1000, 2000, 2440, 2960)  # a 1440x960 window, level-0 pixels
    whole = Image.fromarray(rng.integers(0, 255, (960, 1440, 3), dtype=np.uint8))
    boxes = np.array([[1010, 2005, 1150, 2140], [1005, 2300, 1180, 2470],  # at its edge
                      [1600, 2400, 1800, 2600], [1700, 2450, 1790, 2560],
                      [2300, 2820, 2435, 2955]], dtype=np.float32)  # the last at its corner
    scales = [1.5, 2.6]
    for cells in (boxes[:4], boxes[1:2], boxes[4:]):  # alone, a cell at an edge: its crop
        # is pushed inside the window, past where its own square would end
        x0, y0, x1, y1 = _crop_extent(home, cells, scales)
        assert (x1 - x0) * (y1 - y0) < 1440 * 960  # less than the window is read
        part = whole.crop((x0 - home[0], y0 - home[1], x1 - home[0], y1 - home[1]))
        for bx0, by0, bx1, by1 in cells.tolist():
            for scale in scales:
                from_whole = crop_cell(whole, Box(bx0 - home[0], by0 - home[1],
                                                  bx1 - home[0], by1 - home[1]), scale)
                from_part = crop_cell(part, Box(bx0 - x0, by0 - y0, bx1 - x0, by1 - y0), scale)
                assert np.array_equal(np.asarray(from_whole), np.asarray(from_part))
    assert _crop_extent(home, boxes[2:4], [1.0]) == (1598, 2398, 1801, 2601)


def test_read_ahead_reads_one_ahead_in_its_thread_and_stops_when_closed():
    """Whole slides read the next window (and cell region) in a reader thread while the
    detector runs (`read_ahead`): in order, one ahead, nothing more once closed, so the
    slide can be read elsewhere (or closed) right after."""
    import threading

    from leukodiff.pipeline.wholeslide import read_ahead

    reads = []

    def read(item: int) -> int:
        reads.append((item, threading.current_thread().name))
        return item * item

    assert list(read_ahead([1, 2, 3], read)) == [(1, 1), (2, 4), (3, 9)]
    assert all(name.startswith("slide-reader") for _, name in reads)
    reads.clear()
    reading = read_ahead([1, 2, 3, 4], read)
    assert next(reading) == (1, 1)
    reading.close()  # waits for the read ahead (2); 3 and 4 are never read
    assert [item for item, _ in reads] == [1, 2]
    assert list(read_ahead([], read)) == []
