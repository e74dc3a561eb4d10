"""Issue #16: the exported FHIR report parsed by fhir.resources (strict: unknown elements,
wrong types, bad codes or dates are errors), for a first report and an amended one.

fhir.resources 8 models R5 at its top level; the station writes R4, whose Bundle,
DiagnosticReport and Observation are those of R4B (`fhir.resources.R4B`; R4B changed
none of them), so that is what the export is checked against.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError
from station_helpers import FIELDS, all_cells, upload, wait_analysed


def sign(client, case: dict, reason: str):
    return client.post(f"/api/cases/{case['id']}/sign-off",
                       json={"revision": case["revision"], "reason": reason})


def parse_report(response) -> tuple[Bundle, DiagnosticReport, list[Observation]]:
    """The downloaded fhir.json, each resource parsed by its own model (raises if invalid);
    the report's results must be exactly the bundle's observations."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    raw = json.loads(response.content)
    bundle = Bundle.model_validate_json(response.content)
    assert bundle.type == "collection" and len(bundle.entry) == len(raw["entry"])
    (report, *observations) = raw["entry"]
    assert report["resource"]["resourceType"] == "DiagnosticReport"
    parsed_report = DiagnosticReport.model_validate(report["resource"])
    parsed = [Observation.model_validate(e["resource"]) for e in observations]
    assert all(e["resource"]["resourceType"] == "Observation" for e in observations)
    assert [r.reference for r in parsed_report.result] == [e["fullUrl"] for e in observations]
    for entry, resource in zip(raw["entry"], [parsed_report, *parsed], strict=True):
        assert entry["fullUrl"] == f"urn:uuid:{resource.id}"
        assert resource.issued.tzinfo is not None  # an instant: its offset is required
    # Strict indeed: an element R4 does not have, or an instant without its offset, is
    # refused. (fhir.resources does not check code bindings: the statuses are checked by
    # value in the test.)
    observation = observations[0]["resource"]
    for wrong in ({"valueQuantity": {**observation["valueQuantity"], "units": "%"}},
                  {"issued": "2026-11-30T10:00:00"}):
        with pytest.raises(ValidationError):
            Observation.model_validate({**observation, **wrong})
    return bundle, parsed_report, parsed


def test_fhir_export_parses_as_r4_first_and_amended(station, bccd: Path) -> None:
    tech = station.client("tess")
    reviewer = station.client("rita", "reviewer")
    case = tech.post("/api/cases", json={"accession": "FHIR-1"}).json()
    assert upload(tech, case["id"], bccd / FIELDS[1]).status_code == 200
    case = wait_analysed(tech, case["id"])
    for cell in all_cells(case):  # sign-off needs every cell named
        if cell["label"] == "unidentified":
            assert tech.patch(f"/api/cases/{case['id']}/cells/{cell['id']}",
                              json={"label": "neutrophil", "version": cell["version"]}
                              ).is_success
    field = case["fields"][0]
    # Classes beyond the five: a band neutrophil (a % observation) and a nucleated red
    # cell (per 100 white cells, its own UCUM unit).
    for i, label in enumerate(("band_neutrophil", "nucleated_red_cell")):
        x = 10 + 40 * i
        added = tech.post(f"/api/cases/{case['id']}/cells", json={
            "field_id": field["id"], "box": [x, 10, x + 30, 40], "label": label})
        assert added.status_code == 201, added.text
    case = tech.get(f"/api/cases/{case['id']}").json()
    signed = sign(reviewer, case, "small sample")
    assert signed.status_code == 200, signed.text

    _bundle, report, observations = parse_report(
        tech.get(f"/api/cases/{case['id']}/fhir.json"))
    assert report.status == "final" and {o.status for o in observations} == {"final"}
    codes = {o.code.coding[0].code: o for o in observations}
    assert {"26508-2", "19048-8"} <= set(codes)  # band neutrophils %, nucleated RBC /100 WBC
    assert codes["19048-8"].valueQuantity.code == "/100{WBCs}"
    assert all(o.valueQuantity.system == "http://unitsofmeasure.org" for o in observations)
    assert "small sample" in report.conclusion

    case = signed.json()
    reopened = reviewer.post(f"/api/cases/{case['id']}/reopen",
                             json={"revision": case["revision"], "reason": "recount"})
    assert reopened.status_code == 200, reopened.text
    again = sign(reviewer, reopened.json(), "small sample, recounted")
    assert again.status_code == 200, again.text
    _bundle, amended, observations = parse_report(
        tech.get(f"/api/cases/{case['id']}/fhir.json"))
    assert amended.status == "amended" and {o.status for o in observations} == {"amended"}
    assert amended.conclusion.startswith("Amended report (amendment 1; reopened because: "
                                         "recount).")
    assert amended.id != report.id
