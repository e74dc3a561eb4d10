"""`leukodiff adapt`: the models taught a lab's look from its reviewed cells and fields."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from leukodiff.cli.common import (
    ConfigDefault,
    DataRoot,
    Resume,
    TimeLimit,
    _fail,
    _require_torch,
    _track,
    console,
)

if TYPE_CHECKING:
    from leukodiff.training.adapt import AdaptConfig
    from leukodiff.training.adapt_detector import DetectorAdaptConfig


Level2 = partial(ConfigDefault, "AdaptConfig")
Detector = partial(ConfigDefault, "DetectorAdaptConfig")


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
    epochs: int = typer.Option(Level2("epochs"), help="Passes over the lab's cells (and the "
                               "replay)."),
    lr: float = typer.Option(Level2("lr"), help="Level 2: Adam learning rate."),
    layers: str = typer.Option(Level2("layers"), help="Level 2: the weights that learn the "
                               "lab: all | early (the first conv blocks) | head."),
    batch_size: int = typer.Option(Level2("batch_size"), help="Level 2: cells per step."),
    replay_per_class: int = typer.Option(Level2("replay_per_class"), help="Cells per type "
                                         "from the base models' own training data, so "
                                         "nothing is forgotten."),
    held_out: float = typer.Option(Level2("held_out"), help="Share of the lab's cases/slides "
                                   "kept to measure before and after (level 2 and the "
                                   "detector)."),
    validation: float = typer.Option(Level2("validation"), help="Level 2: share of the "
                                     "learning cases that choose the epoch (0: all learn, "
                                     "the last epoch kept)."),
    min_per_type: int = typer.Option(Level2("min_per_type"), help="Level 2: fewer reviewed "
                                     "cells of a type are refused."),
    seed: int = typer.Option(Level2("seed"), help="Level 2: seed of the split and training."),
    detector_epochs: int = typer.Option(Detector("epochs"), help="Detector: passes over the "
                                        "lab's fields (and the replay)."),
    detector_lr: float = typer.Option(Detector("lr"), help="Detector: learning rate."),
    detector_batch_size: int = typer.Option(Detector("batch_size"), help="Detector: fields "
                                            "per step."),
    frozen_blocks: int = typer.Option(Detector("frozen_blocks"), help="Detector: MobileNet "
                                      "conv layers kept as they are."),
    replay_per_field: float = typer.Option(Detector("replay_per_field"), help="Detector: base "
                                           "training fields mixed in per lab field."),
    min_replay: int = typer.Option(Detector("min_replay"), help="Detector: at least this "
                                   "many replay fields."),
    detector_validation: float = typer.Option(Detector("validation"), help="Detector: share "
                                              "of the learning cases that choose the epoch "
                                              "and the threshold."),
    min_fields: int = typer.Option(Detector("min_fields"), help="Detector: fewer reviewed "
                                   "fields are refused."),
    group_epochs: int = typer.Option(Detector("group_epochs"), help="Detector: group "
                                     "classifier epochs on the lab's typed cells."),
    group_lr: float = typer.Option(Detector("group_lr"), help="Detector: group classifier "
                                   "learning rate."),
    group_pbc_per_type: int = typer.Option(Detector("group_pbc_per_type"), help="Detector: "
                                           "PBC cells per type for the group classifier."),
    detector_seed: int = typer.Option(Detector("seed"), help="Detector: seed of the split "
                                      "and training."),
    group_by: str = typer.Option("prefix", help="How a class-folder image names its case "
                                 "or slide: 'prefix' (file name up to '-field', as "
                                 "`export-training` writes ACCESSION-fieldN-cellN.png, else "
                                 "up to the first '-') or 'file' (every image its own)."),
    force: bool = typer.Option(False, help="Write the adapted models even when they are "
                               "worse on the held-out cells."),
    resume: Resume = False,
    time_limit: TimeLimit = 0.0,
    data_root: Path | None = DataRoot,
) -> None:
    """Teach the models your lab's look from its reviewed cells (level 2) and fields (the
    detector): fine-tuning with replay; before/after on held-out cases; writes a new
    model set to --out."""
    _require_torch()
    import tempfile

    from leukodiff.training.adapt import TASKS, WORK_DIR, AdaptConfig, AdaptInterrupted
    from leukodiff.training.adapt_detector import DetectorAdaptConfig

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
                config = AdaptConfig(epochs=epochs, lr=lr, batch_size=batch_size,
                                     replay_per_class=replay_per_class, held_out=held_out,
                                     validation=validation, min_per_type=min_per_type,
                                     seed=seed, layers=layers)
                _adapt_from(sources, shown, out, mononuclear, polymorphonuclear, config,
                            group_by, force, data_root, resume and level2_stopped, limit)
            if field_sources:
                detector_config = DetectorAdaptConfig(
                    epochs=detector_epochs, lr=detector_lr, batch_size=detector_batch_size,
                    frozen_blocks=frozen_blocks, replay_per_field=replay_per_field,
                    min_replay=min_replay, held_out=held_out, validation=detector_validation,
                    min_fields=min_fields, group_epochs=group_epochs, group_lr=group_lr,
                    group_pbc_per_type=group_pbc_per_type, seed=detector_seed)
                _adapt_detector_from(field_sources, out, detector, detector_config, group_by,
                                     force, data_root, resume and detector_stopped, limit)
        except AdaptInterrupted as stopped:
            console.print(f"{stopped}: run the same command again with --resume")


def _adapt_detector_from(sources: list[str], out: Path, detector: str,
                         config: DetectorAdaptConfig,
                         group_by: str, force: bool, data_root: Path | None, resume: bool,
                         time_limit: float | None) -> None:
    from leukodiff.training.adapt import AdaptRefused
    from leukodiff.training.adapt_detector import (
        DetectorAdaptError,
        adapt_detector,
        lab_fields,
    )
    from leukodiff.training.detector import DetectorTrainingError

    try:
        lab = lab_fields(sources, group_by, data_root, _track, console.print)
        result = adapt_detector(lab, out, config,
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
                polymorphonuclear: str, config: AdaptConfig, group_by: str, force: bool,
                data_root: Path | None, resume: bool, time_limit: float | None) -> None:
    from leukodiff.training.adapt import AdaptError, AdaptRefused, lab_cells
    from leukodiff.training.adapt import adapt as adapt_models
    from leukodiff.training.classifier import TrainingError

    try:
        lab = lab_cells(cells, group_by, data_root, _track, console.print)
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

