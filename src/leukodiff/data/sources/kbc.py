"""KBC (Kaggle "Blood Cell Images", dataset2-master): augmented copies of ~280 BCCD fields.

Each image is a whole BCCD field at half size (320x240), turned, flipped,
sheared and zoomed; its white cell is wherever it was in the field. File names
are `_<n>_<id>.jpeg`. The shared data README took `<n>` for the source cell,
but `leukodiff.evaluation.provenance` shows it is not (copies sharing an `<n>`
come from the same field no more often than any two copies): the group key
below is therefore only the file's own name number, and honest KBC splits use
`provenance.trace_kbc(...).regrouped()`, which keys each image by the BCCD
field it was made from (see docs/RESULTS.md, section 2).
"""

from __future__ import annotations

import re
from pathlib import Path

from leukodiff.data.records import Cell, Loaded, Skipped
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources.generic import read_class_folders

SOURCE = "kbc"
SUBSETS = ("TRAIN", "TEST_SIMPLE")
_NAME = re.compile(r"_(\d+)_(\d+)\.jpe?g$", re.IGNORECASE)


def source_cell_key(path: Path) -> str:
    """`kbc:TRAIN:EOSINOPHIL:12` for `TRAIN/EOSINOPHIL/_12_345.jpeg` (the name's number,
    not a source cell: see the module docstring)."""
    match = _NAME.search(path.name)
    cell = match.group(1) if match else path.stem  # unknown naming: its own cell
    return f"{SOURCE}:{path.parent.parent.name}:{path.parent.name}:{cell}"


def read_kbc(root: Path, *, track: Track = no_progress) -> Loaded[Cell]:
    """KBC crops from `root/images/TRAIN` and `root/images/TEST_SIMPLE` (subset = folder)."""
    loaded: Loaded[Cell] = Loaded()
    for subset in SUBSETS:
        folder = root / "images" / subset
        if not folder.is_dir():
            loaded.skipped.append(Skipped(folder, "KBC subset folder missing"))
            continue
        loaded.extend(
            read_class_folders(
                folder, source=SOURCE, subset=subset, group_key=source_cell_key, track=track
            )
        )
    return loaded
