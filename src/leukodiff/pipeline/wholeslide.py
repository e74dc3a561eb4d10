"""Whole-slide images, analysed window by window as one slide.

    result = analyze_whole_slide(analyzer, "scan.ome.tif")   # SlideResult
    result.field.cells, result.mpp, result.counting_area

The file is read lazily region by region (`pipeline.slidefiles`: pyramidal / OME TIFF,
DICOM WSI, OpenSlide formats). Two grids, one decision each:

- Blocks decide the counting area: the detector's native field (640x480 for the shipped
  one) at the detector's scale, with half a side of overlap (the largest white cell,
  ~240 px, fits it), as `pipeline.tiling.detect_tiled` tiles. A block whose part of the
  thumbnail shows no structure (bare glass, a plain area) is background, never read.
- Windows run the detector: DETECT_BLOCKS (3x3: 1440x960 at the detector's scale) groups
  of neighbouring blocks, each the bounding box of its group's blocks that show
  structure, then cut to the structure itself (STRUCTURE_MARGIN of glass kept). Every
  block lies inside its group's box, and a window loses only bare glass, so a cell that
  fits a block (any cell up to the blocks' overlap) is seen whole by some window; the
  detector re-reads less overlap (1.6 times the smear read, not 3.2) and bare glass at
  the smear's edge is not run through it. A window whose run fills the network's box
  cap is run again in field-size tiles (`_detect_window`).

Boxes are merged across window borders, at the detector's scale, with the grid-bucketed
merge (`tiling.merge_tiles_local`; its 16 px edge margin is the detector's), then each
cell is classified from the one window that holds it whole (or a region read around it).

Scale: the detector learnt fields of scale.DETECTOR_MPP micrometres a pixel (BCCD's red
cells, 104 px, are 7.5 um). When the file gives its microns per pixel, windows of the
same extent in micrometres are read and resized to the detector's scale (unless within
MPP_TOLERANCE); when it does not, the red-cell ruler (`pipeline.scale`) measures the
cells on a few blocks of the slide, its estimate is used and reported as such
(resizing only when the cells look more than SHRINK_ABOVE times larger or smaller
than BCCD's, the ruler's own precision), and a note says so. A `shrink` given by the
caller is used as it is: no ruler.

Counting area (`pipeline.monolayer`): every block read is placed in the monolayer, a
thick or a thin area by the red-cell coverage of its core (measured on its window's
pixels); the result reports each zone's blocks, area and white cells, and
`monolayer_only` counts the monolayer's cells alone (a window with no monolayer block
is then not run through the detector).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from leukodiff.data.crops import square_window
from leukodiff.data.records import Box
from leukodiff.pipeline.analyzer import Analyzer, CellCall, FieldResult
from leukodiff.pipeline.boxes import Detections, agnostic_nms
from leukodiff.pipeline.monolayer import (
    Cores,
    CountingArea,
    counting_area,
    coverage,
    glass_level,
    zone_of,
)
from leukodiff.pipeline.scale import DETECTOR_MPP, SHRINK_ABOVE, cell_size_ratio
from leukodiff.pipeline.slidefiles import (
    Slide,
    SlideError,
    is_whole_slide,
    open_slide,
)
from leukodiff.pipeline.tiling import detect_tiled, merge_tiles_local, tile_origins

__all__ = ["Slide", "SlideError", "SlideResult", "analyze_whole_slide", "crop_to_structure",
           "group_blocks", "is_whole_slide", "open_slide", "plan_windows"]

T, R = TypeVar("T"), TypeVar("R")
# A window is background when, on the lowest level, fewer than this share of its pixels
# differ from their window's median gray by more than STRUCTURE_GRAY: no cell, red or white.
STRUCTURE_GRAY = 20
MIN_STRUCTURE = 0.005
# A slide whose file gives its microns per pixel is resized to the detector's scale
# (scale.DETECTOR_MPP) unless within this factor of it: the detector learnt fields whose
# cells vary more than that (the ruler: 0.80-1.39 of BCCD's median, p10-p90).
MPP_TOLERANCE = 1.1
# The detector's windows: groups of this many blocks across and down (3x3: 1440x960 at
# the detector's scale, overlap 240 px) read 1.6 times the smear, where the blocks
# themselves read 3.2. On BCCD-dense smear such a window fills at most 13 of the
# network's 20 boxes (any score): larger windows come closer to that cap (see
# `_detect_window`).
DETECT_BLOCKS = (3, 3)
# Detector pixels of glass kept around a window's structure when it is cut to it: nearer,
# the window's edge shifts the detector's boxes (the same slide as TIFF and as SVS, whose
# thumbnails differ: boxes' IoU 0.90 at 32 px, 0.95 at 64, identical at 96).
STRUCTURE_MARGIN = 96


@dataclass(frozen=True)
class Window:
    """A level-0 region (x0, y0, x1, y1) to analyse."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1


