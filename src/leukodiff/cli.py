"""The `leukodiff` command. Thin: each command calls library code and prints."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="White-blood-cell differential counts from blood smear images.",
                  no_args_is_help=True)
data_app = typer.Typer(help="Inspect the blood-smear data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
train_app = typer.Typer(help="Train the level-1 detector or the level-2 classifiers.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")
evaluate_app = typer.Typer(help="Measure a trained model on held-out data.", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")
console = Console()
SHORT_NAMES = {"lymphocyte": "Lym", "monocyte": "Mono", "neutrophil": "Neut",
               "eosinophil": "Eos", "basophil": "Baso"}


DataRoot = typer.Option(
    None, "--data-root", help="Folder holding bccd/, kbc/, pbc/, bcd/ "
    "[default: $LEUKODIFF_DATA, else ../shared/data beside the checkout]."
)


def _track(items, description: str = ""):
    """Progress bar for long library loops (library code itself never prints)."""
    from rich.progress import track

    if not console.is_terminal:  # logs and CI: no bar redraws
        return items
    return track(items, description=description, console=console, transient=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
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
    paths: list[str] = typer.Argument(..., help="Smear images, folders of images, or globs."),
    out: Path = typer.Option(..., help="Output folder (refused if it holds results)."),
    overwrite: bool = typer.Option(False, help="Replace results already in --out."),
    detector: str = typer.Option("detector", help="Level-1 model file or shipped name."),
    mononuclear: str = typer.Option("mononuclear", help="Level-2 mononuclear model."),
    polymorphonuclear: str = typer.Option("polymorphonuclear",
                                          help="Level-2 polymorphonuclear model."),
    min_confidence: float | None = typer.Option(
        None, help="Call cells below this type confidence 'unidentified' "
        "[default: each model's calibrated threshold]."),
) -> None:
    """Find, classify and count the white cells of smear images; write a report."""
    from leukodiff.models.io import ModelFileError
    from leukodiff.pipeline import Analyzer
    from leukodiff.reports.run import OutputExistsError, analyze_to_folder

    try:
        analyzer = Analyzer.load(detector, mononuclear, polymorphonuclear,
                                 min_confidence=min_confidence)
        run = analyze_to_folder(analyzer, paths, out, overwrite=overwrite, track=_track)
    except (ModelFileError, OutputExistsError) as error:
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
    console.print(f"report: {out / 'report.html'}  (per field: {out / 'fields'}, "
                  f"per cell: {out / 'cells.csv'}, counts: {out / 'differential.json'})")
    if not run.results:
        raise _fail("no image could be analysed")


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@train_app.command("classifier")
def train_classifier_command(
    task: str = typer.Option("mononuclear", help="mononuclear | polymorphonuclear | flat."),
    out: Path = typer.Option(..., help="Run folder: checkpoints, model.pt, manifest."),
    sources: str = typer.Option("pbc,bccd", help="Comma-separated: data set names "
                                "(pbc, kbc, bccd) or folders of class folders."),
    classes: str = typer.Option("", help="Only these types of the task, e.g. "
                                "'neutrophil,eosinophil' (the paper's 2-class setting)."),
    mode: str = typer.Option("finetune", help="frozen (paper: base frozen, head only) "
                             "| finetune (all layers)."),
    epochs: int = typer.Option(12),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(1e-3, help="Adam learning rate (paper: 1e-3)."),
    seed: int = typer.Option(0, help="Seed of the split, initialisation and augmentation."),
    crop_scale: float = typer.Option(2.6, help="Square crop side / box side, for field cells."),
    max_per_class: int = typer.Option(0, help="Cap cells per class and part (quick runs)."),
    resume: bool = typer.Option(False, help="Continue the interrupted run in --out."),
    data_root: Path | None = DataRoot,
    weights_dir: Path | None = typer.Option(None, help="ImageNet TFLite weights folder "
                                            "[default: $LEUKODIFF_WEIGHTS, ../shared/weights]."),
) -> None:
    """Train a level-2 MobileNet classifier; writes OUT/model.pt and its manifest."""
    from leukodiff.training.classifier import ClassifierConfig, TrainingError, train_classifier

    config = ClassifierConfig(task=task, classes=_split_list(classes),
                              sources=_split_list(sources), mode=mode, epochs=epochs,
                              batch_size=batch_size, lr=lr, seed=seed, crop_scale=crop_scale,
                              max_per_class=max_per_class)
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
    from leukodiff.models.io import ModelFileError
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
    from leukodiff.models.mobilenet import MobileNetClassifier, parameter_table

    model = MobileNetClassifier(num_classes=classes, width=width)
    if frozen_base:
        model.freeze_backbone()
    console.print(parameter_table(model, input_size=input_size))


if __name__ == "__main__":
    app()
