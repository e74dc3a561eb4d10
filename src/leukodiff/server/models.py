"""The station's model sets (issue #15, "in the station"): the registry, the default set
for new analyses with promote and roll back, and "adapt from signed cases" jobs.

A model set is the three models an analysis runs: the detector and the two level-2
classifiers. "shipped" is the package's own weights and is always there; every other set
was adapted from the station's signed cases by an admin's job and lives in
DATA_DIR/models/<name>/, written once (files read-only) and never overwritten or deleted.
A role a job did not adapt (too few reviewed fields for the detector, say) is the base
set's file, named in the set's `files`. The job calls the same library code as
`leukodiff adapt --station` (`training.adapt.lab_cells` + `adapt`, `training.
adapt_detector.lab_fields` + `adapt_detector`), on the training export of every signed case.

Every promotion, roll back and job is an audit event without a case (`MODEL_ACTIONS`); the
roll back stack is replayed from those events, so it survives restarts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from leukodiff.models.files import ModelFileError, read_manifest, sha256_of, shipped
from leukodiff.server.db import AuditEvent, Case, Database, ModelJob, ModelSet, User, utcnow
from leukodiff.server.settings import PRIVATE_DIR, Settings, private_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

SHIPPED = "shipped"
ROLES = ("detector", "mononuclear", "polymorphonuclear")
LEVEL2 = ("mononuclear", "polymorphonuclear")
# Files of a role beside its .pt: manifest, ONNX export (+ its manifest), and the
# detector's group classifier and look reference. Copied/kept as the adapt code wrote them.
MODEL_ACTIONS = ("model_promote", "model_rollback", "model_adapt_started",
                 "model_adapt_finished")
JOB_LOG_LINES = 200
PROGRESS_EVERY = 1.0  # seconds between progress writes to the database
READ_ONLY = 0o400


class ModelSetError(ValueError):
    """A model-set change refused, with the reason shown and the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def set_digest(files: dict[str, Any]) -> str:
    """One sha256 naming a set's contents: over its roles' file hashes, in role order."""
    text = "".join(f"{role}:{files[role]['sha256']}\n" for role in ROLES)
    return hashlib.sha256(text.encode()).hexdigest()


def models_dir(settings: Settings) -> Path:
    return settings.models_dir


def role_path(settings: Settings, entry: dict[str, Any], role: str) -> Path:
    """The .pt file of one role of a set (`ModelSet.files[role]`)."""
    if entry["set"] == SHIPPED:
        return shipped(role)
    return models_dir(settings) / entry["set"] / entry["file"]


def set_paths(settings: Settings, model_set: ModelSet) -> dict[str, Path]:
    return {role: role_path(settings, model_set.files[role], role) for role in ROLES}


def _shipped_files() -> dict[str, Any]:
    return {role: {"set": SHIPPED, "file": f"{role}.pt", "sha256": sha256_of(shipped(role))}
            for role in ROLES}


def ensure_shipped(session: Session) -> ModelSet:
    """The "shipped" row, made (the default when no set is) or brought up to the installed
    package's weights (an upgrade); fields keep the digest they were analysed with."""
    files = _shipped_files()
    row = session.scalar(select(ModelSet).where(ModelSet.name == SHIPPED))
    if row is None:
        row = ModelSet(name=SHIPPED, source="shipped", base=None, files=files,
                       sha256=set_digest(files), figures=_shipped_figures())
        session.add(row)
    elif row.sha256 != set_digest(files):
        row.files, row.sha256, row.figures = files, set_digest(files), _shipped_figures()
    session.flush()
    if session.scalar(select(ModelSet.id).where(ModelSet.is_default.is_(True))) is None:
        row.is_default = True
        session.flush()
    return row


def _shipped_figures() -> dict[str, Any]:
    """The shipped models' own validation figures (their manifests), for the page."""
    figures: dict[str, Any] = {}
    for role in ROLES:
        try:
            metrics = read_manifest(shipped(role, ".json")).metrics
        except ModelFileError:
            continue
        val = metrics.get("val", {})
        if role == "detector" and "wbc" in val:
            figures[role] = {"validation": {k: val["wbc"].get(k) for k in
                                            ("precision", "recall", "ap50")}}
        elif "all" in val:
            figures[role] = {"validation": {
                "macro_f1": val["all"].get("macro_f1"),
                "recall": {c: v.get("recall") for c, v in
                           val["all"].get("per_class", {}).items()}}}
    return figures


