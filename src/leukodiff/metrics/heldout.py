"""The typed records of the held-out evaluations of what ships: `leukodiff evaluate
detector`, `evaluate pipeline`, `evaluate robustness` and `evaluate groups`. The
evaluations return them; `to_dict()` is their JSON (the keys of the metrics.json files and
of docs/robustness.json, docs/group_cv.json: the field names; `metrics.records`).

A detection figure inside them (`bccd_test`, `wbc`, ...) is `metrics.detection`'s
`detection_metrics` record as it is: the same dict training validation stores in a
detector's manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from leukodiff.metrics.labs import TypeCounts
from leukodiff.metrics.records import Record

#: `metrics.detection.detection_metrics`: wbc / groups / matched / end_to_end / per_image
DetectionFigures = dict[str, Any]


# --- evaluate pipeline ---------------------------------------------------------------------

@dataclass(frozen=True)
class TypeRow(TypeCounts):
    """One true type: its cells, how many were found and typed right, and that share."""

    accuracy: float


@dataclass(frozen=True)
class EndToEndPart:
    per_type: dict[str, TypeRow]  # only the types with cells
    cells: int
    right: int
    accuracy: float


@dataclass(frozen=True)
class CountError:
    """White cells counted per field against the boxes: mean |error|, fields exact."""

    mean_absolute: float
    exact_fields: int


@dataclass(frozen=True)
class EndToEnd(Record):
    """Each labelled white cell: found (IoU >= 0.5) and typed right, over the single-WBC
    fields and over all of them; `confusion`: "truth -> answer" counts ("missed")."""

    fields: int
    single_wbc_fields: EndToEndPart
    all_labelled_cells: EndToEndPart
    confusion: dict[str, int]
    count_error: CountError


# --- evaluate robustness -------------------------------------------------------------------

@dataclass(frozen=True)
class PerturbedFields:
    """BCCD test fields end to end under one change (the single-WBC fields' cells)."""

    single_wbc_cells: int
    found: int
    right_type: int
    accuracy: float
    count_mae: float
    confusion: dict[str, int]


@dataclass(frozen=True)
class CellScores:
    n: int
    accuracy: float
    macro_f1: float


@dataclass(frozen=True)
class RobustnessRow:
    """One change: the fields end to end, and the level-2 models on PBC's held-out cells
    (empty for a change of scale: a whole-cell image is resized to the input anyway)."""

    perturbation: str
    bccd_end_to_end: PerturbedFields
    pbc: dict[str, CellScores]


@dataclass(frozen=True)
class Robustness(Record):
    backend: str
    bccd_test_fields: int
    rows: list[RobustnessRow]


# --- evaluate groups -----------------------------------------------------------------------

@dataclass(frozen=True)
class GroupFigures:
    """Group calls (mononuclear / polymorphonuclear) against the truth; a recall is NaN
    where the group has no cell."""

    cells: int
    mononuclear: int
    accuracy: float
    mononuclear_recall: float
    polymorphonuclear_recall: float


@dataclass(frozen=True)
class GroupFold(GroupFigures):
    fold: int
    fields: int
    best_epoch: int


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float


@dataclass(frozen=True)
class GroupRecipe:
    """The group classifier's training settings of every fold (`DetectorConfig`'s)."""

    group_epochs: int
    group_lr: float
    group_pbc_per_type: int
    group_bccd_repeat: int


@dataclass(frozen=True)
class GroupCrossValidation(Record):
    """Per fold, pooled over the folds, and mean / std over folds (`mean_std`: accuracy
    and the two recalls); `seconds`: the whole run."""

    folds: list[GroupFold]
    pooled: GroupFigures
    mean_std: dict[str, Spread]
    fields: int
    seed: int
    recipe: GroupRecipe
    seconds: float | None = None


# --- evaluate detector ---------------------------------------------------------------------

@dataclass(frozen=True)
class FieldTiming:
    """Milliseconds per field of detection (after a warm-up field), and the field size."""

    median: float
    mean: float
    n: int
    size: str


@dataclass(frozen=True)
class SweepRow:
    ap50: float | None
    recall: float
    precision: float
    found: int
    false: int
    truth: int


@dataclass(frozen=True)
class BcdDetection:
    """BCD (another lab) at `scale`, and the sweep of scales (and colour standardisation)
    around it."""

    scale: float
    scale_from_rbc_sizes: float
    colour_standardised: bool
    wbc: dict[str, Any]  # detection_metrics' "wbc"
    per_image: list[dict[str, Any]]
    sweep: dict[str, SweepRow]


@dataclass(frozen=True, kw_only=True)
class DetectorEvaluation(Record):
    """A detector on BCCD's VOC test list (as annotated; BCCD's unboxed white cells
    ignored; the fields with a white-cell box only) and, unless left out, on BCD;
    `pictures`: the annotated PNGs written."""

    model: str
    backend: str
    model_sha256: str | None
    bccd_test: DetectionFigures
    bccd_test_unboxed_ignored: DetectionFigures
    bccd_test_fields_with_a_wbc_box: DetectionFigures
    ms_per_field: FieldTiming
    bcd: BcdDetection | None = None
    pictures: list[str] = field(default_factory=list)