def plan_windows(slide: Slide, size: tuple[int, int], overlap: int | None = None,
                 thumbnail: np.ndarray | None = None) -> tuple[list[Window], list[Window]]:
    """Overlapping level-0 windows of `size` over the slide, as (to read, skipped): a
    window is skipped when its part of the thumbnail (`slide.thumbnail()` unless given)
    shows no structure (MIN_STRUCTURE)."""
    tile_w, tile_h = min(size[0], slide.width), min(size[1], slide.height)
    overlap = overlap if overlap is not None else min(tile_w, tile_h) // 2
    thumbnail = slide.thumbnail() if thumbnail is None else thumbnail
    thumb = np.asarray(Image.fromarray(thumbnail).convert("L"), dtype=np.int16)
    fx, fy = thumb.shape[1] / slide.width, thumb.shape[0] / slide.height
    keep, skip = [], []
    for y in tile_origins(slide.height, tile_h, overlap):
        for x in tile_origins(slide.width, tile_w, overlap):
            window = Window(x, y, x + tile_w, y + tile_h)
            patch = thumb[int(y * fy):max(int(y * fy) + 1, int(np.ceil((y + tile_h) * fy))),
                          int(x * fx):max(int(x * fx) + 1, int(np.ceil((x + tile_w) * fx)))]
            busy = np.abs(patch - np.median(patch)) > STRUCTURE_GRAY
            (keep if busy.mean() >= MIN_STRUCTURE else skip).append(window)
    return keep, skip


