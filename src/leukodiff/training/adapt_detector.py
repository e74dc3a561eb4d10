"""Teach the detector a lab's look from its reviewed fields (issue #15, level 1).

A reviewed field is the truth for every white cell in it: the cells the technologist
kept or drew are white cells, and everything else in the field, the boxes marked
not-a-white-cell or deleted included, is background. Fine-tuning on those fields
therefore learns the lab's missed cells as positives and its false cells (pale red
cells, stain debris) as hard negatives, with no extra bookkeeping.

The trained detector is the start (`DetectorConfig.init_weights`); all but its first
MobileNet layers learn with the RPN and RoI heads (a few minutes on 2 CPU cores); the
group classifier is kept. A replay sample of the base
detector's own training fields is mixed in, so the labs it knew are not forgotten. A
quarter of the lab's learning cases choose the epoch and recalibrate the operating
score threshold (the F1-best on them); part of the lab's fields, grouped by case or
slide, is held out and measured before and after through the shipped code path
(onnxruntime). A detector that is worse there is not written unless forced.

Training checkpoints every epoch in `OUT/.adapting/detector/` (the training engine's
folder); an adaptation stopped by a crash, Ctrl-C or its time limit goes on from its
last epoch with `resume=True`, and the folder is removed once the detector is written
(or refused).
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from leukodiff.data.crops import field_image
from leukodiff.data.records import Box, Field
from leukodiff.data.root import DataNotFoundError, has_dataset
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.splits import case_split
from leukodiff.metrics.detection import best_threshold, detection_scores
from leukodiff.models.export import export_detector
from leukodiff.models.files import invoked_command, read_checked, resolve
from leukodiff.models.io import load_detector, save_model
from leukodiff.pipeline.familiarity import Familiarity, familiarity_path
from leukodiff.training.detector import (
    DetectorConfig,
    DetectorData,
    DetectorTrainingError,
    prepare_fields,
    train_detector,
)


class DetectorAdaptError(ValueError):
    """Nothing sound can be learnt from the fields given."""


@dataclass(frozen=True)
class DetectorAdaptConfig:
    epochs: int = 5
    lr: float = 3e-4  # a third of training's: the heads already know white cells
    batch_size: int = 4
    # MobileNet conv layers kept as they are: the first 6 (stem and early filters, to
    # stride 4); the 17 deeper ones learn the lab's look with the reduction, RPN and heads
    # (all 23 kept: precision 0.69 instead of 0.83 on Chula's val part, k = 10)
    frozen_blocks: int = 6
    replay_per_field: float = 1.0  # base training fields mixed in per lab field
    min_replay: int = 16
    held_out: float = 0.3  # share of the lab's cases/slides measured before and after
    validation: float = 0.25  # share of the learning cases: epoch and threshold
    min_fields: int = 4  # fewer reviewed fields to learn from: refused
    # the group classifier: the reviewed fields' typed cells (+ replay fields' and a few PBC
    # cells per type), kept only when it beats the one it came with on the lab's val cells
    group_epochs: int = 3
    group_lr: float = 1e-4
    group_pbc_per_type: int = 100
    seed: int = 0


def lab_fields(sources: Sequence[str], group_by: str = "prefix", data_root=None,
               track: Track = no_progress, log: Callable[[str], None] = lambda m: None
               ) -> list[Field]:
    """The lab's reviewed fields: each source a Pascal VOC folder (as `export-training`
    writes fields/; with `group_by` "prefix" grouped by the case its file names) or a
    data-set name. `leukodiff adapt` and the station's adapt job both read their fields
    here. DetectorAdaptError names a source that is neither, or no fields at all."""
    from leukodiff.data.sources import FIELD_SOURCES, load_fields
    from leukodiff.data.sources.generic import read_voc
    from leukodiff.training.adapt import case_of

    fields: list[Field] = []
    for source in sources:
        if source in FIELD_SOURCES:
            fields.extend(load_fields(source, data_root, track).records)
            continue
        root = Path(source)
        if not root.is_dir():
            raise DetectorAdaptError(f"--fields {source}: neither a folder nor a data set")
        loaded = read_voc(root, source=root.name, track=track)
        for skipped in loaded.skipped:
            log(f"skipped {skipped.path}: {skipped.reason}")
        fields.extend(replace(f, group_key=f"{root.name}:{case_of(f.image.name)}")
                      if group_by == "prefix" else f for f in loaded.records)
    if not fields:
        raise DetectorAdaptError(f"no reviewed fields in {', '.join(sources)}")
    return fields


def replay_fields(base_config: DetectorConfig, count: int, seed: int, data_root=None,
                  track: Track = no_progress, log: Callable[[str], None] = lambda m: None
                  ) -> list[Field]:
    """`count` training fields of the base detector's own sources (seeded; its split
    re-drawn from its config, so none of its test fields are used); a source that is not
    on this machine is left out, and said so."""
    train: list[Field] = []
    for source in base_config.sources:
        try:
            data = prepare_fields(replace(base_config, sources=(source,), max_train_fields=0,
                                          max_val_fields=0), data_root, track)
        except (DataNotFoundError, FileNotFoundError, DetectorTrainingError) as error:
            log(f"replay: {source} left out ({error})")
            continue
        train.extend(data.train)
    return random.Random(seed).sample(train, min(count, len(train)))


def detect_fields(detector: str | Path, fields: Sequence[Field], threads: int | None = None,
                  track: Track = no_progress, description: str = "Detecting") -> list:
    """The `Detections` of every field down to score 0 (as AP needs), through the shipped
    pipeline (onnxruntime), as `metrics.detection.detection_metrics` takes them."""
    from leukodiff.pipeline import Analyzer

    with Analyzer.load(detector, backend="onnx", threads=threads,
                       detection_threshold=0.0) as analyzer:
        return [analyzer.detect(analyzer.check(field_image(record)))
                for record in track(list(fields), description)]


def add_lab_look(reference: Path, fields: Sequence[Field], out: Path,
                 track: Track = no_progress) -> Path | None:
    """The base detector's look reference with the lab's own fields added as one more
    lab (its threshold kept: the base labs' false-alarm rate is unchanged), so the
    adapted detector stops calling the lab's fields unlike its training. None when the
    base has no reference."""
    from leukodiff.training.familiarity import FeatureCache

    if not reference.exists():
        return None
    base = Familiarity.load(reference)
    rows = FeatureCache()(fields, track, "Measuring how the lab's fields look")
    lab = Familiarity.fit({"adapted lab": rows}, [rows]).labs[0]
    return Familiarity((*base.labs, lab), base.threshold).save(
        out, {"adapted": {"base": str(reference), "lab_fields": len(fields)}})


def adapt_detector(lab_fields: Sequence[Field], out_dir: Path,
                   config: DetectorAdaptConfig = DetectorAdaptConfig(), *,
                   base: str | Path = "detector", held: Sequence[Field] | None = None,
                   ignore: dict[str, Sequence[Box]] | None = None, before: dict | None = None,
                   force: bool = False, data_root=None, threads: int | None = None,
                   track: Track = no_progress,
                   log: Callable[[str], None] = lambda m: None,
                   command: str | None = None, resume: bool = False,
                   time_limit_minutes: float | None = None) -> dict:
    """Fine-tune `base` on the lab's reviewed fields; write `out_dir/detector.pt` (+ ONNX)
    unless worse on the held-out fields (`held`, or a `config.held_out` share of the
    lab's cases). Returns {"before", "after", "fields", "threshold", "seconds", "written"}.

    `ignore`: per field name, white cells nobody boxed (neither hit nor false alarm);
    `before`: the base detector's `detection_scores` on `held`, when already measured.
    Raises DetectorAdaptError (too little to learn from) or
    `training.adapt.AdaptRefused` (worse on the held-out fields, not forced).
    `resume` continues the training stopped in `out_dir/.adapting/detector/` (a crash,
    Ctrl-C, or `time_limit_minutes`: `training.adapt.AdaptInterrupted` after the epoch
    that passes it)."""
    from leukodiff.training.adapt import WORK_DIR, AdaptInterrupted, AdaptRefused

    started = time.perf_counter()
    out_dir = Path(out_dir)
    if (out_dir / "detector.pt").exists():
        raise DetectorAdaptError(f"{out_dir} already holds an adapted detector; choose "
                                 "another --out")
    work = out_dir / WORK_DIR / "detector"
    interrupted = (work / "last.pt").exists()
    if resume and not interrupted:
        raise DetectorAdaptError(f"nothing to resume: no interrupted adaptation of the "
                                 f"detector in {out_dir}")
    if interrupted and not resume:
        raise DetectorAdaptError(f"{out_dir} holds an interrupted adaptation of the "
                                 "detector; pass --resume to continue it or choose another "
                                 "--out")
    base_path, manifest = read_checked(base)
    lab_fields = [f for f in lab_fields if f.wbc_boxes]
    if held is None:
        learn, held = case_split(lab_fields, config.held_out, config.seed)
    else:
        learn, held = list(lab_fields), list(held)
    if not held:
        raise DetectorAdaptError("no held-out fields to measure before and after: the "
                                 "reviewed fields come from a single case or slide")
    if len(learn) < config.min_fields:
        raise DetectorAdaptError(f"{len(learn)} reviewed field(s) with white cells to learn "
                                 f"from (outside those held out); at least "
                                 f"{config.min_fields} are needed")
    fit, val = case_split(learn, config.validation, config.seed + 1)
    base_config = DetectorConfig.from_dict(manifest.training.settings)
    replay = replay_fields(base_config, max(config.min_replay,
                                            round(config.replay_per_field * len(fit))),
                           config.seed, data_root, track, log)
    if not replay:
        raise DetectorAdaptError("none of the base detector's training fields ("
                                 f"{', '.join(base_config.sources)}) is on this machine: "
                                 "without them to replay, adapting would forget them")
    log(f"detector: {len(fit)} lab fields to learn from, {len(val)} to choose, "
        f"{len(held)} held out; {len(replay)} replay fields of "
        f"{', '.join(base_config.sources)}")
    # the lab's own validation chooses the epoch: no weight averaging (`average_last`)
    recipe = replace(base_config, init_weights=str(base_path), epochs=config.epochs,
                     average_last=0, lr=config.lr, batch_size=config.batch_size,
                     frozen_blocks=config.frozen_blocks, warmup_steps=0, val_every=1,
                     group_epochs=config.group_epochs if val else 0,
                     group_lr=config.group_lr,
                     # PBC's cells replay the five types when this machine has them
                     group_pbc_per_type=(config.group_pbc_per_type
                                         if has_dataset("pbc", data_root) else 0),
                     pbc_paste=0.0, mono_oversample=1, seed=config.seed,
                     max_train_fields=0, max_val_fields=0)
    # no lab validation fields (one learning case): the replay part stands in for them
    data = DetectorData(train=fit + replay, val=val or replay[: config.min_replay], test=[])
    trained = work / "detector.pt"
    if not trained.exists():  # else trained before a stop: measured again below
        done = train_detector(recipe, work, data=data, data_root=data_root, track=track,
                              log=log, resume=resume, time_limit_minutes=time_limit_minutes)
        if done.get("finished") is False:
            raise AdaptInterrupted(f"detector: stopped after epoch {done['epoch']} of "
                                   f"{config.epochs} (time limit); resume to go on")
    export_detector(trained)
    try:
        default = manifest.score_threshold
        threshold = default
        if val:
            threshold = best_threshold(detect_fields(trained, val, threads, track,
                                                     "Choosing the threshold"),
                                       val, default, ignore)
        before = before or detection_scores(
            detect_fields(base_path, held, threads, track, "Held-out fields, base detector"),
            held, default, ignore)
        adapted = detection_scores(detect_fields(trained, held, threads, track,
                                                 "Held-out fields, adapted detector"),
                                   held, threshold, ignore)
        log(f"detector on the held-out fields: precision {before['precision']:.3f} -> "
            f"{adapted['precision']:.3f}, recall {before['recall']:.3f} -> "
            f"{adapted['recall']:.3f} (threshold {threshold:.2f}, {len(held)} fields)")
        result = {"before": before, "after": adapted, "threshold": threshold,
                  "fields": {"learn": len(fit), "choose": len(val), "held_out": len(held),
                             "replay": len(replay),
                             "cells": sum(len(f.wbc_boxes) for f in fit)},
                  "seconds": time.perf_counter() - started}
        worse = adapted["f1"] < before["f1"]
        if worse and not force:
            raise AdaptRefused("the adapted detector is worse on the lab's held-out fields "
                               f"(F1 {before['f1']:.3f} -> {adapted['f1']:.3f}); nothing "
                               "written (--force writes it anyway)", {"detector": result})
        model, trained_manifest = load_detector(trained)
        if command is None:  # this process's `leukodiff ...` command line
            command = invoked_command()
        final = {**trained_manifest.to_dict(),
                 "architecture": {**trained_manifest.architecture,
                                  "score_threshold": threshold},
                 "adapted": {"base": {"model": str(resolve(base)),
                                      "sha256": manifest.sha256},
                             "config": asdict(config), "fields": result["fields"],
                             "before": before, "after": adapted, "threshold": threshold,
                             "forced": bool(force and worse),
                             "minutes": result["seconds"] / 60, "command": command}}
        final.pop("weights", None)
        final.pop("sha256", None)
        path = out_dir / "detector.pt"
        save_model(model, final, path)
        export_detector(path)
        add_lab_look(familiarity_path(base_path), fit, familiarity_path(path), track)
    except AdaptRefused:
        remove_work(work)
        raise
    remove_work(work)
    result["written"] = str(path)
    return result


def remove_work(work: Path) -> None:
    """An adaptation's checkpoint folder, once its outcome is written or refused (and
    `.adapting` with it when nothing else is left there)."""
    shutil.rmtree(work, ignore_errors=True)
    if work.parent.is_dir() and not any(work.parent.iterdir()):
        work.parent.rmdir()
