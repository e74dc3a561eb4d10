"""The typed record of `leukodiff evaluate labs` (leave one lab out): what
`evaluation.labs` measures on each held-out lab, what `reports.labs` renders, and what
docs/labs.json holds (field names are its keys; `metrics.records`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LabDetection:
    """Level 1 on a lab's fields at the detector's operating threshold (IoU 0.5; the
    reviewed unboxed cells ignored), and how often the white-cell count is exact."""

    precision: float
    recall: float
    ap50: float | None
    truth: int
    found: int
    false: int
    group_accuracy: float | None
    exact_count: float
    count_mae: float
    extra_cells_per_field: float


@dataclass(frozen=True)
class TypeCounts:
    cells: int
    found: int
    right: int


@dataclass(frozen=True)
class LabEndToEnd:
    """True typed cells found and typed right; `said`: "truth -> answer" counts."""

    cells: int
    right: int
    share: float | None
    per_type: dict[str, TypeCounts]
    said: dict[str, int]


@dataclass(frozen=True)
class LabTyping:
    """Level 2 on the lab's true boxes, each given to its true group's model."""

    n: int
    accuracy: float
    macro_f1: float
    recall: dict[str, float]
    min_recall: float
    confusion: list[list[int]]
    classes: list[str]
    unidentified_share: float


@dataclass(frozen=True)
class TrainedOn:
    """The labs a fold's models learnt from (None: that level was not trained)."""

    level2: list[str] | None
    detector: list[str] | None


@dataclass(frozen=True)
class Fires:
    """How often the "unlike the training labs" warning fires on a lab's test part."""

    fields: int
    unfamiliar: int


@dataclass(frozen=True, kw_only=True)
class LabRun:
    """One held-out lab: a fold's models, or the shipped ones on a lab they never saw.
    A part is None (absent from the JSON) where the lab does not measure it."""

    skipped: str | None = None  # why the lab was not run
    fields: int | None = None
    unlike_training: float | None = None  # share of fields the warning flags
    detector: LabDetection | None = None
    end_to_end: LabEndToEnd | None = None
    level2: LabTyping | None = None
    trained_on: TrainedOn | None = None
    minutes: dict[str, float] | None = None  # training time per model of the fold
    warning_on_training_labs: dict[str, Fires] | None = None


@dataclass(frozen=True, kw_only=True)
class LabsResults:
    """`config` is the run's `LabsConfig` as written (`dataclasses.asdict`). `folds`: each
    held-out lab with the config's seed; `repeats`: seed -> lab -> the same fold trained
    and measured again with another seed (`LabsConfig.repeat_seeds`), for the spread."""

    config: dict[str, Any]
    labs_present: dict[str, bool]
    folds: dict[str, LabRun]
    shipped: dict[str, LabRun]
    minutes: float | None = None  # the whole run (absent while it runs)
    repeats: dict[str, dict[str, LabRun]] = field(default_factory=dict)
