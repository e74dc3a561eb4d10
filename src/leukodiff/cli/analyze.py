"""`leukodiff analyze`: smear images, or slides, to a differential and its report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from leukodiff.cli.common import (
    SHORT_NAMES,
    Backend,
    DetectorModel,
    MononuclearModel,
    PolymorphonuclearModel,
    _fail,
    _track,
    console,
)


def analyze(
    paths: list[str] = typer.Argument(None, help="Smear images, folders of images, or "
                                      "globs; with --slides, folders of slide folders."),
    out: Path = typer.Option(..., help="Output folder (refused if it holds results)."),
    overwrite: bool = typer.Option(False, help="Replace results already in --out."),
    slides: bool = typer.Option(False, "--slides", help="Slides as the unit: each "
                                "subfolder of PATHS is one slide (a PATH without subfolders "
                                "is one slide); one report per slide + a run summary."),
    manifest: Path | None = typer.Option(None, help="Slides from a CSV with columns "
                                         "slide_id,path (a field image or a folder of them; "
                                         "relative to the CSV's folder)."),
    target: int | None = typer.Option(None, help="Slides: stop counting a slide once this "
                                      "many white cells are found (100 or 200), its fields "
                                      "taken in file-name order."),
    workers: int | None = typer.Option(None, help="Slides: worker processes, one thread "
                                       "each [default: one per core]; 1 runs in this process."),
    resume: bool = typer.Option(False, help="Slides: skip the slides finished in --out "
                                "(after a crash or Ctrl-C); redo half-finished ones."),
    engine: str = typer.Option("local", help="Slides: local (a process pool) or ray (Ray "
                               "Data over an actor pool; the `ray` extra): the same outputs."),
    address: str | None = typer.Option(None, help="Slides, --engine ray: a Ray cluster to "
                                       "join (HEAD:6379, or auto under `ray job "
                                       "submit`) "
                                       "[default: a local one for the run]."),
    detector: DetectorModel = "detector",
    mononuclear: MononuclearModel = "mononuclear",
    polymorphonuclear: PolymorphonuclearModel = "polymorphonuclear",
    min_confidence: float | None = typer.Option(
        None, help="Call cells below this type confidence 'unidentified' "
        "[default: each model's calibrated threshold]."),
    backend: Backend = "auto",
    threads: int | None = typer.Option(None, help="CPU threads [default: all cores]."),
    monolayer_only: bool = typer.Option(False, help="Whole slides: count only the cells of "
                                        "the counting area (the monolayer, where red cells "
                                        "just touch); thick and thin areas are reported, "
                                        "not searched."),
) -> None:
    """Find, classify and count the white cells of smear images; write a report.

    Besides the report, fields/*.png, fields/*.json, cells.csv and differential.json:
    fields/*.geojson (each field's cells as QuPath detections) and detections.coco.json
    (every cell of the run as COCO detection results, with the images and categories).

    With --slides or --manifest: one differential per slide in OUT/slides/<slide>/ (the
    same outputs, cells also as cells.parquet, thumbnails in cells/), and OUT/summary.csv
    and summary.json, one row per slide.

    A whole-slide file (a pyramidal or OME TIFF, or larger than 8000 px a side; a DICOM
    WSI folder or .dcm file; .svs/.ndpi/.mrxs/... through OpenSlide: the `wsi` extra) is
    read window by window at the detector's scale (from its microns per pixel, else
    measured on its red cells) and counted as one image: fields/*.overview.png shows its
    cells on the slide's lowest level; its counting area (monolayer) is reported.
    """
    if slides or manifest is not None:
        if monolayer_only:
            raise _fail("--monolayer-only works on whole-slide files (analyze slide.ome.tif), "
                        "not with --slides or --manifest")
        _analyze_slides(paths or [], out, manifest, overwrite, resume, target, workers,
                        threads, detector, mononuclear, polymorphonuclear, min_confidence,
                        backend, engine, address)
        return
    if (resume or target is not None or workers is not None or engine != "local"
            or address is not None):
        raise _fail("--resume, --target, --workers, --engine and --address work on slides: "
                    "add --slides (each subfolder of PATHS is a slide) or --manifest "
                    "slides.csv")
    if not paths:
        raise _fail("give smear images, folders or globs to analyse (or --manifest)")
    from leukodiff.models.files import ModelFileError
    from leukodiff.pipeline import Analyzer
    from leukodiff.pipeline.backends import BackendError
    from leukodiff.reports.run import OutputExistsError, analyze_to_folder

    try:
        with Analyzer.load(detector, mononuclear, polymorphonuclear, backend=backend,
                           threads=threads, min_confidence=min_confidence) as analyzer:
            if reason := getattr(analyzer.backend, "fallback_reason", None):
                console.print(f"[yellow]using torch[/]: {reason}", highlight=False)
            run = analyze_to_folder(analyzer, paths, out, overwrite=overwrite,
                                    monolayer_only=monolayer_only, track=_track)
    except (ModelFileError, BackendError, OutputExistsError) as error:
        raise _fail(str(error)) from None
    diff = run.differential
    table = Table(title=f"Differential: {diff.fields} fields, {diff.total} white cells")
    for column in ("type", "count", "% of identified"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for label, count in diff.counts.items():
        percent = diff.percentages.get(label)
        table.add_row(label, str(count), "" if percent is None else f"{percent:.1f}")
    console.print(table)
    for name, reason in run.skipped:
        console.print(f"[yellow]skipped[/] {name}: {reason}", highlight=False)
    for name, note in run.notes:
        console.print(f"[cyan]note[/] {name}: {note}", highlight=False)
    if diff.warning:
        console.print(f"[bold yellow]warning[/]: {diff.warning}", highlight=False)
    console.print(f"report: {out / 'report.html'}  (per field: {out / 'fields'}, "
                  f"per cell: {out / 'cells.csv'}, counts: {out / 'differential.json'})")
    console.print(f"for other tools: {out / 'fields'}/*.geojson (QuPath), "
                  f"{out / 'detections.coco.json'} (COCO)", highlight=False)
    if not run.results:
        raise _fail("no image could be analysed")


class _SlideBars:
    """Progress of a slides run: a bar per slide in progress and one overall (on a
    terminal), and a line per finished slide (everywhere)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                             MofNCompleteColumn(), console=console, transient=True,
                             disable=not console.is_terminal)
        self.overall = None
        self.tasks: dict[str, object] = {}

    def __enter__(self) -> _SlideBars:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.bars.__exit__(*exc_info)

    def run_started(self, slides: int) -> None:
        self.overall = self.bars.add_task("slides", total=slides)

    def slide_started(self, slide) -> None:
        self.tasks[slide.slide_id] = self.bars.add_task(
            f"  {escape(slide.slide_id)} (fields)", total=len(slide.fields))

    def field_done(self, slide) -> None:
        self.bars.advance(self.tasks[slide.slide_id])

    def slide_finished(self, slide, row: dict) -> None:
        if (task := self.tasks.pop(slide.slide_id, None)) is not None:
            self.bars.remove_task(task)
        self.bars.advance(self.overall)
        done = self.bars.tasks[self.overall].completed
        total = self.bars.tasks[self.overall].total
        detail = (f"{row['white_cells']} white cells, {row['fields_analysed']} of "
                  f"{row['fields_total']} fields, {row['seconds']:.1f} s")
        note = f" ({row['note']})" if row.get("note") else ""
        self.bars.console.print(f"[{done:.0f}/{total:.0f}] slide {escape(row['slide'])}: "
                                f"{row['status']}, {detail}{escape(note)}", highlight=False)


def _analyze_slides(paths: list[str], out: Path, manifest: Path | None, overwrite: bool,
                    resume: bool, target: int | None, workers: int | None,
                    threads: int | None, detector: str, mononuclear: str,
                    polymorphonuclear: str, min_confidence: float | None,
                    backend: str, engine: str, address: str | None) -> None:
    import os

    from leukodiff.models.files import ModelFileError
    from leukodiff.pipeline.backends import BackendError
    from leukodiff.reports.run import OutputExistsError
    from leukodiff.reports.slides import (
        FINISHED,
        AnalyzerSpec,
        SlideInputError,
        SlidesInterrupted,
        analyze_slides,
        slides_from_folders,
        slides_from_manifest,
    )
    from leukodiff.reports.slides_ray import RayEngineError

    if manifest is not None and paths:
        raise _fail("give either --manifest or slide folders, not both")
    if manifest is None and not paths:
        raise _fail("--slides needs folders whose subfolders are slides")
    try:
        if manifest is not None:
            found, notes = slides_from_manifest(manifest), []
        else:
            found, notes = slides_from_folders(paths)
    except SlideInputError as error:
        raise _fail(str(error)) from None
    for note in notes:
        console.print(f"[yellow]note[/]: {escape(note)}", highlight=False)
    if engine != "ray" or address is None:  # a cluster's own size is its CPUs
        workers = workers or os.cpu_count() or 1
    where = (" on Ray" + (f" at {address}" if address else " (local)")) if engine == "ray" else ""
    console.print(f"{len(found)} slide(s), {sum(len(s.fields) for s in found)} fields; "
                  + (f"{workers} worker(s)" if workers else "one worker per CPU") + where
                  + (f"; target {target} white cells" if target else ""), highlight=False)
    spec = AnalyzerSpec(detector, mononuclear, polymorphonuclear, backend, min_confidence)
    try:
        with _SlideBars() as bars:
            run = analyze_slides(found, out, spec, workers=workers, threads=threads,
                                 target=target, resume=resume, overwrite=overwrite,
                                 progress=bars, log=console.print, engine=engine,
                                 address=address)
    except SlidesInterrupted as interrupted:
        finished = sum(row["status"] in FINISHED for row in interrupted.run.rows)
        console.print(f"[bold yellow]interrupted[/]: {finished} slide(s) finished and kept; "
                      f"summary in {out / 'summary.csv'}; rerun with --resume to go on",
                      highlight=False)
        raise typer.Exit(code=130) from None
    except (ModelFileError, BackendError, OutputExistsError, ValueError,
            RayEngineError) as error:
        raise _fail(str(error)) from None
    _print_slides_summary(run.rows)
    for note in run.notes:
        console.print(f"[yellow]note[/]: {escape(note)}", highlight=False)
    console.print(f"per slide: {out / 'slides'}/<slide>/report.html (cells.csv, "
                  f"differential.json, fields/); run summary: {out / 'summary.csv'}, "
                  f"{out / 'summary.json'}", highlight=False)
    if not any(row["status"] in FINISHED for row in run.rows):
        raise _fail("no slide could be analysed")


def _print_slides_summary(rows: list[dict]) -> None:
    from rich import box

    from leukodiff.taxonomy import CellType

    table = Table(title=f"Run summary: {len(rows)} slide(s); % of identified cells",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    types = [str(t) for t in CellType]
    widths = {"slide": min(16, max((len(row["slide"]) for row in rows), default=5)),
              "status": 7}  # "target reached" and "no images" fold
    for column in ("slide", "status", "fields", "WBC", *(SHORT_NAMES[t] for t in types),
                   "unid", "s"):
        table.add_column(column, justify="left" if column in widths else "right",
                         min_width=widths.get(column), no_wrap=column not in widths)
    for row in rows:
        table.add_row(escape(row["slide"]), row["status"],
                      f"{row['fields_analysed']}/{row['fields_total']}",
                      str(row["white_cells"]),
                      *("" if row[f"pct_{t}"] is None else f"{row[f'pct_{t}']:.0f}"
                        for t in types),
                      str(row["unidentified"]), f"{row['seconds']:.1f}")
    console.print(table)
    for row in rows:
        if row["warning"]:
            console.print(f"[bold yellow]warning[/] {escape(row['slide'])}: "
                          f"{escape(row['warning'])}", highlight=False)

