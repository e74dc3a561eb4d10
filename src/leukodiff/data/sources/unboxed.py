"""White cells a field set shows but leaves without a box, reviewed by eye.

Both typed field sets leave some white cells unboxed, and both for a reason a detector
must not learn from: BCCD boxes most but not all cells; Chula boxes only the cell its
slide was collected for (a basophil slide's neutrophils stay unboxed). Left as they
are, an unboxed cell would teach a detector that a white cell is background, and
would count against it as a false positive when found.

`bccd_unboxed.csv`: every confident detection (score >= 0.5) of the shipped detector
that matched no box, in all 364 fields, reviewed; six are the only white cell of a
field that `labels.csv` names but that has no box at all, so their type is known.
`chula_unboxed.csv`: every detection scoring >= 0.5 (266) of the three
leave-one-lab-out fold detectors of issue #14 (two trained without Chula) that
overlapped no box (IoU < 0.3), in all 488 fields, reviewed on 2x crops: 64 plainly
white cells (49 fields, 33 of them on basophil slides) were kept; blurred red cells,
smudges and cells cut too far by the edge to judge were not. Neither list claims to
be complete: cells no detector found are not in it.

Evaluation treats them as "ignore" regions (COCO crowd): finding one is not a false
positive, missing one is not a miss, and a field's true count includes them;
detector training adds those of its training and validation fields as boxes. The
sources' own annotations are not changed.
"""

from __future__ import annotations

import csv
from importlib import resources

from leukodiff.data.records import Box
from leukodiff.taxonomy import CellType, Group, parse_cell_type

REVIEWED = ("bccd", "chula")  # sources with a reviewed list: `<source>_unboxed.csv`


def unboxed_white_cells(source: str) -> dict[str, tuple[Box, ...]]:
    """The reviewed unboxed white cells of `source`, by field name (image stem); empty
    for a source nobody reviewed."""
    if source not in REVIEWED:
        return {}
    text = resources.files(__package__).joinpath(f"{source}_unboxed.csv").read_text()
    found: dict[str, list[Box]] = {}
    for row in csv.DictReader(text.splitlines()):
        label = row["label"].strip()
        known = {"cell_type": parse_cell_type(label)} if label in set(CellType) else (
            {"group": Group(label)} if label else {})
        box = Box(*(float(row[k]) for k in ("x0", "y0", "x1", "y1")), **known)
        found.setdefault(row["field"], []).append(box)
    return {name: tuple(boxes) for name, boxes in found.items()}
