"""`leukodiff adapt`: teach the level-2 models a lab's own look from its reviewed cells.

Every lab's stain, microscope and camera differ, and a model is best on the lab it has
learnt. A lab's reviewed cells (class folders, e.g. the station's `export-training`
output, or any typed data set the readers know), mixed with a replay sample of the
cells the models first learnt from (so nothing is forgotten), fine-tune both level-2
models in a minute or two on a CPU.

A quarter of the lab's learning cases choose the epoch, the base model (epoch 0)
included, so an adaptation that does not help on the lab's own cases is not taken.
Part of the lab's cells, grouped by case or slide (never by cell), is held out; the
base and the adapted models are measured on it (accuracy, macro-F1, per-type recall
with the counts behind them). The adapted set is written to a new folder (weights,
ONNX, a manifest naming the base model's hash, the data counts, the command and the
before/after figures) only when it is not worse on the held-out part, unless forced;
the models it started from are never touched. Too few cells of a type to learn from
is refused with the types and counts.

An adaptation checkpoints every epoch in `OUT/.adapting/TASK/` (the training engine's
`last.pt` and `best.pt`); one stopped by a crash, Ctrl-C or its time limit goes on from
its last epoch with `resume=True`, to the same weights as one never stopped. The folder
is removed once the models are written (or refused); a finished model in `--out` is
never overwritten. The detector and its group classifier: `training.adapt_detector`.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from leukodiff.data.crops import LEVEL2_VIEWS
from leukodiff.data.records import Cell
from leukodiff.data.root import DataNotFoundError
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.splits import case_split, holdout
from leukodiff.metrics.classification import calibrate_confidence, classification_metrics
from leukodiff.models.export import export_classifier
from leukodiff.models.files import Manifest, invoked_command, read_checked, resolve
from leukodiff.models.io import load_classifier, save_model
from leukodiff.taxonomy import MIN_REVIEWED_PER_TYPE
from leukodiff.training.cells import (
    CellImages,
    CellTensorDataset,
    CropGeometry,
    augmentation,
)
from leukodiff.training.classifier import class_weights, predict_probabilities, select_cells
from leukodiff.training.engine import (
    KeptBest,
    RunFolder,
    classifier_epochs,
    new_state,
    run_epochs,
    seed_everything,
)

TASKS = ("mononuclear", "polymorphonuclear")
#: Where an adaptation's checkpoints live in its output folder while it runs.
WORK_DIR = ".adapting"


class AdaptError(ValueError):
    """Nothing sound can be learnt from what was given (too few cells, no held-out part)."""


class AdaptInterrupted(RuntimeError):
    """The time limit stopped an adaptation after an epoch; `resume=True` goes on."""


class AdaptRefused(RuntimeError):
    """The adapted models are worse on the lab's held-out cells; nothing was written."""

    def __init__(self, message: str, results: dict) -> None:
        super().__init__(message)
        self.results = results


@dataclass(frozen=True)
class AdaptConfig:
    epochs: int = 8
    lr: float = 1e-4  # a tenth of training's: the base already knows cells
    batch_size: int = 32
    replay_per_class: int = 100  # cells per type from the base model's own training part
    held_out: float = 0.3  # share of the lab's cases/slides kept to measure before/after
    # share of the learning cases that choose the epoch (0: the base model kept unless
    # an epoch beats it on them); 0 here: train on all of them, keep the last epoch
    validation: float = 0.25
    min_per_type: int = MIN_REVIEWED_PER_TYPE  # fewer reviewed cells of a type: refused
    seed: int = 0
    # which weights learn the lab: "all" (every layer but BatchNorm's statistics), "early"
    # (the first EARLY_BLOCKS conv blocks: a lab's look is stain, optics and camera, an
    # input-level change) or "head" (the FC layers on the base's features)
    layers: str = "all"

    def __post_init__(self) -> None:
        if self.layers not in ADAPTED_LAYERS:
            raise AdaptError(f"layers is one of {', '.join(ADAPTED_LAYERS)}, not "
                             f"{self.layers!r}")


