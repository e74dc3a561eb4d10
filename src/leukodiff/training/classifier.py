"""Training a level-2 classifier: the paper's frozen-base mode, or full fine-tuning.

    config = ClassifierConfig(task="mononuclear", sources=("pbc", "bccd"))
    result = train_classifier(config, Path("runs/mono"))

Data: any mix of shared sources and user folders, split once by
`leukodiff.data.splits.holdout` (grouped; a source's own lists kept). Training
sees only the train part, model selection only val; test is reported at the
end and never used for a decision.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from leukodiff.data.crops import LEVEL2_VIEWS, check_views, orientation
from leukodiff.data.records import Cell
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import CELL_SOURCES, FIELD_SOURCES, load_cells, read_class_folders
from leukodiff.data.splits import holdout
from leukodiff.imaging import STAIN_NORMALISATIONS
from leukodiff.metrics.classification import calibrate_confidence, classification_metrics
from leukodiff.models.files import (
    Manifest,
    invoked_command,
    manifest_path,
    resolve,
    sha256_of,
)
from leukodiff.models.io import load_classifier, save_model
from leukodiff.models.mobilenet import MobileNetClassifier, fused_for_inference
from leukodiff.models.tflite import load_imagenet_backbone
from leukodiff.taxonomy import CELL_TYPES_OF, CellType, Group, parse_cell_type
from leukodiff.training.cells import (
    AUGMENTATIONS,
    CellTensorDataset,
    CropGeometry,
    augmentation,
    load_cell_tensors,
)
from leukodiff.training.engine import (
    RunFolder,
    classifier_epochs,
    new_state,
    run_epochs,
    seed_everything,
    warmup_cosine,
)
from leukodiff.training.mixstyle import add_mixstyle

TASKS: dict[str, tuple[CellType, ...]] = {
    "mononuclear": CELL_TYPES_OF[Group.MONONUCLEAR],
    "polymorphonuclear": CELL_TYPES_OF[Group.POLYMORPHONUCLEAR],
    "flat": tuple(CellType),
}
MODES = ("frozen", "finetune")


class TrainingError(RuntimeError):
    """Training cannot start or go on (bad configuration, no data, occupied output folder)."""


@dataclass(frozen=True)
class ClassifierConfig:
    task: str = "mononuclear"
    classes: tuple[str, ...] = ()  # subset of the task's types; empty = all of them
    sources: tuple[str, ...] = ("pbc", "bccd")  # shared set names or class-folder paths
    mode: str = "finetune"
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3  # the paper's Adam: lr 1e-3, betas (0.9, 0.999), eps 1e-7
    seed: int = 0
    width: float = 0.5
    input_size: int = 128
    crop_scale: float = 2.6
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_per_class: int = 0  # > 0: cap each class of each source per part (quick runs, tests)
    balance: bool = True  # class-weighted loss
    # Draw training cells with weight 1 / (cells of their source) ** source_balance, so a
    # small source (BCCD's ~200 field crops beside PBC's thousands) is not drowned out.
    source_balance: float = 0.5
    # Each source's draws spread evenly over its types (the class-weighted loss then weighs
    # the classes as drawn): BCCD's cells are mostly neutrophils, and a model that learns
    # "BCCD's look means neutrophil" calls another sharp lab's granulocytes neutrophils.
    balance_by_source: bool = False
    augmentation: str = "basic"  # training.cells.AUGMENTATIONS: "lab" adds stain and camera
    stain: str = "none"  # imaging.STAIN_NORMALISATIONS: "reinhard" normalises each crop
    mixstyle: float = 0.0  # > 0: training.mixstyle with this probability (fine-tuning only)

    def class_names(self) -> tuple[str, ...]:
        if self.task not in TASKS:
            raise TrainingError(f"unknown task {self.task!r}; tasks: {', '.join(TASKS)}")
        if self.mode not in MODES:
            raise TrainingError(f"unknown mode {self.mode!r}; modes: {', '.join(MODES)}")
        if self.augmentation not in AUGMENTATIONS:
            raise TrainingError(f"unknown augmentation {self.augmentation!r}; choose one of "
                                f"{', '.join(AUGMENTATIONS)}")
        if self.stain not in STAIN_NORMALISATIONS:
            raise TrainingError(f"unknown stain normalisation {self.stain!r}; choose one of "
                                f"{', '.join(STAIN_NORMALISATIONS)}")
        if self.mixstyle and self.mode != "finetune":
            raise TrainingError("mixstyle mixes the backbone's features: it needs mode "
                                "'finetune'")
        allowed = TASKS[self.task]
        if not self.classes:
            return tuple(str(t) for t in allowed)
        chosen = tuple(parse_cell_type(c) for c in self.classes)
        if not set(chosen) <= set(allowed) or len(set(chosen)) < 2:
            raise TrainingError(f"classes {self.classes} must be two or more of "
                                f"{[str(t) for t in allowed]} for task {self.task!r}")
        return tuple(str(t) for t in allowed if t in chosen)

    @property
    def geometry(self) -> CropGeometry:
        return CropGeometry(self.input_size, self.crop_scale, self.stain)

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> ClassifierConfig:
        """The configuration a model was trained with, from its manifest."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in manifest.training.settings.items() if k in known})