def group_blocks(blocks: list[Window], skipped: list[Window], per: tuple[int, int]
                 ) -> list[tuple[Window, list[Window]]]:
    """The detector's windows over a grid of blocks (`plan_windows`: `blocks` to read,
    `skipped` background), as (window, its blocks): groups of `per` neighbouring blocks
    (across, down), each window the bounding box of its group's blocks to read. Every
    block to read lies wholly inside exactly one window; a group with none is not read."""
    if not blocks:
        return []
    xs = sorted({b.x0 for b in (*blocks, *skipped)})
    ys = sorted({b.y0 for b in (*blocks, *skipped)})
    per_x, per_y = per
    # groups start at the first block to read, so a smear's edge starts a window
    first_x, first_y = xs.index(min(b.x0 for b in blocks)), ys.index(min(b.y0 for b in blocks))
    column = {x: (i - first_x) // per_x for i, x in enumerate(xs)}
    row = {y: (i - first_y) // per_y for i, y in enumerate(ys)}
    groups: dict[tuple[int, int], list[Window]] = {}
    for block in blocks:
        groups.setdefault((row[block.y0], column[block.x0]), []).append(block)
    return [(Window(min(b.x0 for b in members), min(b.y0 for b in members),
                    max(b.x1 for b in members), max(b.y1 for b in members)), members)
            for _, members in sorted(groups.items())]


def crop_to_structure(windows: list[Window], thumbnail: np.ndarray, glass: float,
                      size: tuple[int, int], margin: float) -> list[Window]:
    """Each window cut to the bounding box of its structure (thumbnail pixels darker in
    green than the glass by STRUCTURE_GRAY; a white or red cell always is), widened by
    `margin` level-0 pixels and two thumbnail pixels (the thumbnail subsamples), so the
    bare glass at a smear's edge is not run through the detector. A window with no such
    pixel is kept whole (its blocks' own test found structure)."""
    busy = thumbnail[..., 1].astype(np.int16) < glass - STRUCTURE_GRAY
    fx, fy = thumbnail.shape[1] / size[0], thumbnail.shape[0] / size[1]
    pad_x, pad_y = margin + 2 / fx, margin + 2 / fy
    out = []
    for w in windows:
        tx0, ty0 = int(w.x0 * fx), int(w.y0 * fy)
        patch = busy[ty0:max(ty0 + 1, math.ceil(w.y1 * fy)),
                     tx0:max(tx0 + 1, math.ceil(w.x1 * fx))]
        rows, columns = np.flatnonzero(patch.any(1)), np.flatnonzero(patch.any(0))
        if not len(rows):
            out.append(w)
            continue
        out.append(Window(max(w.x0, math.floor((tx0 + columns[0]) / fx - pad_x)),
                          max(w.y0, math.floor((ty0 + rows[0]) / fy - pad_y)),
                          min(w.x1, math.ceil((tx0 + columns[-1] + 1) / fx + pad_x)),
                          min(w.y1, math.ceil((ty0 + rows[-1] + 1) / fy + pad_y))))
    return out


def _coverage(pixels: np.ndarray, window: Window, core: tuple[float, float, float, float],
              glass: float) -> float:
    """`monolayer.coverage` of a block's core from its window's pixels (at any scale): the
    part of the core the window was cut away from is glass (`crop_to_structure`)."""
    height, width = pixels.shape[:2]
    fx, fy = width / (window.x1 - window.x0), height / (window.y1 - window.y0)
    x0, y0 = (core[0] - window.x0) * fx, (core[1] - window.y0) * fy
    x1, y1 = (core[2] - window.x0) * fx, (core[3] - window.y0) * fy
    part = pixels[max(0, round(y0)):max(0, round(y1)), max(0, round(x0)):max(0, round(x1))]
    whole = max(1, (round(x1) - round(x0)) * (round(y1) - round(y0)))
    return min(1.0, coverage(part, glass) * part.shape[0] * part.shape[1] / whole
               if part.size else 0.0)


@dataclass
class SlideResult:
    """A whole slide's cells (in level-0 pixels) and how it was read."""

    field: FieldResult
    mpp: float | None  # microns per pixel the analysis used: the file's, or the ruler's
    mpp_source: str  # where `mpp` came from
    levels: list[tuple[int, int]]
    windows: int  # the detector's windows read
    skipped_windows: int  # blocks skipped as background (no structure in the thumbnail)
    shrink: float = 1.0  # windows were resized this many times smaller for the detector
    ruler_ratio: float | None = None  # the red-cell ruler: cells' size / BCCD's
    notes: list[str] = field(default_factory=list)
    counting_area: CountingArea | None = None
    blocks: int = 0  # field-size blocks read (the counting area's grid)
    read_px: float = 0.0  # level-0 pixels of the windows read
    retiled: int = 0  # windows whose boxes filled the detector's cap: run again in tiles

    def to_dict(self) -> dict:
        return {"image": self.field.image, "width": self.field.width,
                "height": self.field.height, "levels": [list(s) for s in self.levels],
                "mpp": self.mpp, "mpp_source": self.mpp_source,
                "detector_mpp": round(DETECTOR_MPP, 4), "windows": self.windows,
                "blocks": self.blocks, "skipped_windows": self.skipped_windows,
                "read_px": self.read_px, "windows_retiled": self.retiled, "shrink": self.shrink,
                "ruler_ratio": self.ruler_ratio, "notes": self.notes,
                "counting_area": (self.counting_area.to_dict()
                                  if self.counting_area is not None else None)}


    def summary(self) -> list[str]:
        """What a reader of the report must know: the scale's notes, the counting area."""
        lines = list(self.notes)
        if (area := self.counting_area) is not None:
            size = (f"{area.area_mm2['monolayer']:.3g} mm^2" if area.area_mm2 is not None
                    else f"{area.area_px['monolayer']:.3g} px")
            read = sum(n for zone, n in area.windows.items() if zone != "background")
            outside = {z: n for z, n in area.cells.items() if z != "monolayer" and n}
            head = (f"counting area (monolayer): {size}, {area.windows['monolayer']} of {read} "
                    f"blocks read; {area.cells['monolayer']} white cells inside it")
            if area.restricted:
                lines.append(f"{head}, only these counted (thick and thin areas not searched)")
            else:
                lines.append(f"{head}, {sum(outside.values())} outside" + (
                    f" ({', '.join(f'{z} {n}' for z, n in outside.items())})" if outside else ""))
        return lines


def _ruler(slide: Slide, windows: list[Window], samples: int = 6) -> float | None:
    """The red-cell ruler's ratio (cells' size / BCCD's) on up to `samples` windows
    spread over the slide (median), None when none tells."""
    if not windows:
        return None
    picks = [windows[i] for i in np.linspace(0, len(windows) - 1, min(samples, len(windows)),
                                             dtype=int)]
    ratios = []
    for w in picks:
        side = 1024
        cx, cy = (w.x0 + w.x1) // 2, (w.y0 + w.y1) // 2
        region = slide.read(cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)
        if (ratio := cell_size_ratio(Image.fromarray(region))) is not None:
            ratios.append(ratio)
    return float(np.median(ratios)) if ratios else None


@dataclass
class _Scale:
    shrink: float
    mpp: float | None
    source: str
    ruler_ratio: float | None = None
    note: str | None = None


def _scale(slide: Slide, size: tuple[int, int], thumbnail: np.ndarray,
           shrink: float | None) -> _Scale:
    """How many times to shrink the windows for the detector, and the microns per pixel:
    `shrink` when given (the file's microns per pixel, if any, still reported), else from
    the file (resized to DETECTOR_MPP), else from the red-cell ruler on blocks of `size`
    with structure (the only case that reads pixels here)."""
    if shrink is not None:
        if slide.mpp is not None:
            return _Scale(shrink, slide.mpp, slide.mpp_source)
        return _Scale(shrink, None, "unknown", None,
                      f"no microns per pixel in the file: analysed {shrink:g} times smaller, "
                      "as asked; areas in pixels only")
    if slide.mpp is not None:
        shrink = DETECTOR_MPP / slide.mpp
        if abs(math.log(shrink)) <= math.log(MPP_TOLERANCE):
            shrink = 1.0
        return _Scale(shrink, slide.mpp, slide.mpp_source)
    ratio = _ruler(slide, plan_windows(slide, size, thumbnail=thumbnail)[0])
    if ratio is None:
        return _Scale(1.0, None, "unknown", None,
                      "no microns per pixel in the file, and the red-cell ruler found too "
                      "few red cells to measure them: analysed at the file's own pixels, "
                      f"as if {DETECTOR_MPP:.3f} um a pixel (the detector's); areas in "
                      "pixels only")
    shrink = ratio if ratio > SHRINK_ABOVE or ratio < 1 / SHRINK_ABOVE else 1.0
    mpp = DETECTOR_MPP / ratio
    return _Scale(shrink, mpp, "red-cell ruler (no microns per pixel in the file)", ratio,
                  f"no microns per pixel in the file: the red-cell ruler estimates {mpp:.3f} "
                  f"um a pixel (cells {ratio:.2f} times the detector's size)")


def _read_window(slide: Slide, window: Window, shrink: float) -> Image.Image:
    image = Image.fromarray(slide.read(*window.box))
    if shrink != 1.0:
        image = image.resize((max(1, round(image.width / shrink)),
                              max(1, round(image.height / shrink))),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
    return image


def read_ahead(items: list[T], read: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """(item, read(item)) for each item, the next one read in a reader thread while the
    caller works on this one (tile decoding, resizing and onnxruntime all release the GIL).
    Only that thread reads until the last item is handed over: close the generator (or
    exhaust it) before reading the slide elsewhere."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-reader") as reader:
        ahead = reader.submit(read, items[0])
        for index, item in enumerate(items):
            value = ahead.result()
            if index + 1 < len(items):
                ahead = reader.submit(read, items[index + 1])
            yield item, value


def iter_windows(slide: Slide, windows: list[Window], shrink: float = 1.0
                 ) -> Iterator[tuple[Window, Image.Image]]:
    """Each window's pixels, resized `shrink` times smaller (for the detector), the next
    one read ahead (`read_ahead`)."""
    return read_ahead(windows, lambda window: _read_window(slide, window, shrink))


def analyze_whole_slide(analyzer: Analyzer, path: str | Path, *,
                        shrink: float | None = None, monolayer_only: bool = False,
                        track=None) -> SlideResult:
    """Every white cell of a whole slide, in level-0 pixels, counted once.

    `shrink`: how many times smaller to resize the windows for the detector (default:
    from the file's microns per pixel, else the red-cell ruler; 1 keeps the file's
    pixels). `monolayer_only`: count only the cells of the counting area (the
    monolayer); the other zones are still reported. `track`: an optional progress
    wrapper, `track(iterable, description)`."""
    track = track or (lambda items, _description: items)
    with open_slide(path) as slide, contextlib.ExitStack() as stack:
        size = analyzer.tile
        thumbnail = slide.thumbnail()
        glass = glass_level(thumbnail)
        scale = _scale(slide, size, thumbnail, shrink)
        native = (max(1, round(size[0] * scale.shrink)), max(1, round(size[1] * scale.shrink)))
        blocks, skipped = plan_windows(slide, native, thumbnail=thumbnail)
        tile = (min(native[0], slide.width), min(native[1], slide.height))
        cores = Cores([(b.x0, b.y0) for b in (*blocks, *skipped)], tile,
                      (slide.width, slide.height))
        grouped = group_blocks(blocks, skipped, DETECT_BLOCKS)
        windows = crop_to_structure([window for window, _ in grouped], thumbnail, glass,
                                    (slide.width, slide.height), STRUCTURE_MARGIN * scale.shrink)
        zones: dict[tuple[int, int], str] = {}
        found, origins, retiled = [], [], 0
        # closed before the slide is, even on an error: its reader thread reads no more
        reading = stack.enter_context(contextlib.closing(iter_windows(slide, windows,
                                                                      scale.shrink)))
        for (window, image), (_, members) in zip(track(reading, "Reading windows"), grouped,
                                                 strict=True):
            pixels = np.asarray(image)
            for block in members:  # each block's zone, on its core's pixels
                core = cores.core(block.x0, block.y0)
                zones[block.x0, block.y0] = zone_of(_coverage(pixels, window, core, glass))
            if monolayer_only and all(zones[b.x0, b.y0] != "monolayer" for b in members):
                continue
            detections, tiled = _detect_window(analyzer, image)
            retiled += tiled
            if image.size != (window.x1 - window.x0, window.y1 - window.y0):
                back = np.array([(window.x1 - window.x0) / image.width,
                                 (window.y1 - window.y0) / image.height] * 2, dtype=np.float32)
                detections = Detections(detections.boxes * back, detections.labels,
                                        detections.scores)
            found.append(detections)
            origins.append(window.box)
        merged = _merge_at_detector_scale(found, origins, (slide.width, slide.height),
                                          scale.shrink)
        merged = merged.above(analyzer.detection_threshold)
        area, inside = counting_area(zones, cores, merged.boxes, scale.mpp, glass,
                                     monolayer_only)
        if monolayer_only:
            merged = merged.take(np.flatnonzero(inside))
        cells = _classify(analyzer, slide, merged, windows)
        result = FieldResult(str(path), slide.width, slide.height, cells)
        notes = [scale.note] if scale.note else []
        read_px = float(sum((w.x1 - w.x0) * (w.y1 - w.y0) for w in windows))
        return SlideResult(result, scale.mpp, scale.source, slide.levels, len(windows),
                           len(skipped), scale.shrink, scale.ruler_ratio, notes, area,
                           len(blocks), read_px, retiled)


def _detect_window(analyzer: Analyzer, image: Image.Image) -> tuple[Detections, bool]:
    """The detector on one window in one run, or, when that run fills the network's
    per-image cap (spec detections_per_image boxes, any score: a dense window would lose
    cells past it), on field-size tiles of the window (`tiling.detect_tiled`, as
    `Analyzer.detect` tiles a large frame); and whether it was tiled."""
    raw = analyzer._detect_raw(image)
    if len(raw) < int(analyzer.spec["detections_per_image"]):
        return agnostic_nms(raw, float(analyzer.spec["agnostic_nms_iou"])), False
    return detect_tiled(analyzer._detect_field, image, analyzer.tile), True


def _merge_at_detector_scale(found: list[Detections],
                             origins: list[tuple[int, int, int, int]],
                             size: tuple[int, int], shrink: float) -> Detections:
    """`merge_tiles_local` on level-0 boxes, run in the detector's pixels (level 0 /
    `shrink`): its margins (tiling.EDGE_MARGIN) are the detector's, whatever the file's
    scale."""
    if shrink == 1.0:
        return merge_tiles_local(found, origins, size)
    small = [Detections(d.boxes / np.float32(shrink), d.labels, d.scores) for d in found]
    merged = merge_tiles_local(small, [tuple(v / shrink for v in o) for o in origins],
                               (size[0] / shrink, size[1] / shrink))
    return Detections(merged.boxes * np.float32(shrink), merged.labels, merged.scores)


def _classify(analyzer: Analyzer, slide: Slide, found: Detections,
              windows: list[Window], margin: float = 0.5) -> list[CellCall]:
    """Group refiner and level-2 classifiers on each cell, batched by home: the first
    window holding the cell with `margin` (of its size) around it, or a region around the
    cell alone. Of a home window only the part the cells' crops take is read
    (`_crop_extent`: the same crops, hence the same calls; on the 50,000 px benchmark
    slide, reading whole windows here took a third of the analysis)."""
    if not len(found):
        return []
    batches: dict[tuple[int, int, int, int], list[int]] = {}
    extents = np.array([w.box for w in windows], dtype=np.float64).reshape(-1, 4)
    for i, (x0, y0, x1, y1) in enumerate(found.boxes.tolist()):
        mx, my = margin * (x1 - x0), margin * (y1 - y0)
        want = (x0 - mx, y0 - my, x1 + mx, y1 + my)
        holds = np.flatnonzero((extents[:, 0] <= max(0, want[0]))
                               & (extents[:, 1] <= max(0, want[1]))
                               & (extents[:, 2] >= min(slide.width, want[2]))
                               & (extents[:, 3] >= min(slide.height, want[3])))
        home = tuple(int(v) for v in extents[holds[0]]) if len(holds) else None
        if home is None:
            home = (max(0, int(want[0])), max(0, int(want[1])),
                    min(slide.width, int(np.ceil(want[2]))),
                    min(slide.height, int(np.ceil(want[3]))))
        batches.setdefault(home, []).append(i)
    scales = [c.crop_scale for c in analyzer.classifiers.values()]
    if analyzer.group_refiner is not None:
        scales.append(analyzer.group_refiner.crop_scale)
    cells: list[CellCall] = []
    # in reading order: neighbours share the cached tiles; each part read ahead
    parts = []
    for home, members in sorted(batches.items(), key=lambda batch: (batch[0][1], batch[0][0])):
        local = found.take(members)
        parts.append((local, _crop_extent(home, local.boxes, scales)))
    with contextlib.closing(read_ahead(parts, lambda part: Image.fromarray(
            slide.read(*part[1])))) as reading:
        for (local, (x0, y0, _, _)), image in reading:
            offset = np.array([x0, y0, x0, y0], dtype=np.float32)
            local = Detections(local.boxes - offset, local.labels, local.scores)
            if analyzer.group_refiner is not None:
                boxes = [Box(*box) for box in local.boxes.tolist()]
                groups = analyzer.group_refiner(image, boxes).argmax(1) + 1
                local = Detections(local.boxes, groups.astype(np.int64), local.scores)
            for cell in analyzer.classify(image, local):
                box = tuple(float(v) for v in np.asarray(cell.box) + offset)
                cells.append(CellCall(box, cell.group, cell.group_confidence, cell.cell_type,
                                      cell.type_confidence, cell.probabilities))
    cells.sort(key=lambda c: (c.box[1], c.box[0]))
    return cells


def _crop_extent(home: tuple[int, int, int, int], boxes: np.ndarray,
                 scales: list[float]) -> tuple[int, int, int, int]:
    """The part of `home` (level-0 x0, y0, x1, y1) that the crops of `boxes` (level-0) at
    each of `scales` take, as `data.crops.square_window` cuts them from the whole of
    `home`: a crop pushed inside by home's edge ends at that edge, which the part keeps,
    so each crop cut from the part is the same square: the part starts an even number of
    pixels from home's origin, as Python's round() sends halves to the even side."""
    x0, y0, x1, y1 = home
    if not scales:
        return home
    squares = np.array([square_window(Box(bx0 - x0, by0 - y0, bx1 - x0, by1 - y0), scale,
                                      (x1 - x0, y1 - y0))
                        for bx0, by0, bx1, by1 in boxes.tolist() for scale in scales])
    # a pixel more than the rounded squares each side (a square reaching half a pixel past
    # the part would be pushed inside it), from an even shift (round() sends ties alike)
    left, top = np.maximum(squares[:, :2].min(0) - 1, 0) // 2 * 2
    right = min(x1 - x0, int(squares[:, 2].max()) + 1)
    bottom = min(y1 - y0, int(squares[:, 3].max()) + 1)
    return x0 + int(left), y0 + int(top), x0 + right, y0 + bottom
