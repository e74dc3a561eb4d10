"""Slides as the unit of a run: one differential per slide (patient sample), many slides
per run, worker processes, results streamed to disk, resumable.

    slides = slides_from_folders(["archive/"])      # each subfolder: one slide
    slides = slides_from_manifest("slides.csv")     # columns slide_id,path
    run = analyze_slides(slides, "out/", AnalyzerSpec(), workers=2, target=100)

Layout of the output folder:

    OUT/summary.csv, OUT/summary.json       one row per slide of the run
    OUT/slides/<slide>/report.html          counts, %, a gallery of cells/*.jpg
    OUT/slides/<slide>/cells.csv (+ cells.parquet with pyarrow)   one row per cell
    OUT/slides/<slide>/detections.coco.json, fields/*.png|json|geojson, cells/*.jpg
    OUT/slides/<slide>/differential.json    written last (atomically): the slide is done

A slide's fields are taken in file-name order (`field_order`); fields/0003_x is the
third. With `target`, no field after the one that brings the slide's white cells to the
target is counted (that field counts whole), as a count by hand stops at 100 or 200.

Memory is bounded whatever the number of fields or slides: a field's annotated PNG and
cell thumbnails are written by whichever process analysed it, as soon as it is done; its
cells are appended to the slide's CSV/Parquet by this process, in field order (so any
number of workers writes the same files); the differential is accumulated from counts;
at most a few fields per worker are in flight, and the report is written from the CSV.
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import re
import shutil
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from leukodiff.data.scan import IMAGE_SUFFIXES
from leukodiff.imaging import ImageError, load_image
from leukodiff.pipeline.analyzer import (
    COCO_CATEGORY_IDS,
    UNIDENTIFIED,
    AnalysisError,
    Analyzer,
    Differential,
    FieldResult,
    coco_categories,
)
from leukodiff.reports.outputs import CSV_COLUMNS, cell_thumbnail, write_field, write_report
from leukodiff.reports.run import OutputExistsError, models_of
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


@dataclass(frozen=True)
class AnalyzerSpec:
    """What each worker loads (`Analyzer.load` arguments): picklable, unlike an Analyzer."""

    detector: str = "detector"
    mononuclear: str = "mononuclear"
    polymorphonuclear: str = "polymorphonuclear"
    backend: str = "auto"
    min_confidence: float | None = None

    def load(self, threads: int | None) -> Analyzer:
        return Analyzer.load(self.detector, self.mononuclear, self.polymorphonuclear,
                             backend=self.backend, threads=threads,
                             min_confidence=self.min_confidence)


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


def _field_stem(index: int, path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)
    return f"{index:04d}_{stem[:60]}"


def _analyze_field(analyzer: Analyzer, task: _FieldTask) -> _FieldOutcome:
    """One field, wherever it runs: analysed, its PNG/JSON/GeoJSON and cell thumbnails
    written; only its cells come back. An unusable image comes back as its reason."""
    name = task.name or task.path
    try:
        image = load_image(task.path)
        result = analyzer(image, name=name, look=True)
    except (ImageError, AnalysisError) as error:
        reason = str(error).removeprefix(f"{task.path}: ").removeprefix(f"{name}: ")
        return _FieldOutcome(None, reason)
    folder = Path(task.folder)
    write_field(folder, task.stem, image, result)
    for number, cell in enumerate(result.cells, start=1):
        cell_thumbnail(image, cell.box).convert("RGB").save(
            folder / "cells" / f"{task.stem}_{number:03d}.jpg", quality=85)
    return _FieldOutcome(result)


_worker: Analyzer | None = None


def _init_worker(spec: AnalyzerSpec) -> None:
    """A worker process: Ctrl-C is the parent's to handle; one Analyzer, one thread."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = spec.load(threads=1)


def _analyze_in_worker(task: _FieldTask) -> _FieldOutcome:
    assert _worker is not None, "worker not initialised"
    return _analyze_field(_worker, task)


class _Inline:
    """The executor of --workers 1: each field analysed in this process at submit."""

    def __init__(self, analyzer: Analyzer) -> None:
        self.analyzer = analyzer

    def submit(self, _fn: Callable, task: _FieldTask) -> Future:
        future: Future = Future()
        try:
            future.set_result(_analyze_field(self.analyzer, task))
        except Exception as error:  # as a pool would: raised at .result()
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


