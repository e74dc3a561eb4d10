"""What a review changes inside an open case: cells (label, confirm, draw, delete, restore)
and fields (upload, exclude, include, re-analyse); each change locked, version-checked and
audited through `review`.
"""

from __future__ import annotations

import math

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from leukodiff.server.db import (
    LABELS,
    Case,
    CellRecord,
    FieldImage,
    FieldStatus,
    Image,
    ModelSet,
    Role,
    User,
    utcnow,
)
from leukodiff.server.review import (
    ReviewError,
    audit,
    check_version,
    checked_reason,
    lock_open_case,
)
from leukodiff.server.storage import StoredImage


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
    check_version("cell", cell.version, version, cell.updated_by)
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
            check_version("cell", cell.version, version, cell.updated_by)
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
    check_version("cell", cell.version, version, cell.updated_by)
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
    check_version("cell", cell.version, version, cell.updated_by)
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
    reason = checked_reason(reason)
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
    reason = checked_reason(reason)
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
