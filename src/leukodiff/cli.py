"""The `leukodiff` command. Thin: each command calls library code and prints."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="White-blood-cell differential counts from blood smear images.",
                  no_args_is_help=True)
data_app = typer.Typer(help="Inspect the blood-smear data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
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
    from rich.table import Table

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
                console.print("  " + " = ".join(p.name for p in paths), highlight=False)
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
def params(
    width: float = typer.Option(0.5, help="MobileNetV1 width multiplier."),
    input_size: int = typer.Option(128, help="Input side in pixels."),
    classes: int = typer.Option(2, help="Classes of the softmax head."),
) -> None:
    """Print the paper's Table 2: the MobileNet classifier layer by layer, Keras-style counts."""
    from leukodiff.models.mobilenet import MobileNetClassifier, parameter_table

    model = MobileNetClassifier(num_classes=classes, width=width)
    console.print(parameter_table(model, input_size=input_size))


if __name__ == "__main__":
    app()