#: Conv blocks of MobileNetV1 that "early" adapts: the stem and the first three
#: depthwise-separable pairs, everything before the 16-pixel stage (stride 8 at 128 px).
EARLY_BLOCKS = 7
ADAPTED_LAYERS = ("all", "early", "head")


def learn_layers(model: torch.nn.Module, layers: str) -> None:
    """Make only `layers` (AdaptConfig.layers) trainable; BatchNorm keeps its statistics."""
    if layers == "all":
        model.unfreeze_backbone(train_batchnorm=False)
        return
    model.freeze_backbone()
    model.head.requires_grad_(layers == "head")
    if layers == "early":
        for block in list(model.backbone.blocks())[:EARLY_BLOCKS]:
            block.requires_grad_(True)


@dataclass
class Adapted:
    """One level-2 model adapted in memory, with what it was measured at."""

    task: str
    model: torch.nn.Module
    manifest: Manifest
    before: dict
    after: dict
    cells: dict = field(default_factory=dict)
    seconds: float = 0.0
    # the "unidentified" threshold recalibrated on the lab's validation cells (None: too
    # few to trust, the base model's kept)
    calibration: dict | None = None


#: Validation cells needed to recalibrate the "unidentified" threshold on a lab: with fewer,
#: one wrong call among the most confident would flag every cell (or none) as unidentified.
MIN_CALIBRATION_CELLS = 30
#: Cases (or slides) the validation part needs to choose the epoch on. One case is one
#: smear's look and a handful of cells: macro-F1 moves by whole cells, the base model
#: (epoch 0, which wins ties) is kept whatever was learnt, and the corrections in that
#: case are never learnt from. With fewer, the lab learns from all its learning cases,
#: keeps the last epoch, and is judged on its held-out cases as every adaptation is.
#: (4 cases of BCCD test fields whose eosinophils the shipped model calls neutrophil, 2
#: corrected a case: with one 7-cell validation case no epoch beat the base and 0 of 8
#: corrections took; learning from all 3 learning cases, 5 to 6 of 8 took, and every
#: confirmed cell stayed right: tests/server/test_server_models.py.)
MIN_VALIDATION_GROUPS = 2


def case_of(file_name: str) -> str:
    """The case or slide a reviewed cell's file names: up to "-field" (`export-training`
    writes ACCESSION-fieldN-cellN.png; an accession may hold '-'), else up to the first '-'."""
    if "-field" in file_name:
        return file_name.rsplit("-field", 1)[0]
    return file_name.split("-")[0]


def lab_cells(sources: Sequence[str], group_by: str = "prefix", data_root=None,
              track: Track = no_progress, log: Callable[[str], None] = lambda m: None
              ) -> list[Cell]:
    """The lab's reviewed cells of the five types: each source a class-folder tree (as
    `export-training` writes CELLS/TYPE/ACCESSION-fieldN-cellN.png; with `group_by`
    "prefix" its cells are grouped by the case their file names, with "file" each image
    is its own) or a data-set name. `leukodiff adapt` and the station's adapt job both
    read their cells here. AdaptError names a source that is neither."""
    from leukodiff.data.sources import CELL_SOURCES, FIELD_SOURCES, read_class_folders
    from leukodiff.taxonomy import CellType

    if group_by not in ("prefix", "file"):
        raise AdaptError("group_by is 'prefix' or 'file'")
    cells: list[Cell] = []
    for source in sources:
        if source in CELL_SOURCES or source in FIELD_SOURCES:
            cells.extend(select_cells([source], [str(t) for t in CellType], data_root,
                                      track)[0])
            continue
        root = Path(source)
        if not root.is_dir():
            raise AdaptError(f"--cells {source}: neither a folder nor a data set")
        key = (lambda p, r=root: f"{r.name}:{case_of(p.name)}") if group_by == "prefix" \
            else None
        loaded = read_class_folders(root, source=root.name, group_key=key, track=track)
        for skipped in loaded.skipped:
            log(f"skipped {skipped.path}: {skipped.reason}")
        cells.extend(loaded.records)
    return cells


