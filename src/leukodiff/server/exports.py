"""Exports of a signed case (CSV, JSON, FHIR R4) and of reviewed cells as training data.

Training data uses the layouts `leukodiff train` reads:
`cells/<cell type>/*.png` (read_class_folders) and
`fields/Annotations/*.xml` + `fields/JPEGImages/*.png` (read_voc).
"""

from __future__ import annotations

import csv
import io
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leukodiff.data.crops import crop_cell
from leukodiff.data.records import Box
from leukodiff.server.case_summary import (
    case_dict,
    counted_fields,
    differential,
    model_sets_used,
    sign_off_check,
)
from leukodiff.server.db import NOT_WBC, UNIDENTIFIED, AuditEvent, Case, CellRecord
from leukodiff.server.storage import ViewCache
from leukodiff.taxonomy import REVIEW_CLASS, REVIEW_CLASSES, CellType

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
# Percent of leukocytes, method-less codes: the count is machine-proposed, human-verified.
LOINC_PERCENT = {
    CellType.LYMPHOCYTE: ("26478-8", "Lymphocytes/100 leukocytes in Blood"),
    CellType.MONOCYTE: ("26485-3", "Monocytes/100 leukocytes in Blood"),
    CellType.NEUTROPHIL: ("26511-6", "Neutrophils/100 leukocytes in Blood"),
    CellType.EOSINOPHIL: ("26450-7", "Eosinophils/100 leukocytes in Blood"),
    CellType.BASOPHIL: ("30180-4", "Basophils/100 leukocytes in Blood"),
}
# The classes a reviewer adds to the models' five (reported only when seen). Method-less
# codes like the five's, each checked against two published tables (HL7 mCODE's CBC value
# set and others; 19048-8 on loinc.org itself). Every reported class has one; a class
# without a verified LOINC code would need a local code system here instead.
LOINC_PERCENT_OTHER = {
    "band_neutrophil": ("26508-2", "Band form neutrophils/100 leukocytes in Blood"),
    "immature_granulocyte": ("38518-7", "Immature granulocytes/100 leukocytes in Blood"),
    "blast": ("26446-5", "Blasts/100 leukocytes in Blood"),
    # LOINC's "variant lymphocytes" (formerly atypical) are the reactive lymphocytes
    "reactive_lymphocyte": ("13046-8", "Variant lymphocytes/100 leukocytes in Blood"),
    "plasma_cell": ("13047-6", "Plasma cells/100 leukocytes in Blood"),
}
# Reported per 100 counted white cells, outside the WBC count.
LOINC_PER_100_WBC = {
    "nucleated_red_cell": ("19048-8", "Nucleated erythrocytes/100 leukocytes in Blood"),
    "smudge_cell": ("34992-8", "Smudge cells/100 leukocytes in Blood"),
}
PER_100_WBC_UNIT = {"unit": "/100 WBC", "system": UCUM, "code": "/100{WBCs}"}
PANEL = ("57023-4", "Auto Differential panel - Blood")
# Crop side / box side of exported cell crops: the default of `leukodiff train classifier`.
CROP_SCALE = 2.6
CSV_COLUMNS = ["accession", "field_id", "field_name", "cell_id", "x0", "y0", "x1", "y1",
               "origin", "model_label", "model_confidence", "label", "reviewed",
               "updated_by", "updated_at", "counting", "model_set", "model_set_sha256"]


class ExportError(ValueError):
    """An export that cannot be made (e.g. of a case not yet signed off)."""


def _live_cells(case: Case) -> Iterator[CellRecord]:
    """The cells the differential counts from: not deleted, in fields not excluded (the
    CSV leaves excluded fields out; the JSON export lists them, marked, with their reason)."""
    for field in counted_fields(case):
        yield from (c for c in field.cells if not c.deleted)


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text(value: str) -> str:
    """A user-chosen text (file name, accession, username) made inert for spreadsheets."""
    return f"'{value}" if value.startswith(FORMULA_START) else value


def cases_csv(case: Case) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for cell in _live_cells(case):
        writer.writerow([_text(case.accession), cell.field_id, _text(cell.field.original_name),
                         cell.id, *(f"{v:.1f}" for v in cell.box), cell.origin,
                         cell.model_label or "",
                         "" if cell.model_confidence is None else f"{cell.model_confidence:.4f}",
                         cell.label, int(cell.reviewed),
                         _text(cell.updated_by.username) if cell.updated_by else "",
                         cell.updated_at.isoformat(), _counting(cell.label),
                         cell.field.model_set or "", cell.field.model_set_sha256 or ""])
    return buffer.getvalue()


