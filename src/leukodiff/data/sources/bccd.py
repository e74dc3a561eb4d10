"""BCCD: 364 smear fields (640x480) in Pascal VOC, WBC subtypes joined from `labels.csv`.

`labels.csv` gives one category per field, not per box. A field's white-cell
boxes get a cell type only when that is unambiguous: one box and one label, or
as many boxes as labels that all name the same type. Otherwise the boxes stay
unassigned, keeping the field's labels as `candidates`, and keep a group only
when every label is in the same group and there are enough labels to cover
every box.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from leukodiff.data.records import Box, Field, Loaded, Skipped
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources.generic import read_voc
from leukodiff.taxonomy import GROUP_OF, CellType, UnknownLabelError, parse_cell_type

SOURCE = "bccd"
VOC_SUBSETS = ("train", "val", "test")


def read_labels(path: Path) -> tuple[dict[str, tuple[CellType, ...]], list[Skipped]]:
    """`labels.csv` as {field name: cell types}; row `Image = N` is `BloodImage_0000N`."""
    labels: dict[str, tuple[CellType, ...]] = {}
    skipped: list[Skipped] = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                name = f"BloodImage_{int(row['Image']):05d}"
            except (KeyError, TypeError, ValueError):
                skipped.append(Skipped(path, f"row {row}: no image number"))
                continue
            types = []
            for text in (row.get("Category") or "").split(","):
                if not text.strip():
                    continue
                try:
                    types.append(parse_cell_type(text))
                except UnknownLabelError as error:
                    skipped.append(Skipped(path, f"{name}: {error}"))
            labels[name] = tuple(types)
    return labels, skipped


def read_subsets(voc_dir: Path) -> dict[str, str]:
    """{field name: "train" | "val" | "test"} from the VOC ImageSets lists."""
    subsets: dict[str, str] = {}
    for subset in VOC_SUBSETS:
        list_file = voc_dir / "ImageSets" / "Main" / f"{subset}.txt"
        if list_file.is_file():
            for name in list_file.read_text().split():
                subsets[name] = subset
    return subsets


def assign_types(boxes: tuple[Box, ...], labels: tuple[CellType, ...]) -> tuple[Box, ...]:
    """Give the field's white-cell boxes their types where `labels` makes that unambiguous."""
    wbc = [b for b in boxes if b.cell_type is None and b.group is None and b.kind == "wbc"]
    if not wbc or not labels:
        return boxes
    if len(set(labels)) == 1 and len(wbc) == len(labels):
        new = {id(b): replace(b, cell_type=labels[0]) for b in wbc}
    else:
        groups = {GROUP_OF[t] for t in labels}
        group = groups.pop() if len(groups) == 1 and len(labels) >= len(wbc) else None
        new = {id(b): replace(b, group=group, candidates=labels) for b in wbc}
    return tuple(new.get(id(b), b) for b in boxes)


def read_bccd(root: Path, *, track: Track = no_progress) -> Loaded[Field]:
    """All BCCD fields; `root` is the `bccd` folder holding `BCCD/` and `labels.csv`."""
    voc_dir = root / "BCCD"
    loaded = read_voc(voc_dir, source=SOURCE, track=track)
    labels, skipped = read_labels(root / "labels.csv")
    loaded.skipped.extend(skipped)
    subsets = read_subsets(voc_dir)
    loaded.records = [
        replace(
            field,
            boxes=assign_types(field.boxes, labels.get(field.image.stem, ())),
            subset=subsets.get(field.image.stem),
        )
        for field in loaded.records
    ]
    return loaded