def replay_cells(manifest: Manifest, per_class: int, seed: int, data_root=None,
                 track: Track = no_progress, log: Callable[[str], None] = lambda m: None
                 ) -> list[Cell]:
    """Up to `per_class` cells of each type from the base model's own *training* part (its
    split is re-drawn from its manifest, so none of its test cells are used); a source
    that is not on this machine is left out, and said so."""
    trained = manifest.training.settings
    classes = list(manifest.classes)
    cells: list[Cell] = []
    for source in manifest.training.sources:
        try:
            found, _ = select_cells([source], classes, data_root, track)
        except (DataNotFoundError, FileNotFoundError, ValueError) as error:
            log(f"replay: {source} left out ({error})")
            continue
        cells.extend(found)
    if not cells:
        return []
    parts = holdout(cells, val_fraction=trained["val_fraction"],
                    test_fraction=trained["test_fraction"], seed=trained["seed"])
    by_type: dict[str, list[Cell]] = {}
    for i in parts["train"]:
        by_type.setdefault(str(cells[i].cell_type), []).append(cells[i])
    rng = random.Random(seed)
    chosen = []
    for name in sorted(by_type):
        pool = sorted(by_type[name], key=lambda c: (c.source, c.group_key, str(c.image)))
        chosen.extend(rng.sample(pool, per_class) if len(pool) > per_class else pool)
    return chosen


def measure(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
            classes: Sequence[str]) -> dict:
    """`scores` of the model's calls on `images`."""
    predicted = predict_probabilities(model, images).argmax(1).tolist() if len(targets) else []
    return scores(targets.tolist(), predicted, classes)


