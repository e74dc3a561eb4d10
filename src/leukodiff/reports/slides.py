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

import multiprocessing
import os
import shutil
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leukodiff.imaging import ImageError, load_image
from leukodiff.pipeline.analyzer import (
    AnalysisError,
    Analyzer,
)
from leukodiff.reports.outputs import cell_thumbnail, write_field
from leukodiff.reports.run import OutputExistsError, models_of
from leukodiff.reports.slide_inputs import (  # noqa: F401 (re-exported: the slide API)
    Slide,
    SlideInputError,
    slides_from_folders,
    slides_from_manifest,
)
from leukodiff.reports.slide_outputs import (  # noqa: F401 (re-exported: the engines share them)
    DONE,
    FINISHED,
    INTERRUPTED,
    NO_IMAGES,
    NOT_STARTED,
    SLIDES,
    TARGET_REACHED,
    SlidesRun,
    _FieldOutcome,
    _FieldTask,
    _finished_row,
    _row,
    _SlideState,
    field_order,
    write_summary,
)


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


class SlidesInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: finished slides kept, the summary written, `run` says so."""

    def __init__(self, run: SlidesRun) -> None:
        super().__init__("interrupted")
        self.run = run


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
