"""What a case shows and counts: its differential, the sign-off check, and the JSON the
review page reads. Read only: the changes are `review` (cases) and `edits` (cells, fields).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from leukodiff.pipeline.analyzer import unlike_training_warning
from leukodiff.server.db import (
    NOT_WBC,
    UNIDENTIFIED,
    Case,
    CaseStatus,
    CellRecord,
    FieldImage,
    FieldStatus,
)
from leukodiff.taxonomy import MIN_REVIEWED_PER_TYPE, REVIEW_CLASSES, CellType, Counting


@dataclass
class CaseDifferential:
    """Counts of the reviewed (current) labels, by lab convention (`taxonomy.Counting`).

    `counted` is the WBC count: the white-cell classes (the five types, band neutrophils,
    immature granulocytes, blasts, reactive lymphocytes, plasma cells) and unidentified
    cells; it is what the target and sign-off compare. Percentages are of `identified`
    white cells: as in `Analyzer.differential`, an unidentified cell counts towards the
    target but has no share of any class (a signed case has none, so there the base is
    `counted`). Nucleated red cells and smudge cells are reported apart, per 100 counted
    white cells, and are in no WBC figure; artefacts and not-a-white-cell objects are in
    nothing but their counts.
    """

    counts: dict[str, int]  # every class (`taxonomy.REVIEW_CLASSES`)
    percentages: dict[str, float]  # the white-cell classes with a share, of `identified`
    per_100_wbc: dict[str, float]  # nucleated red cells and smudge cells per 100 `counted`
    counted: int  # the WBC count (deleted cells and every class outside it left out)
    unidentified: int
    not_wbc: int
    reviewed: int  # of the counted white cells, those a person labelled or confirmed
    target: int
    identified: int  # white cells of a named class: the percentages' base
    fields: int = 0  # analysed fields counted (failed and excluded ones left out)
    unlike_training: int = 0  # of them, fields that look unlike the models' training labs
    failed_fields: int = 0  # fields whose analysis failed: not counted, not analysed
    excluded_fields: int = 0  # fields a person excluded: none of their cells is counted
    # The fields left out, named for the sign-off confirmation and the audit:
    # failed: {id, name, error}; excluded: {id, name, reason, by} (a failed field that
    # was then excluded is listed as excluded only).
    failed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    excluded: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def warning(self) -> str | None:
        return unlike_training_warning(self.unlike_training, self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "warning": self.warning}


def counted_fields(case: Case) -> list[FieldImage]:
    """The case's fields whose cells count: every field but the excluded ones."""
    return [f for f in case.fields if not f.excluded]


def differential(case: Case) -> CaseDifferential:
    included = counted_fields(case)
    cells = [c for f in included for c in f.cells if not c.deleted]
    counts = Counter(c.label for c in cells)
    named = [c.name for c in REVIEW_CLASSES if c.counting is Counting.DIFFERENTIAL]
    identified = sum(counts[label] for label in named)
    counted = sum(counts[c.name] for c in REVIEW_CLASSES if c.counting.white_cell)
    return CaseDifferential(
        counts={c.name: counts[c.name] for c in REVIEW_CLASSES},
        percentages={label: _share(counts[label], identified) for label in named},
        per_100_wbc={c.name: _share(counts[c.name], counted) for c in REVIEW_CLASSES
                     if c.counting.per_100_wbc},
        counted=counted, unidentified=counts[UNIDENTIFIED], not_wbc=counts[NOT_WBC],
        reviewed=sum(1 for c in cells if c.reviewed and c.label in _WHITE_CELL_LABELS),
        target=case.target_count, identified=identified,
        fields=sum(f.status == FieldStatus.DONE for f in included),
        unlike_training=sum(f.unlike_training for f in included),
        failed_fields=sum(f.status == FieldStatus.FAILED for f in included),
        excluded_fields=len(case.fields) - len(included),
        failed=[{"id": f.id, "name": f.original_name, "error": f.error} for f in included
                if f.status == FieldStatus.FAILED],
        excluded=[{"id": f.id, "name": f.original_name, "reason": f.exclude_reason,
                   "by": f.excluded_by} for f in case.fields if f.excluded])


_WHITE_CELL_LABELS = frozenset(c.name for c in REVIEW_CLASSES if c.counting.white_cell)


def _share(count: int, base: int) -> float:
    """`count` per 100 of `base`, rounded to 0.1 (0 when there is no base)."""
    return round(100.0 * count / base, 1) if base else 0.0


@dataclass
class SignOffCheck:
    """What a reviewer confirms at sign-off: the count against the target, the white
    cells nobody reviewed, the fields whose analysis failed and the fields excluded.
    Any shortfall needs a written reason (`sign_off` refuses without one); an excluded
    field is listed but needs none of its own (its exclusion already gave one)."""

    counted: int
    target: int
    unreviewed: int  # white cells (counted) whose label no person set or confirmed
    failed_fields: int
    excluded_fields: int = 0
    # As in CaseDifferential: failed {id, name, error}, excluded {id, name, reason, by}.
    failed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    excluded: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        found = []
        if self.counted < self.target:
            found.append(f"{self.counted} of {self.target} target cells")
        if self.unreviewed:
            found.append(f"{self.unreviewed} cell{'s' if self.unreviewed != 1 else ''} "
                         "unreviewed")
        if self.failed_fields:
            found.append(f"{self.failed_fields} field{'s' if self.failed_fields != 1 else ''}"
                         " failed analysis")
        return found

    @property
    def reason_required(self) -> bool:
        return bool(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "problems": self.problems,
                "reason_required": self.reason_required}


