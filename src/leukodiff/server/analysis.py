"""Background analysis: uploaded fields queue here and one worker thread runs the Analyzer.

One worker because the Analyzer already runs its two level-2 models concurrently
and the machine's cores are shared; fields left queued by a restart are resumed.
Each analysis runs the station's default model set at the moment it starts (or the set a
re-analysis asked for) and records it on the field and in the audit trail.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sqlalchemy import select

from leukodiff.imaging import ImageError
from leukodiff.models.files import ModelFileError
from leukodiff.pipeline import AnalysisError, Analyzer
from leukodiff.pipeline.boxes import box_iou
from leukodiff.server.case_summary import disagrees
from leukodiff.server.db import (
    Case,
    CellRecord,
    Database,
    FieldImage,
    FieldStatus,
    ModelSet,
    utcnow,
)
from leukodiff.server.model_sets import SHIPPED, Analyzers, default_set, find_set, set_paths
from leukodiff.server.review import audit
from leukodiff.server.settings import Settings
from leukodiff.server.storage import ViewCache

# A new call and an existing cell at least this alike (intersection over union) are the
# same cell: the detector's own matching threshold in evaluation.
MATCH_IOU = 0.5

log = logging.getLogger(__name__)


class AnalysisQueue:
    """Runs queued fields through the Analyzer of their model set, one at a time, and
    stores the calls as cells (a re-analysis merges them into the field's cells)."""

    def __init__(self, db: Database, views: ViewCache, analyzer: Analyzer | None = None,
                 settings: Settings | None = None) -> None:
        self.db, self.views, self.settings = db, views, settings
        self._analyzers = Analyzers(analyzer)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leukodiff-analysis")

    def analyzer(self, model_set: ModelSet | None = None) -> Analyzer:
        """The Analyzer of a model set (None: the shipped models), loaded on first use (a
        server can start before they are needed) and kept for the next field."""
        if model_set is None or model_set.name == SHIPPED or self.settings is None:
            return self._analyzers.get(SHIPPED, "", None, Analyzer.load)
        return self._analyzers.get(model_set.name, model_set.sha256,
                                   set_paths(self.settings, model_set), Analyzer.load)

    def submit(self, field_ids: list[int]) -> None:
        for field_id in field_ids:
            self._executor.submit(self._run_logged, field_id)

    def resume(self) -> None:
        """Queue again what a stopped server left unfinished."""
        with self.db.writing() as session:
            fields = session.scalars(select(FieldImage).where(
                FieldImage.status.in_([FieldStatus.QUEUED, FieldStatus.ANALYSING]))).all()
            for field in fields:
                field.status = FieldStatus.QUEUED
            ids = [f.id for f in fields]
        self.submit(ids)

    def shutdown(self) -> None:
        """Finish the field in progress (queued ones resume on the next start), then free
        the Analyzers' worker threads (not a shared one: its owner's to close)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._analyzers.close()

    def _run_logged(self, field_id: int) -> None:
        try:
            self._run(field_id)
        except Exception:  # a worker must survive one bad field; the field is marked failed
            log.exception("analysis of field %s failed", field_id)
            try:
                self._finish_failed(field_id, "internal error during analysis (see server log)")
            except Exception:  # e.g. the database is down: the next start re-queues the field
                log.exception("could not mark field %s failed", field_id)

    def _run(self, field_id: int) -> None:
        with self.db.writing() as session:
            field = session.get(FieldImage, field_id)
            if field is None or field.status != FieldStatus.QUEUED:
                return
            field.status = FieldStatus.ANALYSING
            sha256, name = field.image_sha256, field.original_name
            # A re-analysis names its set; a new analysis takes the default set now.
            model_set = (find_set(session, field.pending_model_set) if field.pending_model_set
                         else default_set(session))
            session.expunge(model_set)
        try:
            image = self.views.image(sha256)
            result = self.analyzer(model_set)(image, name=name, look=True)
            self.views.view_path(sha256)  # render the browser view now, not on first request
        except (AnalysisError, ImageError, ModelFileError) as error:
            self._finish_failed(field_id, str(error))
            return
        with self.db.writing() as session:
            # The case row first, as every change in a case takes it (edits wait for us).
            case_id = session.scalar(select(FieldImage.case_id).where(FieldImage.id == field_id))
            session.get(Case, case_id, with_for_update=True)
            field = session.get(FieldImage, field_id, populate_existing=True)
            again = field.analysed_at is not None
            if again:
                changes = merge_calls(field, result.cells)
            else:
                for call in result.cells:
                    field.cells.append(_new_cell(field_id, call))
                changes = {"cells": len(result.cells)}
            field.status, field.analysed_at = FieldStatus.DONE, utcnow()
            field.error = None
            field.familiarity, field.unlike_training = (result.familiarity,
                                                        result.unlike_training)
            field.model_set, field.model_set_sha256 = model_set.name, model_set.sha256
            field.pending_model_set = None
            session.flush()
            audit(session, field.case, None, "reanalysis" if again else "analysis",
                  field_id=field_id,
                  after={**changes, "counts": dict(result.counts()),
                         "familiarity": result.familiarity,
                         "unlike_training": result.unlike_training,
                         "model_set": model_set.name, "model_set_sha256": model_set.sha256})

    def _finish_failed(self, field_id: int, message: str) -> None:
        with self.db.writing() as session:
            field = session.get(FieldImage, field_id)
            if field is None:
                return
            if field.analysed_at is not None:  # a re-analysis: the earlier calls stand
                wanted, field.pending_model_set = field.pending_model_set, None
                field.status, field.error = FieldStatus.DONE, (
                    f"re-analysis with {wanted} failed: {message}")[:500]
                audit(session, field.case, None, "reanalysis_failed", field_id=field_id,
                      after={"error": message[:500], "model_set": wanted})
                return
            field.status, field.error = FieldStatus.FAILED, message[:500]
            audit(session, field.case, None, "analysis_failed", field_id=field_id,
                  after={"error": message[:500]})


def _new_cell(field_id: int, call) -> CellRecord:
    x0, y0, x1, y1 = call.box
    return CellRecord(field_id=field_id, x0=x0, y0=y0, x1=x1, y1=y1, origin="model",
                      model_label=call.label, model_group=str(call.group),
                      model_confidence=round(call.type_confidence, 4),
                      probabilities={k: round(v, 4) for k, v in call.probabilities.items()},
                      label=call.label)


def merge_calls(field: FieldImage, calls: list) -> dict[str, int]:
    """A re-analysis's calls merged into a field's cells, keeping what people decided.

    Each new call is matched to a live cell (IoU >= `MATCH_IOU`, best pairs first). A
    matched cell takes the new model's call (`model_label`, group, confidence,
    probabilities); its `label` follows the call only if no person reviewed it. A cell a
    person reviewed (labelled, confirmed or drawn) is always kept with its label, even when
    the new models find nothing there (its model call is then cleared). An unreviewed cell
    the new models no longer find is marked deleted (the row stays, as for a deleted
    detection), and a new call matching no cell becomes a new, unreviewed cell.
    """
    live = [c for c in field.cells if not c.deleted]
    overlaps = box_iou(np.array([cell.box for cell in live], dtype=np.float64).reshape(-1, 4),
                       np.array([call.box for call in calls], dtype=np.float64).reshape(-1, 4))
    pairs = sorted(((float(overlaps[i, j]), i, j) for i in range(len(live))
                    for j in range(len(calls))), reverse=True)
    matched_cells: dict[int, int] = {}
    used_calls: set[int] = set()
    for iou, i, j in pairs:
        if iou < MATCH_IOU:
            break
        if i in matched_cells or j in used_calls:
            continue
        matched_cells[i] = j
        used_calls.add(j)
    now = utcnow()
    kept = removed = 0
    for i, cell in enumerate(live):
        if i in matched_cells:
            call = calls[matched_cells[i]]
            cell.model_label, cell.model_group = call.label, str(call.group)
            cell.model_confidence = round(call.type_confidence, 4)
            cell.probabilities = {k: round(v, 4) for k, v in call.probabilities.items()}
            if not cell.reviewed:
                cell.label = call.label
            cell.updated_at = now
        elif cell.reviewed:
            kept += 1
            if cell.origin == "model":  # the new models call nothing here
                cell.model_label = cell.model_group = None
                cell.model_confidence, cell.probabilities = None, None
                cell.updated_at = now
        else:
            cell.deleted, cell.updated_at = True, now
            removed += 1
    added = [j for j in range(len(calls)) if j not in used_calls]
    for j in added:
        field.cells.append(_new_cell(field.id, calls[j]))
    disagreements = sum(disagrees(c) for c in field.cells if not c.deleted)
    return {"cells": len(calls), "matched": len(matched_cells), "added": len(added),
            "removed": removed, "reviewed_unmatched": kept, "disagreements": disagreements}
