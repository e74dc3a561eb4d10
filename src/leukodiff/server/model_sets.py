"""The station's model sets (issue #15, "in the station"): the registry, the default set
for new analyses with promote and roll back, and the loaded Analyzers per set.

A model set is the three models an analysis runs: the detector and the two level-2
classifiers. "shipped" is the package's own weights and is always there; every other set
was adapted from the station's signed cases by an admin's job (`adapt_job`) and lives in
DATA_DIR/models/<name>/, written once (files read-only) and never overwritten or deleted.
A role a job did not adapt (too few reviewed fields for the detector, say) is the base
set's file, named in the set's `files`.

Every promotion, roll back and job is an audit event without a case (`MODEL_ACTIONS`); the
roll back stack is replayed from those events, so it survives restarts.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from leukodiff.models.files import ModelFileError, read_manifest, sha256_of, shipped
from leukodiff.server.db import AuditEvent, ModelSet, User
from leukodiff.server.settings import Settings

SHIPPED = "shipped"
ROLES = ("detector", "mononuclear", "polymorphonuclear")
MODEL_ACTIONS = ("model_promote", "model_rollback", "model_adapt_started",
                 "model_adapt_finished")


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