def sign_off_check(summary: CaseDifferential) -> SignOffCheck:
    """What sign-off needs, from the case's differential (computed once by the caller)."""
    return SignOffCheck(counted=summary.counted, target=summary.target,
                        unreviewed=summary.counted - summary.reviewed,
                        failed_fields=summary.failed_fields,
                        excluded_fields=summary.excluded_fields,
                        failed=summary.failed, excluded=summary.excluded)


def adaptation_progress(session: Session) -> dict[str, Any]:
    """Reviewed cells per type across signed cases, and how many more each type needs.

    The cells counted are those `leukodiff adapt --station` learns from (the training
    export): in a signed case, in a field not excluded, not deleted, reviewed by a
    person, labelled one of the five types. `leukodiff adapt` refuses a type with fewer
    than `MIN_REVIEWED_PER_TYPE` of them outside the cases it holds out to measure on,
    so reaching the minimum here is needed, not always enough.
    """
    types = [str(t) for t in CellType]
    rows = session.execute(
        select(CellRecord.label, func.count(CellRecord.id))
        .join(FieldImage, CellRecord.field_id == FieldImage.id)
        .join(Case, FieldImage.case_id == Case.id)
        .where(Case.status == CaseStatus.SIGNED, CellRecord.reviewed.is_(True),
               CellRecord.deleted.is_(False), FieldImage.excluded.is_(False),
               CellRecord.label.in_(types))
        .group_by(CellRecord.label)).all()
    reviewed = {label: 0 for label in types} | {label: n for label, n in rows}
    signed = session.scalar(select(func.count(Case.id)).where(
        Case.status == CaseStatus.SIGNED))
    return {"minimum": MIN_REVIEWED_PER_TYPE, "signed_cases": signed,
            "types": {label: {"reviewed": reviewed[label],
                              "needed": max(0, MIN_REVIEWED_PER_TYPE - reviewed[label])}
                      for label in types},
            "ready": all(reviewed[label] >= MIN_REVIEWED_PER_TYPE for label in types)}


def disagrees(cell: CellRecord) -> bool:
    """A person's label the model's (latest) call differs from: a cell reviewed, and a
    model call that names a class (not "unidentified") other than the reviewed label."""
    return bool(cell.reviewed and cell.model_label and cell.model_label != UNIDENTIFIED
                and cell.model_label != cell.label)


def cell_dict(cell: CellRecord) -> dict[str, Any]:
    return {"id": cell.id, "field_id": cell.field_id, "box": [round(v, 1) for v in cell.box],
            "label": cell.label, "origin": cell.origin, "model_label": cell.model_label,
            "model_group": cell.model_group, "model_confidence": cell.model_confidence,
            "reviewed": cell.reviewed, "version": cell.version,
            "disagrees": disagrees(cell)}


def field_dict(field: FieldImage) -> dict[str, Any]:
    return {"id": field.id, "name": field.original_name, "status": field.status,
            "error": field.error, "width": field.image.width, "height": field.image.height,
            "familiarity": field.familiarity, "unlike_training": field.unlike_training,
            "sha256": field.image_sha256, "excluded": field.excluded,
            "exclude_reason": field.exclude_reason, "excluded_by": field.excluded_by,
            "excluded_at": field.excluded_at.isoformat() if field.excluded_at else None,
            "model_set": field.model_set, "model_set_sha256": field.model_set_sha256,
            "pending_model_set": field.pending_model_set,
            "cells": [cell_dict(c) for c in field.cells if not c.deleted]}


def model_sets_used(case: Case) -> list[str]:
    """The model sets whose calls the case's counted fields carry, in order of first use
    (a field analysed before the station recorded sets ran the shipped models)."""
    used = [f.model_set or "shipped" for f in counted_fields(case) if f.analysed_at]
    return list(dict.fromkeys(used))


def case_dict(case: Case) -> dict[str, Any]:
    summary = differential(case)
    return {"id": case.id, "accession": case.accession, "status": case.status,
            "target_count": case.target_count, "revision": case.revision,
            "created_at": case.created_at.isoformat(),
            "created_by": case.created_by.username,
            "signed_at": case.signed_at.isoformat() if case.signed_at else None,
            "signed_by": case.signed_by.username if case.signed_by else None,
            "sign_off_reason": case.sign_off_reason,
            "amendments": case.amendments, "amend_reason": case.amend_reason,
            "sign_off_check": sign_off_check(summary).to_dict(),
            "fields": [field_dict(f) for f in case.fields],
            "model_sets": model_sets_used(case),
            # reviewed cells (counted fields) whose latest model call names another class
            "disagreements": sum(disagrees(c) for f in counted_fields(case)
                                 for c in f.cells if not c.deleted),
            "progress": progress(case), "differential": summary.to_dict()}


def progress(case: Case) -> dict[str, int]:
    states = Counter(f.status for f in case.fields)
    return {"total": len(case.fields), **{str(s): states[s] for s in FieldStatus}}

