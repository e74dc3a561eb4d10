"""What a review changes: cases, cells, sign-off; each change audited and version-checked.

Functions here take an open write session and raise `ReviewError` (shown to the
user with its HTTP status); the routes only translate requests into these calls.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from leukodiff.pipeline.analyzer import unlike_training_warning
from leukodiff.server.db import (
    LABELS,
    NOT_WBC,
    UNIDENTIFIED,
    AuditEvent,
    Case,
    CaseStatus,
    CellRecord,
    FieldImage,
    FieldStatus,
    Image,
    Role,
    User,
    utcnow,
)
from leukodiff.server.storage import StoredImage
from leukodiff.taxonomy import MIN_REVIEWED_PER_TYPE, REVIEW_CLASSES, CellType, Counting

ACCESSION_MAX = 64
TARGET_RANGE = (10, 2000)
REASON_MAX = 1000


class ReviewError(ValueError):
    """A change refused, with the reason shown to the user and the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None
                 ) -> None:
        super().__init__(message)
        self.message, self.status, self.retry_after = message, status, retry_after


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


def load_case(session: Session, case_id: int, *, lock: bool = False) -> Case:
    """The case with its fields and cells; `lock` holds its row until commit (PostgreSQL)."""
    query = select(Case).where(Case.id == case_id)
    if lock:
        query = query.with_for_update()
    case = session.scalar(
        query.options(
            selectinload(Case.fields).selectinload(FieldImage.cells),
            selectinload(Case.fields).selectinload(FieldImage.image),
            selectinload(Case.created_by), selectinload(Case.signed_by)))
    if case is None:
        raise ReviewError(f"no case {case_id}", status=404)
    return case


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


def audit(session: Session, case: Case, user: User | None, action: str, *,
          field_id: int | None = None, cell_id: int | None = None,
          before: dict | None = None, after: dict | None = None) -> None:
    """Record one change and bump the case's revision (an atomic increment, never lost)."""
    session.add(AuditEvent(case_id=case.id, user_id=user.id if user else None, action=action,
                           field_id=field_id, cell_id=cell_id, before=before, after=after))
    session.execute(update(Case).where(Case.id == case.id)
                    .values(revision=Case.revision + 1)
                    .execution_options(synchronize_session=False))


def create_case(session: Session, user: User, accession: str, target_count: int = 100) -> Case:
    accession = accession.strip()
    if not accession or len(accession) > ACCESSION_MAX or not accession.isprintable():
        raise ReviewError(f"accession id: 1-{ACCESSION_MAX} printable characters")
    _check_target(target_count)
    if session.scalar(select(Case.id).where(Case.accession == accession)) is not None:
        raise ReviewError(f"a case with accession {accession!r} already exists", status=409)
    case = Case(accession=accession, target_count=target_count, created_by_id=user.id)
    session.add(case)
    try:
        session.flush()
    except IntegrityError:  # created by someone else a moment ago
        raise ReviewError(f"a case with accession {accession!r} already exists",
                          status=409) from None
    audit(session, case, user, "create_case", after={"accession": accession,
                                                     "target_count": target_count})
    return case


def _check_target(target: int) -> None:
    low, high = TARGET_RANGE
    if not low <= target <= high:
        raise ReviewError(f"target count must be between {low} and {high} white cells")


def _open_case(case: Case) -> None:
    if case.status == CaseStatus.SIGNED:
        raise ReviewError(f"case {case.accession} is signed off and locked; no changes allowed",
                          status=423)


def lock_open_case(session: Session, case_id: int) -> Case:
    """The case row, locked until commit, refused if signed off.

    Every change in a case takes this lock first (PostgreSQL: SELECT ... FOR UPDATE;
    SQLite: the write transaction already holds the database lock), so an edit or
    upload can never slip in beside a sign-off.
    """
    case = session.get(Case, case_id, with_for_update=True, populate_existing=True)
    if case is None:
        raise ReviewError(f"no case {case_id}", status=404)
    _open_case(case)
    return case


def _cell_in_case(session: Session, case_id: int, cell_id: int) -> tuple[Case, CellRecord]:
    case = lock_open_case(session, case_id)
    cell = session.get(CellRecord, cell_id)
    if cell is None or cell.deleted or cell.field.case_id != case_id:
        raise ReviewError(f"no cell {cell_id} in case {case_id}", status=404)
    _not_excluded(cell.field)
    return case, cell


