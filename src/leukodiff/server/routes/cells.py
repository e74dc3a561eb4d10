"""The review page's cell edits: label, confirm (one cell or a class), draw, delete, restore."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field

from leukodiff.server import case_summary, edits, review
from leukodiff.server.db import CellRecord
from leukodiff.server.routes.common import ID_MAX, ID_MIN, Id, UserDep, api_router, case_response
from leukodiff.server.state import state_of

api = api_router()


class LabelChange(BaseModel):
    label: str
    version: int
    reviewed: bool = True  # False: back to unreviewed (the page's undo of a confirm)


class CellVersion(BaseModel):
    id: int = Field(ge=ID_MIN, le=ID_MAX)
    version: int


class ClassConfirm(BaseModel):
    label: str
    # The cells shown (each with the version seen); None: every matching cell of the case.
    cells: list[CellVersion] | None = None
    reviewed: bool = True  # False: the undo of a bulk confirm


class Restore(BaseModel):
    version: int


class NewCell(BaseModel):
    field_id: int = Field(ge=ID_MIN, le=ID_MAX)
    box: list[float]
    label: str


def _edit_response(request: Request, case_id: int, cell_id: int) -> dict[str, Any]:
    with state_of(request).db.reading() as session:
        case = review.load_case(session, case_id)
        cell = session.get(CellRecord, cell_id)
        summary = case_summary.differential(case)
        return {"cell": case_summary.cell_dict(cell), "deleted": cell.deleted,
                "revision": case.revision, "differential": summary.to_dict(),
                # what the page's open sign-off panel shows follows each edit
                "sign_off_check": case_summary.sign_off_check(summary).to_dict()}


@api.patch("/cases/{case_id}/cells/{cell_id}")
def reclassify(request: Request, user: UserDep, case_id: Id, cell_id: Id,
               body: LabelChange) -> dict[str, Any]:
    with state_of(request).db.writing() as session:
        edits.set_label(session, user, case_id, cell_id, body.label, body.version,
                         reviewed=body.reviewed)
    return _edit_response(request, case_id, cell_id)


@api.post("/cases/{case_id}/confirm")
def confirm_class(request: Request, user: UserDep, case_id: Id, body: ClassConfirm
                  ) -> dict[str, Any]:
    """Bulk confirm: accept the label of every unreviewed live cell of one class (or of the
    cells listed); one audit event with the count. Returns the ids changed and the case."""
    cells = None if body.cells is None else [(c.id, c.version) for c in body.cells]
    with state_of(request).db.writing() as session:
        changed = [c.id for c in edits.confirm_class(session, user, case_id, body.label,
                                                      cells, reviewed=body.reviewed)]
    return {"changed": changed, "case": case_response(request, case_id)}


@api.post("/cases/{case_id}/cells/{cell_id}/restore")
def restore_cell(request: Request, user: UserDep, case_id: Id, cell_id: Id, body: Restore
                 ) -> dict[str, Any]:
    """Undo a delete: the cell counts again (audited as `restore_cell`)."""
    with state_of(request).db.writing() as session:
        edits.restore_cell(session, user, case_id, cell_id, body.version)
    return _edit_response(request, case_id, cell_id)


@api.post("/cases/{case_id}/cells", status_code=201)
def add_cell(request: Request, user: UserDep, case_id: Id, body: NewCell) -> dict[str, Any]:
    with state_of(request).db.writing() as session:
        cell = edits.add_cell(session, user, case_id, body.field_id, body.box, body.label)
    return _edit_response(request, case_id, cell.id)


@api.delete("/cases/{case_id}/cells/{cell_id}")
def delete_cell(request: Request, user: UserDep, case_id: Id, cell_id: Id,
                version: int) -> dict[str, Any]:
    with state_of(request).db.writing() as session:
        edits.delete_cell(session, user, case_id, cell_id, version)
    return _edit_response(request, case_id, cell_id)