def _counting(label: str) -> str:
    """How the label is counted (`taxonomy.Counting`): a spreadsheet can total by it."""
    known = REVIEW_CLASS.get(label)
    return str(known.counting) if known else ""


def case_json(case: Case, events: Iterable[AuditEvent]) -> dict[str, Any]:
    return {**case_dict(case), "conclusion": conclusion(case),
            "audit": [audit_dict(e) for e in events]}


def audit_dict(event: AuditEvent) -> dict[str, Any]:
    return {"id": event.id, "at": event.at.isoformat(), "action": event.action,
            "user": (event.user.username if event.user
                     else "analyzer" if event.case_id is not None else "command line"),
            "field_id": event.field_id, "cell_id": event.cell_id,
            "before": event.before, "after": event.after}


def fhir_report(case: Case) -> dict[str, Any]:
    """A FHIR R4 Bundle: one DiagnosticReport and an Observation per cell-type percentage."""
    if case.signed_at is None or case.signed_by is None:
        raise ExportError(f"case {case.accession} is not signed off; only signed cases export")
    summary = differential(case)
    signed = case.signed_at.isoformat()
    reviewer = {"display": case.signed_by.username}
    accession = {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                      "code": "ACSN", "display": "Accession ID"}]},
                 "value": case.accession}
    lab = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                       "code": "laboratory", "display": "Laboratory"}]}
    # A case reopened and signed again: this report replaces the one issued before.
    status = "amended" if case.amendments else "final"
    def observation(code: str, display: str, text: str, value: float, unit: dict[str, str],
                    note: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation", "id": str(uuid.uuid4()), "status": status,
            "category": [lab],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}],
                     "text": text},
            "identifier": [accession], "effectiveDateTime": signed, "issued": signed,
            "performer": [reviewer], "valueQuantity": {"value": value, **unit},
            "note": [{"text": note}], "method": method,
            # One set: its Device, contained (so the bundle's entries stay the report and
            # its Observations) and referenced; several: the method names them all.
            **({"contained": [devices[0]],
                "device": {"reference": f"#{devices[0]['id']}",
                           "display": devices[0]["deviceName"][0]["name"]}}
               if len(devices) == 1 else {}),
        }

    # The models that pre-classified the cells: one Device per model set the counted fields
    # were analysed with; every Observation names them in its method, and as its device
    # when there is one set.
    devices = model_devices(case)
    method = {"text": "Digital morphology: leukodiff model set(s) "
                      f"{', '.join(d['deviceName'][0]['name'] for d in devices)}, "
                      "pre-classified, reviewed by a person",
              "coding": [{"system": METHOD_SYSTEM, "code": "leukodiff-reviewed",
                          "display": "leukodiff pre-classification, human-verified"}]}
    percent = {"unit": "%", "system": UCUM, "code": "%"}
    counted = summary.counted
    # The five types always (0 is a result); the other white-cell classes when seen.
    observations = [
        observation(code, display, f"{REVIEW_CLASS[label].title.capitalize()}s %",
                    summary.percentages[label], percent,
                    f"{summary.counts[label]} of {counted} white cells counted")
        for label, (code, display) in [*((str(t), v) for t, v in LOINC_PERCENT.items()),
                                       *LOINC_PERCENT_OTHER.items()]
        if REVIEW_CLASS[label].model_type or summary.counts[label]]
    # Nucleated red cells and smudge cells: per 100 white cells, outside the WBC count.
    observations += [
        observation(code, display, f"{REVIEW_CLASS[label].title.capitalize()}s /100 WBC",
                    summary.per_100_wbc[label], PER_100_WBC_UNIT,
                    f"{summary.counts[label]} seen while counting {counted} white cells; "
                    "not in the white-cell count")
        for label, (code, display) in LOINC_PER_100_WBC.items() if summary.counts[label]]
    report = {
        "resourceType": "DiagnosticReport", "id": str(uuid.uuid4()), "status": status,
        "identifier": [accession],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                  "code": "HM", "display": "Hematology"}]}],
        "code": {"coding": [{"system": LOINC, "code": PANEL[0], "display": PANEL[1]}],
                 "text": "White-cell differential, digital morphology, reviewed"},
        "effectiveDateTime": signed, "issued": signed,
        "performer": [reviewer], "resultsInterpreter": [reviewer],
        "result": [{"reference": f"urn:uuid:{o['id']}"} for o in observations],
        # Says how many cells a person actually looked at: sign-off needs every cell
        # named, not every cell opened, so "every cell verified" would overstate it.
        "conclusion": conclusion(case),
    }
    entries = [report, *observations]
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "collection",
            "timestamp": signed,
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in entries]}


