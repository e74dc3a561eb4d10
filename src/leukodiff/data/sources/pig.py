"""Pig: Visayan warty pig smear photos, white-cell boxes only (CC0); a detector training lab.

Not in ../shared: brought with `fetch` from FrancescaIE/WBC-detection-dataset (commit
b4dc56f30ee262fc051be7da9489045e55a5c59b, README: "Dataset for Detection of White Blood
Cells of the Juvenile Visayan Warty Pig") and extracted into `DATA_ROOT/pig/` (see
`data.root.FETCHED_SETS`). `{train,valid,test}/` are YOLO folders of 416x416 JPEG
smartphone photos through an Olympus CX23's eyepiece (a round field in black), one class,
"WBC" (white cell of unknown type): 459 / 98 / 98 photos.

Quirks:
- Its white cells are ~22 px across (p10-p90 18-28), a fifth of the human labs' (BCD
  ~100, Chula ~146, BCCD ~207): every field is read enlarged `ZOOM` times (`Field.zoom`,
  `data.crops.field_image`), so its cells meet the detector at BCD's size. Enlarged, they
  are soft: a camera of low resolution, which a new lab may have too.
- Pig blood: red cells smaller than human ones, white cells alike in kind. Only the
  detector learns from it (white cell or not), never a cell type.
- Roboflow export: `<photo>_JPG.rf.<hash>.jpg`; each photo appears once. The photo number
  is the group key (no slide is named).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from leukodiff.data.records import Field, Loaded, Skipped
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources.generic import read_yolo

SOURCE = "pig"
CLASS_NAMES = ("wbc",)
FOLDERS = ("train", "valid", "test")
ZOOM = 5.0
# training photos a detector run draws at most: about BCCD's 205 training fields, so the
# pig's look does not outweigh the human labs' (and an epoch fits the CPU schedule)
TRAINING_FIELDS = 200


def photo_of(path: Path) -> str:
    """`100_JPG.rf.79f8....jpg` -> `100`."""
    return path.name.split(".rf.", 1)[0].split("_", 1)[0]


def enlarged(record: Field, zoom: float) -> Field:
    """`record` as read enlarged `zoom` times: its size and boxes scaled to match."""
    return replace(record, width=round(record.width * zoom), height=round(record.height * zoom),
                   boxes=tuple(b.scaled(zoom) for b in record.boxes), zoom=zoom)


def read_pig(root: Path, *, track: Track = no_progress) -> Loaded[Field]:
    loaded: Loaded[Field] = Loaded()
    for folder in FOLDERS:
        if not (Path(root) / folder).is_dir():
            loaded.skipped.append(Skipped(Path(root) / folder, "folder absent: the set is "
                                                                "not wholly extracted"))
            continue
        part = read_yolo(Path(root) / folder, CLASS_NAMES, source=SOURCE,
                         group_key=lambda p: f"{SOURCE}:{photo_of(p)}", track=track)
        loaded.skipped.extend(part.skipped)
        loaded.records.extend(replace(enlarged(r, ZOOM), subset=folder) for r in part.records)
    return loaded
