"""`leukodiff adapt`: the models taught a lab's look from its reviewed cells and fields."""

from __future__ import annotations

from pathlib import Path

import typer

from leukodiff.cli.common import DataRoot, _fail, _require_torch, _track, console


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
    data_root: Path | None = DataRoot,
) -> None:
    """Teach the models your lab's look from its reviewed cells (level 2) and fields (the
    detector): fine-tuning with replay; before/after on held-out cases; writes a new
    model set to --out."""
    _require_torch()
    import tempfile

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
        if sources:
            _adapt_from(sources, shown, out, mononuclear, polymorphonuclear, epochs,
                        replay_per_class, held_out, group_by, force, data_root)
        if field_sources:
            _adapt_detector_from(field_sources, out, detector, held_out, group_by, force,
                                 data_root)


def _adapt_detector_from(sources: list[str], out: Path, detector: str, held_out: float,
                         group_by: str, force: bool, data_root: Path | None) -> None:
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
                                track=_track, log=console.print)
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
                group_by: str, force: bool, data_root: Path | None) -> None:
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
                               data_root=data_root, track=_track, log=console.print)
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
    console.print(table)

