"""Background analysis: uploaded fields queue here and one worker thread runs the Analyzer.

One worker because the Analyzer already runs its two level-2 models concurrently
and the machine's cores are shared; fields left queued by a restart are resumed.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from leukodiff.imaging import ImageError
from leukodiff.pipeline import AnalysisError, Analyzer
from leukodiff.server.db import CellRecord, Database, FieldImage, FieldStatus, utcnow
from leukodiff.server.review import audit
from leukodiff.server.storage import ViewCache

log = logging.getLogger(__name__)


class AnalysisQueue:
    """Runs queued fields through the Analyzer, one at a time, and stores the calls as cells."""

    def __init__(self, db: Database, views: ViewCache, analyzer: Analyzer | None = None) -> None:
        self.db, self.views = db, views
        self._analyzer = analyzer
        self._owns_analyzer = analyzer is None  # a shared one (tests) is its owner's to close
        self._analyzer_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leukodiff-analysis")

    def analyzer(self) -> Analyzer:
        """The shipped models, loaded on first use (a server can start before they are needed)."""
        with self._analyzer_lock:
            if self._analyzer is None:
                self._analyzer = Analyzer.load()
            return self._analyzer

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
        the Analyzer's worker threads if this queue loaded it."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._analyzer_lock:
            if self._owns_analyzer and self._analyzer is not None:
                self._analyzer.close()
                self._analyzer = None

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
        try:
            image = self.views.image(sha256)
            result = self.analyzer()(image, name=name, look=True)
            self.views.view_path(sha256)  # render the browser view now, not on first request
        except (AnalysisError, ImageError) as error:
            self._finish_failed(field_id, str(error))
            return
        with self.db.writing() as session:
            field = session.get(FieldImage, field_id)
            for call in result.cells:
                x0, y0, x1, y1 = call.box
                session.add(CellRecord(
                    field_id=field_id, x0=x0, y0=y0, x1=x1, y1=y1, origin="model",
                    model_label=call.label, model_group=str(call.group),
                    model_confidence=round(call.type_confidence, 4),
                    probabilities={k: round(v, 4) for k, v in call.probabilities.items()},
                    label=call.label))
            field.status, field.analysed_at = FieldStatus.DONE, utcnow()
            field.familiarity, field.unlike_training = (result.familiarity,
                                                        result.unlike_training)
            session.flush()
            audit(session, field.case, None, "analysis", field_id=field_id,
                  after={"cells": len(result.cells), "counts": dict(result.counts()),
                         "familiarity": result.familiarity,
                         "unlike_training": result.unlike_training})

    def _finish_failed(self, field_id: int, message: str) -> None:
        with self.db.writing() as session:
            field = session.get(FieldImage, field_id)
            if field is None:
                return
            field.status, field.error = FieldStatus.FAILED, message[:500]
            audit(session, field.case, None, "analysis_failed", field_id=field_id,
                  after={"error": message[:500]})