METHOD_SYSTEM = "https://github.com/leukodiff/leukodiff/method"
DEVICE_SYSTEM = "https://github.com/leukodiff/leukodiff/model-set"


def model_devices(case: Case) -> list[dict[str, Any]]:
    """A FHIR Device per model set the case's counted fields were analysed with: its name
    and digest (sha256 over its model files), so a report names the exact models."""
    digests: dict[str, str | None] = {}
    for field in counted_fields(case):
        if field.analysed_at:
            digests.setdefault(field.model_set or "shipped", field.model_set_sha256)
    devices = []
    for name in model_sets_used(case):
        digest = digests.get(name)
        devices.append({
            "resourceType": "Device", "id": f"model-set-{len(devices) + 1}",
            "identifier": [{"system": DEVICE_SYSTEM, "value": digest or name}],
            "deviceName": [{"name": f"leukodiff model set {name}", "type": "model-name"}],
            "manufacturer": "leukodiff",
            "version": [{"value": digest or "not recorded (analysed before schema 0006)"}],
            "type": {"text": "Software: white-blood-cell detection and classification "
                             "models"}})
    return devices


def conclusion(case: Case) -> str:
    """The report's summary line: what was counted over which fields, what a person
    reviewed, who signed, and why they signed short of the mark if they did."""
    summary = differential(case)
    check = sign_off_check(summary)
    failed = (f" ({summary.failed_fields} more field(s) failed analysis: none of their "
              "cells is counted)" if summary.failed_fields else "")
    apart = "".join(f"; {summary.counts[label]} {REVIEW_CLASS[label].title}(s) "
                    f"({summary.per_100_wbc[label]} per 100 white cells) reported apart"
                    for label in summary.per_100_wbc if summary.counts[label])
    artefacts = summary.counts["artefact"]
    if summary.excluded_fields:
        failed += (f" ({summary.excluded_fields} field(s) excluded by a person: none of their "
                   "cells is counted)")
    text = (f"{summary.counted} white cells counted over {summary.fields} analysed "
            f"field(s){failed}{apart}; {summary.not_wbc} objects marked not a white cell"
            f"{f' and {artefacts} artefact(s)' if artefacts else ''}, not counted. "
            f"Pre-classified by leukodiff (model set "
            f"{', '.join(model_sets_used(case)) or 'none'}); {summary.reviewed} of "
            f"{summary.counted} white cells individually reviewed; target "
            f"{summary.target} white cells; signed off "
            f"by {case.signed_by.username if case.signed_by else 'nobody'}.")
    if summary.warning:
        text += f" Warning: {summary.warning}."
    if case.sign_off_reason:
        why = f" ({', '.join(check.problems)})" if check.problems else ""
        text += f" Sign-off reason{why}: {case.sign_off_reason}"
    if case.amendments:
        text = (f"Amended report (amendment {case.amendments}; reopened because: "
                f"{case.amend_reason}). " + text)
    return text


@dataclass
class TrainingSummary:
    """What a training export held and what it left out (filled in by `training_files`)."""

    cells: int = 0  # reviewed cells exported as crops
    cells_left_out: int = 0  # live cells nobody reviewed (the model's call stands unchecked)
    fields: int = 0  # fields exported as VOC pairs (every live cell in them reviewed)
    fields_left_out: int = 0  # fields with a cell nobody reviewed
    cells_other_classes: int = 0  # reviewed cells of a class the models do not learn
    fields_excluded: int = 0  # fields excluded from the case's differential: none of it exported

    def readme(self, cases: Iterable[Case]) -> str:
        names = [c.accession for c in cases if c.signed_at is not None]
        listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return (f"leukodiff training export of {len(names)} signed case(s): {listed}\n\n"
                "Only cells a person reviewed (classified, confirmed or drawn) are in it.\n"
                f"cells/<type>/: {self.cells} reviewed cell crop(s); {self.cells_left_out} "
                "cell(s) left out because nobody reviewed them (unidentified, not-a-white-"
                "cell and deleted detections are never exported as crops).\n"
                f"Only the five types the models learn get a folder: {self.cells_other_classes} "
                "reviewed cell(s) of the station's other classes (band neutrophil, immature "
                "granulocyte, blast, reactive lymphocyte, plasma cell, nucleated red cell, "
                "smudge cell, artefact) are left out of cells/.\n"
                f"fields/ (Pascal VOC): {self.fields} field(s) whose every cell was reviewed; "
                f"{self.fields_left_out} field(s) left out because some of their cells were "
                "not reviewed (their boxes would be unchecked or missing). White cells of "
                "the other classes are boxed as plain WBC; nucleated red cells, smudge cells, "
                "artefacts and not-a-white-cell objects get no box.\n"
                f"{self.fields_excluded} field(s) excluded from their case's differential "
                "left out entirely (neither crops nor VOC pairs).\n")


