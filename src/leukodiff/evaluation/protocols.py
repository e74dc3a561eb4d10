"""Evaluation protocols: the paper's Monte Carlo CV, grouped by source cell, cross-source,
flat versus multi-level, with McNemar's test. Plain functions; every random choice is seeded.

The level-2 models are the paper's: MobileNetV1-0.5 with ImageNet weights, FC 512,
Adam 1e-3 (`leukodiff.training.classifier`). In the paper's *frozen* mode the base
never changes, so its features are computed once per image (`backbone_features`)
and every split only retrains the head (`train_head`, seconds). *Fine-tuned* models
go through `train_classifier` on one split at a time (`finetune_split`).

    cells = ...                                   # KBC TRAIN, boxed and regrouped (provenance)
    images = load_cell_tensors(cells, CropGeometry())
    features = backbone_features(images)
    splits = monte_carlo(cells, repeats=10, seed=0, grouped=True)
    runs = two_level_runs(features, cells, splits)    # per split: both level-2 heads
    table = paper_table(runs)                         # Table 3 layout: mean and std
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest, wilcoxon
from torch import nn
from torchvision.transforms import v2

from leukodiff.data.records import Cell
from leukodiff.data.splits import Split, holdout
from leukodiff.metrics.classification import classification_metrics
from leukodiff.metrics.study import (
    METRICS,
    ClassRow,
    ClassTable,
    Comparison,
    FlatVsTwoLevel,
    McNemar,
    ParameterCount,
    Parameters,
    Scores,
)
from leukodiff.models.mobilenet import MobileNetClassifier, keras_parameter_counts
from leukodiff.taxonomy import CELL_TYPES_OF, Group
from leukodiff.training.classifier import (
    ClassifierConfig,
    Prepared,
    build_model,
    class_weights,
    paper_adam,
    pooled_features,
    predict_logits,
    train_classifier,
)
from leukodiff.training.engine import Step, classification_loss, train_epoch

#: The paper's level-2 tasks: the four types it classifies, two per group (no basophils).
PAPER_TASKS: dict[str, tuple[str, ...]] = {
    "mononuclear": ("lymphocyte", "monocyte"),
    "polymorphonuclear": ("neutrophil", "eosinophil"),
}
#: With basophils (PBC only has enough of them).
FIVE_CLASS_TASKS: dict[str, tuple[str, ...]] = {
    str(g): tuple(str(t) for t in CELL_TYPES_OF[g]) for g in Group
}


@dataclass(frozen=True)
class HeadConfig:
    """How a head is trained on frozen features: the paper's FC 512 and Adam 1e-3."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    balance: bool = True  # class-weighted loss, as train_classifier
    hidden: int = 512
    width: float = 0.5


# --- features and heads -----------------------------------------------------------------------


def backbone_features(images: torch.Tensor, *, width: float = 0.5,
                      weights_dir: str | Path | None = None, batch_size: int = 128,
                      track: Callable | None = None) -> torch.Tensor:
    """Pooled ImageNet MobileNet features (N, 512 at width 0.5) of uint8 images (N, 3, S, S)."""
    model = build_model(ClassifierConfig(mode="frozen", width=width), weights_dir)
    chunks = range(0, len(images), 4 * batch_size)
    if track is not None:
        chunks = track(list(chunks), "Backbone features")
    parts = [pooled_features(model, images[s:s + 4 * batch_size], batch_size) for s in chunks]
    return torch.cat(parts) if parts else torch.zeros((0, model.backbone.out_features))


def new_head(n_classes: int, config: HeadConfig = HeadConfig()) -> nn.Module:
    """The paper's head (FC `hidden` + ReLU + softmax layer), freshly initialised."""
    return MobileNetClassifier(n_classes, width=config.width, hidden=config.hidden).head