class SlideProgress:
    """What a run tells as it goes (the CLI draws bars; library callers get nothing)."""

    def run_started(self, slides: int) -> None: ...

    def slide_started(self, slide: Slide) -> None: ...

    def field_done(self, slide: Slide) -> None: ...

    def slide_finished(self, slide: Slide, row: dict) -> None: ...


@dataclass
class SlidesRun:
    rows: list[dict] = field(default_factory=list)  # one per slide, in slide order
    notes: list[str] = field(default_factory=list)  # about the whole run
    interrupted: bool = False


class SlidesInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: finished slides kept, the summary written, `run` says so."""

    def __init__(self, run: SlidesRun) -> None:
        super().__init__("interrupted")
        self.run = run


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


def _parquet_available() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _claim(slide: Slide, out_dir: Path, resume: bool) -> tuple[dict | None, str]:
    """Before a slide's first field: its summary row when there is nothing to do
    (finished earlier with `resume`, or no images), else None and the note on the folder
    an earlier run left (removed here, so the slide is redone from scratch)."""
    folder = out_dir / SLIDES / slide.folder_name
    if resume and (row := _finished_row(folder)) is not None:
        return {**row, "note": "finished by an earlier run: skipped (--resume)"}, ""
    if not slide.fields:
        return _row(slide, NO_IMAGES, note=f"{slide.source}: no image files"), ""
    if not folder.exists():
        return None, ""
    shutil.rmtree(folder)
    return None, ("partial results of an interrupted run replaced: redone from scratch"
                  if resume else "earlier results replaced (--overwrite)")


def _cut_short(run: SlidesRun, slides: Sequence[Slide], rows: dict[int, dict],
               states: dict[int, _SlideState], out_dir: Path, note: str = "") -> None:
    """A run stopped (Ctrl-C, a dead worker or cluster): slides in progress are left
    partial for --resume, finished ones kept; the summary says which is which."""
    for number, state in states.items():
        state.abandon()
        rows[number] = _row(state.slide, INTERRUPTED, fields_total=len(state.slide.fields),
                            note="interrupted: partial folder, redone by --resume")
    for number, slide in enumerate(slides):
        if number not in rows:
            rows[number] = _row(slide, NOT_STARTED, fields_total=len(slide.fields))
    run.rows = [rows[n] for n in sorted(rows)]
    run.interrupted = True
    if note:
        run.notes.append(note)
    write_summary(out_dir, run)


ENGINES = ("local", "ray")


def analyze_slides(slides: Sequence[Slide], out_dir: str | Path,
                   spec: AnalyzerSpec = AnalyzerSpec(), *, workers: int | None = 1,
                   threads: int | None = None, target: int | None = None,
                   resume: bool = False, overwrite: bool = False,
                   progress: SlideProgress | None = None,
                   log: Callable[[str], None] = lambda _: None, engine: str = "local",
                   address: str | None = None) -> SlidesRun:
    """Analyse every slide into OUT/slides/<slide>/, then write OUT/summary.csv|json.

    `workers` > 1: a process pool (spawn), one Analyzer of one thread per worker; the
    fields of a slide are spread over the workers and committed in field order, so the
    outputs are those of `workers=1` (in this process, `threads` threads). `resume`: a
    slide whose differential.json says it finished is skipped; a slide folder without it
    (an interrupted run) is removed and redone. Without `resume` or `overwrite` an output
    folder that holds anything is refused (OutputExistsError); `overwrite` replaces the
    folders of this run's slides. ModelFileError / BackendError come before any work.

    `engine="ray"`: the same job on Ray (`reports.slides_ray`: an actor pool of `workers`
    Analyzers, None: one per CPU of the cluster; `address`: an existing cluster, None: a
    local one for the run); the same files. RayEngineError: Ray missing, unreachable or
    failed mid-run (finished slides kept).
    """
    out_dir = Path(out_dir)
    progress = progress or SlideProgress()
    if resume and overwrite:
        raise ValueError("--resume keeps finished slides and --overwrite replaces them: "
                         "give one")
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)} (not {engine!r})")
    if address is not None and engine != "ray":
        raise ValueError("--address names a Ray cluster: add --engine ray")
    if workers is None and engine == "local":
        workers = os.cpu_count() or 1
    if workers is not None and workers < 1:
        raise ValueError("--workers must be 1 or more")
    if engine == "ray":
        from leukodiff.reports.slides_ray import check_ray

        check_ray(address)
    if target is not None and target < 1:
        raise ValueError("--target must be a positive number of white cells (100 or 200)")
    if out_dir.exists() and any(out_dir.iterdir()) and not (resume or overwrite):
        raise OutputExistsError(f"{out_dir} already holds results; pass --resume to skip "
                                "the slides finished there, --overwrite to replace them, "
                                "or choose another --out")
    (out_dir / SLIDES).mkdir(parents=True, exist_ok=True)
    run = SlidesRun()
    parquet = _parquet_available()
    if not parquet:
        run.notes.append("cells.parquet not written: pyarrow is not installed (pip install "
                         "'leukodiff[parquet]'); cells.csv holds the same rows")
    analyzer = spec.load(threads if workers == 1 else 1)  # model errors before any work
    models = models_of(analyzer)
    if engine == "ray":
        analyzer.close()
        from leukodiff.reports.slides_ray import analyze_on_ray

        return analyze_on_ray(slides, out_dir, spec, run, models, workers=workers,
                              address=address, target=target, resume=resume,
                              parquet=parquet, progress=progress, log=log)
    assert workers is not None
    if workers == 1:
        executor: Any = _Inline(analyzer)
    else:
        analyzer.close()
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(spec,))
    rows: dict[int, dict] = {}
    states: dict[int, _SlideState] = {}
    progress.run_started(len(slides))

    def prepare(number: int, slide: Slide) -> _SlideState | None:
        row, note = _claim(slide, out_dir, resume)
        if row is not None:
            rows[number] = row
            progress.slide_finished(slide, row)
            return None
        progress.slide_started(slide)
        return _SlideState(slide, out_dir / SLIDES / slide.folder_name, target, parquet, note)

    def tasks() -> Iterator[tuple[int, _SlideState, int, _FieldTask]]:
        for number, slide in enumerate(slides):
            state = prepare(number, slide)
            if state is None:
                continue
            states[number] = state
            for index, path in enumerate(slide.fields, start=1):
                if state.stopped:
                    break
                yield number, state, index, _FieldTask(str(state.folder),
                                                       _field_stem(index, path), str(path))
            state.exhausted = True

    def finish_ready() -> None:
        for number, state in list(states.items()):
            if state.exhausted and state.pending == 0:
                del states[number]
                rows[number] = state.finish(models)
                progress.slide_finished(state.slide, rows[number])

    window = 1 if workers == 1 else 2 * workers + 1
    inflight: deque[tuple[_SlideState, int, _FieldTask, Future]] = deque()
    todo = tasks()
    try:
        while True:
            while len(inflight) < window:
                item = next(todo, None)
                if item is None:
                    break
                _, state, index, task = item
                state.pending += 1
                inflight.append((state, index, task, executor.submit(_analyze_in_worker,
                                                                     task)))
            finish_ready()
            if not inflight:
                break
            state, index, task, future = inflight.popleft()
            state.pending -= 1
            if future.cancelled():
                continue
            try:
                outcome = future.result()
            except BrokenProcessPool:
                raise
            except Exception as error:  # a bug or a full disk: this slide fails, run goes on
                outcome = None
                if not state.stopped:
                    state.error = f"{Path(task.path).name}: {type(error).__name__}: {error}"
                    state.stopped = True
                    log(f"slide {state.slide.slide_id}: {state.error}")
                    for other, _, _, pending in inflight:
                        if other is state:
                            pending.cancel()
            if outcome is not None:
                if state.stopped:
                    state.discard(task)
                else:
                    state.commit(index, task, outcome)
                    progress.field_done(state.slide)
                    if state.stopped:  # the target: later fields of the slide are not taken
                        for other, _, _, pending in inflight:
                            if other is state:
                                pending.cancel()
    except (KeyboardInterrupt, BrokenProcessPool) as error:
        executor.shutdown(wait=True, cancel_futures=True)
        _cut_short(run, slides, rows, states, out_dir,
                   f"a worker process died ({error}); rerun with --resume"
                   if isinstance(error, BrokenProcessPool) else "")
        if isinstance(error, KeyboardInterrupt):
            raise SlidesInterrupted(run) from None
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if workers == 1:
            analyzer.close()
    run.rows = [rows[n] for n in sorted(rows)]
    write_summary(out_dir, run)
    return run


def run_totals(rows: Iterable[dict]) -> Counter:
    """How many slides of a run ended with each status."""
    return Counter(row["status"] for row in rows)
