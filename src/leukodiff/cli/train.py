"""`leukodiff train ...`: the level-2 classifiers, the detector, its group classifier
and the familiarity reference."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from leukodiff.cli.common import (
    ConfigDefault,
    DataRoot,
    Resume,
    TimeLimit,
    WeightsDir,
    _fail,
    _require_torch,
    _split_list,
    _track,
    console,
)
from leukodiff.models.files import invoked_command

Classifier = partial(ConfigDefault, "ClassifierConfig")
Detector = partial(ConfigDefault, "DetectorConfig")

train_app = typer.Typer(help="Train the level-1 detector or the level-2 classifiers.",
                        no_args_is_help=True, callback=_require_torch)


@train_app.command("classifier")
def train_classifier_command(
    task: str = typer.Option(Classifier("task"), help="mononuclear | polymorphonuclear | flat."),
    out: Path = typer.Option(..., help="Run folder: checkpoints, model.pt, manifest."),
    sources: str = typer.Option(Classifier("sources"), help="Comma-separated: data set names "
                                "(pbc, kbc, bccd, chula) or folders of class folders."),
    classes: str = typer.Option(Classifier("classes"), help="Only these types of the task, e.g. "
                                "'neutrophil,eosinophil' (the paper's 2-class setting)."),
    mode: str = typer.Option(Classifier("mode"), help="frozen (paper: base frozen, head only) "
                             "| finetune (all layers)."),
    epochs: int = typer.Option(Classifier("epochs")),
    batch_size: int = typer.Option(Classifier("batch_size")),
    lr: float = typer.Option(Classifier("lr"), help="Adam learning rate (paper: 1e-3)."),
    seed: int = typer.Option(Classifier("seed"), help="Seed of the split, initialisation and "
                             "augmentation."),
    width: float = typer.Option(Classifier("width"), help="MobileNetV1 width multiplier "
                                "(ImageNet weights: 0.25, 0.5, 0.75, 1.0)."),
    input_size: int = typer.Option(Classifier("input_size"), help="Crop side in pixels."),
    crop_scale: float = typer.Option(Classifier("crop_scale"), help="Square crop side / box "
                                     "side, for field cells."),
    val_fraction: float = typer.Option(Classifier("val_fraction"), help="Share of each "
                                       "source's groups for validation."),
    test_fraction: float = typer.Option(Classifier("test_fraction"), help="Share of each "
                                        "source's groups held out for the test."),
    max_per_class: int = typer.Option(Classifier("max_per_class"), help="Cap cells per "
                                      "class, source and part (quick runs)."),
    balance: bool = typer.Option(Classifier("balance"), "--balance/--no-balance",
                                 help="Class-weighted loss."),
    source_balance: float = typer.Option(Classifier("source_balance"), help="Draw cells "
                                         "with weight 1 / (cells of their source) ** this "
                                         "(0: every cell alike)."),
    balance_by_source: bool = typer.Option(Classifier("balance_by_source"),
                                           "--balance-by-source/--no-balance-by-source",
                                           help="Spread each source's draws evenly over its "
                                           "types, so a source's look says nothing of the "
                                           "type."),
    augmentation: str = typer.Option(Classifier("augmentation"), help="basic (flips, turns, "
                                     "zoom, colour jitter) | lab (+ stain and camera: other "
                                     "labs' look)."),
    stain: str = typer.Option(Classifier("stain"), help="Colour normalisation of each crop: "
                              "none | reinhard (every crop to one reference look)."),
    mixstyle: float = typer.Option(Classifier("mixstyle"), help="Probability of mixing "
                                   "feature statistics between training images (MixStyle; "
                                   "0: off; finetune only)."),
    resume: Resume = False,
    data_root: Path | None = DataRoot,
    weights_dir: Path | None = WeightsDir,
) -> None:
    """Train a level-2 MobileNet classifier; writes OUT/model.pt and its manifest."""
    from leukodiff.training.classifier import ClassifierConfig, TrainingError, train_classifier

    config = ClassifierConfig(task=task, classes=_split_list(classes),
                              sources=_split_list(sources), mode=mode, epochs=epochs,
                              batch_size=batch_size, lr=lr, seed=seed, width=width,
                              input_size=input_size, crop_scale=crop_scale,
                              val_fraction=val_fraction, test_fraction=test_fraction,
                              max_per_class=max_per_class, balance=balance,
                              source_balance=source_balance,
                              balance_by_source=balance_by_source, augmentation=augmentation,
                              stain=stain, mixstyle=mixstyle)
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


@train_app.command("detector")
def train_detector_command(
    out: Path = typer.Option(..., help="Run folder: checkpoints, detector.pt, manifest."),
    epochs: int = typer.Option(Detector("epochs")),
    batch_size: int = typer.Option(Detector("batch_size"), help="Fields per step."),
    lr: float = typer.Option(Detector("lr"), help="AdamW learning rate (linear warm-up, then "
                             "cosine)."),
    weight_decay: float = typer.Option(Detector("weight_decay"), help="AdamW weight decay."),
    frozen_blocks: int = typer.Option(Detector("frozen_blocks"), help="MobileNet conv blocks "
                                      "kept at their ImageNet weights."),
    seed: int = typer.Option(Detector("seed"), help="Seed of initialisation, sampling and "
                             "augmentation."),
    warmup_steps: int = typer.Option(Detector("warmup_steps"), help="Steps of linear "
                                     "learning-rate warm-up."),
    val_every: int = typer.Option(Detector("val_every"), help="Epochs between validations "
                                  "(and the last one)."),
    validation: str = typer.Option(Detector("validation"), help="voc: select on BCCD's VOC "
                                   "val list | grouped: on a grouped split of VOC "
                                   "train+val. The test list is never used."),
    val_fraction: float = typer.Option(Detector("val_fraction"), help="Share of the fields "
                                       "that validate (only with --validation grouped)."),
    mono_oversample: int = typer.Option(Detector("mono_oversample"), help="Times a field "
                                        "with a mononuclear cell is drawn per epoch."),
    copy_paste: float = typer.Option(Detector("copy_paste"), help="Probability of pasting a "
                                     "mononuclear cell from another training field."),
    pbc_paste: float = typer.Option(Detector("pbc_paste"), help="Probability of pasting a PBC "
                                    "cell (any of the five types, coloured and sized like "
                                    "the field)."),
    pbc_paste_per_type: int = typer.Option(Detector("pbc_paste_per_type"), help="PBC cells "
                                           "per type to paste from."),
    pbc_box_detector: str = typer.Option(Detector("pbc_box_detector"), help="The detector "
                                         "that boxes the PBC cells to paste."),
    scale_range: str = typer.Option(Detector("scale_range"), help="Scale jitter: min,max "
                                    "factor."),
    colour_jitter: str = typer.Option(Detector("color_jitter"), help="Colour jitter: "
                                      "brightness,contrast,saturation,hue."),
    channel_gain: float = typer.Option(Detector("channel_gain"), help="Each RGB channel "
                                       "times 1 +- this (stain and lamp balance)."),
    blur: float = typer.Option(Detector("blur"), help="Probability of a Gaussian blur "
                               "(focus, optics)."),
    stain_jitter: float = typer.Option(Detector("stain_jitter"), help="Each stain's amount "
                                       "(HED space) times 1 +- this: another lab's stain "
                                       "(0: off; left one lab out, not kept: "
                                       "experiments/labs_detector_stain.py)."),
    gamma: float = typer.Option(Detector("gamma"), help="Gamma of exp(+- this): another "
                                "camera (0: off; not kept, as --stain-jitter)."),
    window_on_cell: float = typer.Option(Detector("window_on_cell"), help="Probability that "
                                         "a window cut from a large field holds a white "
                                         "cell."),
    group_classifier: bool = typer.Option(Detector("spec.group_classifier"),
                                          "--group-classifier/--no-group-classifier",
                                          help="Relabel boxes with a crop classifier trained "
                                          "on BCCD + PBC cells."),
    group_epochs: int = typer.Option(Detector("group_epochs"), help="Epochs of the group "
                                     "classifier (0: keep the one of --init-weights)."),
    group_lr: float = typer.Option(Detector("group_lr"), help="Group classifier learning "
                                   "rate."),
    group_batch_size: int = typer.Option(Detector("group_batch_size"), help="Group "
                                         "classifier cells per step."),
    group_pbc_per_type: int = typer.Option(Detector("group_pbc_per_type"), help="PBC cells "
                                           "per type for the group classifier (0: field "
                                           "cells only)."),
    group_bccd_repeat: int = typer.Option(Detector("group_bccd_repeat"), help="Times the "
                                          "training fields' cells are drawn per group "
                                          "classifier epoch."),
    group_augmentation: str = typer.Option(Detector("group_augmentation"), help="Group "
                                           "classifier augmentation: basic | lab (+ stain "
                                           "and camera)."),
    group_stain: str = typer.Option(Detector("spec.group_stain"), help="Group classifier "
                                    "crop colour normalisation: none | reinhard."),
    score: str = typer.Option(Detector("spec.score"), help="A box's white-cell score: group "
                              "(its best group's probability) | cell (1 - P(background); "
                              "operating threshold then chosen on validation F1)."),
    other_cell_class: bool = typer.Option(Detector("spec.other_cell_class"),
                                          "--other-cells/--no-other-cells",
                                          help="Teach the box head the training labs' "
                                          "boxed red cells and platelets as a class of "
                                          "their own (needs --score cell)."),
    colour_standardise: bool = typer.Option(Detector("spec.colour_standardise"),
                                            "--colour-standardise/--raw-colours",
                                            help="Standardise each field's colours to BCCD's "
                                            "statistics inside the model."),
    unknown_group: str = typer.Option(Detector("unknown_group"), help="Cells whose group is "
                                      "unknown: 'ignore' (neither cell nor background to "
                                      "the box head), 'cell' (a white cell of either group) "
                                      "or 'drop' their fields."),
    init_weights: str = typer.Option(Detector("init_weights"), help="Start from this "
                                     "detector.pt (fine-tuning) [default: ImageNet "
                                     "backbone only]."),
    average_last: int = typer.Option(Detector("average_last"), help="The detector is the mean "
                                     "of its weights after each of its last N epochs (SWA) "
                                     "instead of its best validated epoch [0: the best]."),
    max_train_fields: int = typer.Option(Detector("max_train_fields"), help="Only this many "
                                         "training fields (quick runs)."),
    max_val_fields: int = typer.Option(Detector("max_val_fields"), help="Only this many "
                                       "validation fields (quick runs)."),
    sources: str = typer.Option(Detector("sources"), help="Field sets to learn from, "
                                "comma-separated: bccd (VOC lists), bcd, chula (split by "
                                "slide/field), pig (training photos only, enlarged 5x)."),
    device: str = typer.Option("", help="cpu | cuda [default: cuda when available]."),
    time_limit: TimeLimit = 0.0,
    resume: Resume = False,
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
                        group_stain=group_stain, score=score,
                        other_cell_class=other_cell_class)
    try:
        scales = tuple(float(v) for v in _split_list(scale_range))
        jitter = tuple(float(v) for v in _split_list(colour_jitter))
    except ValueError:
        raise _fail("--scale-range and --colour-jitter take comma-separated numbers") from None
    if len(scales) != 2 or len(jitter) != 4:
        raise _fail("--scale-range takes 2 numbers, --colour-jitter 4")
    config = DetectorConfig(spec=spec, epochs=epochs, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, frozen_blocks=frozen_blocks, seed=seed,
                            warmup_steps=warmup_steps, val_every=val_every,
                            scale_range=scales, color_jitter=jitter,
                            channel_gain=channel_gain, blur=blur,
                            stain_jitter=stain_jitter, gamma=gamma,
                            window_on_cell=window_on_cell, validation=validation,
                            val_fraction=val_fraction, mono_oversample=mono_oversample,
                            copy_paste=copy_paste, pbc_paste=pbc_paste,
                            pbc_paste_per_type=pbc_paste_per_type,
                            pbc_box_detector=pbc_box_detector,
                            group_epochs=group_epochs, group_lr=group_lr,
                            group_batch_size=group_batch_size,
                            unknown_group=unknown_group,
                            group_pbc_per_type=group_pbc_per_type,
                            group_bccd_repeat=group_bccd_repeat,
                            group_augmentation=group_augmentation,
                            init_weights=init_weights, average_last=average_last,
                            max_train_fields=max_train_fields,
                            max_val_fields=max_val_fields,
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
                                     seed=seed, track=_track, command=invoked_command())
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
    console.print(f"wrote {out / 'detector.pt'} and {out / 'detector.json'}")


@train_app.command("score")
def train_score_command(
    detector: str = typer.Option("detector", help="Trained detector.pt (or the shipped "
                                 "'detector') scored by its best group's probability."),
    out: Path = typer.Option(..., help="Folder for the new detector.pt and its manifest."),
    data_root: Path | None = DataRoot,
) -> None:
    """Score a trained detector's boxes 1 - P(background) instead of by their best group,
    its operating threshold chosen on its training run's validation fields (same weights)."""
    from leukodiff.training.detector import DetectorTrainingError, rescore_detector

    try:
        manifest = rescore_detector(detector, out, data_root=data_root, track=_track,
                                    log=console.print)
    except (DetectorTrainingError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    val = manifest["metrics"]["val"]["wbc"]
    console.print(f"operating threshold {manifest['architecture']['score_threshold']}: val "
                  f"precision {val['precision']:.3f} recall {val['recall']:.3f} AP50 "
                  f"{val['ap50']:.3f}")
    console.print(f"wrote {out / 'detector.pt'} and {out / 'detector.json'}")


@train_app.command("calibrate")
def train_calibrate_command(
    model: str = typer.Option(..., help="Trained level-2 model.pt (or the shipped "
                              "'mononuclear' / 'polymorphonuclear')."),
    out: Path = typer.Option(..., help="Folder for the new model.pt, its manifest and ONNX."),
    data_root: Path | None = DataRoot,
) -> None:
    """Calibrate a level-2 model's "unidentified" threshold, and measure its val and test
    parts, again as the pipeline now types cells (every orientation of a crop averaged);
    same weights, written to --out."""
    from leukodiff.models.export import export_classifier
    from leukodiff.training.classifier import TrainingError, recalibrate_classifier

    try:
        manifest = recalibrate_classifier(model, out, data_root=data_root, track=_track,
                                          log=console.print)
        for stale in (out / "model.onnx", out / "model.onnx.json"):  # an earlier run's
            stale.unlink(missing_ok=True)
        onnx = export_classifier(out / "model.pt")
    except (TrainingError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    was = manifest["recalibrated_from"]["threshold"]
    console.print(f"unidentified below {manifest['calibration']['threshold']:.3f} (was "
                  f"{was:.3f}); wrote {out / 'model.pt'}, its manifest and {onnx.name}")


def _fires(report: dict) -> str:
    parts = [f"{s} {v['unfamiliar']}/{v['fields']}"
             for s, v in report["fires_on_test_parts"].items()]
    return "unlike the training labs on their test parts: " + (", ".join(parts) or "-")


@train_app.command("familiarity")
def train_familiarity_command(
    sources: str = typer.Option(..., help="The detector's training labs, comma-separated "
                                "(the shipped detector: bccd,bcd,chula)."),
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
                                         seed=seed, track=_track, command=invoked_command())
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    console.print(f"wrote {path}: {_fires(report)}")

