"""What a slide run writes, and how: per slide a cells CSV (and Parquet), field outputs,
the report and differential.json last (the done marker, written atomically); the run's
summary.csv/json. Shared by both engines (`reports.slides`: the process pool;
`reports.slides_ray`: Ray), so they write the same files.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from leukodiff.pipeline.analyzer import (
    COCO_CATEGORY_IDS,
    UNIDENTIFIED,
    Differential,
    FieldResult,
    coco_categories,
)
from leukodiff.reports.outputs import CSV_COLUMNS, write_report
from leukodiff.reports.slide_inputs import (
    Slide,
)
from leukodiff.taxonomy import CellType

SLIDES = "slides"  # OUT/slides/<slide>/
MARKER = "differential.json"  # written last: its presence (status finished) = slide done
DONE, TARGET_REACHED = "done", "target reached"
NO_IMAGES, FAILED = "no images", "failed"
INTERRUPTED, NOT_STARTED = "interrupted", "not started"
FINISHED = (DONE, TARGET_REACHED)  # what --resume skips
TYPES = [str(t) for t in CellType]
CELL_COLUMNS = ["slide", "field", *CSV_COLUMNS, *(f"p_{t}" for t in TYPES)]
SUMMARY_COLUMNS = ["slide", "status", "fields_total", "fields_taken", "fields_analysed",
                   "fields_failed", "white_cells", "identified",
                   *(f"pct_{t}" for t in TYPES), "unidentified", "warning", "seconds",
                   "note", "report"]
field_order = "fields taken in file-name order"


@dataclass(frozen=True)
class _FieldTask:
    folder: str  # the slide's output folder
    stem: str  # fields/STEM.*, cells/STEM_NNN.jpg
    path: str  # the image
    name: str = ""  # the input as given, in the outputs (default: path); Ray reads `path`


@dataclass
class _FieldOutcome:
    result: FieldResult | None
    error: str | None = None


@dataclass
class SlidesRun:
    rows: list[dict] = field(default_factory=list)  # one per slide, in slide order
    notes: list[str] = field(default_factory=list)  # about the whole run
    interrupted: bool = False


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _cell_rows(slide_id: str, stem: str, result: FieldResult) -> list[list[Any]]:
    rows = []
    for number, cell in enumerate(result.cells, start=1):
        rows.append([slide_id, stem, result.image, number, *map(float, cell.box),
                     str(cell.group), cell.group_confidence, cell.label, cell.type_confidence,
                     *(cell.probabilities.get(t) for t in TYPES)])
    return rows


def _csv_value(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in ("x0", "y0", "x1", "y1"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


class _ParquetCells:
    """cells.parquet, written a row group at a time (pyarrow)."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        types = {"cell": pa.int32(), "group_confidence": pa.float64(),
                 "type_confidence": pa.float64(),
                 **{c: pa.float64() for c in ("x0", "y0", "x1", "y1")},
                 **{f"p_{t}": pa.float64() for t in TYPES}}
        self.schema = pa.schema([(c, types.get(c, pa.string())) for c in CELL_COLUMNS])
        self.writer = pq.ParquetWriter(path, self.schema)
        self.rows: list[list[Any]] = []

    def add(self, rows: list[list[Any]]) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= 4096:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = list(zip(*self.rows, strict=True))
            self.writer.write_table(self.pa.table(
                {c: self.pa.array(v, self.schema.field(c).type)
                 for c, v in zip(CELL_COLUMNS, columns, strict=True)}, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


class _SlideState:
    """One slide being analysed: its open files and running counts (no field kept)."""

    def __init__(self, slide: Slide, folder: Path, target: int | None, parquet: bool,
                 note: str) -> None:
        self.slide, self.folder, self.target, self.note = slide, folder, target, note
        self.started = time.perf_counter()
        self.counts: Counter = Counter()
        self.analysed = self.taken = self.unlike = self.pending = 0
        self.skipped: list[tuple[str, str]] = []
        self.stopped = self.exhausted = False
        self.error: str | None = None
        (folder / "fields").mkdir(parents=True, exist_ok=True)  # Ray's workers may have
        (folder / "cells").mkdir(exist_ok=True)  # written the slide's first fields already
        self.csv_handle = (folder / "cells.csv").open("w", newline="")
        self.csv = csv.writer(self.csv_handle)
        self.csv.writerow(CELL_COLUMNS)
        self.parquet = _ParquetCells(folder / "cells.parquet") if parquet else None
        self.coco_images = (folder / ".coco-images.part").open("w")
        self.coco_annotations = (folder / ".coco-annotations.part").open("w")
        self.annotations = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def commit(self, index: int, task: _FieldTask, outcome: _FieldOutcome) -> None:
        """A field's outcome, in field order."""
        self.taken = index
        result = outcome.result
        if result is None:
            self.skipped.append((task.path, outcome.error or "could not be analysed"))
            return
        self.analysed += 1
        self.unlike += result.unlike_training
        self.counts.update(result.counts())
        rows = _cell_rows(self.slide.slide_id, task.stem, result)
        self.csv.writerows([_csv_value(c, v) for c, v in zip(CELL_COLUMNS, row, strict=True)]
                           for row in rows)
        if self.parquet:
            self.parquet.add(rows)
        self.coco_images.write(json.dumps({"id": index, "file_name": result.image,
                                           "width": result.width,
                                           "height": result.height}) + "\n")
        for entry in result.to_coco(index):
            self.annotations += 1
            self.coco_annotations.write(json.dumps(
                {"id": self.annotations, **entry,
                 "area": entry["bbox"][2] * entry["bbox"][3], "iscrowd": 0}) + "\n")
        if self.target and self.total >= self.target:
            self.stopped = True

    def discard(self, task: _FieldTask) -> None:
        """A field analysed ahead (another worker) after the target was reached."""
        for path in [*(self.folder / "fields").glob(f"{task.stem}.*"),
                     *(self.folder / "cells").glob(f"{task.stem}_*.jpg")]:
            path.unlink(missing_ok=True)

    def _close(self) -> None:
        self.csv_handle.close()
        if self.parquet:
            self.parquet.close()
        self.coco_images.close()
        self.coco_annotations.close()

    def _write_coco(self) -> None:
        images = self.folder / ".coco-images.part"
        annotations = self.folder / ".coco-annotations.part"
        info = {"description": f"leukodiff analyze, slide {self.slide.slide_id}: white-cell "
                "detections (COCO results); image id n is fields/000n_*",
                "date_created": datetime.now(UTC).isoformat(timespec="seconds")}
        with (self.folder / "detections.coco.json").open("w") as out:
            out.write(f'{{"info": {json.dumps(info)},\n"images": [')
            _join_lines(out, images)
            out.write(f'],\n"categories": {json.dumps(coco_categories())},\n"annotations": [')
            _join_lines(out, annotations)
            out.write("]}\n")
        images.unlink()
        annotations.unlink()

    def finish(self, models: dict[str, str]) -> dict:
        """Close the files, write the COCO file and report, then differential.json."""
        self._close()
        self._write_coco()
        differential = Differential.of_counts(self.counts, self.analysed, self.unlike)
        fields_total = len(self.slide.fields)
        if self.error:
            status = FAILED
        elif self.analysed == 0:
            status, self.error = FAILED, "no field could be analysed"
        elif self.stopped and self.target:
            status = TARGET_REACHED
        else:
            status = DONE
        notes = [self.order_note(status)]
        if self.error:
            notes.append(f"Failed: {self.error}.")
        write_report(self.folder / "report.html", differential, _CsvGallery(self.folder),
                     self.skipped, models, title=f"Slide {self.slide.slide_id}: white-cell "
                     "differential", notes=notes)
        row = _row(self.slide, status, differential, fields_total=fields_total,
                   taken=self.taken, failed=len(self.skipped),
                   seconds=time.perf_counter() - self.started,
                   note="; ".join(filter(None, [self.note, self.error])),
                   report=f"{SLIDES}/{self.folder.name}/report.html")
        _atomic_write(self.folder / MARKER, json.dumps(
            {**differential.to_dict(), "slide": row, "order": field_order,
             "target": self.target,
             "skipped": [{"input": i, "reason": r} for i, r in self.skipped]}, indent=2) + "\n")
        return row

    def order_note(self, status: str) -> str:
        fields_total = len(self.slide.fields)
        text = f"{fields_total} field(s), {field_order}"
        if status == TARGET_REACHED:
            return (f"{text}; target of {self.target} white cells reached after "
                    f"{self.taken} of {fields_total} fields ({self.total} counted: the field "
                    "that reached the target is counted whole; later fields not analysed).")
        if self.target:
            return (f"{text}; target of {self.target} white cells not reached: all fields "
                    f"taken, {self.total} white cells counted.")
        return f"{text}; all taken."

    def abandon(self) -> None:
        """Interrupted: close the files; the folder stays partial (no differential.json),
        so --resume redoes it."""
        with contextlib.suppress(Exception):
            self._close()


def _join_lines(out, path: Path) -> None:
    with path.open() as lines:
        for number, line in enumerate(lines):
            out.write(("," if number else "") + line.rstrip("\n"))


class _CsvGallery:
    """A slide report's gallery: thumbnail files under cells/, read back from cells.csv
    one label at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def figures(self, label: str) -> Iterator[tuple[str, str, float]]:
        with (self.folder / "cells.csv").open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row["label"] == label:
                    yield (f"cells/{row['field']}_{int(row['cell']):03d}.jpg",
                           f"{Path(row['image']).name} #{row['cell']}",
                           float(row["type_confidence"]))


def _row(slide: Slide, status: str, differential: Differential | None = None, *,
         fields_total: int = 0, taken: int = 0, failed: int = 0, seconds: float = 0.0,
         note: str = "", report: str = "") -> dict:
    d = differential
    return {"slide": slide.slide_id, "status": status, "fields_total": fields_total,
            "fields_taken": taken, "fields_analysed": d.fields if d else 0,
            "fields_failed": failed, "white_cells": d.total if d else 0,
            "identified": d.identified if d else 0,
            **{f"pct_{t}": round(d.percentages[t], 2) if d else None for t in TYPES},
            "unidentified": d.counts[UNIDENTIFIED] if d else 0,
            "warning": (d.warning or "") if d else "", "seconds": round(seconds, 2),
            "note": note, "report": report}


def _finished_row(folder: Path) -> dict | None:
    """The summary row of a slide finished by an earlier run (None: not finished)."""
    try:
        saved = json.loads((folder / MARKER).read_text())
        row = saved["slide"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return row if isinstance(row, dict) and row.get("status") in FINISHED else None


def write_summary(out_dir: Path, run: SlidesRun) -> None:
    """OUT/summary.csv and OUT/summary.json: one row per slide of the run."""
    lines = [SUMMARY_COLUMNS]
    lines += [["" if row.get(c) is None else str(row.get(c)) for c in SUMMARY_COLUMNS]
              for row in run.rows]
    partial = out_dir / ".summary.csv.partial"
    with partial.open("w", newline="") as handle:
        csv.writer(handle).writerows(lines)
    os.replace(partial, out_dir / "summary.csv")
    _atomic_write(out_dir / "summary.json", json.dumps(
        {"slides": run.rows, "notes": run.notes, "interrupted": run.interrupted,
         "order": field_order, "categories": list(COCO_CATEGORY_IDS)}, indent=2) + "\n")
