"""The Models page's "adapt from signed cases" job: one at a time, in a worker thread,
writing a new model set (`model_sets`) that an admin may then promote.

The job calls the same library code as `leukodiff adapt --station` (`training.adapt.
lab_cells` + `adapt`, `training.adapt_detector.lab_fields` + `adapt_detector`), on the
training export of every signed case; training is imported only inside the job, so a
station without torch still serves.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select

from leukodiff.models.files import sha256_of
from leukodiff.server.db import Case, Database, ModelJob, ModelSet, User, utcnow
from leukodiff.server.model_sets import (
    ROLES,
    ModelSetError,
    default_set,
    find_set,
    model_audit,
    models_dir,
    set_digest,
    set_paths,
)
from leukodiff.server.settings import PRIVATE_DIR, Settings, private_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

LEVEL2 = ("mononuclear", "polymorphonuclear")
JOB_LOG_LINES = 200
PROGRESS_EVERY = 1.0  # seconds between progress writes to the database
READ_ONLY = 0o400


def job_dict(job: ModelJob) -> dict[str, Any]:
    return {"id": job.id, "status": job.status, "base": job.base, "stage": job.stage,
            "started_at": job.started_at.isoformat(),
            "started_by": job.started_by.username if job.started_by else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "message": job.message, "model_set": job.model_set,
            "log": list((job.log or {}).get("lines", [])), "result": job.result,
            "running": job.status in ("queued", "running")}


# --- figures ------------------------------------------------------------------------------

def level2_figures(result: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of one level-2 model's adaptation (`training.adapt.adapt`)."""
    if "skipped" in result:
        return {"skipped": result["skipped"]}
    before, after = result["before"], result["after"]
    return {"before": {"macro_f1": before["macro_f1"], "accuracy": before["accuracy"],
                       "recall": before["recall"], "n": before["n"]},
            "after": {"macro_f1": after["macro_f1"], "accuracy": after["accuracy"],
                      "recall": after["recall"], "n": after["n"]},
            "cells": {k: result["cells"][k] for k in ("learnt", "validation", "held_out",
                                                        "replay", "best_epoch")
                      if k in result["cells"]}}


def detector_figures(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("precision", "recall", "f1", "threshold", "truth", "found", "false")
    return {"before": {k: result["before"][k] for k in keys},
            "after": {k: result["after"][k] for k in keys}, "fields": result["fields"]}


# --- the adapt job ------------------------------------------------------------------------

@dataclass(frozen=True)
class AdaptJobConfig:
    """What the adapt job runs: the library's configurations (`training.adapt.AdaptConfig`,
    `training.adapt_detector.DetectorAdaptConfig`), given as plain overrides so the station
    can start without torch; `detector` False leaves the detector as the base set's."""

    level2: dict[str, Any] | None = None  # AdaptConfig fields, e.g. {"epochs": 2}
    detector_config: dict[str, Any] | None = None  # DetectorAdaptConfig fields
    detector: bool = True
    force: bool = False  # keep an adaptation worse on the held-out part (never from the page)

    @classmethod
    def of(cls, value: AdaptJobConfig | dict[str, Any] | None) -> AdaptJobConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})


