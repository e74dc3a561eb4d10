"""What a review changes in a case: create it, set its target, sign it off, reopen it;
and what every change shares (the lock on an open case, version checks, the audit).

Functions here take an open write session and raise `ReviewError` (shown to the
user with its HTTP status); the routes only translate requests into these calls.
Changes to cells and fields are in `edits`; what a case shows is `case_summary`.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from leukodiff.server.case_summary import differential, sign_off_check
from leukodiff.server.db import (
    AuditEvent,
    Case,
    CaseStatus,
    FieldImage,
    FieldStatus,
    Role,
    User,
    utcnow,
)

ACCESSION_MAX = 64
TARGET_RANGE = (10, 2000)
REASON_MAX = 1000


class ReviewError(ValueError):
    """A change refused, with the reason shown to the user and the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None
                 ) -> None:
        super().__init__(message)
        self.message, self.status, self.retry_after = message, status, retry_after


def load_case(session: Session, case_id: int, *, lock: bool = False) -> Case:
    """The case with its fields and cells; `lock` holds its row until commit (PostgreSQL)."""
    query = select(Case).where(Case.id == case_id)
    if lock:
        query = query.with_for_update()
    case = session.scalar(
        query.options(
            selectinload(Case.fields).selectinload(FieldImage.cells),
            selectinload(Case.fields).selectinload(FieldImage.image),
            selectinload(Case.created_by), selectinload(Case.signed_by)))
    if case is None:
        raise ReviewError(f"no case {case_id}", status=404)
    return case


def audit(session: Session, case: Case, user: User | None, action: str, *,
          field_id: int | None = None, cell_id: int | None = None,
          before: dict | None = None, after: dict | None = None) -> None:
    """Record one change and bump the case's revision (an atomic increment, never lost)."""
    session.add(AuditEvent(case_id=case.id, user_id=user.id if user else None, action=action,
                           field_id=field_id, cell_id=cell_id, before=before, after=after))
    session.execute(update(Case).where(Case.id == case.id)
                    .values(revision=Case.revision + 1)
                    .execution_options(synchronize_session=False))


def create_case(session: Session, user: User, accession: str, target_count: int = 100) -> Case:
    accession = accession.strip()
    if not accession or len(accession) > ACCESSION_MAX or not accession.isprintable():
        raise ReviewError(f"accession id: 1-{ACCESSION_MAX} printable characters")
    _check_target(target_count)
    if session.scalar(select(Case.id).where(Case.accession == accession)) is not None:
        raise ReviewError(f"a case with accession {accession!r} already exists", status=409)
    case = Case(accession=accession, target_count=target_count, created_by_id=user.id)
    session.add(case)
    try:
        session.flush()
    except IntegrityError:  # created by someone else a moment ago
        raise ReviewError(f"a case with accession {accession!r} already exists",
                          status=409) from None
    audit(session, case, user, "create_case", after={"accession": accession,
                                                     "target_count": target_count})
    return case


def _check_target(target: int) -> None:
    low, high = TARGET_RANGE
    if not low <= target <= high:
        raise ReviewError(f"target count must be between {low} and {high} white cells")


def _open_case(case: Case) -> None:
    if case.status == CaseStatus.SIGNED:
        raise ReviewError(f"case {case.accession} is signed off and locked; no changes allowed",
                          status=423)


def lock_open_case(session: Session, case_id: int) -> Case:
    """The case row, locked until commit, refused if signed off.

    Every change in a case takes this lock first (PostgreSQL: SELECT ... FOR UPDATE;
    SQLite: the write transaction already holds the database lock), so an edit or
    upload can never slip in beside a sign-off.
    """
    case = session.get(Case, case_id, with_for_update=True, populate_existing=True)
    if case is None:
        raise ReviewError(f"no case {case_id}", status=404)
    _open_case(case)
    return case


def check_version(kind: str, current: int, sent: int, who: User | None) -> None:
    if current != sent:
        by = f" by {who.username}" if who else ""
        raise ReviewError(f"this {kind} was changed{by} since you loaded it (your version "
                          f"{sent}, now {current}); your edit was not applied - reload and "
                          "check before changing it again", status=409)