@dataclass
class Prepared:
    """Cells of one run, split, decoded, with integer targets."""

    classes: tuple[str, ...]
    cells: list[Cell]
    parts: dict[str, tuple[int, ...]]
    images: torch.Tensor  # (N, 3, S, S) uint8
    targets: torch.Tensor  # (N,) int64
    skipped: list = field(default_factory=list)

    def part(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(self.parts[name], dtype=torch.long)
        return self.images[index], self.targets[index]

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            name: {c: int((self.targets[list(idx)] == i).sum()) if idx else 0
                   for i, c in enumerate(self.classes)}
            for name, idx in self.parts.items()
        }


def select_cells(sources: Sequence[str], classes: Sequence[str],
                 data_root: str | Path | None = None, track: Track = no_progress
                 ) -> tuple[list[Cell], list]:
    """Cells of the wanted classes from shared sets (by name) or class-folder trees (by path)."""
    cells: list[Cell] = []
    skipped: list = []
    for source in sources:
        if source in CELL_SOURCES or source in FIELD_SOURCES:
            loaded = load_cells(source, data_root, track)
        elif Path(source).is_dir():
            loaded = read_class_folders(Path(source), source=Path(source).name, track=track)
        else:
            raise TrainingError(f"source {source!r} is neither a data set "
                                f"({', '.join([*CELL_SOURCES, *FIELD_SOURCES])}) nor a folder")
        cells.extend(c for c in loaded.records if str(c.cell_type) in classes)
        skipped.extend(loaded.skipped)
    if not cells:
        raise TrainingError(f"no cells of {list(classes)} in sources {list(sources)}")
    return cells, skipped


def _cap(parts: dict[str, tuple[int, ...]], cells: list[Cell], cap: int, seed: int):
    """At most `cap` cells of each class of each source per part (a small source stays
    whole beside a large one)."""
    rng = random.Random(seed)
    capped = {}
    for name, indices in parts.items():
        by_class: dict[tuple[str, str], list[int]] = {}
        for i in indices:
            by_class.setdefault((cells[i].source, str(cells[i].cell_type)), []).append(i)
        keep = [i for group in by_class.values()
                for i in (rng.sample(group, cap) if len(group) > cap else group)]
        capped[name] = tuple(sorted(keep))
    return capped


def prepare(config: ClassifierConfig, data_root: str | Path | None = None,
            track: Track = no_progress) -> Prepared:
    classes = config.class_names()
    cells, skipped = select_cells(config.sources, classes, data_root, track)
    parts = holdout(cells, val_fraction=config.val_fraction,
                    test_fraction=config.test_fraction, seed=config.seed)
    if config.max_per_class:
        parts = _cap(parts, cells, config.max_per_class, config.seed)
        used = sorted({i for idx in parts.values() for i in idx})
        remap = {old: new for new, old in enumerate(used)}
        cells = [cells[i] for i in used]
        parts = {k: tuple(remap[i] for i in v) for k, v in parts.items()}
    images = load_cell_tensors(cells, config.geometry, track)
    targets = torch.tensor([classes.index(str(c.cell_type)) for c in cells])
    return Prepared(classes, cells, parts, images, targets, skipped)


