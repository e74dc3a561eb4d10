"""`leukodiff evaluate ...`: trained models measured on held-out data."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import typer
from rich.table import Table

from leukodiff.cli.common import (
    Backend,
    ConfigDefault,
    DataRoot,
    WeightsDir,
    _fail,
    _require_torch,
    _split_list,
    _track,
    console,
)

Labs = partial(ConfigDefault, "LabsConfig")
Adaptation = partial(ConfigDefault, "AdaptationConfig")
Eval = partial(ConfigDefault, "EvalConfig")

evaluate_app = typer.Typer(help="Measure a trained model on held-out data.", no_args_is_help=True,
                           callback=_require_torch)


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
    backend: Backend = "onnx",
    data_root: Path | None = DataRoot,
) -> None:
    """COCO AP, recall/precision and group accuracy on BCCD's VOC test list; recall and
    precision on BCD (boxes found as `analyze` finds them)."""
    from leukodiff.evaluation.detector import evaluate_detector
    from leukodiff.models.files import ModelFileError
    from leukodiff.pipeline.backends import BackendError

    try:
        results = evaluate_detector(model, backend=backend, data_root=data_root, out_dir=out,
                                    bcd=bcd, bcd_scale=bcd_scale,
                                    bcd_colour_standardise=colour_standardise,
                                    examples=examples, track=_track)
    except (ModelFileError, BackendError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    test = results.bccd_test
    wbc, matched = test["wbc"], test["matched"]
    console.print(f"BCCD VOC test ({test['fields']} fields): WBC AP50 {wbc['ap50']:.3f}, "
                  f"AP50:95 {wbc['ap50_95']:.3f}, recall {wbc['recall']:.3f}, precision "
                  f"{wbc['precision']:.3f} at score {test['score_threshold']}")
    console.print(f"  per-group AP50 {test['groups']['ap50']}; matched cells "
                  f"{matched['n']}: group accuracy {matched['group_accuracy']:.3f}, "
                  f"mononuclear recall {matched['mononuclear_recall']:.3f}")
    fair = results.bccd_test_unboxed_ignored["wbc"]
    console.print(f"  BCCD's unboxed white cells as ignore regions: AP50 {fair['ap50']:.3f}, "
                  f"AP50:95 {fair['ap50_95']:.3f}, precision {fair['precision']:.3f} "
                  f"({fair['ignored']} detections on unboxed cells ignored)")
    boxed = results.bccd_test_fields_with_a_wbc_box["wbc"]
    console.print(f"  fields with a WBC box only: AP50 {boxed['ap50']:.3f}, precision "
                  f"{boxed['precision']:.3f}")
    speed = results.ms_per_field
    console.print(f"  {speed.median:.1f} ms per {speed.size} field (median, "
                  f"{results.backend})")
    if (b := results.bcd) is not None:
        look = " colour-standardised" if b.colour_standardised else ""
        console.print(f"BCD x{b.scale:.2f}{look}: recall {b.wbc['recall']:.3f}, precision "
                      f"{b.wbc['precision']:.3f}, AP50 {b.wbc['ap50']:.3f}")
        for name, row in b.sweep.items():
            console.print(f"  {name}: recall {row.recall:.3f}, precision "
                          f"{row.precision:.3f}, AP50 {row.ap50:.3f}")
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
    pooled = results.pooled
    console.print(f"{folds}-fold CV over {results.fields} BCCD fields, {pooled.cells} "
                  f"cells ({pooled.mononuclear} mononuclear):")
    for key, spread in results.mean_std.items():
        console.print(f"  {key}: pooled {getattr(pooled, key):.3f}, per fold "
                      f"{spread.mean:.3f} ± {spread.std:.3f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results.to_dict(), indent=2) + "\n")


@evaluate_app.command("pipeline")
def evaluate_pipeline_command(
    data_root: Path | None = DataRoot,
    out: Path | None = typer.Option(None, help="Write metrics.json here."),
    backend: Backend = "onnx",
) -> None:
    """End to end on BCCD's VOC test fields: is each labelled cell found and rightly typed?"""
    import json

    from leukodiff.evaluation.pipeline import evaluate_bccd_test
    from leukodiff.models.files import ModelFileError
    from leukodiff.pipeline import Analyzer
    from leukodiff.pipeline.backends import BackendError

    try:
        with Analyzer.load(backend=backend) as analyzer:
            results = evaluate_bccd_test(analyzer, data_root, _track)
    except (ModelFileError, BackendError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    for name, part in (("single WBC fields", results.single_wbc_fields),
                       ("all labelled cells", results.all_labelled_cells)):
        table = Table(title=f"{name}: {part.right} of {part.cells} right "
                      f"({100 * part.accuracy:.1f}%)")
        for column in ("true type", "cells", "found", "right type", "accuracy"):
            table.add_column(column, justify="left" if column == "true type" else "right")
        for cell_type, row in part.per_type.items():
            table.add_row(cell_type, str(row.cells), str(row.found), str(row.right),
                          f"{100 * row.accuracy:.1f}%")
        console.print(table)
    console.print("truth -> call: " + ", ".join(f"{k} {v}" for k, v in
                                                  results.confusion.items()))
    errors = results.count_error
    console.print(f"white cells per field: mean absolute count error "
                  f"{errors.mean_absolute:.2f}; exact in {errors.exact_fields} of "
                  f"{results.fields} fields")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results.to_dict(), indent=2) + "\n")


