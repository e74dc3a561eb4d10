"""One reader per shared data set, plus generic readers for users' own data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from leukodiff.data.crops import cells_from_fields
from leukodiff.data.records import Cell, Field, Loaded
from leukodiff.data.root import dataset_dir
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources.bccd import read_bccd
from leukodiff.data.sources.bcd import read_bcd
from leukodiff.data.sources.chula import read_chula
from leukodiff.data.sources.generic import read_class_folders, read_coco, read_voc, read_yolo
from leukodiff.data.sources.kbc import read_kbc
from leukodiff.data.sources.pbc import read_pbc
from leukodiff.data.sources.pig import read_pig

# name -> (reader, a path inside the data set that proves it is there)
FIELD_SOURCES: dict[str, tuple[Callable[..., Loaded[Field]], str]] = {
    "bccd": (read_bccd, "BCCD/Annotations"),
    "bcd": (read_bcd, "annotations.csv"),
    "chula": (read_chula, "WBC_Samples"),  # fetched, not in ../shared (data.root.FETCHED_SETS)
    "pig": (read_pig, "train/labels"),  # fetched; boxes only, read enlarged (Field.zoom)
}
CELL_SOURCES: dict[str, tuple[Callable[..., Loaded[Cell]], str]] = {
    "kbc": (read_kbc, "images"),
    "pbc": (read_pbc, ""),
}
SOURCES = ("bccd", "kbc", "pbc", "bcd", "chula")


def load_fields(name: str, root: str | Path | None = None, track: Track = no_progress
                ) -> Loaded[Field]:
    """The fields of a field data set ("bccd", "bcd", "chula" or "pig")."""
    if name not in FIELD_SOURCES:
        raise ValueError(f"{name!r} has no smear fields; field sets: {', '.join(FIELD_SOURCES)}")
    reader, marker = FIELD_SOURCES[name]
    return reader(dataset_dir(name, root, marker), track=track)


def load_cells(name: str, root: str | Path | None = None, track: Track = no_progress
               ) -> Loaded[Cell]:
    """The labelled cells of a shared data set; field sets give their typed boxes."""
    if name in CELL_SOURCES:
        reader, marker = CELL_SOURCES[name]
        return reader(dataset_dir(name, root, marker), track=track)
    fields = load_fields(name, root, track)
    return Loaded(cells_from_fields(fields.records), list(fields.skipped))


__all__ = [
    "CELL_SOURCES",
    "FIELD_SOURCES",
    "SOURCES",
    "load_cells",
    "load_fields",
    "read_bccd",
    "read_bcd",
    "read_chula",
    "read_class_folders",
    "read_coco",
    "read_kbc",
    "read_pbc",
    "read_pig",
    "read_voc",
    "read_yolo",
]
