"""Whole-slide images: read lazily, window by window, and analysed as one slide.

    slide = open_slide("scan.ome.tif")          # size, levels, microns per pixel
    result = analyze_whole_slide(analyzer, "scan.ome.tif")   # SlideResult

A pyramidal or OME TIFF (tifffile, the `wsi` extra) is read one tile of its file at a
time: a window of the full-resolution level decodes only the file tiles it covers (a
small cache holds the last ones, as neighbouring windows overlap), so memory stays
bounded by a window, the cache and the lowest level, whatever the slide's size. Other
formats (.svs, .ndpi, .mrxs, ...) go through OpenSlide when `openslide` imports.

Windows are the detector's native field (640x480 for the shipped one) with half a side
of overlap, as `pipeline.tiling.detect_tiled` uses; a window whose part of the lowest
level shows no structure (bare glass, a plain area: no cell of any kind) is skipped
without reading it. Boxes are merged across window borders with the grid-bucketed
merge (`tiling.merge_tiles_local`), then each cell is classified from the one window
that holds it whole (or from a region read around it).

Scale: microns per pixel come from the file (OME PhysicalSizeX, the Aperio description,
the TIFF resolution tags; None when absent or implausible) and are reported; the
windows are shrunk, as the Analyzer shrinks a large frame, when the red-cell ruler
(`pipeline.scale`) says the cells look much larger than BCCD's. The counting area (the
monolayer) is not chosen yet: every window with structure is counted.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from leukodiff.data.records import Box
from leukodiff.pipeline.analyzer import AnalysisError, Analyzer, CellCall, FieldResult
from leukodiff.pipeline.boxes import Detections
from leukodiff.pipeline.scale import SHRINK_ABOVE, cell_size_ratio
from leukodiff.pipeline.tiling import merge_tiles_local, tile_origins

# File endings that may hold a whole slide; TIFFs count as one only when pyramidal or
# larger than WHOLE_SLIDE_SIDE on a side (an ordinary field photographed as .tif does not).
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".svslide")
WHOLE_SLIDE_SIDE = 8000
# Plausible microns per pixel of a bright-field scan (x100 oil ~0.1, x10 ~1); resolution
# tags outside this (72 dpi written by default, ...) are not a scale.
MPP_RANGE = (0.02, 20.0)
# A window is background when, on the lowest level, fewer than this share of its pixels
# differ from their window's median gray by more than STRUCTURE_GRAY: no cell, red or white.
STRUCTURE_GRAY = 20
MIN_STRUCTURE = 0.005
THUMBNAIL_SIDE = 2048  # the lowest level read whole; larger ones are subsampled
CACHE_BYTES = 24 << 20  # decoded file tiles kept (neighbouring windows overlap)


class SlideError(AnalysisError):
    """A whole-slide file that cannot be read, with the reason."""


def _missing(package: str, extra: str, path: Path) -> SlideError:
    return SlideError(f"{path}: reading this whole-slide format needs {package}: "
                      f"pip install {extra}")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def is_whole_slide(path: str | Path) -> bool:
    """Whether `path` should be read as a whole slide: an OpenSlide format, or a TIFF
    that is pyramidal or larger than WHOLE_SLIDE_SIDE pixels on a side."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix in OPENSLIDE_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES or not path.is_file():
        return False
    try:
        import tifffile
    except ImportError:
        return False  # read as an ordinary image; a large one then says what to install
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            height, width = series.levels[0].shape[:2]
            return len(series.levels) > 1 or max(width, height) > WHOLE_SLIDE_SIDE
    except Exception:  # a broken .tif: open_slide says why
        return suffix in (".ome.tif", ".ome.tiff")


class Slide:
    """A whole-slide image: its level-0 size, levels, microns per pixel, regions."""

    path: Path
    width: int
    height: int
    levels: list[tuple[int, int]]  # (width, height) of each level, full resolution first
    mpp: float | None
    mpp_source: str

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Level-0 pixels [y0:y1, x0:x1] as (h, w, 3) uint8 RGB."""
        raise NotImplementedError

    def thumbnail(self) -> np.ndarray:
        """The lowest level (subsampled to at most THUMBNAIL_SIDE a side), RGB."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not np.isfinite(mpp) or not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        return None
    return float(mpp)


