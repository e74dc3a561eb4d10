"""`leukodiff data summary`, `leukodiff export onnx` and `leukodiff params`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from leukodiff.cli.common import (
    SHORT_NAMES,
    DataRoot,
    DetectorModel,
    MononuclearModel,
    PolymorphonuclearModel,
    _fail,
    _require_torch,
    _track,
    console,
)

data_app = typer.Typer(help="Inspect the blood-smear data sets.", no_args_is_help=True)
export_app = typer.Typer(help="Export trained models for other runtimes.", no_args_is_help=True,
                         callback=_require_torch)


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



@export_app.command("onnx")
def export_onnx_command(
    detector: DetectorModel = "detector",
    mononuclear: MononuclearModel = "mononuclear",
    polymorphonuclear: PolymorphonuclearModel = "polymorphonuclear",
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


