"""Chula: Chulalongkorn University (Bangkok) smear fields, a third typed lab (MIT licence).

Not in ../shared: brought with `fetch` from singgihbekti/WBC_Dataset at commit
45759ab1e6258b9746377a0935077e2eef0da41b and extracted into `DATA_ROOT/chula/`
(see `data.root.FETCHED_SETS`). `WBC_Samples/{train,valid}/` are YOLO folders of
1440x900 JPEG fields, classes 0 neutrophil, 1 eosinophil, 2 basophil, 3 lymphocyte,
4 monocyte (523 boxes, ~100 per type, about one white cell per field).

Quirks, handled here and reported, never guessed:
- 12 images have no label file of their name (12 label files have no image; the
  names differ by a few digits): the images are skipped with that reason.
- `HF-<name>` images are horizontal mirrors of `<name>` (checked: they differ from
  the mirrored original by 0.1 gray level on average): augmented copies, skipped.
- The name's prefix (`L-8`, `N-3B`, `M-5Bb`, ...) is the slide, and each slide was
  collected for one cell type: the slide is the group key, so no split puts one
  slide on both sides. The repository's own train/valid folders share slides, so
  they are not used as parts.
"""

from __future__ import annotations

from pathlib import Path

from leukodiff.data.records import Field, Loaded, Skipped
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources.generic import read_yolo

SOURCE = "chula"
CLASS_NAMES = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")
FOLDERS = ("WBC_Samples/train", "WBC_Samples/valid")
MIRROR_PREFIX = "HF-"


def slide_of(path: Path) -> str:
    """`M-5Bb_0026.jpg` -> `M-5Bb`."""
    return path.stem.rsplit("_", 1)[0].removeprefix(MIRROR_PREFIX)


def read_chula(root: Path, *, track: Track = no_progress) -> Loaded[Field]:
    loaded: Loaded[Field] = Loaded()
    for folder in FOLDERS:
        part = read_yolo(Path(root) / folder, CLASS_NAMES, source=SOURCE,
                         group_key=lambda p: f"{SOURCE}:{slide_of(p)}", track=track)
        loaded.skipped.extend(part.skipped)
        for record in part.records:
            if record.image.name.startswith(MIRROR_PREFIX):
                original = record.image.name.removeprefix(MIRROR_PREFIX)
                loaded.skipped.append(Skipped(record.image, f"horizontal mirror of {original} "
                                                            "(an augmented copy)"))
            else:
                loaded.records.append(record)
    return loaded