_UNIT_MICRONS = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4,
                 "m": 1e6}


class TiffSlide(Slide):
    """A pyramidal, OME or large TIFF read with tifffile, one file tile (or strip) at a
    time, without zarr."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            import tifffile
        except ImportError:
            raise _missing("tifffile", "'leukodiff[wsi]' (or: pip install tifffile)",
                           self.path) from None
        if not self.path.is_file():
            raise SlideError(f"{self.path}: no such file")
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            self._pages = [level.pages[0] if hasattr(level, "pages") else level.keyframe
                           for level in series.levels]
        except Exception as error:  # tifffile raises many kinds
            raise SlideError(f"{self.path}: not a readable TIFF ({error}); is the file "
                             "corrupt or truncated?") from None
        for page in self._pages:
            if page is None or page.dtype != np.uint8 or page.samplesperpixel not in (1, 3, 4):
                self._tif.close()
                raise SlideError(f"{self.path}: unsupported TIFF layout (needs 8-bit "
                                 "RGB, RGBA or gray pixels)")
        self.levels = [(int(p.imagewidth), int(p.imagelength)) for p in self._pages]
        self.width, self.height = self.levels[0]
        self.mpp, self.mpp_source = self._read_mpp()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0  # bytes in the cache
        # every tile/strip of level 0 must lie in the file: a truncated file says so now
        size = self.path.stat().st_size
        page = self._pages[0]
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)
                if c]
        if not ends or max(ends) > size:
            self._tif.close()
            raise SlideError(f"{self.path}: the file is truncated (its image data runs "
                             f"past its {size} bytes)")

    def _read_mpp(self) -> tuple[float | None, str]:
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            if match:
                factor = _UNIT_MICRONS.get(unit.group(1) if unit else "µm", 1.0)
                if (mpp := _plausible(float(match.group(1)) * factor)) is not None:
                    return mpp, "OME PhysicalSizeX"
        page = self._pages[0]
        description = page.description or ""
        match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
        if match is not None and (mpp := _plausible(float(match.group(1)))) is not None:
            return mpp, "Aperio MPP"
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            numerator, denominator = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            per_unit = numerator / denominator if denominator else 0.0
            microns = {2: 25400.0, 3: 10000.0}.get(unit)
            if microns and per_unit > 0 and (mpp := _plausible(microns / per_unit)):
                return mpp, "TIFF resolution tags"
        return None, "none"

    def _segment(self, page, index: int) -> np.ndarray:
        key = (self._pages.index(page), index)
        if (hit := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return hit
        fh = self._tif.filehandle
        fh.seek(page.dataoffsets[index])
        data = fh.read(page.databytecounts[index])
        try:
            segment, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as error:
            if "imagecodecs" in str(error):
                raise _missing("imagecodecs", "imagecodecs", self.path) from None
            raise SlideError(f"{self.path}: cannot decode its image data ({error}); is "
                             "the file corrupt or truncated?") from None
        if segment is None:
            raise SlideError(f"{self.path}: an empty tile in the image data; is the file "
                             "corrupt?")
        segment = np.asarray(segment).reshape(shape)[0]  # (length, width, samples)
        self._cache[key] = segment
        self._cached += segment.nbytes
        while self._cached > CACHE_BYTES and len(self._cache) > 1:
            self._cached -= self._cache.popitem(last=False)[1].nbytes
        return segment

    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        page = self._pages[level]
        width, height = self.levels[level]
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        samples = int(page.samplesperpixel)
        out = np.zeros((max(0, y1 - y0), max(0, x1 - x0), samples), dtype=np.uint8)
        if page.is_tiled:
            tile_w, tile_h = int(page.tilewidth), int(page.tilelength)
        else:
            tile_w, tile_h = width, int(min(page.rowsperstrip or height, height))
        across = -(-width // tile_w)
        for ty in range(y0 // tile_h, -(-y1 // tile_h)):
            for tx in range(x0 // tile_w, -(-x1 // tile_w)):
                segment = self._segment(page, ty * across + tx)
                sx0, sy0 = tx * tile_w, ty * tile_h
                ax0, ay0 = max(x0, sx0), max(y0, sy0)
                ax1 = min(x1, sx0 + tile_w, sx0 + segment.shape[1])
                ay1 = min(y1, sy0 + tile_h, sy0 + segment.shape[0])
                if ax1 > ax0 and ay1 > ay0:
                    out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = \
                        segment[ay0 - sy0:ay1 - sy0, ax0 - sx0:ax1 - sx0, :samples]
        if samples == 1:
            return np.repeat(out, 3, axis=2)
        return out[..., :3]

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._read_level(0, x0, y0, x1, y1)

    def thumbnail(self) -> np.ndarray:
        level = len(self.levels) - 1
        width, height = self.levels[level]
        step = max(1, -(-max(width, height) // THUMBNAIL_SIDE))
        if step == 1:
            return self._read_level(level, 0, 0, width, height)
        block = step * max(1, 1024 // step)  # a block at a time, never the whole level
        out = np.empty((-(-height // step), -(-width // step), 3), dtype=np.uint8)
        for y in range(0, height, block):
            for x in range(0, width, block):
                part = self._read_level(level, x, y, x + block, y + block)[::step, ::step]
                out[y // step:y // step + part.shape[0],
                    x // step:x // step + part.shape[1]] = part
        return out

    def close(self) -> None:
        self._cache.clear()
        self._cached = 0
        self._tif.close()


class OpenSlideSlide(Slide):
    """Any format OpenSlide reads (.svs, .ndpi, .mrxs, ...)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            import openslide
        except ImportError:
            raise _missing("OpenSlide", "openslide-bin openslide-python", self.path) from None
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception as error:
            raise SlideError(f"{self.path}: OpenSlide cannot read it ({error}); is the "
                             "file corrupt or truncated?") from None
        self.levels = [tuple(map(int, d)) for d in self._slide.level_dimensions]
        self.width, self.height = self.levels[0]
        mpp = self._slide.properties.get("openslide.mpp-x")
        self.mpp = _plausible(float(mpp)) if mpp else None
        self.mpp_source = "openslide.mpp-x" if self.mpp else "none"

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        region = self._slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0))
        return np.asarray(region.convert("RGB"))

    def thumbnail(self) -> np.ndarray:
        width, height = self.levels[-1]
        scale = min(1.0, THUMBNAIL_SIDE / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        level = len(self.levels) - 1
        image = self._slide.read_region((0, 0), level, (width, height)).convert("RGB")
        return np.asarray(image.resize(size))

    def close(self) -> None:
        self._slide.close()


def open_slide(path: str | Path) -> Slide:
    """The whole slide at `path` (TIFF: tifffile; other formats: OpenSlide), or SlideError
    saying why it cannot be read (what to install, corrupt or truncated file)."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    if _suffix(path) in TIFF_SUFFIXES:
        return TiffSlide(path)
    return OpenSlideSlide(path)


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


def plan_windows(slide: Slide, size: tuple[int, int], overlap: int | None = None
                 ) -> tuple[list[Window], list[Window]]:
    """Overlapping level-0 windows of `size` over the slide, as (to read, skipped): a
    window is skipped when its part of the thumbnail shows no structure (MIN_STRUCTURE)."""
    tile_w, tile_h = min(size[0], slide.width), min(size[1], slide.height)
    overlap = overlap if overlap is not None else min(tile_w, tile_h) // 2
    thumb = np.asarray(Image.fromarray(slide.thumbnail()).convert("L"), dtype=np.int16)
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


@dataclass
class SlideResult:
    """A whole slide's cells (in level-0 pixels) and how it was read."""

    field: FieldResult
    mpp: float | None
    mpp_source: str
    levels: list[tuple[int, int]]
    windows: int
    skipped_windows: int
    shrink: float = 1.0  # windows were shrunk this many times for the detector
    ruler_ratio: float | None = None  # the red-cell ruler: cells' size / BCCD's
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"image": self.field.image, "width": self.field.width,
                "height": self.field.height, "levels": [list(s) for s in self.levels],
                "mpp": self.mpp, "mpp_source": self.mpp_source, "windows": self.windows,
                "skipped_windows": self.skipped_windows, "shrink": self.shrink,
                "ruler_ratio": self.ruler_ratio, "notes": self.notes}


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