class JobProgress:
    """A job's stage and log, written to its row at most once a second (and at the end)."""

    def __init__(self, db: Database, job_id: int) -> None:
        self.db, self.job_id = db, job_id
        self.lines: list[str] = []
        self.stage = ""
        self._written = 0.0

    def say(self, line: str) -> None:
        self.lines = [*self.lines, str(line)][-JOB_LOG_LINES:]
        self.flush(force=False)

    def track(self, items: Sequence[T], description: str = "") -> Iterable[T]:
        """`data.scan.Track`: the stage becomes "description i/n" as the items pass."""
        total = len(items) if hasattr(items, "__len__") else None
        for i, item in enumerate(items):
            self.stage = f"{description} {i + 1}/{total}" if total else description
            self.flush(force=False)
            yield item

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self.say(stage)

    def flush(self, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._written < PROGRESS_EVERY:
            return
        self._written = now
        with self.db.writing() as session:
            job = session.get(ModelJob, self.job_id)
            job.stage, job.log = self.stage[:200], {"lines": list(self.lines)}


class ModelJobs:
    """One adapt job at a time, in its own worker thread (requests never wait on it)."""

    def __init__(self, settings: Settings, db: Database, views) -> None:
        self.settings, self.db, self.views = settings, db, views
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leukodiff-adapt")
        self._lock = threading.Lock()

    def resume(self) -> None:
        """A job a stopped server left running cannot resume: marked failed, said why."""
        with self.db.writing() as session:
            for job in session.scalars(select(ModelJob).where(
                    ModelJob.status.in_(("queued", "running")))):
                job.status, job.finished_at = "failed", utcnow()
                job.message = "interrupted: the station stopped while the job ran; start it again"

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def start(self, user: User, base: str | None = None) -> int:
        """Queue "adapt from signed cases" from `base` (None: the default set); its id."""
        with self._lock, self.db.writing() as session:
            running = session.scalar(select(ModelJob.id).where(
                ModelJob.status.in_(("queued", "running"))))
            if running is not None:
                raise ModelSetError(f"an adapt job is already running (job {running}); "
                                    "wait for it to finish", status=409)
            base_set = find_set(session, base) if base else default_set(session)
            job = ModelJob(started_by_id=user.id, base=base_set.name, status="queued",
                           stage="queued", log={"lines": []})
            session.add(job)
            session.flush()
            model_audit(session, user, "model_adapt_started",
                        after={"job": job.id, "base": base_set.name})
            job_id = job.id
        self._executor.submit(self._run_logged, job_id)
        return job_id

    def _run_logged(self, job_id: int) -> None:
        progress = JobProgress(self.db, job_id)
        try:
            self._run(job_id, progress)
        except Exception as error:  # the worker survives; the job says what happened
            log.exception("adapt job %s failed", job_id)
            progress.say(f"error: {type(error).__name__}: {error}")
            self._finish(job_id, progress, "failed", f"the job failed: {error}")

    def _finish(self, job_id: int, progress: JobProgress, status: str, message: str,
                model_set: str | None = None, result: dict | None = None) -> None:
        progress.stage = status
        progress.flush()
        with self.db.writing() as session:
            job = session.get(ModelJob, job_id)
            job.status, job.message, job.finished_at = status, message, utcnow()
            job.model_set, job.result = model_set, result
            model_audit(session, job.started_by, "model_adapt_finished",
                        after={"job": job_id, "status": status, "message": message,
                               "model_set": model_set})

    def _run(self, job_id: int, progress: JobProgress) -> None:
        from leukodiff.server.exports import write_training
        from leukodiff.server.review import load_case

        with self.db.writing() as session:
            job = session.get(ModelJob, job_id)
            job.status = "running"
            base = find_set(session, job.base)
            base_files, base_name = dict(base.files), base.name
            base_paths = set_paths(self.settings, base)
        config = AdaptJobConfig.of(self.settings.adapt_job)
        tmp = self.settings.data_dir / "tmp"
        private_dir(models_dir(self.settings))
        with tempfile.TemporaryDirectory(dir=tmp, prefix=f"adapt-{job_id}-") as scratch:
            progress.set_stage("exporting the signed cases' reviewed cells and fields")
            export = Path(scratch) / "station"
            with self.db.reading() as session:
                ids = list(session.scalars(select(Case.id).where(Case.signed_at.is_not(None))
                                           .order_by(Case.id)))
                if not ids:
                    self._finish(job_id, progress, "refused", "no signed cases to learn from")
                    return
                write_training([load_case(session, i) for i in ids], self.views, export)
            progress.say(f"{len(ids)} signed case(s): {', '.join(map(str, ids))}")
            out = Path(scratch) / "set"
            out.mkdir()
            shown = [f"station {self.settings.data_dir} (signed cases "
                     f"{', '.join(map(str, ids))})"]
            outcome = adapt_station(export, out, shown, base_paths, config,
                                    self.settings.data_root, progress,
                                    command=f"review station adapt job {job_id} from "
                                            f"{base_name}")
            written = [role for role in ROLES if (out / f"{role}.pt").exists()]
            if not written:
                self._finish(job_id, progress, "refused", "; ".join(outcome["refused"])
                             or "nothing was adapted", result=outcome)
                return
            name = self._store(job_id, out)
            files = {role: ({"set": name, "file": f"{role}.pt",
                             "sha256": sha256_of(models_dir(self.settings) / name
                                                 / f"{role}.pt")}
                            if role in written else base_files[role]) for role in ROLES}
            with self.db.writing() as session:
                job = session.get(ModelJob, job_id)
                session.add(ModelSet(name=name, source="adapted", base=base_name,
                                     created_by_id=job.started_by_id, files=files,
                                     sha256=set_digest(files),
                                     figures={**outcome["figures"],
                                              "refused": outcome["refused"],
                                              "signed_cases": ids}))
            notes = (f" (not adapted: {'; '.join(outcome['refused'])})"
                     if outcome["refused"] else "")
            self._finish(job_id, progress, "done",
                         f"model set {name} made from {len(ids)} signed case(s): "
                         f"{', '.join(written)} adapted{notes}; promote it to use it",
                         model_set=name, result=outcome)

    def _store(self, job_id: int, out: Path) -> str:
        """The adapted files moved into DATA_DIR/models/<new name>/, read-only; never over
        an existing folder."""
        name = f"adapted-{utcnow():%Y%m%d}-{job_id}"
        target = models_dir(self.settings) / name
        if target.exists():  # a set's files are never replaced
            raise FileExistsError(f"{target} already exists")
        shutil.move(str(out), str(target))
        os.chmod(target, PRIVATE_DIR)
        for path in target.rglob("*"):
            os.chmod(path, PRIVATE_DIR if path.is_dir() else READ_ONLY)
        return name


def adapt_station(export: Path, out: Path, shown: list[str], bases: dict[str, Path],
                  config: AdaptJobConfig, data_root: Path | None,
                  progress: JobProgress, command: str = "") -> dict[str, Any]:
    """`leukodiff adapt --station`'s library calls on a training export: the level-2 models
    from export/cells, the detector from export/fields. A part refused (too few cells or
    fields, or worse on the held-out cases) is said in "refused"; the others go on."""
    from leukodiff.training.adapt import AdaptConfig, AdaptError, AdaptRefused, adapt, lab_cells
    from leukodiff.training.adapt_detector import (
        DetectorAdaptConfig,
        DetectorAdaptError,
        adapt_detector,
        lab_fields,
    )
    from leukodiff.training.classifier import TrainingError
    from leukodiff.training.detector import DetectorTrainingError

    outcome: dict[str, Any] = {"figures": {}, "refused": []}
    say, track = progress.say, progress.track
    if (export / "cells").is_dir():
        progress.set_stage("adapting the level-2 models (mononuclear, polymorphonuclear)")
        try:
            cells = lab_cells([str(export / "cells")], "prefix", data_root, track, say)
            results = adapt(shown, out, replace(AdaptConfig(), **(config.level2 or {})),
                            cells=cells, force=config.force,
                            bases={task: bases[task] for task in LEVEL2},
                            data_root=data_root, track=track, log=say, command=command)
            outcome["figures"].update({task: level2_figures(r) for task, r in results.items()})
        except AdaptRefused as refused:
            outcome["figures"].update({t: level2_figures(r)
                                       for t, r in refused.results.items()})
            outcome["refused"].append(f"level-2 models: {refused}")
        except (AdaptError, TrainingError, FileNotFoundError, ValueError) as error:
            outcome["refused"].append(f"level-2 models: {error}")
    else:
        outcome["refused"].append("level-2 models: no reviewed cells of the five types in "
                                  "the signed cases")
    if not config.detector:
        outcome["refused"].append("detector: not adapted (this station's adapt job leaves "
                                  "it out)")
    elif (export / "fields").is_dir():
        progress.set_stage("adapting the detector")
        try:
            found = lab_fields([str(export / "fields")], "prefix", data_root, track, say)
            result = adapt_detector(found, out, replace(DetectorAdaptConfig(),
                                                        **(config.detector_config or {})),
                                    base=bases["detector"], force=config.force,
                                    data_root=data_root, track=track, log=say,
                                    command=command)
            outcome["figures"]["detector"] = detector_figures(result)
        except AdaptRefused as refused:
            outcome["figures"]["detector"] = detector_figures(refused.results["detector"])
            outcome["refused"].append(f"detector: {refused}")
        except (DetectorAdaptError, DetectorTrainingError, FileNotFoundError,
                ValueError) as error:
            outcome["refused"].append(f"detector: {error}")
    else:
        outcome["refused"].append("detector: no field whose every cell was reviewed in the "
                                  "signed cases")
    for line in outcome["refused"]:
        say(f"not adapted: {line}")
    return outcome