def scores(truth: Sequence[int], predicted: Sequence[int], classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and per-type recall with its counts (types present only)."""
    metrics = classification_metrics(list(truth), list(predicted), list(classes))
    present = [c for c in classes if metrics["per_class"][c]["support"]]
    return {"n": metrics["n"], "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "recall": {c: metrics["per_class"][c]["recall"] for c in present},
            "right": {c: round(metrics["per_class"][c]["recall"]
                               * metrics["per_class"][c]["support"]) for c in present},
            "support": {c: metrics["per_class"][c]["support"] for c in present}}


def validation_split(learn: Sequence[Cell], share: float, seed: int
                     ) -> tuple[list[Cell], list[Cell]]:
    """(fit, validation) of the lab's learning cells, grouped by case/slide; no validation
    (everything fits, the last epoch is kept) when the validation part would hold fewer
    than MIN_VALIDATION_GROUPS cases or slides."""
    fit, val = case_split(learn, share, seed + 1)
    if len({c.group_key for c in val}) < MIN_VALIDATION_GROUPS:
        return list(learn), []
    return fit, val


def plan_task(task: str, classes: Sequence[str], lab_cells: Sequence[Cell],
              config: AdaptConfig) -> tuple[list[Cell], list[Cell]] | None:
    """The lab's cells of one model's types, as (learn, held out); None when there are
    none; AdaptError when a type has too few to learn from or nothing can be held out."""
    mine = [c for c in lab_cells if str(c.cell_type) in classes]
    if not mine:
        return None
    if len({c.group_key for c in mine}) < 2:
        raise AdaptError(f"{task}: no held-out cells to measure on; the cells must come "
                         "from at least two cases or slides")
    learn, held = case_split(mine, config.held_out, config.seed)
    counts = Counter(str(c.cell_type) for c in learn)
    few = {t: n for t, n in sorted(counts.items()) if n < config.min_per_type}
    if few:
        listed = ", ".join(f"{t} {n}" for t, n in few.items())
        none = replay_only(classes, learn)
        raise AdaptError(f"{task}: too few reviewed cells to learn from ({listed}; at least "
                         f"{config.min_per_type} of a type, outside the held-out cases)"
                         + (f"; none of {', '.join(none)} (the replay only)" if none else ""))
    if not held:
        raise AdaptError(f"{task}: no held-out cells to measure on; the cells must come "
                         "from at least two cases or slides")
    return learn, held


def replay_only(classes: Sequence[str], learn: Sequence[Cell]) -> list[str]:
    """The model's types of which the lab gave no cell to learn from: the replay alone
    keeps them (a lab never sees every type; it is said, not refused)."""
    present = {str(c.cell_type) for c in learn}
    return [t for t in classes if t not in present]


def lab_digest(task: str, manifest: Manifest, learn: Sequence[Cell], held: Sequence[Cell]
               ) -> str:
    """What an adaptation learns from, in a word: resuming one with other cells or another
    base model is refused. File names, not paths: `--station` exports its cells to a new
    temporary folder on every run."""
    text = "\n".join([task, str(manifest.sha256),
                      *(f"{part}:{c.image.name}:{c.cell_type}:{c.group_key}"
                        for part, cells in (("learn", learn), ("held", held))
                        for c in cells)])
    return hashlib.sha256(text.encode()).hexdigest()


def crop_geometry(manifest: Manifest) -> CropGeometry:
    """How the model's manifest says its cells are cut, sized and normalised."""
    if manifest.input is None:
        raise AdaptError(f"{manifest.provenance.weights}: not a crop classifier")
    return CropGeometry(manifest.input.size, manifest.input.crop_scale, manifest.input.stain)


def adapt_task(task: str, base: str | Path, learn: Sequence[Cell], held: Sequence[Cell],
               config: AdaptConfig, *, data_root=None, images: CellImages | None = None,
               replay: Sequence[Cell] | None = None, track: Track = no_progress,
               log: Callable[[str], None] = lambda m: None, work: Path | None = None,
               resume: bool = False, time_limit_minutes: float | None = None,
               started: float | None = None) -> Adapted:
    """Fine-tune one level-2 model on the lab's `learn` cells (+ replay); measure the
    base and the result on `held`. `images` (the model's crop geometry) and `replay`
    may be given when one lab is adapted to many times.

    `work`: a folder for the engine's checkpoints (`resume` continues the run there);
    None keeps the best epoch in memory. AdaptInterrupted when `time_limit_minutes`
    (counted from `started`) stopped it after an epoch."""
    began = time.perf_counter()
    model, manifest = load_classifier(base)
    classes = list(manifest.classes)
    folder = None if work is None else RunFolder(
        work, resume=resume, error=AdaptError,
        config={**asdict(config), "task": task, "lab": lab_digest(task, manifest, learn, held)})
    geometry = crop_geometry(manifest)
    images = images or CellImages(geometry)
    if images.geometry != geometry:
        raise ValueError(f"cell images cut as {images.geometry}, the model wants {geometry}")
    if replay is None:
        replay = replay_cells(manifest, config.replay_per_class, config.seed, data_root,
                              track, log)
    fit, val = validation_split(learn, config.validation, config.seed)
    if not val and config.validation > 0:
        log(f"{task}: too few cases to choose an epoch on (fewer than "
            f"{MIN_VALIDATION_GROUPS} for validation): all {len(fit)} learning cells "
            "learnt from, the last epoch kept")
    train_cells = [*fit, *replay]
    train_x = images(train_cells, track)
    train_y = torch.tensor([classes.index(str(c.cell_type)) for c in train_cells])
    val_x = images(val, track)
    val_y = torch.tensor([classes.index(str(c.cell_type)) for c in val])
    test_x = images(held, track)
    test_y = torch.tensor([classes.index(str(c.cell_type)) for c in held])
    before = measure(model, test_x, test_y, classes)

    seed_everything(config.seed)
    # the lab's cells weigh as much as the replay together, whatever their numbers
    weights = torch.tensor([1 / len(fit)] * len(fit) + [1 / max(1, len(replay))]
                           * len(replay), dtype=torch.double)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = WeightedRandomSampler(weights, num_samples=max(2 * len(fit), len(train_y)),
                                    generator=generator)
    aug = manifest.training.augmentation
    loader = DataLoader(CellTensorDataset(train_x, train_y, augmentation(aug, geometry.input_size)),
                        batch_size=config.batch_size, sampler=sampler)
    learn_layers(model, config.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, eps=1e-7)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights(train_y, len(classes)))
    train = classifier_epochs(model, loader, loss_fn, optimizer, track=track,
                              description=lambda n: f"adapting {task} {n}/{config.epochs}")
    # epoch 0 is the base model: adapting must beat it on the lab's own validation cases
    base_score = measure(model, val_x, val_y, classes)["macro_f1"] if val else -1.0
    state = new_state()
    state.update(best_score=[base_score], best_epoch=0)
    state["history"].append({"epoch": 0, "val_macro_f1": base_score if val else None})
    kept = KeptBest(model)
    keep_best: Callable[[], None] = kept if folder is None else (
        lambda: folder.save_best(model))
    if folder is not None and resume:
        state = folder.resume(model, optimizer, None, generator)
        log(f"{task}: resumed after epoch {state['epoch']}")
    else:
        keep_best()  # epoch 0: the base model

    def one_epoch(epoch: int) -> dict:
        return {"loss": train(epoch)["loss"]}

    def validate(epoch: int, record: dict) -> tuple[float]:
        # without validation cases every epoch beats the one before: the last is kept
        score = measure(model, val_x, val_y, classes)["macro_f1"] if val else float(epoch)
        record["val_macro_f1"] = score if val else None
        return (score,)

    def describe(record: dict, best: bool) -> str:
        return (f"{task} epoch {record['epoch']}: loss {record['loss']:.4f}"
                + (f"  validation macro-F1 {record['val_macro_f1']:.3f}" if val else ""))

    save_last = None if folder is None else (
        lambda state: folder.save_last(model, optimizer, None, generator, state))
    if not run_epochs(config.epochs, state, epoch=one_epoch, validate=validate,
                      keep_best=keep_best, describe=describe, save_last=save_last, log=log,
                      time_limit_minutes=time_limit_minutes, started=started):
        raise AdaptInterrupted(f"{task}: stopped after epoch {state['epoch']} of "
                               f"{config.epochs} (time limit); resume to go on")
    if folder is None:
        kept.restore()
    else:
        folder.load_best(model)
    best = (state["best_score"][0], state["best_epoch"])
    history = state["history"]
    model.eval()
    if val:
        log(f"{task}: epoch {best[1]} chosen on {len(val)} validation cells"
            + (" (the base model: no epoch beat it)" if best[1] == 0 else ""))
    after = measure(model, test_x, test_y, classes)
    calibration = None
    if len(val) >= MIN_CALIBRATION_CELLS:
        calibration = {**calibrate_confidence(predict_probabilities(model, val_x).numpy(),
                                              val_y.tolist()),
                       "views": LEVEL2_VIEWS,
                       "on": "the lab's validation cases (leukodiff adapt)"}
        log(f"{task}: unidentified below confidence {calibration['threshold']:.3f} on the "
            f"lab's {len(val)} validation cells (was "
            f"{manifest.threshold:.3f})")
    cells = {"learnt": dict(sorted(Counter(str(c.cell_type) for c in fit).items())),
             "validation": dict(sorted(Counter(str(c.cell_type) for c in val).items())),
             "held_out": dict(sorted(Counter(str(c.cell_type) for c in held).items())),
             "replay": dict(sorted(Counter(str(c.cell_type) for c in replay).items())),
             "held_out_groups": len({c.group_key for c in held}),
             "replay_only": replay_only(classes, [*fit, *val]),
             "best_epoch": best[1], "history": history}
    if cells["replay_only"]:
        log(f"{task}: no reviewed {', '.join(cells['replay_only'])} cells to learn from: "
            "the replay alone keeps them")
    return Adapted(task, model, manifest, before, after, cells, time.perf_counter() - began,
                   calibration)