def _not_excluded(field: FieldImage) -> None:
    """Cells of an excluded field are frozen: they count nowhere, so edits would mislead."""
    if field.excluded:
        raise ReviewError(f"field {field.id} ({field.original_name}) is excluded from the "
                          "differential: include it again to edit its cells", status=409)


def _check_version(kind: str, current: int, sent: int, who: User | None) -> None:
    if current != sent:
        by = f" by {who.username}" if who else ""
        raise ReviewError(f"this {kind} was changed{by} since you loaded it (your version "
                          f"{sent}, now {current}); your edit was not applied - reload and "
                          "check before changing it again", status=409)


def _flush_versioned(session: Session, kind: str) -> None:
    """Write; a row changed by a concurrent transaction since we read it is refused (409)."""
    try:
        session.flush()
    except StaleDataError:
        raise ReviewError(f"this {kind} was changed by someone else a moment ago; your edit "
                          "was not applied - reload and check before changing it again",
                          status=409) from None


def set_label(session: Session, user: User, case_id: int, cell_id: int, label: str,
              version: int, reviewed: bool = True) -> CellRecord:
    """Reclassify a cell (or confirm its label): refused if someone changed it since `version`.

    `reviewed=False` puts a cell back to unreviewed (the review page's undo of a confirm
    or of a label set on a cell nobody had reviewed): audited as `unconfirm`, or as
    `reclassify` when the label changes too."""
    if label not in LABELS:
        raise ReviewError(f"unknown label {label!r}; one of: {', '.join(LABELS)}")
    case, cell = _cell_in_case(session, case_id, cell_id)
    _check_version("cell", cell.version, version, cell.updated_by)
    before = {"label": cell.label, "reviewed": cell.reviewed, "version": cell.version}
    cell.label, cell.reviewed = label, reviewed
    cell.updated_at, cell.updated_by_id = utcnow(), user.id
    _flush_versioned(session, "cell")  # UPDATE ... WHERE version = the version read
    action = ("reclassify" if before["label"] != label else "confirm" if reviewed
              else "unconfirm")
    audit(session, case, user, action, field_id=cell.field_id, cell_id=cell.id, before=before,
          after={"label": label, "reviewed": reviewed, "version": cell.version})
    return cell


def confirm_class(session: Session, user: User, case_id: int, label: str,
                  cells: list[tuple[int, int]] | None = None, reviewed: bool = True
                  ) -> list[CellRecord]:
    """Accept the current label of many cells of one class at once (bulk confirm).

    Without `cells`: every live cell labelled `label` in the case's counted fields whose
    reviewed flag differs from `reviewed` (confirm: the unreviewed ones). With `cells`
    ([(id, version)], what the page showed): exactly those, each refused (409) if it is no
    longer a live `label` cell of a counted field or was changed since its version; the
    page's undo sends `reviewed=False` with the cells it confirmed. One audit event
    (`confirm_class` / `unconfirm_class`) holds the label, the count and the cell ids.
    """
    if label not in LABELS:
        raise ReviewError(f"unknown label {label!r}; one of: {', '.join(LABELS)}")
    case = lock_open_case(session, case_id)
    live = session.scalars(
        select(CellRecord).join(FieldImage, CellRecord.field_id == FieldImage.id)
        .where(FieldImage.case_id == case_id, FieldImage.excluded.is_(False),
               CellRecord.deleted.is_(False), CellRecord.label == label)
        .order_by(CellRecord.id)).all()
    if cells is None:
        chosen = [c for c in live if c.reviewed != reviewed]
    else:
        by_id = {c.id: c for c in live}
        chosen = []
        for cell_id, version in dict(cells).items():
            cell = by_id.get(cell_id)
            if cell is None:
                raise ReviewError(f"cell {cell_id} is not a {label} cell of a counted field "
                                  f"in case {case_id} (changed since you loaded it?); "
                                  "nothing was applied", status=409)
            _check_version("cell", cell.version, version, cell.updated_by)
            chosen.append(cell)
    if not chosen:
        return []
    now = utcnow()
    for cell in chosen:
        cell.reviewed, cell.updated_at, cell.updated_by_id = reviewed, now, user.id
    _flush_versioned(session, "cell")
    audit(session, case, user, "confirm_class" if reviewed else "unconfirm_class",
          after={"label": label, "reviewed": reviewed, "count": len(chosen),
                 "cells": [c.id for c in chosen]})
    return chosen


