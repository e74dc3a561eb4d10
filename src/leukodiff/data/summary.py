"""What is in the data: counts per source and cell type, duplicates, skipped files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from leukodiff.data.records import Cell, Field, Skipped
from leukodiff.data.root import DataNotFoundError
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import FIELD_SOURCES, SOURCES, load_cells, load_fields
from leukodiff.data.splits import find_duplicates
from leukodiff.taxonomy import CellType, ObjectKind

UNTYPED = "untyped"


@dataclass
class SourceSummary:
    source: str
    # (subset or "all") -> cell type / "untyped" -> count of white cells
    cells: dict[str, Counter] = field(default_factory=dict)
    # field sets only: number of fields, and boxes of each kind
    fields: int = 0
    boxes: Counter = field(default_factory=Counter)
    wbc_per_field: Counter = field(default_factory=Counter)  # WBC boxes in a field -> fields
    duplicate_sets: list[list[Path]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    missing: str | None = None  # why the source could not be read


def _cell_counts(records: list[Cell]) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    for record in records:
        counts.setdefault(record.subset or "all", Counter())[str(record.cell_type)] += 1
    return counts


def _field_summary(summary: SourceSummary, fields: list[Field]) -> None:
    summary.fields = len(fields)
    for record in fields:
        summary.boxes.update(str(b.kind) for b in record.boxes)
        wbc = record.wbc_boxes
        summary.wbc_per_field[len(wbc)] += 1
        counts = summary.cells.setdefault(record.subset or "all", Counter())
        counts.update(str(b.cell_type) if b.cell_type else UNTYPED for b in wbc)


def summarise(name: str, root: str | Path | None = None, track: Track = no_progress
              ) -> SourceSummary:
    summary = SourceSummary(name)
    try:
        if name in FIELD_SOURCES:
            loaded = load_fields(name, root, track)
            _field_summary(summary, loaded.records)
        else:
            loaded = load_cells(name, root, track)
            summary.cells = _cell_counts(loaded.records)
    except DataNotFoundError as error:
        summary.missing = str(error)
        return summary
    summary.skipped = loaded.skipped
    summary.duplicate_sets = [
        [loaded.records[i].image for i in group] for group in find_duplicates(loaded.records)
    ]
    return summary


def summarise_all(root: str | Path | None = None, track: Track = no_progress
                  ) -> list[SourceSummary]:
    return [summarise(name, root, track) for name in SOURCES]


CELL_COLUMNS = [*(str(t) for t in CellType), UNTYPED]
BOX_KINDS = [str(k) for k in ObjectKind]