def build_model(config: ClassifierConfig, weights_dir: str | Path | None = None
                ) -> MobileNetClassifier:
    """The paper's network with the ImageNet base; frozen or ready to fine-tune."""
    model = MobileNetClassifier(num_classes=len(config.class_names()), width=config.width)
    load_imagenet_backbone(model.backbone, weights_dir)
    if config.mode == "frozen":
        model.freeze_backbone()
    else:
        model.unfreeze_backbone(train_batchnorm=False)
    return model.to(memory_format=torch.channels_last)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256
                   ) -> torch.Tensor:
    """Logits for uint8 images (N, 3, S, S); the model's own normalisation applies (run on
    a copy with BatchNorm folded in, `fused_for_inference`; the model is put in eval mode)."""
    model.eval()
    model = fused_for_inference(model)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].float().div_(255)
        out.append(model(batch.contiguous(memory_format=torch.channels_last)))
    return torch.cat(out) if out else torch.empty((0, 0))


@torch.inference_mode()
def predict_probabilities(model: nn.Module, images: torch.Tensor, views: int = LEVEL2_VIEWS
                          ) -> torch.Tensor:
    """Class probabilities for uint8 images (N, 3, S, S) as the pipeline gives them: the
    softmax averaged over `views` orientations (`data.crops.orientation`). Calibration and
    evaluation use it; the per-epoch validation, a choice among epochs, one view."""
    check_views(views)
    if not len(images):
        return torch.empty((0, 0))
    pixels, model = images.numpy(), fused_for_inference(model.eval())  # folded once
    return torch.stack([predict_logits(model, torch.from_numpy(orientation(pixels, view)))
                        .softmax(1) for view in range(views)]).mean(0)


@torch.inference_mode()
def pooled_features(model: MobileNetClassifier, images: torch.Tensor, batch_size: int = 256
              ) -> torch.Tensor:
    model.eval()
    return torch.cat([
        model.features(images[s:s + batch_size].float().div_(255)
                       .contiguous(memory_format=torch.channels_last))
        for s in range(0, len(images), batch_size)
    ])


def class_weights(targets: torch.Tensor, n_classes: int,
                  draws: torch.Tensor | None = None) -> torch.Tensor:
    """Loss weights that make every class weigh alike: by the cells of each class, or by
    the chance the sampler gives them (`draws`, one weight per cell) when it is not even."""
    if draws is None:
        mass = torch.bincount(targets, minlength=n_classes).clamp(min=1).float()
    else:
        mass = torch.bincount(targets, weights=draws, minlength=n_classes).float().clamp(min=1e-12)
    return mass.sum() / (n_classes * mass)


def draw_weights(cells: Sequence[Cell], exponent: float, by_source: bool) -> torch.Tensor | None:
    """Each training cell's chance to be drawn (None: every cell alike): 1 / (cells of its
    source) ** `exponent`, so a small source is not drowned out; `by_source`: each source's
    share spread evenly over its types, so a source's look says nothing of the type."""
    per_source = Counter(c.source for c in cells)
    if not by_source and (exponent == 0 or len(per_source) < 2):
        return None
    weights = torch.tensor([per_source[c.source] ** -exponent for c in cells],
                           dtype=torch.double)
    if by_source:
        pairs = Counter((c.source, c.cell_type) for c in cells)
        types = Counter(source for source, _ in pairs)
        weights *= torch.tensor([per_source[c.source] / (types[c.source]
                                                         * pairs[c.source, c.cell_type])
                                 for c in cells], dtype=torch.double)
    return weights


def _sampler(weights: torch.Tensor | None, count: int, generator: torch.Generator
             ) -> torch.utils.data.Sampler:
    """Shuffle every cell once per epoch, or draw `count` cells by `weights`."""
    if weights is None:
        return torch.utils.data.RandomSampler(range(count), generator=generator)
    return torch.utils.data.WeightedRandomSampler(weights, count, generator=generator)


def paper_adam(params, config: ClassifierConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-7)