def add_cell(session: Session, user: User, case_id: int, field_id: int,
             box: list[float], label: str) -> CellRecord:
    """A cell the detector missed, drawn by the reviewer."""
    if label not in LABELS:
        raise ReviewError(f"unknown label {label!r}; one of: {', '.join(LABELS)}")
    case = lock_open_case(session, case_id)
    field = session.get(FieldImage, field_id)
    if field is None or field.case_id != case_id:
        raise ReviewError(f"no field {field_id} in case {case_id}", status=404)
    _not_excluded(field)
    x0, y0, x1, y1 = _clip_box(box, field.image.width, field.image.height)
    cell = CellRecord(field_id=field.id, x0=x0, y0=y0, x1=x1, y1=y1, origin="user",
                      label=label, reviewed=True, updated_by_id=user.id)
    session.add(cell)
    session.flush()
    audit(session, case, user, "add_cell", field_id=field.id, cell_id=cell.id,
          after={"box": [x0, y0, x1, y1], "label": label})
    return cell


def _clip_box(box: list[float], width: int, height: int) -> tuple[float, ...]:
    # NaN passes every comparison below and would be stored: then no read of the case works.
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        raise ReviewError("box must be [x0, y0, x1, y1] in image pixels (finite numbers)")
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    if x1 - x0 < 4 or y1 - y0 < 4:
        raise ReviewError("box is too small (at least 4 x 4 pixels inside the image)")
    return round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)


def add_field(session: Session, user: User, case_id: int, name: str, stored: StoredImage) -> int:
    """Add a stored image to an open case as a new field (queued for analysis); its id."""
    case = lock_open_case(session, case_id)
    _ensure_image(session, stored)
    existing = session.scalar(select(FieldImage).where(
        FieldImage.case_id == case_id, FieldImage.image_sha256 == stored.sha256))
    if existing is not None:
        excluded = ", excluded: include it again instead" if existing.excluded else ""
        raise ReviewError(f"the same image is already in this case (field "
                          f"{existing.id}, {existing.original_name}{excluded})", status=409)
    field = FieldImage(case_id=case_id, image_sha256=stored.sha256, original_name=name,
                       uploaded_by_id=user.id)
    session.add(field)
    try:
        session.flush()
    except IntegrityError:  # the same image, uploaded concurrently
        raise ReviewError("the same image is already in this case", status=409) from None
    audit(session, case, user, "upload", field_id=field.id,
          after={"name": name, "sha256": stored.sha256, "bytes": stored.size_bytes})
    return field.id


def _ensure_image(session: Session, stored: StoredImage) -> None:
    """The image's row, made unless it exists.

    Two cases' uploads of the same bytes lock different case rows, so both may find
    no row and insert it: the loser's insert runs in a savepoint and its unique-key
    error is the expected outcome (same bytes, same row), not a failed upload.
    """
    if session.get(Image, stored.sha256) is not None:
        return
    try:
        with session.begin_nested():
            session.add(Image(sha256=stored.sha256, size_bytes=stored.size_bytes,
                              format=stored.format, width=stored.width, height=stored.height))
    except IntegrityError:
        if session.get(Image, stored.sha256) is None:  # some other constraint: not ours to hide
            raise


def delete_cell(session: Session, user: User, case_id: int, cell_id: int,
                version: int) -> None:
    """Remove a false detection from the count; the row stays, marked deleted, for the audit."""
    case, cell = _cell_in_case(session, case_id, cell_id)
    _check_version("cell", cell.version, version, cell.updated_by)
    cell.deleted = True
    cell.updated_at, cell.updated_by_id = utcnow(), user.id
    _flush_versioned(session, "cell")
    audit(session, case, user, "delete_cell", field_id=cell.field_id, cell_id=cell.id,
          before={"label": cell.label, "box": list(cell.box), "version": version})


def restore_cell(session: Session, user: User, case_id: int, cell_id: int,
                 version: int) -> CellRecord:
    """Bring a deleted cell back into the count (the review page's undo of a delete, or of
    the undo of a drawn box): refused if it is not deleted, its field is excluded, or it
    changed since `version` (the version its delete returned)."""
    case = lock_open_case(session, case_id)
    cell = session.get(CellRecord, cell_id)
    if cell is None or cell.field.case_id != case_id:
        raise ReviewError(f"no cell {cell_id} in case {case_id}", status=404)
    if not cell.deleted:
        raise ReviewError(f"cell {cell_id} is not deleted: nothing to restore", status=409)
    _not_excluded(cell.field)
    _check_version("cell", cell.version, version, cell.updated_by)
    cell.deleted = False
    cell.updated_at, cell.updated_by_id = utcnow(), user.id
    _flush_versioned(session, "cell")
    audit(session, case, user, "restore_cell", field_id=cell.field_id, cell_id=cell.id,
          before={"deleted": True, "version": version},
          after={"label": cell.label, "box": list(cell.box), "version": cell.version})
    return cell


