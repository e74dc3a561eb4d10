"""Whole-slide files, read lazily region by region: pyramidal / OME TIFF (tifffile),
DICOM WSI (wsidicom), and every format OpenSlide reads (openslide-python + openslide-bin).

    with open_slide("scan.ome.tif") as slide:   # or scan.svs, or a DICOM WSI folder
        slide.width, slide.height, slide.levels, slide.mpp
        region = slide.read(x0, y0, x1, y1)      # level-0 pixels, RGB uint8

A TIFF is read one file tile (or strip) at a time: a region decodes only the tiles it
covers, and a small cache (CACHE_BYTES) holds the last ones, as neighbouring windows
overlap; DICOM and OpenSlide read regions through their libraries' own tile caches.
Memory stays bounded by a region, the cache and the thumbnail (the lowest level, read
block by block and subsampled to THUMBNAIL_SIDE), whatever the slide's size.

Microns per pixel come from the file (OME PhysicalSizeX, the Aperio description, the
TIFF resolution tags, DICOM's PixelSpacing, OpenSlide's openslide.mpp-x); None when
absent or implausible (MPP_RANGE), and `pipeline.wholeslide` then measures the scale.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from leukodiff.pipeline.analyzer import AnalysisError

# File endings that may hold a whole slide; TIFFs count as one only when pyramidal or
# larger than WHOLE_SLIDE_SIDE on a side (an ordinary field photographed as .tif does not).
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".svslide")
# A DICOM WSI is a folder of instances (one or more per level); a .dcm file stands for its
# folder (wsidicom picks the slide's levels among them).
DICOM_SUFFIX = ".dcm"
WHOLE_SLIDE_SIDE = 8000
# Plausible microns per pixel of a bright-field scan (x100 oil ~0.1, x10 ~1); resolution
# tags outside this (72 dpi written by default, ...) are not a scale.
MPP_RANGE = (0.02, 20.0)
THUMBNAIL_SIDE = 2048  # the lowest level read whole; larger ones are subsampled
CACHE_BYTES = 24 << 20  # decoded file tiles kept (neighbouring windows overlap)


class SlideError(AnalysisError):
    """A whole-slide file that cannot be read, with the reason."""


def _missing(package: str, extra: str, path: Path) -> SlideError:
    return SlideError(f"{path}: reading this whole-slide format needs {package}: "
                      f"pip install {extra}")


@contextmanager
def _needs(package: str, extra: str, path: Path) -> Iterator[None]:
    """Around a reader's import of its optional package: when it is missing, a SlideError
    that says how to install it, not an ImportError."""
    try:
        yield
    except ImportError:
        raise _missing(package, extra, path) from None


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def is_dicom_folder(path: Path) -> bool:
    """A folder holding .dcm files: a DICOM WSI, read as one slide."""
    return path.is_dir() and any(p.suffix.lower() == DICOM_SUFFIX for p in path.iterdir())


def is_whole_slide(path: str | Path) -> bool:
    """Whether `path` should be read as a whole slide: an OpenSlide format, a DICOM WSI
    (a .dcm file or a folder of them), or a TIFF that is pyramidal or larger than
    WHOLE_SLIDE_SIDE pixels on a side."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix in (*OPENSLIDE_SUFFIXES, DICOM_SUFFIX) or is_dicom_folder(path):
        return True
    if suffix not in TIFF_SUFFIXES or not path.is_file():
        return False
    try:
        import tifffile
    except ImportError:
        return False  # read as an ordinary image; a large one then says what to install
    try:
        with tifffile.TiffFile(path) as tif:
            if suffix in (".ome.tif", ".ome.tiff") and not tif.is_ome:
                return True  # its OME-XML lost (a truncated slide): open_slide says why
            series = tif.series[0]
            height, width = series.levels[0].shape[:2]
            return len(series.levels) > 1 or max(width, height) > WHOLE_SLIDE_SIDE
    except Exception:  # a broken .tif: open_slide says why
        return suffix in (".ome.tif", ".ome.tiff")