def iter_windows(slide: Slide, windows: list[Window], shrink: float = 1.0
                 ) -> Iterator[tuple[Window, Image.Image]]:
    """Each window's pixels, shrunk `shrink` times (for the detector)."""
    for window in windows:
        image = Image.fromarray(slide.read(*window.box))
        if shrink != 1.0:
            image = image.resize((max(1, round(image.width / shrink)),
                                  max(1, round(image.height / shrink))),
                                 Image.Resampling.BILINEAR, reducing_gap=2.0)
        yield window, image


def analyze_whole_slide(analyzer: Analyzer, path: str | Path, *,
                        shrink: float | None = None, track=None) -> SlideResult:
    """Every white cell of a whole slide, in level-0 pixels, counted once.

    `shrink`: how many times to shrink the windows for the detector (default: from the
    red-cell ruler, as `Analyzer.detect` does for a large frame; 1 keeps native pixels).
    `track`: an optional progress wrapper, `track(iterable, description)`."""
    track = track or (lambda items, _description: items)
    with open_slide(path) as slide:
        size = analyzer.tile
        ratio = None
        notes = []
        first, _ = plan_windows(slide, size)
        if shrink is None:
            ratio = _ruler(slide, first)
            shrink = ratio if ratio is not None and ratio > SHRINK_ABOVE else 1.0
        native = (max(1, round(size[0] * shrink)), max(1, round(size[1] * shrink)))
        windows, skipped = plan_windows(slide, native) if shrink != 1.0 else (first, _)
        if slide.mpp is None:
            notes.append("no microns per pixel in the file: scale from the red-cell ruler")
        found, origins = [], []
        for window, image in track(iter_windows(slide, windows, shrink), "Reading windows"):
            detections = analyzer._detect_field(image)  # the pipeline's own
            if shrink != 1.0:
                back = np.array([window.x1 - window.x0, window.y1 - window.y0] * 2,
                                dtype=np.float32) / np.array([image.width, image.height] * 2,
                                                              dtype=np.float32)
                detections = Detections(detections.boxes * back, detections.labels,
                                        detections.scores)
            found.append(detections)
            origins.append(window.box)
        merged = merge_tiles_local(found, origins, (slide.width, slide.height))
        merged = merged.above(analyzer.detection_threshold)
        cells = _classify(analyzer, slide, merged, windows)
        result = FieldResult(str(path), slide.width, slide.height, cells)
        return SlideResult(result, slide.mpp, slide.mpp_source, slide.levels,
                           len(windows), len(skipped), shrink, ratio, notes)


