"""A case's fields: uploads (each queued for analysis), and excluding or including a
field (audited, with a reason)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import File, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from leukodiff.server import edits
from leukodiff.server.db import Case, User
from leukodiff.server.review import ReviewError
from leukodiff.server.routes.common import Id, UserDep, api_router, case_response, found, large_body
from leukodiff.server.state import state_of
from leukodiff.server.storage import UploadError, display_name

api = api_router()


@api.post("/cases/{case_id}/fields")
@large_body
def upload_fields(request: Request, user: UserDep, case_id: Id,
                  files: Annotated[list[UploadFile], File()]) -> Response:
    """Store each file (checked by content), add it to the case and queue its analysis."""
    state = state_of(request)
    if len(files) > state.settings.max_files_per_request:
        raise UploadError(f"at most {state.settings.max_files_per_request} files per upload")
    with state.db.reading() as session:
        found(session, Case, case_id, "case")
    accepted, rejected, statuses = [], [], []
    for upload in files:
        name = display_name(upload.filename)
        try:
            stored = state.blobs.receive(upload.file, state.settings.max_upload_bytes)
            field_id = _add_field(request, user, case_id, name, stored)
        except (UploadError, ReviewError) as error:
            rejected.append({"name": name, "reason": str(error)})
            statuses.append(error.status)
            continue
        accepted.append({"name": name, "field_id": field_id})
    state.queue.submit([a["field_id"] for a in accepted])
    status = 200 if accepted else max(statuses, default=400)
    return Response(json.dumps({"accepted": accepted, "rejected": rejected}),
                    status_code=status, media_type="application/json")


def _add_field(request: Request, user: User, case_id: int, name: str, stored) -> int:
    with state_of(request).db.writing() as session:
        return edits.add_field(session, user, case_id, name, stored)


class Exclusion(BaseModel):
    reason: str | None = None  # required to exclude; optional to include again


@api.post("/fields/{field_id}/exclude")
def exclude_field(request: Request, user: UserDep, field_id: Id, body: Exclusion
                  ) -> dict[str, Any]:
    """Take a field out of the differential, counts and exports, with a reason (audited);
    its cells and image are kept. Technologists and reviewers, open cases only."""
    with state_of(request).db.writing() as session:
        case_id = edits.exclude_field(session, user, field_id, body.reason).case_id
    return case_response(request, case_id)


@api.post("/fields/{field_id}/include")
def include_field(request: Request, user: UserDep, field_id: Id, body: Exclusion
                  ) -> dict[str, Any]:
    """Count an excluded field again (audited)."""
    with state_of(request).db.writing() as session:
        case_id = edits.include_field(session, user, field_id, body.reason).case_id
    return case_response(request, case_id)