def train_classifier(
    config: ClassifierConfig,
    out_dir: Path,
    *,
    data_root: str | Path | None = None,
    prepared: Prepared | None = None,  # the cells already read (`prepare`): no data_root
    weights_dir: str | Path | None = None,
    resume: bool = False,
    track: Track = no_progress,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Train, keep the best epoch on val, report test, write `model.pt` + manifest.

    Checkpoints (`last.pt`) are written every epoch; `resume=True` continues an
    interrupted run in the same folder. A folder holding another run is refused.
    """
    out_dir = Path(out_dir)
    folder = RunFolder(out_dir, resume=resume, error=TrainingError, config=asdict(config))
    seed_everything(config.seed)
    started = time.perf_counter()
    data = prepared or prepare(config, data_root, track)
    log(f"cells per part: {json.dumps(data.counts())}")
    model = build_model(config, weights_dir)
    if config.mixstyle:
        add_mixstyle(model, config.mixstyle)
    train_x, train_y = data.part("train")
    val_x, val_y = data.part("val")
    if not len(train_y) or not len(val_y):
        raise TrainingError(f"empty train or val part: {data.counts()}")
    train_cells = [data.cells[i] for i in data.parts["train"]]
    draws = draw_weights(train_cells, config.source_balance, config.balance_by_source)
    # classes weighed as drawn when each source's types are evened out, else by cell counts
    drawn = draws if config.balance_by_source else None
    weights = class_weights(train_y, len(data.classes), drawn) if config.balance else None
    loss_fn = nn.CrossEntropyLoss(weight=weights)

    if config.mode == "frozen":
        # Paper mode: the base never changes, so compute its features once.
        train_source = torch.utils.data.TensorDataset(pooled_features(model, train_x), train_y)
        val_features = pooled_features(model, val_x)
        trained = model.head
        params = model.head.parameters()
    else:
        train_source = CellTensorDataset(train_x, train_y,
                                         augmentation(config.augmentation, config.input_size))
        trained = model
        params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train_source, batch_size=config.batch_size,
                        sampler=_sampler(draws, len(train_cells), generator),
                        drop_last=len(train_y) > config.batch_size)
    optimizer = paper_adam(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup=len(loader),
                           total=max(1, config.epochs * len(loader))))
    train = classifier_epochs(trained, loader, loss_fn, optimizer, scheduler, track=track,
                              description=lambda n: f"epoch {n}/{config.epochs}")

    state = new_state()
    if resume:
        state = folder.resume(model, optimizer, scheduler, generator)
        log(f"resumed after epoch {state['epoch']}")

    def one_epoch(epoch: int) -> dict:
        done = train(epoch)
        return {"loss": done["loss"], "seconds": done["seconds"], "images": done["samples"]}

    def validate(epoch: int, record: dict) -> tuple[float, float]:
        val_started = time.perf_counter()
        if config.mode == "frozen":
            with torch.inference_mode():
                model.head.eval()
                val_logits = model.head(val_features)
        else:
            val_logits = predict_logits(model, val_x)
        val = classification_metrics(val_y.tolist(), val_logits.argmax(1).tolist(),
                                     data.classes)
        val_loss = float(nn.functional.cross_entropy(val_logits, val_y))
        seconds = record.pop("seconds") + time.perf_counter() - val_started
        images = record.pop("images")
        record.update(val_loss=val_loss, val_accuracy=val["accuracy"],
                      val_macro_f1=val["macro_f1"], seconds=seconds,
                      images_per_second=images / seconds)
        # Val sets of a few hundred cells often tie on F1 near 1.0: the loss breaks ties.
        return val["macro_f1"], -val_loss

    def describe(record: dict, best: bool) -> str:
        return (f"epoch {record['epoch']}: loss {record['loss']:.4f}  val loss "
                f"{record['val_loss']:.4f}  acc {record['val_accuracy']:.4f}  macro-F1 "
                f"{record['val_macro_f1']:.4f}  {record['seconds']:.1f}s "
                f"({record['images_per_second']:.0f} img/s)")

    run_epochs(config.epochs, state, epoch=one_epoch, validate=validate,
               keep_best=lambda: folder.save_best(model), describe=describe,
               save_last=lambda state: folder.save_last(model, optimizer, scheduler,
                                                        generator, state), log=log)

    folder.load_best(model)
    calibration, metrics = calibrate_and_measure(model, data, log)
    manifest = {
        "architecture": {"name": "mobilenet_v1", "width": config.width, "hidden": 512,
                         "activation": "relu6"},
        "task": config.task,
        "classes": list(data.classes),
        "input": {"size": config.input_size, "crop_scale": config.crop_scale,
                  "stain": config.stain,
                  "whole_images": "centre square", "pixels": "RGB float in [0, 1]; the "
                  "model normalises to (p*255 - 128) / 128 itself"},
        "training": {**asdict(config), "cells": data.counts(),
                     "best_epoch": state["best_epoch"], "history": state["history"],
                     "minutes": (time.perf_counter() - started) / 60},
        "split": "leukodiff.data.splits.holdout(seed, val_fraction, test_fraction); BCCD VOC "
                 "lists and KBC TEST_SIMPLE kept as their own parts",
        "command": invoked_command(),
        "metrics": metrics,
        "calibration": calibration,
        "torch": torch.__version__,
    }
    return save_model(model, manifest, out_dir / "model.pt")


def calibrate_and_measure(model: nn.Module, data: Prepared, log: Callable[[str], None]
                          ) -> tuple[dict, dict]:
    """The "unidentified" threshold calibrated on the val part, and the metrics of the val
    and test parts per source, both as the pipeline types cells (`predict_probabilities`)."""
    val_x, val_y = data.part("val")
    calibration = {**calibrate_confidence(predict_probabilities(model, val_x).numpy(),
                                          val_y.tolist()), "views": LEVEL2_VIEWS}
    log(f"unidentified below confidence {calibration['threshold']:.3f} "
        f"({100 * calibration['validation_coverage']:.1f}% of val cells kept)")
    metrics = {}
    for part in ("val", "test"):
        x, y = data.part(part)
        if len(y):
            metrics[part] = evaluate_by_source(model, x, y, [data.cells[i] for i in
                                                             data.parts[part]], data.classes)
    return calibration, metrics


def recalibrate_classifier(model: str | Path, out_dir: Path, *,
                           data_root: str | Path | None = None, track: Track = no_progress,
                           log: Callable[[str], None] = lambda message: None) -> dict:
    """A trained level-2 model's threshold and metrics measured again as the pipeline now
    types cells (`data.crops.LEVEL2_VIEWS` orientations), on its own run's split (same
    seed, sources and caps): `train calibrate`. Same weights (the file is copied, its
    sha256 kept), written to `out_dir/model.pt` with a manifest naming where it came from;
    the source is never changed."""
    source = resolve(model)
    out_dir = Path(out_dir)
    if (out_dir / "model.pt").resolve() == source.resolve():
        raise TrainingError(f"{out_dir} holds the model itself: give another --out")
    network, manifest = load_classifier(source)
    if manifest.provenance.adapted:
        raise TrainingError(f"{source} was adapted to a lab, its threshold calibrated on the "
                            "lab's own cells: `leukodiff adapt` recalibrates it, not this")
    data = prepare(ClassifierConfig.of_manifest(manifest), data_root, track)
    recorded = manifest.training.settings.get("cells")
    if list(data.classes) != list(manifest.classes) or (recorded and data.counts() != recorded):
        raise TrainingError(f"{source}: its run's split could not be rebuilt as it was "
                            f"trained (cells per part now {data.counts()}, at training "
                            f"{recorded}): the data changed; calibrating on it could use "
                            "training cells")
    if not len(data.parts.get("val", ())):
        raise TrainingError(f"{source}: its run's val part is empty; nothing to calibrate on")
    calibration, metrics = calibrate_and_measure(network, data, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out_dir / "model.pt")
    earlier = manifest.raw.get("recalibrated_from", {})
    written = {**manifest.to_dict(), "calibration": calibration, "metrics": metrics,
               "command": invoked_command(),
               "recalibrated_from": {"model": str(model), "sha256": manifest.sha256,
                                     "threshold": manifest.threshold,
                                     # the command that trained it, through any earlier
                                     # recalibration
                                     "command": earlier.get("command",
                                                            manifest.provenance.command)}}
    written.update(weights="model.pt", sha256=sha256_of(out_dir / "model.pt"))
    manifest_path(out_dir / "model.pt").write_text(json.dumps(written, indent=2) + "\n")
    return written


def evaluate_by_source(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                       cells: Sequence[Cell], classes: Sequence[str],
                       views: int = LEVEL2_VIEWS) -> dict:
    """Metrics over all cells, and per source (held-out sources differ a lot), on `views`
    orientations of each crop (a trained model: the number its manifest was calibrated on)."""
    predicted = predict_probabilities(model, images, views).argmax(1)
    result = {"all": classification_metrics(targets.tolist(), predicted.tolist(), classes)}
    sources = Counter(c.source for c in cells)
    if len(sources) > 1:
        for source in sorted(sources):
            mask = torch.tensor([c.source == source for c in cells])
            result[source] = classification_metrics(
                targets[mask].tolist(), predicted[mask].tolist(), classes)
    return result