def adapt(lab_sources: Sequence[str], out_dir: Path, config: AdaptConfig = AdaptConfig(), *,
          bases: dict[str, str | Path] | None = None, force: bool = False, data_root=None,
          cells: Sequence[Cell] | None = None, track: Track = no_progress,
          log: Callable[[str], None] = lambda m: None, command: str | None = None,
          resume: bool = False, time_limit_minutes: float | None = None) -> dict:
    """Adapt both level-2 models to the lab's cells (`lab_sources`: class-folder paths or
    data-set names; or `cells` given directly); write them to `out_dir` unless worse.

    Returns {task: {"before", "after", "cells", "seconds", "written"}}; raises AdaptError
    (too little to learn from) or AdaptRefused (worse on the held-out cells, not forced).
    `command`: what the manifests record as the command (default: this process's
    `leukodiff ...` command line; the station names its adapt job). Checkpoints go to
    `out_dir/.adapting/`: `resume` continues a run stopped there (a crash, Ctrl-C, or
    `time_limit_minutes`, which raises AdaptInterrupted after the epoch that passes it).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    bases = {task: (bases or {}).get(task, task) for task in TASKS}
    if any((out_dir / f"{task}.pt").exists() for task in TASKS):
        raise AdaptError(f"{out_dir} already holds adapted models; choose another --out")
    work = out_dir / WORK_DIR
    interrupted = any((work / task / "last.pt").exists() for task in TASKS)
    if resume and not interrupted:
        raise AdaptError(f"nothing to resume: no interrupted adaptation of the level-2 "
                         f"models in {out_dir}")
    if interrupted and not resume:
        raise AdaptError(f"{out_dir} holds an interrupted adaptation; pass --resume to "
                         "continue it or choose another --out")
    classes = {task: list(read_checked(bases[task])[1].classes) for task in TASKS}
    if cells is None:
        cells, _ = select_cells(list(lab_sources), [c for t in TASKS for c in classes[t]],
                                data_root, track)
    results: dict = {}
    # every refusal before any training
    plans = {task: plan_task(task, classes[task], cells, config) for task in TASKS}
    if not any(plans.values()):
        raise AdaptError("none of the lab's cells is of a type the models know")
    adapted = []
    for task, plan in plans.items():
        if plan is None:
            results[task] = {"skipped": "no reviewed cells of this group"}
            continue
        done = adapt_task(task, bases[task], *plan, config, data_root=data_root, track=track,
                          log=log, work=work / task,
                          resume=resume and (work / task / "last.pt").exists(),
                          time_limit_minutes=time_limit_minutes, started=started)
        adapted.append(done)
        results[task] = {"before": done.before, "after": done.after, "cells": done.cells,
                         "seconds": done.seconds}
        log(f"{task}: held-out macro-F1 {done.before['macro_f1']:.3f} -> "
            f"{done.after['macro_f1']:.3f}, accuracy {done.before['accuracy']:.3f} -> "
            f"{done.after['accuracy']:.3f} ({done.after['n']} cells)")
    for task in TASKS:  # trained: the checkpoints have done their work
        shutil.rmtree(work / task, ignore_errors=True)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    worse = [a.task for a in adapted if a.after["macro_f1"] < a.before["macro_f1"]]
    if worse and not force:
        raise AdaptRefused(f"the adapted {' and '.join(worse)} model is worse on the lab's "
                           "held-out cells than the one it started from; nothing written "
                           "(--force writes it anyway)", results)
    if command is None:
        command = invoked_command()
    for done in adapted:
        source = resolve(bases[done.task])
        manifest = {**done.manifest.to_dict(),
                    "calibration": done.calibration or done.manifest.calibration,
                    "adapted": {"recalibrated": done.calibration is not None,
                                "base": {"model": str(source), "sha256": done.manifest.sha256},
                                "lab": [str(s) for s in lab_sources],
                                "config": asdict(config), "cells": done.cells,
                                "before": done.before, "after": done.after,
                                "forced": bool(force and done.task in worse),
                                "minutes": done.seconds / 60, "command": command}}
        path = out_dir / f"{done.task}.pt"
        save_model(done.model, manifest, path)
        export_classifier(path)
        results[done.task]["written"] = str(path)
    return results
