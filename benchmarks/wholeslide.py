"""A synthetic whole slide with known cells: built, then analysed window by window.

The slide (`build`): a pyramidal, tiled, zlib TIFF of SIDE x SIDE pixels (50,000 in
the full run) with microns per pixel in its resolution tags, plain smear
background except a block of BCCD VOC-test fields pasted side by side (a strip
of background between them), each field holding one annotated white cell well
inside it. Written tile by tile from a generator, every pyramid level rendered
from the same placements, so building it never holds the slide in memory.

The analysis (`analyze`, its own process: its peak RSS is the analysis's):
`pipeline.wholeslide.analyze_whole_slide` with the shipped models on
onnxruntime, then the same distinct fields analysed one by one (the per-field
reference, same Analyzer, same threads). A known cell is one that per-field
analysis finds (IoU >= 0.5 with the annotation), so the check is on the
windowing and the merge, not on the detector: each must be found exactly once
on the slide (a second box on it, IoU > 0.1, would be a double count at a
window border).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import bench_fields, load_rgb, peak_rss_mb
from leukodiff.pipeline.scale import DETECTOR_MPP

PLAIN = (214, 200, 206)  # a smear's background colour, flat (as tests/test_wholeslide.py)
# The pasted BCCD fields are at the detector's own scale (BCCD's red cells define it), so
# the slide says so: a made-up 0.25 um would make the analysis enlarge every window 3.5x.
MPP = DETECTOR_MPP
TILE = 512
GAP = 64  # background between pasted fields
INSIDE = 20  # a known cell is at least this far inside its field
FIELD_MP = 640 * 480 / 1e6


def known_fields(count: int, data_root: str | None) -> list:
    """Up to `count` BCCD VOC-test fields with exactly one white-cell box, well inside."""
    chosen = []
    for record in bench_fields(10_000, data_root):
        if len(record.wbc_boxes) != 1:
            continue
        box = record.wbc_boxes[0]
        x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
        if x0 >= INSIDE and y0 >= INSIDE and x1 <= 640 - INSIDE and y1 <= 480 - INSIDE:
            chosen.append(record)
        if len(chosen) == count:
            break
    return chosen


def _placements(side: int, grid: int, distinct: int) -> list[tuple[int, int, int]]:
    """(field index, x, y) of a grid x grid block of fields at the slide's centre."""
    pitch_x, pitch_y = 640 + GAP, 480 + GAP
    x_start = max(0, (side - grid * pitch_x) // 2)
    y_start = max(0, (side - grid * pitch_y) // 2)
    return [((row * grid + col) % distinct, x_start + col * pitch_x, y_start + row * pitch_y)
            for row in range(grid) for col in range(grid)]


def _render(fields: list[np.ndarray], places: np.ndarray, x0: int, y0: int, width: int,
            height: int, step: int) -> np.ndarray:
    """Pixels of a level whose pixel (i, j) is level-0 pixel ((y0 + i) step, (x0 + j) step)."""
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = PLAIN
    left, top = x0 * step, y0 * step
    right, bottom = (x0 + width) * step, (y0 + height) * step
    hit = ((places[:, 1] < right) & (places[:, 1] + 640 > left)
           & (places[:, 2] < bottom) & (places[:, 2] + 480 > top))
    rows = np.arange(y0, y0 + height) * step
    cols = np.arange(x0, x0 + width) * step
    for index, fx, fy in places[hit]:
        r = rows - fy
        c = cols - fx
        ri = np.flatnonzero((r >= 0) & (r < 480))
        ci = np.flatnonzero((c >= 0) & (c < 640))
        out[ri[0]:ri[-1] + 1, ci[0]:ci[-1] + 1] = fields[index][r[ri]][:, c[ci]]
    return out


def build(spec: dict) -> dict:
    """Write the slide to spec["path"] and its known cells to the same name + .json."""
    import tifffile

    side, grid = spec["side"], spec["grid"]
    path = Path(spec["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    records = known_fields(min(spec.get("distinct", 12), grid * grid), spec.get("data_root"))
    fields = [np.asarray(image) for image in load_rgb(r.image for r in records)]
    placements = _placements(side, grid, len(records))
    places = np.array(placements, dtype=np.int64)
    started = time.perf_counter()
    levels = [(side, side)]
    while max(levels[-1]) > 2048:
        levels.append((-(-levels[-1][0] // 2), -(-levels[-1][1] // 2)))

    def tiles(level: int):
        width, height = levels[level]
        for ty in range(0, height, TILE):
            for tx in range(0, width, TILE):
                yield _render(fields, places, tx, ty, TILE, TILE, 2 ** level)

    resolution = {"resolution": (1e4 / MPP, 1e4 / MPP), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = {"dtype": np.uint8, "tile": (TILE, TILE), "compression": "zlib",
                   "compressionargs": {"level": 1}, "photometric": "rgb"}
        tif.write(tiles(0), shape=(side, side, 3), subifds=len(levels) - 1, **options,
                  **resolution)
        for level in range(1, len(levels)):
            width, height = levels[level]
            tif.write(tiles(level), shape=(height, width, 3), subfiletype=1, **options)
    known = [[float(x + b.x0), float(y + b.y0), float(x + b.x1), float(y + b.y1)]
             for index, x, y in placements for b in [records[index].wbc_boxes[0]]]
    Path(f"{path}.json").write_text(json.dumps({
        "side": side, "mpp": MPP, "fields": [str(r.image) for r in records],
        "placements": placements, "known": known}))
    return {"side": side, "megapixels": side * side / 1e6, "levels": levels,
            "pasted_fields": len(placements), "distinct_fields": len(records),
            "file_mb": path.stat().st_size / 1e6, "build_s": time.perf_counter() - started}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), dtype=np.float32)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def analyze(spec: dict) -> dict:
    """The slide analysed whole (time, peak RSS, cells found once), then per field."""
    from benchmarks.systems import close, load_analyzer
    from leukodiff.pipeline.wholeslide import analyze_whole_slide

    path = Path(spec["path"])
    layout = json.loads(Path(f"{path}.json").read_text())
    analyzer, _ = load_analyzer("onnx", spec["threads"])
    images = load_rgb(Path(p) for p in layout["fields"])
    analyzer(images[0])  # warm: the first call's one-off costs belong to neither side
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    result = analyze_whole_slide(analyzer, path)
    slide_s = time.perf_counter() - start
    slide_rss = peak_rss_mb()
    boxes = np.array([c.box for c in result.field.cells], dtype=np.float32).reshape(-1, 4)

    # the per-field reference: each distinct field, whole pipeline, same analyzer
    per_field_ms, found_alone = [], []
    for record_path, image in zip(layout["fields"], images, strict=True):
        runs = []
        for _ in range(spec.get("field_runs", 3)):
            t = time.perf_counter()
            alone = analyzer(image)
            runs.append(1000 * (time.perf_counter() - t))
        per_field_ms.append(statistics.median(runs))
        index = layout["fields"].index(record_path)
        mine = [k for k, (i, _, _) in enumerate(layout["placements"]) if i == index]
        x, y = layout["placements"][mine[0]][1:]
        annotation = np.array(layout["known"][mine[0]], dtype=np.float32) - [x, y, x, y]
        found = np.array([c.box for c in alone.cells], dtype=np.float32).reshape(-1, 4)
        found_alone.append(bool((_iou(annotation[None], found) >= 0.5).any()))
    close(analyzer)

    known = np.array(layout["known"], dtype=np.float32)
    usable = np.array([found_alone[i] for i, _, _ in layout["placements"]])
    iou = _iou(known[usable], boxes)
    hits = (iou >= 0.5).sum(1)
    second = np.sort(iou, axis=1)[:, -2] if boxes.shape[0] > 1 else np.zeros(len(hits))
    once = int(((hits == 1) & (second < 0.1)).sum())
    field_ms = statistics.fmean([per_field_ms[i] for i, _, _ in layout["placements"]])
    tissue_mp = len(layout["placements"]) * FIELD_MP
    read_mp = result.read_px / 1e6  # level-0 pixels of the detector's windows
    return {
        "side": layout["side"], "megapixels": layout["side"] ** 2 / 1e6,
        "threads": spec["threads"], "backend": "onnx",
        "pasted_fields": len(layout["placements"]), "known_cells": int(usable.sum()),
        "annotated_not_found_per_field": int((~usable).sum()),
        "found_once": once, "missed": int((hits == 0).sum()),
        "double_counted": int(((hits > 1) | ((hits == 1) & (second >= 0.1))).sum()),
        "cells_on_slide": len(boxes),
        "windows_read": result.windows, "blocks_read": result.blocks,
        "windows_skipped": result.skipped_windows,
        "shrink": result.shrink, "mpp": result.mpp, "mpp_source": result.mpp_source,
        "slide_s": slide_s, "slide_peak_rss_mb": slide_rss, "rss_before_slide_mb": rss_before,
        "field_ms": field_ms,
        "s_per_mp_field": field_ms / 1000 / FIELD_MP,
        "s_per_mp_tissue": slide_s / tissue_mp, "s_per_mp_read": slide_s / read_mp,
        "s_per_mp_slide": slide_s / (layout["side"] ** 2 / 1e6),
    }


def describe(metrics: dict[str, Any]) -> str:
    return (f"{metrics['found_once']}/{metrics['known_cells']} known cells found once, "
            f"{metrics['slide_s']:.0f} s, peak RSS {metrics['slide_peak_rss_mb']:.0f} MiB")
