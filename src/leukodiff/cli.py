"""The `leukodiff` command. Thin: each command calls library code and prints."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from leukodiff.server.cli import (
    create_user_command,
    deactivate_user_command,
    export_training_command,
    serve,
    set_password_command,
)


def _require_torch() -> None:
    """Training, evaluation and export need the [torch] extra; analysis alone does not."""
    if "--help" in sys.argv:  # help needs no torch
        return
    for module in ("torch", "torchvision"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            Console().print("[bold red]error:[/] this command needs PyTorch: pip install "
                            "'leukodiff\\[torch]' (analyze alone runs on onnxruntime)",
                            highlight=False)
            raise typer.Exit(code=1)


app = typer.Typer(help="White-blood-cell differential counts from blood smear images.",
                  no_args_is_help=True)
data_app = typer.Typer(help="Inspect the blood-smear data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
train_app = typer.Typer(help="Train the level-1 detector or the level-2 classifiers.",
                        no_args_is_help=True, callback=_require_torch)
app.add_typer(train_app, name="train")
evaluate_app = typer.Typer(help="Measure a trained model on held-out data.", no_args_is_help=True,
                           callback=_require_torch)
app.add_typer(evaluate_app, name="evaluate")
export_app = typer.Typer(help="Export trained models for other runtimes.", no_args_is_help=True,
                         callback=_require_torch)
app.add_typer(export_app, name="export")
console = Console()
SHORT_NAMES = {"lymphocyte": "Lym", "monocyte": "Mono", "neutrophil": "Neut",
               "eosinophil": "Eos", "basophil": "Baso"}


DataRoot = typer.Option(
    None, "--data-root", help="Folder holding bccd/, kbc/, pbc/, bcd/ "
    "[default: $LEUKODIFF_DATA, else ../shared/data beside the checkout]."
)


WeightsDir = typer.Option(
    None, "--weights-dir", help="ImageNet TFLite weights folder "
    "[default: $LEUKODIFF_WEIGHTS, else ../shared/weights]."
)


def _track(items, description: str = ""):
    """Progress bar for long library loops (library code itself never prints)."""
    from rich.progress import track

    if not console.is_terminal:  # logs and CI: no bar redraws
        return items
    return track(items, description=description, console=console, transient=True)


def _fail(message: str) -> typer.Exit:
    console.print("[bold red]error:[/]", escape(message), highlight=False)
    return typer.Exit(code=1)


@data_app.command("summary")
def data_summary(
    data_root: Path | None = DataRoot,
    show_skipped: int = typer.Option(20, help="List at most this many skipped items per source."),
) -> None:
    """Count every source x cell type, boxes per field, duplicates and skipped files."""
    from leukodiff.data.root import DataNotFoundError
    from leukodiff.data.root import data_root as resolve_root
    from leukodiff.data.summary import BOX_KINDS, CELL_COLUMNS, summarise_all

    try:
        root = resolve_root(data_root)
    except DataNotFoundError as error:
        raise _fail(str(error)) from None
    console.print(f"data root: {root}")
    summaries = summarise_all(root, _track)

    cells = Table(title="White cells by source and type")
    cells.add_column("source")
    cells.add_column("subset")
    for column in [*CELL_COLUMNS, "total"]:
        cells.add_column(SHORT_NAMES.get(column, column), justify="right")
    for s in summaries:
        if s.missing:
            cells.add_row(s.source, "[red]missing[/]", *[""] * (len(CELL_COLUMNS) + 1))
        for subset, counts in sorted(s.cells.items()):
            cells.add_row(s.source, subset, *(str(counts.get(c, 0)) for c in CELL_COLUMNS),
                          str(sum(counts.values())))
    console.print(cells)
    console.print("Lym lymphocyte, Mono monocyte, Neut segmented neutrophil, Eos eosinophil, "
                  "Baso basophil; untyped: white cells without a single known type.")

    fields = Table(title="Smear fields: boxes and white cells per field")
    for column in ["source", "fields", *BOX_KINDS, "fields by WBC boxes"]:
        fields.add_column(column, justify="left" if column == "source" else "right")
    for s in summaries:
        if s.fields:
            per_field = ", ".join(f"{n}: {c}" for n, c in sorted(s.wbc_per_field.items()))
            fields.add_row(s.source, str(s.fields), *(str(s.boxes.get(k, 0)) for k in BOX_KINDS),
                           per_field)
    console.print(fields)

    for s in summaries:
        if s.missing:
            console.print(f"[red]{s.source}:[/] {s.missing}", highlight=False)
        if s.duplicate_sets:
            console.print(f"{s.source}: {len(s.duplicate_sets)} sets of exact-duplicate images "
                          "(kept on one side of every split):")
            for paths in s.duplicate_sets[:show_skipped]:
                console.print("  " + " = ".join(str(p.relative_to(root)) for p in paths),
                              highlight=False)
        else:
            console.print(f"{s.source}: no exact-duplicate images")
        if s.skipped:
            console.print(f"{s.source}: {len(s.skipped)} skipped:")
            for item in s.skipped[:show_skipped]:
                console.print(f"  {item.path}: {item.reason}", highlight=False)
            if len(s.skipped) > show_skipped:
                console.print(f"  ... and {len(s.skipped) - show_skipped} more")
    if all(s.missing for s in summaries):
        raise typer.Exit(code=1)


@app.command()
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
    detector: str = typer.Option("detector", help="Level-1 model file or shipped name."),
    mononuclear: str = typer.Option("mononuclear", help="Level-2 mononuclear model."),
    polymorphonuclear: str = typer.Option("polymorphonuclear",
                                          help="Level-2 polymorphonuclear model."),
    min_confidence: float | None = typer.Option(
        None, help="Call cells below this type confidence 'unidentified' "
        "[default: each model's calibrated threshold]."),
    backend: str = typer.Option(
        "auto", help="Where the networks run: onnx (onnxruntime), torch, or auto "
        "(onnx when the exported ONNX files are there)."),
    threads: int | None = typer.Option(None, help="CPU threads [default: all cores]."),
) -> None:
    """Find, classify and count the white cells of smear images; write a report.

    Besides the report, fields/*.png, fields/*.json, cells.csv and differential.json:
    fields/*.geojson (each field's cells as QuPath detections) and detections.coco.json
    (every cell of the run as COCO detection results, with the images and categories).

    With --slides or --manifest: one differential per slide in OUT/slides/<slide>/ (the
    same outputs, cells also as cells.parquet, thumbnails in cells/), and OUT/summary.csv
    and summary.json, one row per slide.

    A whole-slide file (a pyramidal or OME TIFF, or larger than 8000 px a side, with the
    `wsi` extra; .svs/.ndpi/... with OpenSlide) is read window by window and counted as
    one image: fields/*.overview.png shows its cells on the slide's lowest level.
    """
    if slides or manifest is not None:
        _analyze_slides(paths or [], out, manifest, overwrite, resume, target, workers,
                        threads, detector, mononuclear, polymorphonuclear, min_confidence,
                        backend)
        return
    if resume or target is not None or workers is not None:
        raise _fail("--resume, --target and --workers work on slides: add --slides (each "
                    "subfolder of PATHS is a slide) or --manifest slides.csv")
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
            run = analyze_to_folder(analyzer, paths, out, overwrite=overwrite, track=_track)
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
                    backend: str) -> None:
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
    workers = workers or os.cpu_count() or 1
    console.print(f"{len(found)} slide(s), {sum(len(s.fields) for s in found)} fields; "
                  f"{workers} worker(s)" + (f"; target {target} white cells" if target
                                            else ""), highlight=False)
    spec = AnalyzerSpec(detector, mononuclear, polymorphonuclear, backend, min_confidence)
    try:
        with _SlideBars() as bars:
            run = analyze_slides(found, out, spec, workers=workers, threads=threads,
                                 target=target, resume=resume, overwrite=overwrite,
                                 progress=bars, log=console.print)
    except SlidesInterrupted as interrupted:
        finished = sum(row["status"] in FINISHED for row in interrupted.run.rows)
        console.print(f"[bold yellow]interrupted[/]: {finished} slide(s) finished and kept; "
                      f"summary in {out / 'summary.csv'}; rerun with --resume to go on",
                      highlight=False)
        raise typer.Exit(code=130) from None
    except (ModelFileError, BackendError, OutputExistsError, ValueError) as error:
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


@export_app.command("onnx")
def export_onnx_command(
    detector: str = typer.Option("detector", help="Level-1 model file or shipped name."),
    mononuclear: str = typer.Option("mononuclear", help="Level-2 mononuclear model."),
    polymorphonuclear: str = typer.Option("polymorphonuclear",
                                          help="Level-2 polymorphonuclear model."),
) -> None:
    """Write each model as ONNX beside its .pt file (what `analyze` runs on onnxruntime)."""
    from leukodiff.models.export import export_onnx
    from leukodiff.models.files import ModelFileError

    try:
        written = export_onnx(detector, mononuclear, polymorphonuclear)
    except ModelFileError as error:
        raise _fail(str(error)) from None
    for role, path in written.items():
        console.print(f"{role}: {path} ({path.stat().st_size / 1e6:.1f} MB)", highlight=False)


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@train_app.command("classifier")
def train_classifier_command(
    task: str = typer.Option("mononuclear", help="mononuclear | polymorphonuclear | flat."),
    out: Path = typer.Option(..., help="Run folder: checkpoints, model.pt, manifest."),
    sources: str = typer.Option("pbc,bccd", help="Comma-separated: data set names "
                                "(pbc, kbc, bccd, chula) or folders of class folders."),
    classes: str = typer.Option("", help="Only these types of the task, e.g. "
                                "'neutrophil,eosinophil' (the paper's 2-class setting)."),
    mode: str = typer.Option("finetune", help="frozen (paper: base frozen, head only) "
                             "| finetune (all layers)."),
    epochs: int = typer.Option(12),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(1e-3, help="Adam learning rate (paper: 1e-3)."),
    seed: int = typer.Option(0, help="Seed of the split, initialisation and augmentation."),
    crop_scale: float = typer.Option(2.6, help="Square crop side / box side, for field cells."),
    max_per_class: int = typer.Option(0, help="Cap cells per class, source and part (quick runs)."),
    augmentation: str = typer.Option("basic", help="basic (flips, turns, zoom, colour "
                                     "jitter) | lab (+ stain and camera: other labs' look)."),
    stain: str = typer.Option("none", help="Colour normalisation of each crop: none | "
                              "reinhard (every crop to one reference look)."),
    resume: bool = typer.Option(False, help="Continue the interrupted run in --out."),
    data_root: Path | None = DataRoot,
    weights_dir: Path | None = WeightsDir,
) -> None:
    """Train a level-2 MobileNet classifier; writes OUT/model.pt and its manifest."""
    from leukodiff.training.classifier import ClassifierConfig, TrainingError, train_classifier

    config = ClassifierConfig(task=task, classes=_split_list(classes),
                              sources=_split_list(sources), mode=mode, epochs=epochs,
                              batch_size=batch_size, lr=lr, seed=seed, crop_scale=crop_scale,
                              max_per_class=max_per_class, augmentation=augmentation,
                              stain=stain)
    try:
        manifest = train_classifier(config, out, data_root=data_root, weights_dir=weights_dir,
                                    resume=resume, track=_track, log=console.print)
    except (TrainingError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    test = manifest["metrics"].get("test", {})
    for name, metrics in test.items():
        console.print(f"test, {name}: accuracy {metrics['accuracy']:.4f}, "
                      f"macro-F1 {metrics['macro_f1']:.4f} (n={metrics['n']})")
    console.print(f"wrote {out / 'model.pt'} and {out / 'model.json'}")


@evaluate_app.command("classifier")
def evaluate_classifier_command(
    model: Path = typer.Option(..., help="A model.pt with its manifest (or a shipped name: "
                               "mononuclear, polymorphonuclear)."),
    sources: str = typer.Option("", help="Data to test on [default: the model's own sources]."),
    part: str = typer.Option("test", help="train | val | test part of the model's split, "
                             "or 'all' (e.g. a source the model never saw)."),
    out: Path | None = typer.Option(None, help="Folder for the confusion-matrix PNG and JSON."),
    data_root: Path | None = DataRoot,
) -> None:
    """Accuracy, precision, recall, F1 per class and the confusion matrix, per source."""
    from leukodiff.evaluation.classifier import evaluate_classifier, metrics_table
    from leukodiff.models.files import ModelFileError
    from leukodiff.training.classifier import TrainingError

    try:
        results = evaluate_classifier(model, _split_list(sources) or None, part,
                                      data_root=data_root, out_dir=out, track=_track)
    except (ModelFileError, TrainingError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    for name, metrics in results.items():
        console.print(metrics_table(metrics, title=f"{model} on {name} ({part})"))
    if out:
        console.print(f"confusion matrices and metrics.json in {out}")


@train_app.command("detector")
def train_detector_command(
    out: Path = typer.Option(..., help="Run folder: checkpoints, detector.pt, manifest."),
    epochs: int = typer.Option(40),
    batch_size: int = typer.Option(8, help="Fields per step."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (linear warm-up, then cosine)."),
    seed: int = typer.Option(0, help="Seed of initialisation, sampling and augmentation."),
    warmup_steps: int = typer.Option(50, help="Steps of linear learning-rate warm-up."),
    val_every: int = typer.Option(2, help="Epochs between validations (and the last one)."),
    validation: str = typer.Option("voc", help="voc: select on BCCD's VOC val list | grouped: "
                                   "on a grouped split of VOC train+val. The test list is "
                                   "never used."),
    mono_oversample: int = typer.Option(5, help="Times a field with a mononuclear cell is "
                                        "drawn per epoch."),
    copy_paste: float = typer.Option(0.5, help="Probability of pasting a mononuclear cell "
                                     "from another training field."),
    pbc_paste: float = typer.Option(0.0, help="Probability of pasting a PBC cell (any of the "
                                    "five types, coloured and sized like the field)."),
    scale_range: str = typer.Option("0.5,1.25", help="Scale jitter: min,max factor."),
    colour_jitter: str = typer.Option("0.25,0.25,0.25,0.04", help="Colour jitter: "
                                      "brightness,contrast,saturation,hue."),
    channel_gain: float = typer.Option(0.15, help="Each RGB channel times 1 +- this "
                                       "(stain and lamp balance)."),
    blur: float = typer.Option(0.3, help="Probability of a Gaussian blur (focus, optics)."),
    group_classifier: bool = typer.Option(True, "--group-classifier/--no-group-classifier",
                                          help="Relabel boxes with a crop classifier trained "
                                          "on BCCD + PBC cells."),
    group_epochs: int = typer.Option(8, help="Epochs of the group classifier (0: keep the "
                                     "one of --init-weights)."),
    group_pbc_per_type: int = typer.Option(800, help="PBC cells per type for the group "
                                           "classifier (0: field cells only)."),
    group_augmentation: str = typer.Option("basic", help="Group classifier augmentation: "
                                           "basic | lab (+ stain and camera)."),
    group_stain: str = typer.Option("none", help="Group classifier crop colour "
                                    "normalisation: none | reinhard."),
    colour_standardise: bool = typer.Option(False, "--colour-standardise/--raw-colours",
                                            help="Standardise each field's colours to BCCD's "
                                            "statistics inside the model."),
    unknown_group: str = typer.Option("ignore", help="Cells whose group is unknown: 'ignore' "
                                      "(neither cell nor background) or 'drop' their fields."),
    init_weights: Path | None = typer.Option(None, help="Start from this detector.pt "
                                             "(fine-tuning)."),
    max_train_fields: int = typer.Option(0, help="Only this many training fields (quick runs)."),
    sources: str = typer.Option("bccd", help="Field sets to learn from, comma-separated: "
                                "bccd (VOC lists), bcd, chula (split by slide/field)."),
    device: str = typer.Option("", help="cpu | cuda [default: cuda when available]."),
    time_limit: float = typer.Option(0.0, help="Stop cleanly after the epoch that passes this "
                                     "many minutes (0: no limit); --resume goes on."),
    resume: bool = typer.Option(False, help="Continue the interrupted run in --out."),
    data_root: Path | None = DataRoot,
    weights_dir: Path | None = WeightsDir,
) -> None:
    """Train the level-1 detector (Faster R-CNN, MobileNetV1-0.5) on smear fields."""
    from leukodiff.models.detector import DetectorSpec
    from leukodiff.training.detector import (
        DetectorConfig,
        DetectorTrainingError,
        test_key,
        train_detector,
    )
    from leukodiff.training.familiarity import write_familiarity

    spec = DetectorSpec(group_classifier=group_classifier, colour_standardise=colour_standardise,
                        group_stain=group_stain)
    try:
        scales = tuple(float(v) for v in _split_list(scale_range))
        jitter = tuple(float(v) for v in _split_list(colour_jitter))
    except ValueError:
        raise _fail("--scale-range and --colour-jitter take comma-separated numbers") from None
    if len(scales) != 2 or len(jitter) != 4:
        raise _fail("--scale-range takes 2 numbers, --colour-jitter 4")
    config = DetectorConfig(spec=spec, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                            warmup_steps=warmup_steps, val_every=val_every,
                            scale_range=scales, color_jitter=jitter,
                            channel_gain=channel_gain, blur=blur,
                            validation=validation, mono_oversample=mono_oversample,
                            copy_paste=copy_paste, pbc_paste=pbc_paste,
                            group_epochs=group_epochs,
                            unknown_group=unknown_group,
                            group_pbc_per_type=group_pbc_per_type,
                            group_augmentation=group_augmentation,
                            init_weights=str(init_weights or ""),
                            max_train_fields=max_train_fields,
                            sources=_split_list(sources))
    try:
        manifest = train_detector(config, out, data_root=data_root, weights_dir=weights_dir,
                                  resume=resume, track=_track, log=console.print,
                                  time_limit_minutes=time_limit or None, device=device or None)
    except (DetectorTrainingError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    if manifest.get("finished") is False:
        console.print(f"stopped after epoch {manifest['epoch']}: run again with --resume")
        return
    for source in config.sources:
        test = manifest["metrics"].get(test_key(source))
        if test:
            console.print(f"{test_key(source)}: WBC AP50 {test['wbc']['ap50']:.3f}, AP50:95 "
                          f"{test['wbc']['ap50_95']:.3f}; group accuracy of matched cells "
                          f"{test['matched']['group_accuracy']:.3f}, mononuclear recall "
                          f"{test['matched']['mononuclear_recall']:.3f}")
    console.print(f"wrote {out / 'detector.pt'} and {out / 'detector.json'}")
    path, report = write_familiarity(out / "detector.pt", config.sources, data_root,
                                     seed=seed, track=_track, command=_command())
    console.print(f"wrote {path}: {_fires(report)}")


@train_app.command("group")
def train_group_command(
    detector: str = typer.Option("detector", help="Trained detector.pt (or the shipped "
                                 "'detector') whose group classifier is trained again."),
    out: Path = typer.Option(..., help="Folder for the new detector.pt and its manifest."),
    augmentation: str = typer.Option("lab", help="basic | lab (+ stain and camera)."),
    stain: str = typer.Option("reinhard", help="Colour normalisation of each crop: none | "
                              "reinhard."),
    data_root: Path | None = DataRoot,
    weights_dir: Path | None = WeightsDir,
) -> None:
    """Train only the detector's group classifier (mononuclear / polymorphonuclear) again,
    on the detector's own training labs; the detector's boxes stay as they are."""
    import shutil

    from leukodiff.models.files import resolve
    from leukodiff.pipeline.familiarity import familiarity_path
    from leukodiff.training.detector import DetectorTrainingError, retrain_group_classifier

    try:
        manifest = retrain_group_classifier(detector, out, augmentation=augmentation,
                                            stain=stain, data_root=data_root,
                                            weights_dir=weights_dir, track=_track,
                                            log=console.print)
    except (DetectorTrainingError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    group = manifest["training"]["group_classifier"]
    best = group["history"][group["best_epoch"] - 1]["val"]
    console.print(f"group classifier: val balanced accuracy {best['balanced_accuracy']:.3f} "
                  f"(epoch {group['best_epoch']})")
    reference = familiarity_path(resolve(detector))
    if reference.is_file():  # the same training labs: the same look reference
        shutil.copyfile(reference, familiarity_path(out / "detector.pt"))
    console.print(f"wrote {out / 'detector.pt'} and {out / 'detector.json'}")


def _command() -> str:
    return "leukodiff " + " ".join(sys.argv[1:])


def _fires(report: dict) -> str:
    parts = [f"{s} {v['unfamiliar']}/{v['fields']}"
             for s, v in report["fires_on_test_parts"].items()]
    return "unlike the training labs on their test parts: " + (", ".join(parts) or "-")


@train_app.command("familiarity")
def train_familiarity_command(
    sources: str = typer.Option(..., help="The detector's training labs, comma-separated "
                                "(the shipped detector: bccd)."),
    detector: str = typer.Option("detector", help="Detector (name or detector.pt) whose "
                                 "reference this is; written beside it."),
    seed: int = typer.Option(0, help="Seed of the labs' splits (as the detector's)."),
    data_root: Path | None = DataRoot,
) -> None:
    """Fit the reference behind the "images unlike the training labs" warning."""
    from leukodiff.models.files import resolve
    from leukodiff.training.familiarity import write_familiarity

    try:
        path, report = write_familiarity(resolve(detector), _split_list(sources), data_root,
                                         seed=seed, track=_track, command=_command())
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    console.print(f"wrote {path}: {_fires(report)}")


@evaluate_app.command("detector")
def evaluate_detector_command(
    model: Path = typer.Option(Path("detector"), help="A detector.pt with its manifest, or the "
                               "shipped name 'detector'."),
    out: Path | None = typer.Option(None, help="Folder for metrics.json and annotated PNGs."),
    bcd: bool = typer.Option(True, "--bcd/--no-bcd", help="Also test on BCD (another lab)."),
    bcd_scale: float = typer.Option(1.0, min=0.0, help="Enlarge BCD tiles by this factor "
                                    "(1: native size, as analyze sees them; 0: from the "
                                    "red-cell sizes of BCCD and BCD)."),
    colour_standardise: bool = typer.Option(False, "--colour-standardise/--raw-colours",
                                            help="BCD: standardise colours to BCCD's "
                                            "statistics before detection."),
    examples: int = typer.Option(6, help="Annotated BCCD fields to save (errors first)."),
    data_root: Path | None = DataRoot,
) -> None:
    """COCO AP, recall/precision and group accuracy on BCCD's VOC test list; recall and
    precision on BCD."""
    from leukodiff.evaluation.detector import evaluate_detector
    from leukodiff.models.files import ModelFileError

    try:
        results = evaluate_detector(model, data_root=data_root, out_dir=out, bcd=bcd,
                                    bcd_scale=bcd_scale,
                                    bcd_colour_standardise=colour_standardise,
                                    examples=examples, track=_track)
    except (ModelFileError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    test = results["bccd_test"]
    wbc, matched = test["wbc"], test["matched"]
    console.print(f"BCCD VOC test ({test['fields']} fields): WBC AP50 {wbc['ap50']:.3f}, "
                  f"AP50:95 {wbc['ap50_95']:.3f}, recall {wbc['recall']:.3f}, precision "
                  f"{wbc['precision']:.3f} at score {test['score_threshold']}")
    console.print(f"  per-group AP50 {test['groups']['ap50']}; matched cells "
                  f"{matched['n']}: group accuracy {matched['group_accuracy']:.3f}, "
                  f"mononuclear recall {matched['mononuclear_recall']:.3f}")
    fair = results["bccd_test_unboxed_ignored"]["wbc"]
    console.print(f"  BCCD's unboxed white cells as ignore regions: AP50 {fair['ap50']:.3f}, "
                  f"AP50:95 {fair['ap50_95']:.3f}, precision {fair['precision']:.3f} "
                  f"({fair['ignored']} detections on unboxed cells ignored)")
    boxed = results["bccd_test_fields_with_a_wbc_box"]["wbc"]
    console.print(f"  fields with a WBC box only: AP50 {boxed['ap50']:.3f}, precision "
                  f"{boxed['precision']:.3f}")
    speed = results["ms_per_field"]
    console.print(f"  {speed['median']:.1f} ms per {speed['size']} field (median, "
                  f"{speed['threads']} threads)")
    if "bcd" in results:
        b = results["bcd"]
        console.print(f"BCD x{b['scale']:.2f}"
                      + (" colour-standardised" if b["colour_standardised"] else "")
                      + f": recall {b['wbc']['recall']:.3f}, precision "
                      f"{b['wbc']['precision']:.3f}, AP50 {b['wbc']['ap50']:.3f}")
        for name, row in b["sweep"].items():
            console.print(f"  {name}: recall {row['recall']:.3f}, precision "
                          f"{row['precision']:.3f}, AP50 {row['ap50']:.3f}")
    if out:
        console.print(f"metrics.json and annotated PNGs in {out}")


@evaluate_app.command("groups")
def evaluate_groups_command(
    folds: int = typer.Option(5, help="Folds, grouped by field over all labelled BCCD fields."),
    seed: int = typer.Option(0, help="Split and training seed."),
    out: Path | None = typer.Option(None, help="Write the figures as JSON to this file."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    data_root: Path | None = DataRoot,
    weights_dir: Path | None = WeightsDir,
) -> None:
    """k-fold cross-validation of level 1's mononuclear / polymorphonuclear decision
    (the group classifier retrained per fold by the shipped recipe)."""
    import json

    from leukodiff.evaluation.groups import group_cross_validation

    results = group_cross_validation(folds, seed, data_root=data_root, weights_dir=weights_dir,
                                     device=device, track=_track, log=console.print)
    pooled, spread = results["pooled"], results["mean_std"]
    console.print(f"{folds}-fold CV over {results['fields']} BCCD fields, {pooled['cells']} "
                  f"cells ({pooled['mononuclear']} mononuclear):")
    for key in ("accuracy", "mononuclear_recall", "polymorphonuclear_recall"):
        console.print(f"  {key}: pooled {pooled[key]:.3f}, per fold {spread[key]['mean']:.3f}"
                      f" ± {spread[key]['std']:.3f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


@evaluate_app.command("pipeline")
def evaluate_pipeline_command(
    data_root: Path | None = DataRoot,
    out: Path | None = typer.Option(None, help="Write metrics.json here."),
) -> None:
    """End to end on BCCD's VOC test fields: is each labelled cell found and rightly typed?"""
    import json

    from leukodiff.evaluation.pipeline import evaluate_bccd_test
    from leukodiff.pipeline import Analyzer

    results = evaluate_bccd_test(Analyzer.load(), data_root, _track)
    for name in ("single_wbc_fields", "all_labelled_cells"):
        part = results[name]
        table = Table(title=f"{name.replace('_', ' ')}: {part['right']} of {part['cells']} "
                      f"right ({100 * part['accuracy']:.1f}%)")
        for column in ("true type", "cells", "found", "right type", "accuracy"):
            table.add_column(column, justify="left" if column == "true type" else "right")
        for cell_type, row in part["per_type"].items():
            table.add_row(cell_type, str(row["cells"]), str(row["found"]), str(row["right"]),
                          f"{100 * row['accuracy']:.1f}%")
        console.print(table)
    console.print("truth -> call: " + ", ".join(f"{k} {v}" for k, v in
                                                  results["confusion"].items()))
    errors = results["count_error"]
    console.print(f"white cells per field: mean absolute count error "
                  f"{errors['mean_absolute']:.2f}; exact in {errors['exact_fields']} of "
                  f"{results['fields']} fields")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")


@evaluate_app.command("robustness")
def evaluate_robustness_command(
    out: Path | None = typer.Option(None, help="Write metrics.json and robustness.png here."),
    backend: str = typer.Option("auto", help="auto | onnx | torch."),
    max_fields: int = typer.Option(0, help="First N BCCD test fields only (0: all 72)."),
    max_cells: int = typer.Option(0, help="First N PBC held-out cells per model (0: all)."),
    data_root: Path | None = DataRoot,
) -> None:
    """The shipped pipeline under other cameras and stains: JPEG, resolution, defocus,
    lamp colour, stain, magnification (BCCD test fields end to end; PBC held-out cells)."""
    import json

    from leukodiff.evaluation.robustness import evaluate_robustness, plot_robustness
    from leukodiff.pipeline import Analyzer

    with Analyzer.load(backend=backend) as analyzer:
        results = evaluate_robustness(analyzer, data_root, max_fields=max_fields,
                                      max_cells=max_cells, track=_track)
    table = Table(title=f"Robustness ({results['backend']}; BCCD test fields end to end, "
                  "PBC held-out cells)")
    for column in ("change", "BCCD found", "BCCD right type", "count MAE",
                   "PBC L/M macro-F1", "PBC N/E/B macro-F1"):
        table.add_column(column, justify="left" if column == "change" else "right")
    for row in results["rows"]:
        e2e, pbc = row["bccd_end_to_end"], row["pbc"]
        cells = e2e["single_wbc_cells"]
        table.add_row(row["perturbation"], f"{e2e['found']}/{cells}",
                      f"{e2e['right_type']}/{cells} ({100 * e2e['accuracy']:.1f}%)",
                      f"{e2e['count_mae']:.2f}",
                      *(f"{pbc[g]['macro_f1']:.3f}" if g in pbc else "-"
                        for g in ("mononuclear", "polymorphonuclear")))
    console.print(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {out / 'metrics.json'}, "
                      f"{plot_robustness(results, out / 'robustness.png')}")


@evaluate_app.command("labs")
def evaluate_labs_command(
    out: Path = typer.Option(Path("runs/labs"), help="Fold models (reused and resumed when "
                             "run again) and labs.json."),
    labs: str = typer.Option(",".join(("chula", "pbc", "bccd", "bcd")),
                             help="Held-out labs to run, in this order."),
    seed: int = typer.Option(0, help="Seed of every split, initialisation and augmentation."),
    classifier_epochs: int = typer.Option(20, help="Level-2 epochs per fold (as shipped)."),
    detector_epochs: int = typer.Option(10, help="Detector epochs per fold (shipped: 40)."),
    max_per_class: int = typer.Option(400, help="Level-2 training cells per class, source "
                                      "and part (0: all, as shipped)."),
    augmentation: str = typer.Option("basic", help="Crop classifiers' augmentation (level 2 "
                                     "and the group classifier): basic | lab."),
    stain: str = typer.Option("none", help="Crop classifiers' colour normalisation: none | "
                              "reinhard."),
    pbc_paste: float = typer.Option(0.0, help="Detectors: probability of pasting a PBC cell "
                                    "(any type) into a training field."),
    quick: bool = typer.Option(False, help="Every step on a few images (minutes); the "
                               "numbers mean nothing."),
    docs: Path | None = typer.Option(None, help="Also write the section of RESULTS.md, "
                                     "labs.json and figures into this docs folder."),
    threads: int = typer.Option(0, help="onnxruntime threads (0: all cores)."),
    data_root: Path | None = DataRoot,
    weights_dir: Path | None = WeightsDir,
) -> None:
    """Leave one lab out: train on the other labs, measure the held-out one through the
    shipped pipeline on onnxruntime (detector, level 2, end to end)."""
    from leukodiff.evaluation.labs import LABS, FoldMismatchError, LabsConfig, evaluate_labs
    from leukodiff.reports.labs import labs_table, write_labs_report
    from leukodiff.training.classifier import TrainingError
    from leukodiff.training.detector import DetectorTrainingError

    chosen = _split_list(labs)
    if unknown := [lab for lab in chosen if lab not in LABS]:
        raise _fail(f"unknown lab(s) {', '.join(unknown)}; labs: {', '.join(LABS)}")
    config = LabsConfig.quick(chosen) if quick else LabsConfig(
        labs=chosen, seed=seed, classifier_epochs=classifier_epochs,
        detector_epochs=detector_epochs, max_per_class=max_per_class,
        augmentation=augmentation, stain=stain, pbc_paste=pbc_paste, threads=threads or None)
    try:
        results = evaluate_labs(out, config, data_root=data_root, weights_dir=weights_dir,
                                track=_track, log=console.print)
    except (TrainingError, DetectorTrainingError, FoldMismatchError, FileNotFoundError,
            ValueError) as error:
        raise _fail(str(error)) from None
    console.print(labs_table(results))
    for path in write_labs_report(results, out, docs):
        console.print(f"wrote {path}")


@evaluate_app.command("adaptation")
def evaluate_adaptation_command(
    labs_dir: Path = typer.Option(Path("runs/labs-v2"), help="`evaluate labs --out` folder "
                                  "holding each lab's fold models (without-LAB/)."),
    out: Path = typer.Option(Path("runs/adaptation"), help="adaptation.json, figure, table."),
    labs: str = typer.Option("chula,bccd,pbc", help="Labs to adapt to, in this order."),
    shots: str = typer.Option("0,5,10,25,50", help="Reviewed cells per type."),
    draws: int = typer.Option(3, help="Draws per k (seeded)."),
    epochs: int = typer.Option(8, help="Adaptation epochs (as `leukodiff adapt`)."),
    detector_labs: str = typer.Option("", help="Labs to adapt the fold detector to (e.g. "
                                      "chula,bccd,bcd; empty: level 2 only). A run with "
                                      "--labs '' keeps the level-2 curve of --out."),
    detector_shots: str = typer.Option("0,10,25", help="Reviewed cells per type whose "
                                       "fields adapt the detector."),
    detector_draws: int = typer.Option(1, help="Draws per k for the detector (minutes "
                                       "each on 2 CPU cores)."),
    docs: Path | None = typer.Option(None, help="Also write the section of RESULTS.md, "
                                     "adaptation.json and the figure into this docs folder."),
    data_root: Path | None = DataRoot,
) -> None:
    """How fast a lab teaches the models its look: k reviewed cells per type (and their
    fields, for the detector) from a lab the models never saw, adapted, measured on that
    lab's test part."""
    _require_torch()
    from leukodiff.evaluation.adaptation import AdaptationConfig, evaluate_adaptation
    from leukodiff.evaluation.labs import DETECTION_LABS, TYPED_LABS
    from leukodiff.reports.adaptation import write_adaptation_report
    from leukodiff.training.adapt import AdaptConfig

    chosen = _split_list(labs)
    if unknown := [lab for lab in chosen if lab not in TYPED_LABS]:
        raise _fail(f"unknown typed lab(s) {', '.join(unknown)}; labs: {', '.join(TYPED_LABS)}")
    boxed = _split_list(detector_labs)
    if unknown := [lab for lab in boxed if lab not in DETECTION_LABS]:
        raise _fail(f"unknown detection lab(s) {', '.join(unknown)}; labs: "
                    f"{', '.join(DETECTION_LABS)}")
    if not chosen and not boxed:
        raise _fail("nothing to run: give --labs and/or --detector-labs")
    try:
        ks = tuple(int(k) for k in _split_list(shots))
        detector_ks = tuple(int(k) for k in _split_list(detector_shots))
    except ValueError:
        raise _fail("--shots and --detector-shots take comma-separated whole numbers") from None
    config = AdaptationConfig(labs=chosen, shots=ks, draws=draws,
                              adapt=AdaptConfig(epochs=epochs), detector_labs=boxed,
                              detector_shots=detector_ks, detector_draws=detector_draws)
    try:
        results = evaluate_adaptation(labs_dir, out, config, data_root=data_root,
                                      track=_track, log=console.print)
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    for path in write_adaptation_report(results, out, docs):
        console.print(f"wrote {path}")


@evaluate_app.command("all")
def evaluate_all_command(
    out: Path = typer.Option(Path("docs"), help="Folder for RESULTS.md and figures/."),
    seed: int = typer.Option(0, help="Seed of every split, head and augmentation."),
    repeats: int = typer.Option(10, help="Monte Carlo repeats (the paper: 10)."),
    finetune_splits: int = typer.Option(2, help="Splits of each kind to fine-tune on "
                                        "(0: frozen base only)."),
    finetune_epochs: int = typer.Option(5, help="Epochs of each fine-tuning run."),
    quick: bool = typer.Option(False, help="A few dozen cells per class: checks that every "
                               "protocol runs (a minute); the numbers mean nothing."),
    cache: Path | None = typer.Option(None, help="Keep provenance and features here between "
                                      "runs (development; timings then exclude them)."),
    data_root: Path | None = DataRoot,
    weights_dir: Path | None = WeightsDir,
) -> None:
    """Reproduce the paper's Table 3 and measure what it hides: writes OUT/RESULTS.md and
    OUT/figures/*.png (provenance, grouped splits, cross-source, flat vs two-level)."""
    from leukodiff.evaluation.results import EvalConfig, evaluate_all
    from leukodiff.training.classifier import TrainingError

    config = (EvalConfig.quick(seed) if quick else
              EvalConfig(seed=seed, repeats=repeats, finetune_splits=finetune_splits,
                         finetune_epochs=finetune_epochs))
    try:
        results = evaluate_all(out, config=config, data_root=data_root,
                               weights_dir=weights_dir, cache_dir=cache, track=_track,
                               log=console.print)
    except (TrainingError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    console.print(f"wrote {out / 'RESULTS.md'} and {len(results['figures'])} figures in "
                  f"{results['timing']['total_s'] / 60:.1f} min")


@app.command()
def adapt(
    cells: list[str] = typer.Option([], help="The lab's reviewed cells: a class-folder tree "
                                    "(e.g. CELLS/lymphocyte/*.png, as `export-training` "
                                    "writes) or a data-set name; repeat for several."),
    station: Path | None = typer.Option(None, help="A review station's data folder: its "
                                        "signed cases' reviewed cells and fields (grouped "
                                        "by case)."),
    fields: list[str] = typer.Option([], help="The lab's reviewed fields, to adapt the "
                                     "detector: a Pascal VOC folder (as `export-training` "
                                     "writes fields/) or a data-set name; repeat for "
                                     "several. Every white cell in such a field is boxed."),
    out: Path = typer.Option(..., help="New folder for the adapted models (never the "
                             "shipped ones)."),
    detector: str = typer.Option("detector", help="Base detector (with --fields or a "
                                 "station's fields)."),
    mononuclear: str = typer.Option("mononuclear", help="Base lymphocyte/monocyte model."),
    polymorphonuclear: str = typer.Option("polymorphonuclear", help="Base neutrophil/"
                                          "eosinophil/basophil model."),
    epochs: int = typer.Option(8, help="Passes over the lab's cells (and the replay)."),
    replay_per_class: int = typer.Option(100, help="Cells per type from the base models' "
                                         "own training data, so nothing is forgotten."),
    held_out: float = typer.Option(0.3, help="Share of the lab's cases/slides kept to "
                                   "measure before and after."),
    group_by: str = typer.Option("prefix", help="How a class-folder image names its case "
                                 "or slide: 'prefix' (file name up to '-field', as "
                                 "`export-training` writes ACCESSION-fieldN-cellN.png, else "
                                 "up to the first '-') or 'file' (every image its own)."),
    force: bool = typer.Option(False, help="Write the adapted models even when they are "
                               "worse on the held-out cells."),
    resume: bool = typer.Option(False, help="Continue the adaptation interrupted in --out "
                                "(a crash, Ctrl-C or --time-limit), from its last epoch."),
    time_limit: float = typer.Option(0.0, help="Stop cleanly after the epoch that passes this "
                                     "many minutes (0: no limit); --resume goes on."),
    data_root: Path | None = DataRoot,
) -> None:
    """Teach the models your lab's look from its reviewed cells (level 2) and fields (the
    detector): fine-tuning with replay; before/after on held-out cases; writes a new
    model set to --out."""
    _require_torch()
    import tempfile

    from leukodiff.training.adapt import TASKS, WORK_DIR, AdaptInterrupted

    if group_by not in ("prefix", "file"):
        raise _fail("--group-by is 'prefix' or 'file'")
    if not cells and not fields and station is None:
        raise _fail("give the lab's reviewed cells or fields: --cells FOLDER, --fields "
                    "FOLDER and/or --station DATA_DIR")
    with tempfile.TemporaryDirectory() as exported:
        sources, shown = list(cells), list(cells)
        field_sources = list(fields)
        if station is not None:
            from leukodiff.server.cli import export_signed_cases
            from leukodiff.server.settings import DATABASE_FILE

            if not (station / DATABASE_FILE).is_file():
                raise _fail(f"--station {station}: no review station database there "
                            f"({DATABASE_FILE})")
            written, ids = export_signed_cases(station, None, Path(exported) / "station")
            console.print(f"station: {written} files from {len(ids)} signed case(s)")
            if (Path(exported) / "station" / "cells").is_dir():
                sources.append(str(Path(exported) / "station" / "cells"))
                shown.append(f"station {station} (signed cases {', '.join(map(str, ids))})")
            if (Path(exported) / "station" / "fields").is_dir():
                field_sources.append(str(Path(exported) / "station" / "fields"))
        # --resume: each part goes on from its checkpoints in OUT/.adapting; a part
        # already written is not redone (nor overwritten)
        level2_stopped = any((out / WORK_DIR / t / "last.pt").exists() for t in TASKS)
        detector_stopped = (out / WORK_DIR / "detector" / "last.pt").exists()
        level2_written = any((out / f"{t}.pt").exists() for t in TASKS)
        if resume and not (level2_stopped or detector_stopped):
            raise _fail(f"nothing to resume: no interrupted adaptation in {out}")
        limit = time_limit or None
        try:
            if sources and resume and level2_written and not level2_stopped:
                console.print(f"the level-2 models are already adapted in {out}")
            elif sources:
                _adapt_from(sources, shown, out, mononuclear, polymorphonuclear, epochs,
                            replay_per_class, held_out, group_by, force, data_root,
                            resume and level2_stopped, limit)
            if field_sources:
                _adapt_detector_from(field_sources, out, detector, held_out, group_by,
                                     force, data_root, resume and detector_stopped, limit)
        except AdaptInterrupted as stopped:
            console.print(f"{stopped}: run the same command again with --resume")


def _adapt_detector_from(sources: list[str], out: Path, detector: str, held_out: float,
                         group_by: str, force: bool, data_root: Path | None, resume: bool,
                         time_limit: float | None) -> None:
    from leukodiff.training.adapt import AdaptRefused
    from leukodiff.training.adapt_detector import (
        DetectorAdaptConfig,
        DetectorAdaptError,
        adapt_detector,
        lab_fields,
    )
    from leukodiff.training.detector import DetectorTrainingError

    try:
        lab = lab_fields(sources, group_by, data_root, _track, console.print)
        result = adapt_detector(lab, out, DetectorAdaptConfig(held_out=held_out),
                                base=detector, force=force, data_root=data_root,
                                track=_track, log=console.print, resume=resume,
                                time_limit_minutes=time_limit)
    except AdaptRefused as refused:
        _print_detector_adaptation(refused.results["detector"])
        raise _fail(str(refused)) from None
    except (DetectorAdaptError, DetectorTrainingError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    _print_detector_adaptation(result)
    console.print(f"wrote the adapted detector to {out}; use it with `leukodiff analyze "
                  f"--detector {out / 'detector.pt'}`")


def _print_detector_adaptation(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"detector on {result['fields']['held_out']} held-out fields of "
                  "your lab: before -> after adaptation")
    for column in ("", "white cells", "found", "false", "precision", "recall",
                   "group right", "threshold"):
        table.add_column(column)
    for name in ("before", "after"):
        row = result[name]
        table.add_row(name, str(row["truth"]), str(row["found"]), str(row["false"]),
                      f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                      f"{row.get('group_accuracy', 0):.3f}", f"{row['threshold']:.2f}")
    console.print(table)


def _adapt_from(cells: list[str], shown: list[str], out: Path, mononuclear: str,
                polymorphonuclear: str, epochs: int, replay_per_class: int, held_out: float,
                group_by: str, force: bool, data_root: Path | None, resume: bool,
                time_limit: float | None) -> None:
    from leukodiff.training.adapt import AdaptConfig, AdaptError, AdaptRefused, lab_cells
    from leukodiff.training.adapt import adapt as adapt_models
    from leukodiff.training.classifier import TrainingError

    try:
        lab = lab_cells(cells, group_by, data_root, _track, console.print)
        config = AdaptConfig(epochs=epochs, replay_per_class=replay_per_class,
                             held_out=held_out)
        results = adapt_models(shown, out, config, cells=lab, force=force,
                               bases={"mononuclear": mononuclear,
                                      "polymorphonuclear": polymorphonuclear},
                               data_root=data_root, track=_track, log=console.print,
                               resume=resume, time_limit_minutes=time_limit)
    except AdaptRefused as refused:
        _print_adaptation(refused.results)
        raise _fail(str(refused)) from None
    except (AdaptError, TrainingError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    _print_adaptation(results)
    console.print(f"wrote the adapted models to {out}; use them with `leukodiff analyze "
                  f"--mononuclear {out / 'mononuclear.pt'} --polymorphonuclear "
                  f"{out / 'polymorphonuclear.pt'}`")


def _print_adaptation(results: dict) -> None:
    from rich.table import Table

    table = Table(title="held-out cases of your lab: before -> after adaptation")
    for column in ("model", "type", "cells", "right before", "right after"):
        table.add_column(column)
    for task, result in results.items():
        if "skipped" in result:
            table.add_row(task, "-", "-", result["skipped"], "")
            continue
        before, after = result["before"], result["after"]
        for name, support in after["support"].items():
            table.add_row(task, name, str(support), str(before["right"][name]),
                          str(after["right"][name]))
        table.add_row(task, "macro-F1", str(after["n"]), f"{before['macro_f1']:.3f}",
                      f"{after['macro_f1']:.3f}")
        for name in result["cells"].get("replay_only", []):
            table.add_row(task, name, "0", "no reviewed cell: the replay only", "")
    console.print(table)


@app.command()
def params(
    width: float = typer.Option(0.5, help="MobileNetV1 width multiplier."),
    input_size: int = typer.Option(128, help="Input side in pixels."),
    classes: int = typer.Option(2, help="Classes of the softmax head."),
    frozen_base: bool = typer.Option(
        True, "--frozen-base/--trainable-base",
        help="Count trainable parameters with the ImageNet base frozen, as the paper does.",
    ),
) -> None:
    """Print the paper's Table 2: the MobileNet classifier layer by layer, Keras-style counts."""
    _require_torch()
    from leukodiff.models.mobilenet import MobileNetClassifier, parameter_table

    model = MobileNetClassifier(num_classes=classes, width=width)
    if frozen_base:
        model.freeze_backbone()
    console.print(parameter_table(model, input_size=input_size))



# The review station (leukodiff.server): listed after the analysis commands.
app.command("serve")(serve)
app.command("create-user")(create_user_command)
app.command("set-password")(set_password_command)
app.command("deactivate-user")(deactivate_user_command)
app.command("export-training")(export_training_command)


if __name__ == "__main__":  # after every command is registered (`python -m leukodiff.cli serve`)
    app()