def _classify(analyzer: Analyzer, slide: Slide, found: Detections,
              windows: list[Window], margin: float = 0.5) -> list[CellCall]:
    """Group refiner and level-2 classifiers on each cell, from one region per batch: the
    first window holding the cell with `margin` (of its size) around it, or a region read
    around the cell alone."""
    if not len(found):
        return []
    batches: dict[tuple[int, int, int, int], list[int]] = {}
    for i, (x0, y0, x1, y1) in enumerate(found.boxes.tolist()):
        mx, my = margin * (x1 - x0), margin * (y1 - y0)
        want = (x0 - mx, y0 - my, x1 + mx, y1 + my)
        home = next((w.box for w in windows
                     if w.x0 <= max(0, want[0]) and w.y0 <= max(0, want[1])
                     and w.x1 >= min(slide.width, want[2])
                     and w.y1 >= min(slide.height, want[3])), None)
        if home is None:
            home = (max(0, int(want[0])), max(0, int(want[1])),
                    min(slide.width, int(np.ceil(want[2]))),
                    min(slide.height, int(np.ceil(want[3]))))
        batches.setdefault(home, []).append(i)
    cells: list[CellCall] = []
    for (x0, y0, x1, y1), members in batches.items():
        image = Image.fromarray(slide.read(x0, y0, x1, y1))
        offset = np.array([x0, y0, x0, y0], dtype=np.float32)
        local = found.take(members)
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