def train_head(features: torch.Tensor, targets: torch.Tensor, n_classes: int,
               config: HeadConfig = HeadConfig(), seed: int = 0) -> nn.Module:
    """Train a head on frozen features: Adam (paper settings), cosine schedule, fixed epochs
    (the Monte Carlo protocol has no validation part to pick an epoch on)."""
    torch.manual_seed(seed)
    head = new_head(n_classes, config)
    weights = class_weights(targets, n_classes) if config.balance else None
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    optimizer = paper_adam(head.parameters(), ClassifierConfig(lr=config.lr))
    steps_per_epoch = max(1, math.ceil(len(targets) / config.batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    step = Step(optimizer, scheduler)
    loss_of = classification_loss(head, loss_fn)
    for _ in range(config.epochs):
        order = torch.randperm(len(targets), generator=generator)
        batches = ((features[batch], targets[batch])
                   for batch in (order[s:s + config.batch_size]
                                 for s in range(0, len(order), config.batch_size)))
        train_epoch(head, batches, loss_of, step)
    return head.eval()


@torch.inference_mode()
def head_logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    head.eval()
    return head(features)


def standardise(features: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Z-score features with the mean and std of `reference` (default: themselves).

    Applied per source it is a label-free domain adaptation: each source's features are
    centred on its own mean (as AdaBN re-estimates batch statistics per domain).
    """
    ref = features if reference is None else reference
    return (features - ref.mean(0)) / ref.std(0).clamp(min=1e-6)


# --- colour: stain augmentation and normalisation ---------------------------------------------


def stain_augment(images: torch.Tensor, copies: int = 2, seed: int = 0) -> torch.Tensor:
    """`copies` colour-jittered versions of uint8 images (brightness, contrast, saturation,
    hue: what varies between stains, lamps and cameras), stacked copy-major."""
    torch.manual_seed(seed)
    jitter = v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.4, hue=0.06)
    return torch.cat([torch.stack([jitter(image) for image in images])
                      for _ in range(copies)])


def normalise_colour(images: torch.Tensor, target_mean: Sequence[float] = (180, 150, 170),
                     target_std: Sequence[float] = (40, 45, 35)) -> torch.Tensor:
    """Per-image colour normalisation: each RGB channel moved to a fixed mean and spread
    (Reinhard-style, in RGB), so every source's images share one overall stain colour."""
    x = images.float()
    mean = x.mean((-2, -1), keepdim=True)
    std = x.std((-2, -1), keepdim=True).clamp(min=1.0)
    target_m = torch.tensor(target_mean, dtype=torch.float32)[:, None, None]
    target_s = torch.tensor(target_std, dtype=torch.float32)[:, None, None]
    return ((x - mean) / std * target_s + target_m).clamp(0, 255).round().to(torch.uint8)


# --- splits and runs --------------------------------------------------------------------------


def targets_of(cells: Sequence[Cell], classes: Sequence[str]) -> torch.Tensor:
    return torch.tensor([list(classes).index(str(c.cell_type)) for c in cells])


@dataclass
class Run:
    """One model on one split: what it predicted for which test cells."""

    name: str  # split name
    classes: tuple[str, ...]
    test: np.ndarray  # indices of the test cells (into the cell list of the protocol)
    y_true: np.ndarray
    y_pred: np.ndarray
    logits: np.ndarray | None = None  # (n, classes) when kept
    extra: dict = field(default_factory=dict)

    @property
    def correct(self) -> np.ndarray:
        return self.y_true == self.y_pred

    def metrics(self) -> dict:
        return classification_metrics(self.y_true.tolist(), self.y_pred.tolist(), self.classes)


def _task_index(cells: Sequence[Cell], classes: Sequence[str], index: Sequence[int]
                ) -> np.ndarray:
    wanted = set(classes)
    return np.array([i for i in index if str(cells[i].cell_type) in wanted], dtype=np.int64)


def head_run(features: torch.Tensor, cells: Sequence[Cell], split: Split,
             classes: Sequence[str], config: HeadConfig = HeadConfig(), seed: int = 0,
             test_features: torch.Tensor | None = None,
             test_cells: Sequence[Cell] | None = None) -> Run:
    """Train a head for `classes` on the split's train cells of those classes; predict its
    test cells (or all of `test_cells`/`test_features`, another source, when given)."""
    classes = tuple(classes)
    train = _task_index(cells, classes, split.train)
    head = train_head(features[train], targets_of([cells[i] for i in train], classes),
                      len(classes), config, seed)
    if test_cells is None:
        test = _task_index(cells, classes, split.test)
        x, tc = features[test], [cells[i] for i in test]
    else:
        test = _task_index(test_cells, classes, range(len(test_cells)))
        x, tc = test_features[test], [test_cells[i] for i in test]
    logits = head_logits(head, x).numpy() if len(test) else np.zeros((0, len(classes)))
    return Run(split.name, classes, test, targets_of(tc, classes).numpy(), logits.argmax(1),
               logits)


def two_level_runs(features: torch.Tensor, cells: Sequence[Cell], splits: Sequence[Split],
                   tasks: dict[str, tuple[str, ...]] = PAPER_TASKS,
                   config: HeadConfig = HeadConfig(), seed: int = 0) -> dict[str, list[Run]]:
    """The paper's level 2 on each split: one head per group, each tested on its own group's
    test cells (level 1 is not involved: the true group is given)."""
    return {task: [head_run(features, cells, split, classes, config, seed + k)
                   for k, split in enumerate(splits)]
            for task, classes in tasks.items()}


# --- the paper's table ------------------------------------------------------------------------


def paper_table(runs: dict[str, list[Run]]) -> ClassTable:
    """Per class (and 'average' over classes): mean and std over splits, in %, of the
    one-vs-rest accuracy, recall, precision and F1 (the layout of Table 3)."""
    table: ClassTable = {}
    for task_runs in runs.values():
        per_split = [r.metrics() for r in task_runs]
        for name in task_runs[0].classes:
            table[name] = ClassRow(**{
                m: _mean_std([100 * s["per_class"][name][m] for s in per_split]) for m in METRICS
            })
    table["average"] = ClassRow(**{
        m: (float(np.mean([getattr(v, m)[0] for v in table.values()])), float("nan"))
        for m in METRICS})
    return table


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


# --- flat versus two-level --------------------------------------------------------------------


def combine_levels(task_runs: dict[str, list[Run]]) -> list[Run]:
    """Per split, the two-level answer over all classes: each test cell answered by its own
    group's head (an oracle level 1: the true group is given)."""
    classes = tuple(c for runs in task_runs.values() for c in runs[0].classes)
    out = []
    for per_split in zip(*task_runs.values(), strict=True):
        test = np.concatenate([r.test for r in per_split])
        y_true = np.concatenate([[classes.index(r.classes[t]) for t in r.y_true]
                                 for r in per_split]).astype(np.int64)
        y_pred = np.concatenate([[classes.index(r.classes[p]) for p in r.y_pred]
                                 for r in per_split]).astype(np.int64)
        order = np.argsort(test, kind="stable")
        out.append(Run(per_split[0].name, classes, test[order], y_true[order], y_pred[order]))
    return out


def flat_runs(features: torch.Tensor, cells: Sequence[Cell], splits: Sequence[Split],
              classes: Sequence[str], config: HeadConfig = HeadConfig(), seed: int = 0
              ) -> list[Run]:
    """One head over all `classes` per split (a single-level classifier of the same size)."""
    return [head_run(features, cells, split, classes, config, seed + 1000 + k)
            for k, split in enumerate(splits)]


def restrict_to_true_group(run: Run, tasks: dict[str, tuple[str, ...]]) -> Run:
    """A flat model given the same oracle as the two-level scheme: its answer among the
    classes of the cell's true group only (argmax of its logits over that group)."""
    if run.logits is None:
        raise ValueError("the flat run kept no logits")
    group_of = {c: tuple(task) for task in tasks.values() for c in task}
    masked = np.full_like(run.logits, -np.inf)
    for row, truth in enumerate(run.y_true):
        allowed = [run.classes.index(c) for c in group_of[run.classes[truth]]]
        masked[row, allowed] = run.logits[row, allowed]
    return Run(run.name, run.classes, run.test, run.y_true, masked.argmax(1), masked)


def flat_vs_two_level(flat: Sequence[Run], two_level: Sequence[Run],
                      tasks: dict[str, tuple[str, ...]] = PAPER_TASKS, width: float = 0.5
                      ) -> FlatVsTwoLevel:
    """Flat against two-level on the same test cells of the same splits: accuracy, macro-F1,
    McNemar per split and pooled, Wilcoxon over splits, and parameter counts. Also the flat
    model given the same true group (`restrict_to_true_group`) against two-level."""
    for f, t in zip(flat, two_level, strict=True):
        if not np.array_equal(f.test, t.test) or f.classes != t.classes:
            raise ValueError(f"split {f.name}: flat and two-level runs test different cells")
    classes = flat[0].classes
    two_params = [parameter_counts(len(t), width) for t in tasks.values()]
    flat_oracle = [restrict_to_true_group(r, tasks) for r in flat]
    return FlatVsTwoLevel(
        classes=classes,
        summary=compare_runs(flat, two_level),
        # the same oracle for both: is the gain the hierarchy or the given group?
        oracle_flat_vs_two_level=compare_runs(flat_oracle, two_level),
        parameters=Parameters(
            flat=parameter_counts(len(classes), width),
            two_level=ParameterCount(total=sum(p.total for p in two_params),
                                     trainable=sum(p.trainable for p in two_params),
                                     models=len(two_params))),
    )


def parameter_counts(n_classes: int, width: float = 0.5) -> ParameterCount:
    """Keras-style counts of one level-2 model (Table 2): total, and trainable when frozen."""
    model = MobileNetClassifier(n_classes, width=width)
    model.freeze_backbone()
    total, trainable = keras_parameter_counts(model)
    return ParameterCount(total=total, trainable=trainable)


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> McNemar:
    """McNemar's exact test: of the cells exactly one model gets right, is the split 50/50?"""
    a_only = int(np.sum(a_correct & ~b_correct))
    b_only = int(np.sum(~a_correct & b_correct))
    n = a_only + b_only
    p = binomtest(a_only, n, 0.5).pvalue if n else 1.0
    return McNemar(a_only=a_only, b_only=b_only, p=float(p))


def compare_runs(a_runs: Sequence[Run], b_runs: Sequence[Run]) -> Comparison:
    """Accuracy and macro-F1 of two models over the same splits (mean, std), McNemar on the
    pooled discordant cells, and Wilcoxon's signed-rank test on the per-split accuracies."""
    a = [r.metrics() for r in a_runs]
    b = [r.metrics() for r in b_runs]
    pooled = mcnemar(np.concatenate([r.correct for r in a_runs]),
                     np.concatenate([r.correct for r in b_runs]))
    diffs = [x["accuracy"] - y["accuracy"] for x, y in zip(a, b, strict=True)]
    try:
        signed = float(wilcoxon(diffs).pvalue) if any(diffs) and len(diffs) > 1 else 1.0
    except ValueError:
        signed = 1.0
    per_split = [mcnemar(x.correct, y.correct).p for x, y in zip(a_runs, b_runs, strict=True)]
    return Comparison(
        a=Scores(**{k: _mean_std([100 * m[k] for m in a]) for k in ("accuracy", "macro_f1")}),
        b=Scores(**{k: _mean_std([100 * m[k] for m in b]) for k in ("accuracy", "macro_f1")}),
        mcnemar_pooled=pooled,
        mcnemar_split_p=per_split,
        splits_p_below_0_05=int(sum(p < 0.05 for p in per_split)),
        wilcoxon_p=signed,
    )


# --- cross-source -----------------------------------------------------------------------------


@dataclass
class Domain:
    """Cells of one source (or family) with their backbone features."""

    name: str
    cells: list[Cell]
    features: torch.Tensor


def cross_source(train: Domain, tests: Sequence[Domain], *,
                 tasks: dict[str, tuple[str, ...]] = PAPER_TASKS,
                 config: HeadConfig = HeadConfig(), seed: int = 0,
                 extra_train: tuple[torch.Tensor, list[Cell]] | None = None,
                 per_source_standardise: bool = False) -> dict[str, dict[str, Run]]:
    """Train one head per task on every cell of `train` (plus `extra_train` features/cells,
    e.g. colour-augmented copies), test on each of `tests`: {test name: {task: Run}}.

    `per_source_standardise`: z-score each domain's features with its own statistics
    (uses the test domain's images, not its labels)."""
    x_train, c_train = train.features, list(train.cells)
    if extra_train is not None:
        x_train = torch.cat([x_train, extra_train[0]])
        c_train = c_train + list(extra_train[1])
    ref = train.features
    if per_source_standardise:
        x_train = standardise(x_train, ref)
    everything = Split("all", tuple(range(len(c_train))), ())
    out: dict[str, dict[str, Run]] = {}
    for test in tests:
        x_test = standardise(test.features) if per_source_standardise else test.features
        out[test.name] = {
            task: head_run(x_train, c_train, everything, classes, config, seed,
                           test_features=x_test, test_cells=test.cells)
            for task, classes in tasks.items()
        }
    return out


# --- fine-tuning ------------------------------------------------------------------------------


def finetune_split(images: torch.Tensor, cells: Sequence[Cell], split: Split,
                   classes: Sequence[str], *, epochs: int = 3, seed: int = 0,
                   val_fraction: float = 0.1, weights_dir: str | Path | None = None,
                   batch_size: int = 64, log: Callable[[str], None] = lambda m: None) -> Run:
    """Fine-tune the whole network (`train_classifier`, finetune mode) on the split's train
    cells of `classes`, choosing the epoch on a grouped val part cut from train; test once."""
    classes = tuple(classes)
    train = _task_index(cells, classes, split.train)
    test = _task_index(cells, classes, split.test)
    train_cells = [cells[i] for i in train]
    parts = holdout(train_cells, val_fraction=val_fraction, test_fraction=0.0, seed=seed)
    index = np.concatenate([train, test])
    n_train = len(train)
    prepared = Prepared(
        classes=classes,
        cells=[cells[i] for i in index],
        parts={"train": parts["train"], "val": parts["val"],
               "test": tuple(range(n_train, len(index)))},
        images=images[torch.from_numpy(index)],
        targets=targets_of([cells[i] for i in index], classes),
    )
    task = "mononuclear" if set(classes) <= {"lymphocyte", "monocyte"} else (
        "polymorphonuclear" if set(classes) <= {"neutrophil", "eosinophil", "basophil"}
        else "flat")
    config = ClassifierConfig(task=task, classes=classes, sources=("kbc",), mode="finetune",
                              epochs=epochs, batch_size=batch_size, seed=seed)
    with tempfile.TemporaryDirectory(prefix="leukodiff-ft-") as folder:
        manifest = train_classifier(config, Path(folder), weights_dir=weights_dir,
                                    prepared=prepared, log=log)
        model = build_model(config, weights_dir)
        model.load_state_dict(torch.load(Path(folder) / "model.pt", map_location="cpu",
                                         weights_only=True))
    # one view of each crop, as the paper classifies (the pipeline averages eight)
    predicted = predict_logits(model, prepared.images[n_train:]).argmax(1).numpy()
    return Run(split.name, classes, test, prepared.targets[n_train:].numpy(), predicted,
               extra={"best_epoch": manifest["training"]["best_epoch"],
                      "minutes": manifest["training"]["minutes"]})
