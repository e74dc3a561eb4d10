"""The detector's training loop: `train_detector` (its epochs on `training.engine`, then
the group classifier's phase, then the manifest) and `retrain_group_classifier` (the
`train group` command: a trained detector's group classifier alone, trained again)."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from leukodiff.data.scan import Track, no_progress
from leukodiff.models.detector import CLASSES, DetectorSpec, build_detector, parameter_count
from leukodiff.models.files import invoked_command, read_checked, resolve
from leukodiff.models.io import load_detector, save_model
from leukodiff.pipeline.familiarity import familiarity_path
from leukodiff.training.detector.augmentation import Augmenter, pbc_donors, uniform
from leukodiff.training.detector.config import DetectorConfig, DetectorTrainingError
from leukodiff.training.detector.fields import (
    DetectorData,
    FieldImages,
    epoch_order,
    prepare_fields,
)
from leukodiff.training.detector.groups import (
    restart_group_classifier,
    train_group_classifier,
)
from leukodiff.training.detector.validation import (
    detect_all,
    final_metrics,
    operating_threshold,
    selection_score,
    short,
    validate,
)
from leukodiff.training.engine import (
    BatchLoss,
    RunFolder,
    Step,
    WeightAverage,
    new_state,
    run_epochs,
    seed_everything,
    train_epoch,
    warmup_cosine,
)


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def detector_step(model: torch.nn.Module, config: DetectorConfig, total_steps: int) -> Step:
    """The detector's optimiser step: AdamW on everything trained but the group classifier
    (its own phase comes after), warm-up then cosine over `total_steps`, gradients clipped
    to norm 10."""
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and not name.startswith("group_classifier.")]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, config.warmup_steps, total_steps))
    return Step(optimizer, scheduler, clip_norm=10.0)


def field_batch_loss(model: torch.nn.Module, augment: Augmenter,
                     scale_range: tuple[float, float], device: torch.device
                     ) -> Callable[[list[int]], BatchLoss]:
    """The loss of a batch of field indices: one rotation and one scale for the whole
    batch (so its images need no padding), each field augmented, Faster R-CNN's losses
    summed (and kept by name for the epoch's record)."""

    def loss_of(batch: list[int]) -> BatchLoss:
        rotation = int(torch.randint(4, ()))
        scale = uniform(*scale_range)
        samples = [augment(i, rotation, scale) for i in batch]
        images = [image.to(device) for image, _ in samples]
        targets = [{k: v.to(device) for k, v in t.items()} for _, t in samples]
        losses = model(images, targets)
        return sum(losses.values()), 1, losses

    return loss_of


def train_detector(
    config: DetectorConfig,
    out_dir: Path,
    *,
    data_root: str | Path | None = None,
    weights_dir: str | Path | None = None,
    resume: bool = False,
    track: Track = no_progress,
    log: Callable[[str], None] = lambda message: None,
    time_limit_minutes: float | None = None,
    device: str | None = None,
    data: DetectorData | None = None,
) -> dict:
    """Train, validate every `val_every` epochs, keep the best on val, report test.

    Writes `last.pt` (atomic, every epoch; `resume=True` continues it),
    `best.pt` and, at the end, `detector.pt` + `detector.json` (the manifest,
    also returned). With `time_limit_minutes`, stops cleanly after the epoch
    that crosses it and returns `{"finished": False, "epoch": n}`: run again
    with `resume=True` to go on.
    """
    config.check()
    if config.init_weights:
        _check_start(config)
    out_dir = Path(out_dir)
    # fields given by the caller (adaptation) are part of what a resume must match
    record = asdict(config) if data is None else {**asdict(config), "fields": data.digest()}
    folder = RunFolder(out_dir, resume=resume, error=DetectorTrainingError,
                       config=record, finished="detector.pt")
    seed_everything(config.seed)
    started = time.perf_counter()
    run_device = _device(device)
    data = data or prepare_fields(config, data_root, track)
    log(f"fields and boxes per part: {json.dumps(data.counts())}")
    model = build_detector(config.spec, weights_dir=weights_dir,
                           frozen_blocks=config.frozen_blocks).to(run_device)
    if config.init_weights:
        model.load_state_dict(torch.load(config.init_weights, map_location=run_device,
                                         weights_only=True))
        log(f"initialised from {config.init_weights}")
    log(f"detector: {parameter_count(model):,} parameters "
        f"({parameter_count(model, trainable=True):,} trained) on {run_device}")
    train_images = FieldImages(data.train)
    val_images = FieldImages(data.val)
    donors = pbc_donors(config, data_root, track) if config.pbc_paste else []
    if donors:
        log(f"PBC cells to paste: {len(donors)}")
    augment = Augmenter(config, train_images, donors)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(epoch_order(data.train, config.mono_oversample,
                                                torch.Generator().manual_seed(0)))
                                / config.batch_size)
    step = detector_step(model, config, steps_per_epoch * config.epochs)
    optimizer, scheduler = step.optimizer, step.scheduler
    loss_of = field_batch_loss(model, augment, config.scale_range, run_device)

    state = new_state()
    if resume:
        state = folder.resume(model, optimizer, scheduler, generator)
        log(f"resumed after epoch {state['epoch']}")
    first_averaged = config.epochs - config.average_last
    average = (WeightAverage(model, out_dir / "average.pt", first_averaged, state["epoch"],
                             error=DetectorTrainingError) if config.average_last else None)

    def one_epoch(epoch: int) -> dict:
        order = epoch_order(data.train, config.mono_oversample, generator)
        batches = [order[s:s + config.batch_size] for s in range(0, len(order),
                                                                 config.batch_size)]
        done = train_epoch(model, batches, loss_of, step, track=track,
                           description=f"epoch {epoch}/{config.epochs}")
        if average is not None and epoch > first_averaged:
            average.add(model, epoch)
        seconds = done.pop("seconds")
        del done["samples"]
        return {**done, "seconds": seconds, "fields": len(order),
                "seconds_per_field": seconds / len(order)}

    def check_on_val(epoch: int, record: dict) -> tuple[float, float] | None:
        if epoch % config.val_every and epoch != config.epochs:
            return None
        val_start = time.perf_counter()
        # Faster R-CNN's own labels: the group classifier is trained after these epochs
        val = validate(model, data.val, val_images, refine=False)
        record["val_seconds"] = time.perf_counter() - val_start
        record["val"] = short(val)
        return selection_score(val, with_groups=not config.spec.group_classifier)

    def describe(record: dict, best: bool) -> str:
        message = (f"epoch {record['epoch']}: loss {record['loss']:.4f}  "
                   f"{record['seconds']:.1f}s ({record['seconds_per_field']:.2f} s/field)")
        if "val" in record:
            val = record["val"]
            message += (f"  val AP50 {val['wbc']['ap50']:.3f}  AP50:95 "
                        f"{val['wbc']['ap50_95']:.3f}  group mAP50 {val['groups']['map50']:.3f}"
                        f"  group acc {val['matched']['group_accuracy']:.3f}  mono recall "
                        f"{val['matched']['mononuclear_recall']:.3f}")
        return message + ("  (best)" if best else "")

    finished = run_epochs(config.epochs, state, epoch=one_epoch, validate=check_on_val,
                   keep_best=lambda: folder.save_best(model), describe=describe,
                   save_last=lambda state: folder.save_last(model, optimizer, scheduler,
                                                            generator, state),
                   log=log, time_limit_minutes=time_limit_minutes, started=started)
    if not finished:
        return {"finished": False, "epoch": state["epoch"], "best_epoch": state["best_epoch"]}

    if average is not None:
        model.load_state_dict(average.state_dict())
        log(f"the detector is the mean of epochs {average.epochs}")
    else:
        folder.load_best(model, run_device)
    group_info: dict = {}
    if config.spec.group_classifier:
        group_info = train_group_classifier(model, config, data, out_dir, device=run_device,
                                            data_root=data_root, track=track, log=log)
    model = model.cpu()
    val_found = detect_all(model, data.val, val_images)  # threshold-free: one pass
    operating = None
    if config.spec.score == "cell":
        operating = _choose_operating_threshold(model, data, val_found, log)
    metrics = final_metrics(model, config, data, val_found)
    manifest = {
        "architecture": {"name": "fasterrcnn_mobilenet_v1", **model.spec.to_dict(),
                         "parameters": parameter_count(model)},
        "task": "level 1: white-cell detection and group",
        "classes": [*CLASSES, *(["other cell"] if model.spec.other_cell_class else [])],
        "input": {"pixels": "RGB float in [0, 1]; the backbone normalises to (p*255 - 128) / "
                  "128 itself", "resolution": "native: no resize inside the model; BCCD "
                  "640x480 fields go in as they are; rescale other sources so a white cell "
                  "is ~200 px across (predict(..., scale=))"},
        "training": {**asdict(config), "fields": data.counts(),
                     "dropped_fields": [r.image.stem for r in data.dropped],
                     "best_epoch": state["best_epoch"], "history": state["history"],
                     "averaged_epochs": average.epochs if average else [],
                     "train_minutes": state["seconds"] / 60, "device": str(run_device),
                     "imagenet_backbone": "mobilenet_v1_0.5_160_quant.tflite",
                     "pbc_pasted_cells": {t: sum(d.cell_type == t for d in donors)
                                          for t in sorted({d.cell_type for d in donors})},
                     "pbc_box_detector_sha256": (read_checked(config.pbc_box_detector)[1]
                                                 .sha256 if donors else None),
                     "group_classifier": group_info, "operating_point": operating},
        "data": {"sources": list(config.sources), "origin": {
            "bccd": "Shenggan/BCCD_Dataset fields with labels.csv groups",
            "bcd": "draaslan/blood-cell-detection-dataset (white cells of unknown group)",
            "chula": "singgihbekti/WBC_Dataset @ 45759ab1e6258b9746377a0935077e2eef0da41b",
            **({"pbc": "PBC cells pasted into training fields (pbc_paste)"} if donors else {}),
        }},
        "split": ("BCCD VOC lists: train to train, val to select the epoch, test only reported"
                  if config.validation == "voc" else
                  f"BCCD: grouped split of VOC train+val (val_fraction {config.val_fraction}, "
                  f"seed {config.seed}); VOC test only reported")
        + "; other sources: data.splits.holdout(seed) by slide or field",
        "command": invoked_command(),
        "metrics": metrics,
        "torch": torch.__version__,
    }
    return save_model(model, manifest, out_dir / "detector.pt")