def set_target(session: Session, user: User, case_id: int, target: int, revision: int) -> Case:
    case = load_case(session, case_id, lock=True)
    _open_case(case)
    _check_target(target)
    check_version("case", case.revision, revision, None)
    before = {"target_count": case.target_count}
    case.target_count = target
    session.flush()
    audit(session, case, user, "set_target", before=before, after={"target_count": target})
    return case


def checked_reason(reason: str | None) -> str | None:
    """A reason as stored: stripped, None if blank; refused (422) if too long, or if it
    holds what a database cannot store (a NUL: PostgreSQL; a lone surrogate, valid in
    JSON: UTF-8)."""
    reason = (reason or "").strip() or None
    if reason is not None and len(reason) > REASON_MAX:
        raise ReviewError(f"the reason is too long (at most {REASON_MAX} characters)",
                          status=422)
    if reason is not None and ("\x00" in reason or not _encodes(reason)):
        raise ReviewError("the reason holds a character that is not text (NUL or a lone "
                          "surrogate)", status=422)
    return reason


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def reopen(session: Session, user: User, case_id: int, revision: int,
           reason: str | None) -> Case:
    """Unlock a signed case to amend it: a reviewer, with a reason. The earlier sign-off
    stays in the audit trail; the next sign-off issues an amended report."""
    if user.role != Role.REVIEWER:
        raise ReviewError(f"only a reviewer reopens a signed case (you are a {user.role})",
                          status=403)
    reason = checked_reason(reason)
    case = load_case(session, case_id, lock=True)
    if case.status != CaseStatus.SIGNED:
        raise ReviewError(f"case {case.accession} is not signed off: nothing to reopen",
                          status=409)
    check_version("case", case.revision, revision, None)
    if reason is None:
        raise ReviewError("a reason is required to reopen a signed case", status=422)
    before = {"status": case.status, "signed_by": case.signed_by.username
              if case.signed_by else None,
              "signed_at": case.signed_at.isoformat() if case.signed_at else None,
              "sign_off_reason": case.sign_off_reason, "amendments": case.amendments}
    case.status, case.signed_at, case.signed_by_id = CaseStatus.OPEN, None, None
    case.sign_off_reason, case.amend_reason = None, reason
    case.amendments += 1
    session.flush()
    audit(session, case, user, "reopen", before=before,
          after={"status": CaseStatus.OPEN, "reason": reason, "amendments": case.amendments})
    return case


def sign_off(session: Session, user: User, case_id: int, revision: int,
             reason: str | None = None) -> Case:
    """Lock the case: only a reviewer, only as seen (revision), only when every cell is named;
    below the target, with unreviewed cells or failed fields, only with a written reason.
    Excluded fields are left out of every count and listed in the audited check."""
    if user.role != Role.REVIEWER:
        raise ReviewError(f"only a reviewer signs off (you are a {user.role})", status=403)
    reason = checked_reason(reason)
    case = load_case(session, case_id, lock=True)
    _open_case(case)
    check_version("case", case.revision, revision, None)
    pending = [f for f in case.fields if f.status in (FieldStatus.QUEUED, FieldStatus.ANALYSING)]
    if pending:
        raise ReviewError(f"{len(pending)} field(s) are still being analysed", status=409)
    summary = differential(case)
    if summary.counted == 0:
        raise ReviewError("no white cells counted: nothing to sign off", status=409)
    if summary.unidentified:
        raise ReviewError(f"{summary.unidentified} cell(s) are still unidentified: classify "
                          "each one (or mark it X, not a white cell) before signing off",
                          status=409)
    check = sign_off_check(summary)
    if check.reason_required and reason is None:
        raise ReviewError(f"{', '.join(check.problems)}: a reason is required to sign off",
                          status=422)
    case.status, case.signed_at, case.signed_by_id = CaseStatus.SIGNED, utcnow(), user.id
    case.sign_off_reason = reason
    session.flush()
    audit(session, case, user, "sign_off", before={"status": CaseStatus.OPEN},
          after={"status": CaseStatus.SIGNED, "differential": summary.to_dict(),
                 "check": check.to_dict(), "reason": reason,
                 "amendment": case.amendments})
    return case