def _field_in_open_case(session: Session, user: User, field_id: int) -> tuple[Case, FieldImage]:
    """The field and its case, locked and open; technologists and reviewers only."""
    if user.role not in (Role.TECHNOLOGIST, Role.REVIEWER):
        raise ReviewError(f"only a technologist or reviewer excludes or includes fields (you "
                          f"are a {user.role})", status=403)
    case_id = session.scalar(select(FieldImage.case_id).where(FieldImage.id == field_id))
    if case_id is None:
        raise ReviewError(f"no field {field_id}", status=404)
    case = lock_open_case(session, case_id)
    field = session.get(FieldImage, field_id, populate_existing=True)
    return case, field


def exclude_field(session: Session, user: User, field_id: int, reason: str | None
                  ) -> FieldImage:
    """Take a field out of the differential, counts and exports, with a reason (audited).

    This is how a field is removed: its cells, its stored image and its upload stay, so an
    exclusion made by mistake is undone by `include_field` and nothing a user gave is lost.
    """
    case, field = _field_in_open_case(session, user, field_id)
    reason = _reason(reason)
    if reason is None:
        raise ReviewError("a reason is required to exclude a field", status=422)
    if field.excluded:
        raise ReviewError(f"field {field.id} ({field.original_name}) is already excluded "
                          f"(by {field.excluded_by}: {field.exclude_reason})", status=409)
    field.excluded, field.exclude_reason = True, reason
    field.excluded_at, field.excluded_by = utcnow(), user.username
    session.flush()
    audit(session, case, user, "exclude_field", field_id=field.id,
          before={"excluded": False, "status": field.status},
          after={"excluded": True, "name": field.original_name, "reason": reason})
    return field


def include_field(session: Session, user: User, field_id: int, reason: str | None = None
                  ) -> FieldImage:
    """Count an excluded field again (audited, with the exclusion it undoes)."""
    case, field = _field_in_open_case(session, user, field_id)
    reason = _reason(reason)
    if not field.excluded:
        raise ReviewError(f"field {field.id} ({field.original_name}) is not excluded",
                          status=409)
    before = {"excluded": True, "reason": field.exclude_reason, "by": field.excluded_by,
              "at": field.excluded_at.isoformat() if field.excluded_at else None}
    field.excluded = False
    field.exclude_reason = field.excluded_at = field.excluded_by = None
    session.flush()
    audit(session, case, user, "include_field", field_id=field.id, before=before,
          after={"excluded": False, "name": field.original_name, "reason": reason})
    return field


def reanalyse(session: Session, user: User, case_id: int, model_set: str) -> list[int]:
    """Queue every counted field of an open case for analysis again with `model_set`
    (a reviewer or admin): the new calls replace the model's on matching cells, people's
    labels stay (`analysis.merge_calls`). The field ids to queue."""
    from leukodiff.server.db import ModelSet

    if user.role not in (Role.REVIEWER, Role.ADMIN):
        raise ReviewError(f"only a reviewer or admin re-analyses a case (you are a "
                          f"{user.role})", status=403)
    case = lock_open_case(session, case_id)
    row = session.scalar(select(ModelSet).where(ModelSet.name == model_set))
    if row is None:
        raise ReviewError(f"no model set {model_set!r}", status=404)
    if row.retired:
        raise ReviewError(f"model set {model_set!r} is retired", status=409)
    fields = session.scalars(select(FieldImage).where(FieldImage.case_id == case_id)
                             .order_by(FieldImage.id)).all()
    if any(f.status in (FieldStatus.QUEUED, FieldStatus.ANALYSING) for f in fields):
        raise ReviewError("fields of this case are still being analysed: wait for them",
                          status=409)
    chosen = [f for f in fields if not f.excluded]
    if not chosen:
        raise ReviewError("no field to re-analyse (every field is excluded)", status=409)
    for field in chosen:
        field.status, field.pending_model_set = FieldStatus.QUEUED, row.name
    session.flush()
    audit(session, case, user, "reanalyse",
          before={"model_sets": sorted({f.model_set or "shipped" for f in chosen
                                        if f.analysed_at})},
          after={"model_set": row.name, "model_set_sha256": row.sha256,
                 "fields": [f.id for f in chosen]})
    return [f.id for f in chosen]