def default_set(session: Session) -> ModelSet:
    row = session.scalar(select(ModelSet).where(ModelSet.is_default.is_(True)))
    return row if row is not None else ensure_shipped(session)


def find_set(session: Session, name: str) -> ModelSet:
    row = session.scalar(select(ModelSet).where(ModelSet.name == name))
    if row is None:
        raise ModelSetError(f"no model set {name!r}", status=404)
    return row


def model_audit(session: Session, user: User | None, action: str, after: dict[str, Any],
                before: dict[str, Any] | None = None) -> None:
    session.add(AuditEvent(case_id=None, user_id=user.id if user else None, action=action,
                           before=before, after=after))


def default_stack(session: Session) -> list[str]:
    """The defaults in force, oldest first (replayed from the audit trail): a promotion
    pushes its set, a roll back pops back to the one before."""
    stack = [SHIPPED]
    for event in session.scalars(select(AuditEvent).where(
            AuditEvent.case_id.is_(None),
            AuditEvent.action.in_(("model_promote", "model_rollback")))
            .order_by(AuditEvent.id)):
        if event.action == "model_promote":
            stack.append(event.after["model_set"])
        elif len(stack) > 1:
            stack.pop()
    return stack


def _make_default(session: Session, row: ModelSet) -> str:
    current = default_set(session)
    current.is_default = False
    session.flush()  # one default at a time, even mid-transaction
    row.is_default = True
    session.flush()
    return current.name


def promote(session: Session, user: User, name: str) -> ModelSet:
    """Make a set the default for new analyses (analyses already made keep their set)."""
    row = find_set(session, name)
    if row.retired:
        raise ModelSetError(f"model set {name!r} is retired", status=409)
    current = default_set(session)
    if current.id == row.id:
        raise ModelSetError(f"model set {name!r} is already the default", status=409)
    previous = _make_default(session, row)
    model_audit(session, user, "model_promote", before={"default": previous},
                after={"model_set": row.name, "sha256": row.sha256})
    return row


def rollback(session: Session, user: User) -> ModelSet:
    """Make the previous default the default again."""
    stack = default_stack(session)
    current = default_set(session)
    if len(stack) < 2:
        raise ModelSetError("nothing to roll back to: the default has never been changed "
                            "(or every promotion is already rolled back)", status=409)
    row = find_set(session, stack[-2])
    _make_default(session, row)
    model_audit(session, user, "model_rollback", before={"default": current.name},
                after={"model_set": row.name, "sha256": row.sha256})
    return row


def set_dict(row: ModelSet) -> dict[str, Any]:
    return {"name": row.name, "source": row.source, "base": row.base,
            "created_at": row.created_at.isoformat(),
            "created_by": row.created_by.username if row.created_by else None,
            "sha256": row.sha256, "files": row.files, "figures": row.figures,
            "is_default": row.is_default, "retired": row.retired}


def list_sets(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(ModelSet).options(selectinload(ModelSet.created_by))
                           .order_by(ModelSet.id))
    return [set_dict(r) for r in rows]


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


# --- analyzers per set ----------------------------------------------------------------------

class Analyzers:
    """Loaded Analyzers, one per model set (by digest), made on first use and closed at
    shutdown; `shared` (tests) stands for "shipped" and is its owner's to close."""

    def __init__(self, shared=None) -> None:
        self._shared = shared
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str, digest: str, paths: dict[str, Path] | None,
            load: Callable[..., Any]):
        with self._lock:
            if name == SHIPPED and self._shared is not None:
                return self._shared
            key = f"{name}:{digest}"
            if key not in self._loaded:
                self._loaded[key] = load() if paths is None else load(
                    detector=paths["detector"], mononuclear=paths["mononuclear"],
                    polymorphonuclear=paths["polymorphonuclear"])
            return self._loaded[key]

    def close(self) -> None:
        with self._lock:
            for analyzer in self._loaded.values():
                analyzer.close()
            self._loaded.clear()
