"""Which slides a run has, and which fields each: a folder per slide, or a manifest
(slide_id,path), checked whole before any work (every problem listed at once).

Fields are taken in file-name order, the order `--target` counts them in.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from leukodiff.data.scan import IMAGE_SUFFIXES

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class SlideInputError(ValueError):
    """Slides that cannot be run as given (every problem listed), found before any work."""


@dataclass(frozen=True)
class Slide:
    """One sample: its id and its fields, in the order they are taken (file name)."""

    slide_id: str
    fields: tuple[Path, ...]
    source: str  # the folder, or the manifest

    @property
    def folder_name(self) -> str:
        """The slide's folder under OUT/slides: its id with characters other than
        letters, digits, '.', '_' and '-' replaced by '_'."""
        return _SAFE.sub("_", self.slide_id)


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".")), key=_order_key)


def _order_key(path: Path) -> tuple[str, str]:
    return path.name, str(path)


def _listed(problems: Sequence[str], limit: int = 20) -> str:
    shown = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(shown)


def _check_ids(slides: Sequence[Slide]) -> None:
    problems, seen = [], {}
    for slide in slides:
        if slide.folder_name in ("", ".", ".."):
            problems.append(f"slide id {slide.slide_id!r} ({slide.source}) cannot name a folder")
            continue
        if (earlier := seen.get(slide.folder_name.lower())) is not None:
            problems.append(f"slide id {slide.slide_id!r} ({slide.source}) is also the id of "
                            f"{earlier.slide_id!r} ({earlier.source}) as a folder name")
        seen[slide.folder_name.lower()] = slide
    if problems:
        raise SlideInputError("slide ids must be distinct folder names:\n" + _listed(problems))


def slides_from_folders(roots: Sequence[str | Path]) -> tuple[list[Slide], list[str]]:
    """Each subfolder of each root is a slide (its images, not those of deeper folders); a
    root without subfolders is one slide itself. Returns the slides and notes (images
    beside slide folders, which belong to no slide and are left out)."""
    slides: list[Slide] = []
    notes: list[str] = []
    problems = [f"{root}: no such folder" for root in roots if not Path(root).is_dir()]
    if problems:
        raise SlideInputError("with --slides, give folders whose subfolders are slides:\n"
                              + _listed(problems))
    for root in map(Path, roots):
        subfolders = sorted(p for p in root.iterdir()
                            if p.is_dir() and not p.name.startswith("."))
        loose = _images_in(root)
        if not subfolders:
            slides.append(Slide(root.resolve().name, tuple(loose), str(root)))
            continue
        slides.extend(Slide(folder.name, tuple(_images_in(folder)), str(folder))
                      for folder in subfolders)
        if loose:
            notes.append(f"{root}: {len(loose)} image(s) beside the slide folders belong to "
                         "no slide and were left out")
    _check_ids(slides)
    return slides, notes


def slides_from_manifest(manifest: str | Path) -> list[Slide]:
    """A CSV with columns slide_id,path (a header row; more columns are ignored): one row
    per field image, or per folder of a slide's images. Relative paths are taken from the
    CSV's folder. Slides keep the order of their first row; a slide's fields are taken in
    file-name order. Missing files and a file named twice are all listed in one
    SlideInputError."""
    manifest = Path(manifest)
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise SlideInputError(f"{manifest}: cannot read the manifest ({error})") from None
    reader = csv.DictReader(text.splitlines())
    columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
    if not {"slide_id", "path"} <= set(columns):
        raise SlideInputError(f"{manifest}: needs a header row with columns slide_id,path "
                              f"(found: {', '.join(reader.fieldnames or []) or 'nothing'})")
    base = manifest.parent
    fields: dict[str, list[Path]] = {}
    first_line: dict[Path, int] = {}
    problems: list[str] = []
    for line, row in enumerate(reader, start=2):
        slide_id = (row.get(columns["slide_id"]) or "").strip()
        text_path = (row.get(columns["path"]) or "").strip()
        if not slide_id or not text_path:
            problems.append(f"line {line}: empty slide_id or path")
            continue
        path = Path(text_path).expanduser()
        path = path if path.is_absolute() else base / path
        if path.is_dir():
            found = _images_in(path)
        elif path.is_file():
            found = [path]
        else:
            problems.append(f"line {line}: {text_path}: no such file or folder")
            continue
        slide_fields = fields.setdefault(slide_id, [])
        for image in found:
            key = image.resolve()
            if key in first_line:
                problems.append(f"line {line}: {image} is named twice (first on line "
                                f"{first_line[key]})")
                continue
            first_line[key] = line
            slide_fields.append(image)
    if problems:
        raise SlideInputError(f"{manifest}: {len(problems)} problem(s), nothing was "
                              f"analysed:\n{_listed(problems)}")
    if not fields:
        raise SlideInputError(f"{manifest}: names no slides (no rows after the header)")
    slides = [Slide(slide_id, tuple(sorted(paths, key=_order_key)), str(manifest))
              for slide_id, paths in fields.items()]
    _check_ids(slides)
    return slides