@evaluate_app.command("robustness")
def evaluate_robustness_command(
    out: Path | None = typer.Option(None, help="Write metrics.json and robustness.png here."),
    backend: Backend = "onnx",
    max_fields: int = typer.Option(0, help="First N BCCD test fields only (0: all 72)."),
    max_cells: int = typer.Option(0, help="First N PBC held-out cells per model (0: all)."),
    data_root: Path | None = DataRoot,
) -> None:
    """The shipped pipeline under other cameras and stains: JPEG, resolution, defocus,
    lamp colour, stain, magnification (BCCD test fields end to end; PBC held-out cells)."""
    import json

    from leukodiff.evaluation.robustness import evaluate_robustness, plot_robustness
    from leukodiff.models.files import ModelFileError
    from leukodiff.pipeline import Analyzer
    from leukodiff.pipeline.backends import BackendError

    try:
        with Analyzer.load(backend=backend) as analyzer:
            results = evaluate_robustness(analyzer, data_root, max_fields=max_fields,
                                          max_cells=max_cells, track=_track)
    except (ModelFileError, BackendError, FileNotFoundError) as error:
        raise _fail(str(error)) from None
    table = Table(title=f"Robustness ({results.backend}; BCCD test fields end to end, "
                  "PBC held-out cells)")
    for column in ("change", "BCCD found", "BCCD right type", "count MAE",
                   "PBC L/M macro-F1", "PBC N/E/B macro-F1"):
        table.add_column(column, justify="left" if column == "change" else "right")
    for row in results.rows:
        e2e, pbc = row.bccd_end_to_end, row.pbc
        cells = e2e.single_wbc_cells
        table.add_row(row.perturbation, f"{e2e.found}/{cells}",
                      f"{e2e.right_type}/{cells} ({100 * e2e.accuracy:.1f}%)",
                      f"{e2e.count_mae:.2f}",
                      *(f"{pbc[g].macro_f1:.3f}" if g in pbc else "-"
                        for g in ("mononuclear", "polymorphonuclear")))
    console.print(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results.to_dict(), indent=2) + "\n")
        console.print(f"wrote {out / 'metrics.json'}, "
                      f"{plot_robustness(results, out / 'robustness.png')}")


