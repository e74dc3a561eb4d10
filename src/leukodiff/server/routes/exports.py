"""Downloads of a signed case: CSV, JSON, FHIR and the training export (zip)."""

from __future__ import annotations

import io
import json
import zipfile
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import Response

from leukodiff.server import review
from leukodiff.server.db import Case
from leukodiff.server.exports import (
    ExportError,
    TrainingSummary,
    case_json,
    cases_csv,
    fhir_report,
    training_files,
)
from leukodiff.server.routes.common import Id, api_router, case_events
from leukodiff.server.state import state_of

api = api_router()


def _signed_case(session, case_id: int) -> Case:
    case = review.load_case(session, case_id)
    if case.signed_at is None:
        raise ExportError(f"case {case.accession} is not signed off; only signed cases export")
    return case


def _download(content: bytes, media_type: str, filename: str) -> Response:
    """An attachment; HTTP headers are latin-1, so the real name goes in RFC 6266 `filename*`."""
    fallback = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_"
                       for c in filename)
    disposition = f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename)}"
    return Response(content, media_type=media_type,
                    headers={"Content-Disposition": disposition})


def _stem(case: Case) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in case.accession)


@api.get("/cases/{case_id}/export.csv")
def export_csv(request: Request, case_id: Id) -> Response:
    with state_of(request).db.reading() as session:
        case = _signed_case(session, case_id)
        return _download(cases_csv(case).encode(), "text/csv", f"{_stem(case)}.csv")


@api.get("/cases/{case_id}/export.json")
def export_json(request: Request, case_id: Id) -> Response:
    with state_of(request).db.reading() as session:
        case = _signed_case(session, case_id)
        content = json.dumps(case_json(case, case_events(session, case_id)), indent=2)
        return _download(content.encode(), "application/json", f"{_stem(case)}.json")


@api.get("/cases/{case_id}/fhir.json")
def export_fhir(request: Request, case_id: Id) -> Response:
    with state_of(request).db.reading() as session:
        case = _signed_case(session, case_id)
        content = json.dumps(fhir_report(case), indent=2)
        return _download(content.encode(), "application/fhir+json", f"{_stem(case)}.fhir.json")


@api.get("/cases/{case_id}/training.zip")
def export_training(request: Request, case_id: Id) -> Response:
    state = state_of(request)
    with state.db.reading() as session:
        case = _signed_case(session, case_id)
        buffer = io.BytesIO()
        summary = TrainingSummary()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path, data in training_files([case], state.views, summary):
                archive.writestr(path, data)
            archive.writestr("README.txt", summary.readme([case]))
        return _download(buffer.getvalue(), "application/zip", f"{_stem(case)}-training.zip")
