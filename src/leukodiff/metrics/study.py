"""The typed record of `leukodiff evaluate all` (the paper's protocols, issue #6), and the
paper's own figures it is compared with.

Below evaluation and reports: `evaluation.results` fills a `Study`,
`reports.study` renders it as docs/RESULTS.md; neither reads the other. Field names
are the JSON keys (`metrics.records.to_plain` / `from_plain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leukodiff.metrics.heldout import EndToEnd

#: mean and standard deviation over splits (in %; std is nan for a single number)
MeanStd = tuple[float, float]

COMMAND = "leukodiff evaluate all --out docs/"
PAPER_CLASSES = ("lymphocyte", "monocyte", "eosinophil", "neutrophil")  # Table 3 order
SPLIT_KINDS = ("random", "name-grouped", "source-grouped")
SPLIT_TITLES = {
    "random": "random 70/30 (the paper's protocol)",
    "name-grouped": "grouped by file-name `<n>` (the KBC reader's key)",
    "source-grouped": "grouped by source cell (BCCD field, from provenance)",
}
CROSS_VARIANTS = ("none", "stain augmentation", "colour normalisation",
                  "feature standardisation", "normalisation + standardisation")
METRICS = ("accuracy", "recall", "precision", "f1")


@dataclass(frozen=True)
class ClassRow:
    """One row of the paper's Table 3: one-vs-rest metrics of a class, in %."""

    accuracy: MeanStd
    recall: MeanStd
    precision: MeanStd
    f1: MeanStd


#: The paper's Table 3 (mean, std in %), per class.
PAPER_TABLE3: dict[str, ClassRow] = {
    "lymphocyte": ClassRow(accuracy=(99.92, 0.08), recall=(99.94, 0.08),
                           precision=(99.91, 0.08), f1=(99.93, 0.07)),
    "monocyte": ClassRow(accuracy=(99.92, 0.08), recall=(99.91, 0.09),
                         precision=(99.94, 0.09), f1=(99.92, 0.08)),
    "eosinophil": ClassRow(accuracy=(96.80, 0.30), recall=(96.86, 1.17),
                           precision=(96.85, 0.61), f1=(96.85, 0.32)),
    "neutrophil": ClassRow(accuracy=(96.80, 0.30), recall=(96.75, 0.70),
                           precision=(96.78, 1.14), f1=(96.76, 0.27)),
}
PAPER_AVERAGE = {"accuracy": 98.36, "recall": 98.37, "precision": 98.37, "f1": 98.36}

#: Table 3 of one protocol: per class, and "average" over the classes
ClassTable = dict[str, ClassRow]


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test: cells only model a gets right, only b, and the p-value."""

    a_only: int
    b_only: int
    p: float


@dataclass(frozen=True)
class Scores:
    """Accuracy and macro-F1 over splits, in %."""

    accuracy: MeanStd
    macro_f1: MeanStd


@dataclass(frozen=True)
class Comparison:
    """Two models on the same splits: their scores, McNemar pooled and per split,
    Wilcoxon's signed-rank test over the per-split accuracies."""

    a: Scores
    b: Scores
    mcnemar_pooled: McNemar
    mcnemar_split_p: list[float]
    splits_p_below_0_05: int
    wilcoxon_p: float


@dataclass(frozen=True)
class ParameterCount:
    """Keras-style parameter counts (Table 2): all, and trainable with a frozen base."""

    total: int
    trainable: int
    models: int = 1


@dataclass(frozen=True)
class Parameters:
    flat: ParameterCount
    two_level: ParameterCount


@dataclass(frozen=True)
class FlatVsTwoLevel:
    """Flat (a) against two-level (b), and the flat model given the true group against
    two-level: is the gain the hierarchy or the given group?"""

    classes: tuple[str, ...]
    summary: Comparison
    oracle_flat_vs_two_level: Comparison
    parameters: Parameters


@dataclass(frozen=True)
class SplitSizes:
    """The first split of a kind: images, groups by the split's own key, and source cells
    (BCCD fields) with copies on both sides."""

    train: int
    test: int
    train_groups: int
    test_groups: int
    shared_groups: int
    source_fields: int


@dataclass(frozen=True)
class FinetunedSplit:
    accuracy: float  # %, rounded to 2 places
    best_epoch: int


@dataclass(frozen=True)
class Overall:
    accuracy: float
    macro_f1: float
    n: int


@dataclass(frozen=True)
class TaskScores(Overall):
    """One level-2 head on one test source."""

    confusion: list[list[int]]
    classes: list[str]


@dataclass(frozen=True)
class ClassScores:
    """Per class, from `metrics.classification.classification_metrics`."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class CrossMetrics:
    """Trained on one source, tested on another: per task, per class, and the two-level
    answer (true group given)."""

    tasks: dict[str, TaskScores]
    per_class: dict[str, ClassScores]
    two_level: Overall


@dataclass(frozen=True)
class CrossSource:
    variants: dict[str, dict[str, CrossMetrics]]  # variant -> "train -> test" -> metrics
    within_family: dict[str, CrossMetrics]
    sizes: dict[str, int]
    crop_scale: float


@dataclass(frozen=True)
class Timing:
    sections_s: dict[str, float]
    total_s: float
    machine: str
    torch_threads: int


@dataclass(frozen=True)
class Study:
    """Everything `evaluate all` measured. `config` is the run's `EvalConfig` as written
    (`dataclasses.asdict`); `provenance` and the detector's figures are the reports of
    `evaluation.provenance` and `evaluation.detector`, `end_to_end` `evaluation.pipeline`'s
    record."""

    config: dict[str, Any]
    command: str
    provenance: dict[str, Any]
    paper: dict[str, ClassTable]  # split kind -> Table 3
    split_sizes: dict[str, SplitSizes]
    finetuned: dict[str, ClassTable]
    finetuned_splits: dict[str, dict[str, list[FinetunedSplit]]]  # kind -> task -> splits
    flat_vs_two_level: dict[str, FlatVsTwoLevel]
    cross_source: CrossSource
    end_to_end: EndToEnd
    detector_test: dict[str, Any]
    detector_test_unboxed_ignored: dict[str, Any] | None
    figures: list[str]
    timing: Timing
