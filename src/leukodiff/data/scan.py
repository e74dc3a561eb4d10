"""Shared reader plumbing: checking image files in bulk and validating boxes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from leukodiff.data.records import Box, Skipped
from leukodiff.imaging import ImageError, ImageInfo, probe_image
from leukodiff.taxonomy import CellType, Group, ObjectKind

T = TypeVar("T")
# A progress hook: wraps an iterable of known length with a description.
# The CLI passes rich's `track`; library callers get no output by default.
Track = Callable[[Sequence[T], str], Iterable[T]]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def no_progress(items: Sequence[T], description: str = "") -> Iterable[T]:
    return items


def _probe(path: Path) -> ImageInfo | Skipped:
    try:
        return probe_image(path)
    except ImageError as error:
        return Skipped(path, str(error).removeprefix(f"{path}: "))


def probe_all(
    paths: Sequence[Path], track: Track = no_progress, description: str = "Checking images"
) -> tuple[dict[Path, ImageInfo], list[Skipped]]:
    """Fully decode and hash each image (threads: PIL and hashlib release the GIL)."""
    infos: dict[Path, ImageInfo] = {}
    skipped: list[Skipped] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(_probe, paths)
        for result in track(_Sized(results, len(paths)), description):
            if isinstance(result, Skipped):
                skipped.append(result)
            else:
                infos[result.path] = result
    return infos, skipped


class _Sized:
    """An iterator with a known length, so progress bars can show a total."""

    def __init__(self, iterator: Iterable[T], length: int) -> None:
        self._iterator, self._length = iterator, length

    def __iter__(self):
        return iter(self._iterator)

    def __len__(self) -> int:
        return self._length


def list_files(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """Image files directly in `folder`, sorted; anything else is reported as skipped."""
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            images.append(path)
        else:
            skipped.append(Skipped(path, "not an image file"))
    return images, skipped


def make_box(
    xyxy: Sequence[float],
    image_size: tuple[int, int],
    label: CellType | Group | ObjectKind,
) -> Box | str:
    """A Box clipped to the image, or the reason it cannot be one.

    Boxes that poke past the border are clipped (BCCD has many that touch it);
    boxes with no area inside the image (BCCD's zero-size RBC points, boxes
    entirely outside) are refused.
    """
    width, height = image_size
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    if not all(v == v for v in (x0, y0, x1, y1)):  # NaN
        return "box has non-numeric coordinates"
    if x1 <= x0 or y1 <= y0:
        return f"degenerate box {_fmt(xyxy)} (zero or negative size)"
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
    if cx1 - cx0 < 1 or cy1 - cy0 < 1:
        return f"box {_fmt(xyxy)} lies outside the {width}x{height} image"
    if isinstance(label, CellType):
        return Box(cx0, cy0, cx1, cy1, cell_type=label)
    if isinstance(label, Group):
        return Box(cx0, cy0, cx1, cy1, group=label)
    return Box(cx0, cy0, cx1, cy1, kind=label)


def _fmt(xyxy: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in xyxy) + ")"