class Slide:
    """A whole-slide image: its level-0 size, levels, microns per pixel, regions.

    A reader gives `_read_region` (a region already cut to its level, never empty); cutting,
    reading level 0, the block-by-block thumbnail and the check of a truncated file on
    opening are shared."""

    path: Path
    width: int
    height: int
    levels: list[tuple[int, int]]  # (width, height) of each level, full resolution first
    mpp: float | None
    mpp_source: str

    def _read_region(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of `level` (inside it, not empty) as (h, w, 3) uint8 RGB."""
        raise NotImplementedError

    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of `level` (cut to the level) as (h, w, 3) uint8 RGB."""
        x0, y0, x1, y1 = self._clip(level, x0, y0, x1, y1)
        if x1 == x0 or y1 == y0:
            return np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        return self._read_region(level, x0, y0, x1, y1)

    def _check_last(self, unit: str) -> None:
        """Read the last `unit` (tile, frame) of the full level, so that a truncated file
        says so when it is opened, not halfway through the slide (it is closed then)."""
        try:
            self._read_level(0, self.width - 1, self.height - 1, self.width, self.height)
        except SlideError as error:
            self.close()
            raise SlideError(f"{self.path}: the file is corrupt or truncated: its last "
                             f"{unit} cannot be read ({str(error).split(' (', 1)[-1]}") from None

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Level-0 pixels [y0:y1, x0:x1] (cut to the slide) as (h, w, 3) uint8 RGB."""
        return self._read_level(0, x0, y0, x1, y1)

    def thumbnail(self) -> np.ndarray:
        """The lowest level, subsampled to at most THUMBNAIL_SIDE a side, RGB; read a block
        at a time, never the whole level (a one-level slide's lowest level is level 0)."""
        level = len(self.levels) - 1
        width, height = self.levels[level]
        step = max(1, -(-max(width, height) // THUMBNAIL_SIDE))
        if step == 1:
            return self._read_level(level, 0, 0, width, height)
        block = step * max(1, 1024 // step)
        out = np.empty((-(-height // step), -(-width // step), 3), dtype=np.uint8)
        for y in range(0, height, block):
            for x in range(0, width, block):
                part = self._read_level(level, x, y, x + block, y + block)[::step, ::step]
                out[y // step:y // step + part.shape[0],
                    x // step:x // step + part.shape[1]] = part
        return out

    def _clip(self, level: int, x0: int, y0: int, x1: int, y1: int
              ) -> tuple[int, int, int, int]:
        width, height = self.levels[level]
        x0, y0 = min(max(0, x0), width), min(max(0, y0), height)
        return x0, y0, max(x0, min(width, x1)), max(y0, min(height, y1))

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
        with _needs("tifffile", "'leukodiff[wsi]' (or: pip install tifffile)", self.path):
            import tifffile
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

    def _read_region(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        page = self._pages[level]
        width, height = self.levels[level]
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

    def close(self) -> None:
        self._cache.clear()
        self._cached = 0
        self._tif.close()


class OpenSlideSlide(Slide):
    """Any format OpenSlide reads (.svs, .ndpi, .scn, .mrxs, a generic tiled TIFF, ...):
    openslide-python with the OpenSlide library from openslide-bin."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with _needs("OpenSlide", "'leukodiff[wsi]' (or: pip install openslide-bin "
                    "openslide-python)", self.path):
            import openslide
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception as error:  # OpenSlideError, OpenSlideUnsupportedFormatError, ...
            raise SlideError(f"{self.path}: OpenSlide cannot read it ({error}); is the "
                             "file corrupt or truncated?") from None
        self.levels = [tuple(map(int, d)) for d in self._slide.level_dimensions]
        self._downsamples = [float(d) for d in self._slide.level_downsamples]
        self.width, self.height = self.levels[0]
        mpp = self._slide.properties.get("openslide.mpp-x")
        try:
            self.mpp = _plausible(float(mpp)) if mpp else None
        except ValueError:
            self.mpp = None
        self.mpp_source = "openslide.mpp-x" if self.mpp else "none"
        self._check_last("tile")

    def _read_region(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        down = self._downsamples[level]  # read_region places a region in level-0 pixels
        try:
            region = self._slide.read_region((round(x0 * down), round(y0 * down)), level,
                                             (x1 - x0, y1 - y0))
        except Exception as error:
            raise SlideError(f"{self.path}: OpenSlide cannot read a region ({error}); is "
                             "the file corrupt or truncated?") from None
        glass = Image.new("RGBA", region.size, (255, 255, 255, 255))  # unscanned: white
        return np.asarray(Image.alpha_composite(glass, region).convert("RGB"))

    def close(self) -> None:
        self._slide.close()


class DicomSlide(Slide):
    """A DICOM WSI (VL Whole Slide Microscopy Image instances in one folder), read with
    wsidicom: its levels, PixelSpacing as microns per pixel, regions frame by frame."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with _needs("wsidicom", "'leukodiff[wsi]' (or: pip install wsidicom)", self.path):
            from wsidicom import WsiDicom
        folder = self.path if self.path.is_dir() else self.path.parent
        _check_dicom_headers(folder)
        from wsidicom.config import Settings
        from wsidicom.errors import WsiDicomNoResolutionError

        # its frame caches bounded as the TIFF reader's (wsidicom's default: 2 x 100 MB)
        caches = Settings(decoded_frame_cache_size=CACHE_BYTES,
                          encoded_frame_cache_size=CACHE_BYTES // 4)
        try:
            self._wsi = WsiDicom.open(folder, settings=caches)
            pyramid = list(self._wsi.levels)
            self.levels = [(int(lv.size.width), int(lv.size.height)) for lv in pyramid]
            self._numbers = [int(lv.level) for lv in pyramid]  # wsidicom's level: 2^n
        except WsiDicomNoResolutionError:
            raise SlideError(f"{self.path}: the DICOM WSI gives no PixelSpacing (microns per "
                             "pixel), which its image instances must have; wsidicom cannot "
                             "place its levels without it") from None
        except Exception as error:  # pydicom and wsidicom raise many kinds
            raise SlideError(f"{self.path}: not a readable DICOM WSI ({error!r}); is a file "
                             "corrupt or truncated, or the folder not one slide?") from None
        self.width, self.height = self.levels[0]
        self.mpp = _plausible(float(self._wsi.mpp.width))  # um a pixel, from PixelSpacing
        self.mpp_source = "DICOM PixelSpacing" if self.mpp else "none"
        self._check_last("frame")

    def _read_region(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            region = self._wsi.read_region((x0, y0), self._numbers[level],
                                           (x1 - x0, y1 - y0), threads=1)
        except Exception as error:
            raise SlideError(f"{self.path}: cannot read a region of the DICOM WSI ({error});"
                             " is a file corrupt or truncated?") from None
        return np.asarray(region.convert("RGB"))

    def close(self) -> None:
        self._wsi.close()


def _check_dicom_headers(folder: Path) -> None:
    """Every .dcm file of a DICOM WSI folder must be DICOM: wsidicom would skip a broken
    one silently (a corrupt full-resolution level would leave the slide at half size)."""
    import pydicom

    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != DICOM_SUFFIX:
            continue
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as error:
            raise SlideError(f"{path}: not a readable DICOM file ({error}); is it corrupt "
                             "or truncated?") from None


def open_slide(path: str | Path) -> Slide:
    """The whole slide at `path` (TIFF: tifffile; DICOM, a .dcm file or its folder:
    wsidicom; other formats: OpenSlide), or SlideError saying why it cannot be read
    (what to install, corrupt or truncated file)."""
    path = Path(path)
    if is_dicom_folder(path):
        return DicomSlide(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    if _suffix(path) in TIFF_SUFFIXES:
        return TiffSlide(path)
    if _suffix(path) == DICOM_SUFFIX:
        return DicomSlide(path)
    return OpenSlideSlide(path)
