"""The typed record of `leukodiff evaluate adaptation` (a lab's learning curve): what
`evaluation.adaptation` measures, what `reports.adaptation` renders, and what
docs/adaptation.json holds (field names are its keys; `metrics.records`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TypingRun:
    """Level 2 adapted with k reviewed cells per type (one draw), on the lab's test part;
    per-type recall, right and support for the types present."""

    k: int
    draw: int
    cells: int
    seconds: float
    n: int
    accuracy: float
    macro_f1: float
    recall: dict[str, float]
    right: dict[str, int]
    support: dict[str, int]


@dataclass(frozen=True)
class TypingPoint:
    """One k of the curve: mean over draws (macro-F1 also its sd)."""

    k: int
    draws: int
    macro_f1: float
    macro_f1_sd: float
    accuracy: float
    seconds: float


@dataclass(frozen=True, kw_only=True)
class TypingCurve:
    skipped: str | None = None  # why the lab has no curve
    test_cells: int | None = None
    pool_cells: int | None = None
    runs: list[TypingRun] | None = None
    summary: list[TypingPoint] | None = None


@dataclass(frozen=True, kw_only=True)
class DetectorRun:
    """The detector adapted on the fields of k reviewed cells per type (one draw; k = 0:
    the fold detector as it came): precision / recall / F1 at IoU 0.5 at `threshold`,
    AP50 and the counts (`training.adapt_detector.detection_scores`)."""

    k: int
    draw: int
    seconds: float
    threshold: float
    precision: float
    recall: float
    f1: float
    ap50: float | None
    truth: int
    found: int
    false: int
    fields: int
    group_accuracy: float | None = None  # absent from records written before it was
    reviewed_fields: int


@dataclass(frozen=True)
class DetectorPoint:
    """One k of the detector's curve: medians over draws (reviewed fields: mean)."""

    k: int
    draws: int
    reviewed_fields: float
    precision: float
    recall: float
    f1: float
    threshold: float
    seconds: float


@dataclass(frozen=True, kw_only=True)
class DetectorCurve:
    skipped: str | None = None
    test_fields: int | None = None
    pool_fields: int | None = None
    test_cells: int | None = None
    runs: list[DetectorRun] | None = None
    summary: list[DetectorPoint] | None = None


@dataclass(frozen=True, kw_only=True)
class AdaptationResults:
    """`config`: the run's `AdaptationConfig` as written; `detector_config`: the
    detector curve's settings (present once a detector curve was run)."""

    config: dict[str, Any]
    labs_dir: str
    labs: dict[str, TypingCurve]
    detector_config: dict[str, Any] | None = None
    detector: dict[str, DetectorCurve] | None = None
