"""PBC (Acevedo et al. 2020): single-cell 360x363 CellaVision images, one folder per type.

Each image is its own cell; the 17 exact-duplicate pairs of the full set are
found by content hash when splitting (see `leukodiff.data.splits`).
"""

from __future__ import annotations

from pathlib import Path

from leukodiff.data.records import Cell, Loaded
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources.generic import read_class_folders

SOURCE = "pbc"


def read_pbc(root: Path, *, track: Track = no_progress) -> Loaded[Cell]:
    return read_class_folders(
        root, source=SOURCE, group_key=lambda p: f"{SOURCE}:{p.stem}", track=track
    )