def training_files(cases: Iterable[Case], views: ViewCache,
                   summary: TrainingSummary | None = None) -> Iterator[tuple[str, bytes]]:
    """(relative path, bytes) of every reviewed cell's crop and every reviewed field's VOC pair.

    Only signed cases are exported, and of them only what a person reviewed (`reviewed`:
    reclassified, confirmed or drawn): a cell whose label is still the model's own call is
    left out, and so is the VOC pair of a field holding such a cell (its boxes would teach
    unchecked calls, or miss a white cell if the box were dropped). Only what the models
    can learn goes in: crops of the five types; VOC boxes of every white cell (`taxonomy.
    Counting.white_cell`), named by type, or plain "WBC" for unidentified cells and the
    white-cell classes the models do not predict (band neutrophil, blast...). Nucleated
    red cells, smudge cells, artefacts, not-a-white-cell objects and deleted detections get
    no box; excluded fields (a person judged the image unfit to count from) are left out
    entirely. `summary`, if given, is filled in with what was exported and left out.
    """
    summary = summary if summary is not None else TrainingSummary()
    for case in cases:
        if case.signed_at is None:
            continue
        summary.fields_excluded += len(case.fields) - len(counted_fields(case))
        for field in counted_fields(case):
            live = [c for c in field.cells if not c.deleted]
            unreviewed = sum(not c.reviewed for c in live)
            summary.cells_left_out += unreviewed
            summary.fields_left_out += bool(unreviewed)
            white = [c for c in live if c.label in _WHITE_CELLS]
            crops = [c for c in live if c.reviewed and c.label in _MODEL_TYPES]
            summary.cells_other_classes += sum(
                c.reviewed and c.label in _OTHER_CLASSES for c in live)
            whole = bool(white) and not unreviewed
            if not crops and not whole:
                continue
            image = views.image(field.image_sha256)
            stem = f"{_safe(case.accession)}-field{field.id}"
            for cell in crops:
                crop = crop_cell(image, Box(*cell.box), CROP_SCALE)
                summary.cells += 1
                yield f"cells/{cell.label}/{stem}-cell{cell.id}.png", _png(crop)
            if whole:
                summary.fields += 1
                yield f"fields/JPEGImages/{stem}.png", _png(image)
                yield f"fields/Annotations/{stem}.xml", _voc_xml(f"{stem}.png", image.size,
                                                                 white)


_MODEL_TYPES = frozenset(str(t) for t in CellType)
_WHITE_CELLS = frozenset(c.name for c in REVIEW_CLASSES if c.counting.white_cell)
# Reviewed classes the models do not learn, counted in the README (unidentified and
# not-a-white-cell are never exported as crops either, but say nothing about a class).
_OTHER_CLASSES = frozenset(c.name for c in REVIEW_CLASSES if not c.model_type) - {
    UNIDENTIFIED, NOT_WBC}


def write_training(cases: Iterable[Case], views: ViewCache, out: Path) -> int:
    """Write `training_files` and a README.txt (what was left out) under `out`; an existing
    file is never replaced (FileExistsError). The number of files written."""
    cases, summary = list(cases), TrainingSummary()
    count = 0
    for relative, data in training_files(cases, views, summary):
        _write_new(out / relative, data)
        count += 1
    _write_new(out / "README.txt", summary.readme(cases).encode())
    return count + 1


def _write_new(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("xb") as handle:
        handle.write(data)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _voc_xml(filename: str, size: tuple[int, int], cells: list[CellRecord]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = filename
    size_element = ET.SubElement(root, "size")
    for name, value in zip(("width", "height", "depth"), (*size, 3), strict=True):
        ET.SubElement(size_element, name).text = str(value)
    for cell in cells:
        obj = ET.SubElement(root, "object")
        # A white cell of no model type (unidentified, band, blast...): a box, of no type.
        ET.SubElement(obj, "name").text = cell.label if cell.label in _MODEL_TYPES else "WBC"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for name, value in zip(("xmin", "ymin", "xmax", "ymax"), cell.box, strict=True):
            ET.SubElement(box, name).text = f"{value:.1f}"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