def _check_start(config: DetectorConfig) -> None:
    """The detector fine-tuned from must have the box head `config` builds, or its weights
    cannot load: refused before any field is read, with the option that matches it."""
    start = DetectorSpec.from_dict(read_checked(config.init_weights)[1].architecture)
    if start.other_cell_class != config.spec.other_cell_class:
        option = "--other-cells" if start.other_cell_class else "--no-other-cells"
        raise DetectorTrainingError(
            f"{config.init_weights} was trained {'with' if start.other_cell_class else 'without'}"
            f" the other-cell class; fine-tune it with {option}")


def retrain_group_classifier(
    detector: str | Path,
    out_dir: Path,
    *,
    augmentation: str,
    stain: str,
    data_root: str | Path | None = None,
    weights_dir: str | Path | None = None,
    track: Track = no_progress,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """A trained detector with only its group classifier trained again, from ImageNet,
    with another augmentation and crop stain normalisation (`train group`).

    The group phase runs after the detector's epochs and never touches the detector's
    own weights, so the result is the detector its whole recipe would have given with
    these group settings, minutes instead of an hour. Written to `out_dir/detector.pt`
    with a manifest naming the detector it came from; the source is never changed.
    """
    out_dir = Path(out_dir)
    source = _fresh_folder(detector, out_dir)
    model, manifest = load_detector(source)
    trained = DetectorConfig.from_dict(manifest.training.settings)
    if not trained.spec.group_classifier:
        raise DetectorTrainingError(f"{source} has no group classifier")
    # the loaded spec, not the training settings': it holds the operating threshold chosen
    # after training (the settings keep the spec training started from)
    config = replace(trained, group_augmentation=augmentation,
                     spec=replace(model.spec, group_stain=stain))
    config.check()
    out_dir.mkdir(parents=True, exist_ok=True)
    restart_group_classifier(model, config, weights_dir)
    data = prepare_fields(config, data_root, track)
    info = train_group_classifier(model, config, data, out_dir, device=torch.device("cpu"),
                                  data_root=data_root, track=track, log=log)
    written = {
        **manifest.to_dict(),
        "architecture": {**manifest.architecture, **config.spec.to_dict()},
        "training": {**manifest.training.settings, **json.loads(json.dumps(asdict(config))),
                     "group_classifier": info,
                     "group_retrained_from": {"model": _shown(source),
                                              "sha256": manifest.sha256}},
        "command": invoked_command(),
        "metrics": final_metrics(model, config, data, detect_all(model, data.val)),
        "torch": torch.__version__,
    }
    _carry_familiarity(source, out_dir)
    return save_model(model, written, out_dir / "detector.pt")


def rescore_detector(
    detector: str | Path,
    out_dir: Path,
    *,
    data_root: str | Path | None = None,
    track: Track = no_progress,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """A trained detector scored 1 - P(background) (`DetectorSpec.score` "cell") instead
    of its best group's probability, with its operating threshold chosen on its own
    training run's validation fields (`train score`).

    Same weights: the score only reads the box head's softmax another way, so nothing is
    trained (the run's epoch was chosen on AP with the group score; a run trained with
    `spec.score="cell"` chooses it on AP with this score). Minutes instead of an hour.
    Written to `out_dir/detector.pt` with a manifest naming
    the detector it came from; the source is never changed.
    """
    source = _fresh_folder(detector, out_dir)
    model, manifest = load_detector(source)
    if model.spec.score == "cell":
        raise DetectorTrainingError(f"{source} is already scored 1 - P(background)")
    trained = DetectorConfig.from_dict(manifest.training.settings)
    config = replace(trained, spec=replace(trained.spec, score="cell"))
    model.spec = replace(model.spec, score="cell")
    model.roi_heads.cell_score = True
    out_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_fields(config, data_root, track)
    val_found = detect_all(model, data.val)
    operating = _choose_operating_threshold(model, data, val_found, log)
    written = {
        **manifest.to_dict(),
        "architecture": {**manifest.architecture, **model.spec.to_dict()},
        "training": {**manifest.training.settings, **json.loads(json.dumps(asdict(config))),
                     "operating_point": operating,
                     "rescored_from": {"model": _shown(source), "sha256": manifest.sha256,
                                       "command": manifest.provenance.command}},
        "command": invoked_command(),
        "metrics": final_metrics(model, config, data, val_found),
        "torch": torch.__version__,
    }
    _carry_familiarity(source, out_dir)
    return save_model(model, written, out_dir / "detector.pt")


def _choose_operating_threshold(model, data: DetectorData, val_found: list,
                                log: Callable[[str], None]) -> dict:
    """Set the model's operating threshold to the F1-best on the validation fields
    (`val_found`: their `detect_all` detections)."""
    threshold, f1 = operating_threshold(model, data.val, val_found)
    model.spec = replace(model.spec, score_threshold=threshold)
    log(f"operating threshold {threshold} (validation F1 {f1[threshold]:.3f})")
    return {"score": model.spec.score, "threshold": threshold,
            "chosen_on": f"validation fields ({len(data.val)}): best F1",
            "val_f1": {str(t): v for t, v in f1.items()}}


def _carry_familiarity(source: Path, out_dir: Path) -> None:
    """A detector made from another on the same training labs keeps its look reference
    (the "images unlike the training labs" warning), when it has one."""
    reference = familiarity_path(source)
    if reference.is_file():
        shutil.copyfile(reference, familiarity_path(out_dir / "detector.pt"))


def _fresh_folder(detector: str | Path, out_dir: Path) -> Path:
    """The source detector's file, once `out_dir` is known to be a new folder for it."""
    source = resolve(detector)
    if (Path(out_dir) / "detector.pt").exists():
        raise DetectorTrainingError(f"{out_dir} already holds a detector; choose another --out")
    if resolve(Path(out_dir) / "detector.pt") == source:
        raise DetectorTrainingError("--out must not be the source detector's folder")
    return source


def _shown(path: Path) -> str:
    """A path as a manifest records it: relative to the working folder when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)