@evaluate_app.command("labs")
def evaluate_labs_command(
    out: Path = typer.Option(Path("runs/labs"), help="Fold models (reused and resumed when "
                             "run again) and labs.json."),
    labs: str = typer.Option(Labs("labs"), help="Held-out labs to run, in this order."),
    seed: int = typer.Option(Labs("seed"), help="Seed of every split, initialisation and "
                             "augmentation."),
    repeat_seeds: str = typer.Option(Labs("repeat_seeds"),
                                     help="Further seeds: each fold trained and measured "
                                     "again with each (OUT/seed-N/), for the spread."),
    classifier_epochs: int = typer.Option(Labs("classifier_epochs"), help="Level-2 epochs "
                                          "per fold (as shipped)."),
    detector_epochs: int = typer.Option(Labs("detector_epochs"), help="Detector epochs per "
                                        "fold (shipped: 40)."),
    mono_oversample: int = typer.Option(Labs("mono_oversample"), help="Detectors: times a "
                                        "field with a mononuclear cell is drawn per epoch "
                                        "(shipped: 5)."),
    group_epochs: int = typer.Option(Labs("group_epochs"), help="Group classifier epochs per "
                                     "fold (shipped: 8)."),
    group_pbc_per_type: int = typer.Option(Labs("group_pbc_per_type"), help="Group "
                                           "classifier: PBC cells per type (shipped: 800)."),
    max_per_class: int = typer.Option(Labs("max_per_class"), help="Level-2 training cells "
                                      "per class, source and part (0: all, as shipped)."),
    augmentation: str = typer.Option(Labs("augmentation"), help="Crop classifiers' "
                                     "augmentation (level 2 and the group classifier): "
                                     "basic | lab."),
    stain: str = typer.Option(Labs("stain"), help="Crop classifiers' colour normalisation: "
                              "none | reinhard."),
    balance_by_source: bool = typer.Option(Labs("balance_by_source"),
                                           "--balance-by-source/--no-balance-by-source",
                                           help="Level 2: spread each training lab's draws "
                                           "evenly over its types."),
    pbc_paste: float = typer.Option(Labs("pbc_paste"), help="Detectors: probability of "
                                    "pasting a PBC cell (any type) into a training field."),
    other_cells: bool = typer.Option(Labs("other_cells"), "--other-cells/--no-other-cells",
                                     help="Detectors: red cells and platelets as a class "
                                     "of their own (--no-other-cells: the recipe before "
                                     "2026-12-07)."),
    max_train_fields: int = typer.Option(Labs("max_train_fields"), help="Training fields "
                                         "per detector (0: all; quick runs)."),
    max_measured: int = typer.Option(Labs("max_measured"), help="Measured images per lab "
                                     "(0: all; quick runs)."),
    quick: bool = typer.Option(False, help="Every step on a few images (minutes); the "
                               "numbers mean nothing."),
    docs: Path | None = typer.Option(None, help="Also write the section of RESULTS.md, "
                                     "labs.json and figures into this docs folder."),
    threads: int | None = typer.Option(Labs("threads"), help="onnxruntime threads "
                                       "(unset or 0: all cores)."),
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
    try:
        repeats = tuple(int(x) for x in _split_list(repeat_seeds))
    except ValueError:
        raise _fail(f"--repeat-seeds takes whole numbers, not {repeat_seeds!r}") from None
    config = replace(LabsConfig.quick(chosen), repeat_seeds=repeats) if quick else LabsConfig(
        labs=chosen, seed=seed, repeat_seeds=repeats, classifier_epochs=classifier_epochs,
        detector_epochs=detector_epochs, mono_oversample=mono_oversample,
        group_epochs=group_epochs, group_pbc_per_type=group_pbc_per_type,
        max_per_class=max_per_class, augmentation=augmentation, stain=stain,
        balance_by_source=balance_by_source, pbc_paste=pbc_paste,
        other_cells=other_cells, threads=threads or None, max_train_fields=max_train_fields,
        max_measured=max_measured)
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
    labs: str = typer.Option(Adaptation("labs"), help="Labs to adapt to, in this order."),
    shots: str = typer.Option(Adaptation("shots"), help="Reviewed cells per type."),
    draws: int = typer.Option(Adaptation("draws"), help="Draws per k (seeded)."),
    seed: int = typer.Option(Adaptation("seed"), help="Seed of the draws and splits."),
    epochs: int = typer.Option(Adaptation("adapt.epochs"), help="Adaptation epochs (as "
                               "`leukodiff adapt`)."),
    lr: float = typer.Option(Adaptation("adapt.lr"), help="Adaptation learning rate (as "
                             "`leukodiff adapt`)."),
    layers: str = typer.Option(Adaptation("adapt.layers"), help="Weights that learn the lab "
                               "(as `leukodiff adapt`): all | early | head."),
    detector_labs: str = typer.Option(Adaptation("detector_labs"), help="Labs to adapt the "
                                      "fold detector to (e.g. chula,bccd,bcd; empty: level "
                                      "2 only). A run with --labs '' keeps the level-2 curve "
                                      "of --out."),
    detector_shots: str = typer.Option(Adaptation("detector_shots"), help="Reviewed cells "
                                       "per type whose fields adapt the detector."),
    detector_draws: int = typer.Option(Adaptation("detector_draws"), help="Draws per k for "
                                       "the detector (minutes each on 2 CPU cores)."),
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
    try:
        adapt = AdaptConfig(epochs=epochs, lr=lr, layers=layers)
    except ValueError as error:
        raise _fail(f"--layers: {error}") from None
    config = AdaptationConfig(labs=chosen, shots=ks, draws=draws, seed=seed, adapt=adapt,
                              detector_labs=boxed,
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
    seed: int = typer.Option(Eval("seed"), help="Seed of every split, head and "
                             "augmentation."),
    repeats: int = typer.Option(Eval("repeats"), help="Monte Carlo repeats (the paper: 10)."),
    train_fraction: float = typer.Option(Eval("train_fraction"), help="Share of each split "
                                         "that trains (the paper: 0.7)."),
    kbc_crop_scale: float = typer.Option(Eval("kbc_crop_scale"), help="Paper protocol: crop "
                                         "side / box side (tight, like the paper's boxes)."),
    cross_crop_scale: float = typer.Option(Eval("cross_crop_scale"), help="Cross-source: "
                                           "crop side / box side (the project's geometry)."),
    finetune_splits: int = typer.Option(Eval("finetune_splits"), help="Splits of each kind "
                                        "to fine-tune on (0: frozen base only)."),
    finetune_epochs: int = typer.Option(Eval("finetune_epochs"), help="Epochs of each "
                                        "fine-tuning run."),
    max_per_class: int = typer.Option(Eval("max_per_class"), help="A seeded subset per "
                                      "class and source (0: all; quick runs)."),
    synthetic: int = typer.Option(Eval("synthetic"), help="Synthetic KBC copies to check "
                                  "the matcher on."),
    augment_copies: int = typer.Option(Eval("augment_copies"), help="Colour-jittered copies "
                                       "of the training set (cross-source)."),
    quick: bool = typer.Option(False, help="A few dozen cells per class: checks that every "
                               "protocol runs (a minute); the numbers mean nothing."),
    cache: Path | None = typer.Option(None, help="Keep provenance and features here between "
                                      "runs (development; timings then exclude them)."),
    data_root: Path | None = DataRoot,
    weights_dir: Path | None = WeightsDir,
) -> None:
    """Reproduce the paper's Table 3 and measure what it hides: writes OUT/RESULTS.md,
    OUT/study.json and OUT/figures/*.png (provenance, grouped splits, cross-source, flat
    vs two-level)."""
    from leukodiff.evaluation.results import EvalConfig, evaluate_all
    from leukodiff.reports.study import write_study_report
    from leukodiff.training.classifier import TrainingError

    config = (EvalConfig.quick(seed) if quick else
              EvalConfig(seed=seed, repeats=repeats, train_fraction=train_fraction,
                         kbc_crop_scale=kbc_crop_scale, cross_crop_scale=cross_crop_scale,
                         finetune_splits=finetune_splits, finetune_epochs=finetune_epochs,
                         max_per_class=max_per_class, synthetic=synthetic,
                         augment_copies=augment_copies))
    try:
        study = evaluate_all(out, config=config, data_root=data_root,
                             weights_dir=weights_dir, cache_dir=cache, track=_track,
                             log=console.print)
    except (TrainingError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    written = write_study_report(study, out)
    console.print(f"wrote {', '.join(map(str, written))} and {len(study.figures)} figures in "
                  f"{study.timing.total_s / 60:.1f} min")