def set_target(session: Session, user: User, case_id: int, target: int, revision: int) -> Case:
    case = load_case(session, case_id, lock=True)
    _open_case(case)
    _check_target(target)
    _check_version("case", case.revision, revision, None)
    before = {"target_count": case.target_count}
    case.target_count = target
    session.flush()
    audit(session, case, user, "set_target", before=before, after={"target_count": target})
    return case


def _reason(reason: str | None) -> str | None:
    """A reason as stored: stripped, None if blank; refused (422) if too long, or if it
    holds what a database cannot store (a NUL: PostgreSQL; a lone surrogate, valid in
    JSON: UTF-8)."""
    reason = (reason or "").strip() or None
    if reason is not None and len(reason) > REASON_MAX:
        raise ReviewError(f"the reason is too long (at most {REASON_MAX} characters)",
                          status=422)
    if reason is not None and ("\x00" in reason or not _encodes(reason)):
        raise ReviewError("the reason holds a character that is not text (NUL or a lone "
                          "surrogate)", status=422)
    return reason


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def reopen(session: Session, user: User, case_id: int, revision: int,
           reason: str | None) -> Case:
    """Unlock a signed case to amend it: a reviewer, with a reason. The earlier sign-off
    stays in the audit trail; the next sign-off issues an amended report."""
    if user.role != Role.REVIEWER:
        raise ReviewError(f"only a reviewer reopens a signed case (you are a {user.role})",
                          status=403)
    reason = _reason(reason)
    case = load_case(session, case_id, lock=True)
    if case.status != CaseStatus.SIGNED:
        raise ReviewError(f"case {case.accession} is not signed off: nothing to reopen",
                          status=409)
    _check_version("case", case.revision, revision, None)
    if reason is None:
        raise ReviewError("a reason is required to reopen a signed case", status=422)
    before = {"status": case.status, "signed_by": case.signed_by.username
              if case.signed_by else None,
              "signed_at": case.signed_at.isoformat() if case.signed_at else None,
              "sign_off_reason": case.sign_off_reason, "amendments": case.amendments}
    case.status, case.signed_at, case.signed_by_id = CaseStatus.OPEN, None, None
    case.sign_off_reason, case.amend_reason = None, reason
    case.amendments += 1
    session.flush()
    audit(session, case, user, "reopen", before=before,
          after={"status": CaseStatus.OPEN, "reason": reason, "amendments": case.amendments})
    return case


def sign_off(session: Session, user: User, case_id: int, revision: int,
             reason: str | None = None) -> Case:
    """Lock the case: only a reviewer, only as seen (revision), only when every cell is named;
    below the target, with unreviewed cells or failed fields, only with a written reason.
    Excluded fields are left out of every count and listed in the audited check."""
    if user.role != Role.REVIEWER:
        raise ReviewError(f"only a reviewer signs off (you are a {user.role})", status=403)
    reason = _reason(reason)
    case = load_case(session, case_id, lock=True)
    _open_case(case)
    _check_version("case", case.revision, revision, None)
    pending = [f for f in case.fields if f.status in (FieldStatus.QUEUED, FieldStatus.ANALYSING)]
    if pending:
        raise ReviewError(f"{len(pending)} field(s) are still being analysed", status=409)
    summary = differential(case)
    if summary.counted == 0:
        raise ReviewError("no white cells counted: nothing to sign off", status=409)
    if summary.unidentified:
        raise ReviewError(f"{summary.unidentified} cell(s) are still unidentified: classify "
                          "each one (or mark it X, not a white cell) before signing off",
                          status=409)
    check = sign_off_check(summary)
    if check.reason_required and reason is None:
        raise ReviewError(f"{', '.join(check.problems)}: a reason is required to sign off",
                          status=422)
    case.status, case.signed_at, case.signed_by_id = CaseStatus.SIGNED, utcnow(), user.id
    case.sign_off_reason = reason
    session.flush()
    audit(session, case, user, "sign_off", before={"status": CaseStatus.OPEN},
          after={"status": CaseStatus.SIGNED, "differential": summary.to_dict(),
                 "check": check.to_dict(), "reason": reason,
                 "amendment": case.amendments})
    return case
