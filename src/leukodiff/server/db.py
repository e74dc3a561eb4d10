"""Database models and the engine: SQLite by default, PostgreSQL by URL; Alembic owns the schema.

Concurrency: every editable row carries a `version` (SQLAlchemy's version_id_col),
so an edit based on a stale read fails instead of silently overwriting; each case
also has a `revision` bumped by every change inside it, which sign-off checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    false,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from leukodiff.taxonomy import NOT_WBC as NOT_WBC  # re-exported: the server's modules
from leukodiff.taxonomy import REVIEW_LABELS
from leukodiff.taxonomy import UNIDENTIFIED as UNIDENTIFIED

MIGRATIONS = Path(__file__).parent / "migrations"
# Every label a reviewed cell may carry, in display order (`taxonomy.REVIEW_CLASSES`); plain
# strings in `cells.label`, so a new class needs no migration.
LABELS = list(REVIEW_LABELS)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Role(StrEnum):
    TECHNOLOGIST = "technologist"
    REVIEWER = "reviewer"
    ADMIN = "admin"


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend.

    SQLite keeps no offset and hands back naive values, which made exported times
    (FHIR `issued` must have an offset) ambiguous; PostgreSQL answers in the
    session's time zone. Both now come back as UTC with its offset.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, _dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, _dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # In every session cookie; raised by signing out, which ends all of the user's sessions.
    session_epoch: Mapped[int] = mapped_column(default=0, server_default="0")
    # Set when an admin (or the command line) chose the password: the next sign-in must
    # choose a new one before anything else (`auth.PASSWORD_CHANGE_PATHS`).
    must_change_password: Mapped[bool] = mapped_column(default=False, server_default=false())
    last_login_at: Mapped[datetime | None] = mapped_column(default=None)


class Image(Base):
    """One stored image file, named by its content (sha256); never changed once written."""

    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CaseStatus(StrEnum):
    OPEN = "open"
    SIGNED = "signed"


class Case(Base):
    """One sample / slide, identified by its accession id."""

    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(primary_key=True)
    accession: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=CaseStatus.OPEN)
    target_count: Mapped[int] = mapped_column(Integer, default=100)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    signed_at: Mapped[datetime | None] = mapped_column(default=None)
    signed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    # Why the reviewer signed short of the target, with unreviewed cells or failed fields.
    sign_off_reason: Mapped[str | None] = mapped_column(Text, default=None)
    # Times a signed case was reopened to amend it; its next sign-off issues an amended report.
    amendments: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    amend_reason: Mapped[str | None] = mapped_column(Text, default=None)  # the latest reopening's
    version: Mapped[int] = mapped_column(Integer, default=1)

    created_by: Mapped[User] = relationship(foreign_keys=[created_by_id])
    signed_by: Mapped[User | None] = relationship(foreign_keys=[signed_by_id])
    fields: Mapped[list[FieldImage]] = relationship(back_populates="case",
                                                    order_by="FieldImage.id")

    __mapper_args__: ClassVar = {"version_id_col": version}


class FieldStatus(StrEnum):
    QUEUED = "queued"
    ANALYSING = "analysing"
    DONE = "done"
    FAILED = "failed"


class FieldImage(Base):
    """A field image of a case, with its analysis state."""

    __tablename__ = "fields"
    __table_args__ = (UniqueConstraint("case_id", "image_sha256", name="uq_field_case_image"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    image_sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256"))
    original_name: Mapped[str] = mapped_column(String(255))  # shown to people, never a path
    status: Mapped[str] = mapped_column(String(16), default=FieldStatus.QUEUED)
    error: Mapped[str | None] = mapped_column(String(500), default=None)
    uploaded_at: Mapped[datetime] = mapped_column(default=utcnow)
    uploaded_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    analysed_at: Mapped[datetime | None] = mapped_column(default=None)
    # distance to the models' training labs (pipeline.familiarity; None: not measured)
    familiarity: Mapped[float | None] = mapped_column(Float, default=None)
    unlike_training: Mapped[bool] = mapped_column(default=False, server_default=false())
    # Excluded by a person (blurred, wrong slide...): out of the differential, counts and
    # exports; its cells and file are kept, and it can be included again. Who: a username
    # (accounts are never renamed or deleted; the audit event holds the id).
    excluded: Mapped[bool] = mapped_column(default=False, server_default=false())
    exclude_reason: Mapped[str | None] = mapped_column(Text, default=None)
    excluded_at: Mapped[datetime | None] = mapped_column(default=None)
    excluded_by: Mapped[str | None] = mapped_column(String(64), default=None)
    # The model set (`model_sets.name`) whose calls the cells carry, and that set's digest
    # (`model_sets.set_digest`: one sha256 over its files' hashes); None: not analysed yet, or
    # analysed before schema 0006 (the shipped models then). `pending_model_set`: the set a
    # queued re-analysis asked for (None: the default set when the analysis starts).
    model_set: Mapped[str | None] = mapped_column(String(64), default=None)
    model_set_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    pending_model_set: Mapped[str | None] = mapped_column(String(64), default=None)

    case: Mapped[Case] = relationship(back_populates="fields")
    image: Mapped[Image] = relationship()
    cells: Mapped[list[CellRecord]] = relationship(back_populates="field",
                                                   order_by="CellRecord.id")


class CellRecord(Base):
    """One cell: the model's call (kept) and the current, possibly corrected, label."""

    __tablename__ = "cells"

    id: Mapped[int] = mapped_column(primary_key=True)
    field_id: Mapped[int] = mapped_column(ForeignKey("fields.id"), index=True)
    x0: Mapped[float] = mapped_column(Float)
    y0: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    origin: Mapped[str] = mapped_column(String(16))  # "model" or "user"
    model_label: Mapped[str | None] = mapped_column(String(32), default=None)
    model_group: Mapped[str | None] = mapped_column(String(32), default=None)
    model_confidence: Mapped[float | None] = mapped_column(Float, default=None)
    probabilities: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    label: Mapped[str] = mapped_column(String(32))
    reviewed: Mapped[bool] = mapped_column(default=False)
    deleted: Mapped[bool] = mapped_column(default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    version: Mapped[int] = mapped_column(Integer, default=1)

    field: Mapped[FieldImage] = relationship(back_populates="cells")
    updated_by: Mapped[User | None] = relationship()

    __mapper_args__: ClassVar = {"version_id_col": version}

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


class ModelSet(Base):
    """A set of the three models the station analyses with: "shipped" (the package's own
    weights, always there) or one adapted from the station's signed cases, whose files live
    in DATA_DIR/models/<name>/ and are never overwritten or deleted. `files`: per role
    (detector, mononuclear, polymorphonuclear) {"set": the set whose folder holds the file,
    "file": its name, "sha256"}: a role not adapted is the base set's file. `figures`: the
    adaptation's before/after on the lab's held-out cases (empty for "shipped")."""

    __tablename__ = "model_sets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(16))  # "shipped" or "adapted"
    base: Mapped[str | None] = mapped_column(String(64), default=None)  # the set it started from
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    sha256: Mapped[str] = mapped_column(String(64))  # `model_sets.set_digest` of `files`
    files: Mapped[dict[str, Any]] = mapped_column()
    figures: Mapped[dict[str, Any]] = mapped_column()
    is_default: Mapped[bool] = mapped_column(default=False, server_default=false())
    retired: Mapped[bool] = mapped_column(default=False, server_default=false())

    created_by: Mapped[User | None] = relationship()


class ModelJob(Base):
    """An "adapt from signed cases" job: its state, progress and outcome (kept)."""

    __tablename__ = "model_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # queued, running, done (a set was made), refused (too little to learn from, or worse:
    # nothing made), failed (an error; see the log)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    base: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str | None] = mapped_column(String(200), default=None)
    log: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"lines": [...]}
    message: Mapped[str | None] = mapped_column(Text, default=None)
    model_set: Mapped[str | None] = mapped_column(String(64), default=None)  # the set made
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)

    started_by: Mapped[User | None] = relationship()


class AuditEvent(Base):
    """Who changed what, when, from what to what; rows are only ever added."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    # None: an account event (the account is in `before` / `after`).
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"), index=True)
    # None: the analyzer, or the command line (account events).
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    action: Mapped[str] = mapped_column(String(32))
    field_id: Mapped[int | None] = mapped_column(default=None)
    cell_id: Mapped[int | None] = mapped_column(default=None)
    before: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    after: Mapped[dict[str, Any] | None] = mapped_column(default=None)

    user: Mapped[User | None] = relationship()


def make_engine(url: str) -> Engine:
    """An engine whose SQLite connections wait for locks instead of failing at once.

    SQLite: WAL lets readers run beside one writer; sessions made for writing begin
    with BEGIN IMMEDIATE so two writers queue on the lock rather than deadlock on
    a read-to-write upgrade.
    """
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                           pool_size=10, max_overflow=30)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get("sqlite_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """The engine plus session factories for reading and for writing."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        # PostgreSQL reads at REPEATABLE READ: the several SELECTs of one request see one
        # snapshot (a case's revision and its fields' progress from the same moment). A
        # read-only transaction never fails to serialise. SQLite's WAL transaction is
        # already one snapshot.
        reader = (self.engine if self.engine.dialect.name == "sqlite"
                  else self.engine.execution_options(isolation_level="REPEATABLE READ"))
        self._read = sessionmaker(reader, expire_on_commit=False)
        writer = self.engine.execution_options(sqlite_write=True)
        self._write = sessionmaker(writer, expire_on_commit=False)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        with self._read() as session:
            yield session

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """A transaction that commits when the block ends and rolls back on any error."""
        with self._write() as session, session.begin():
            yield session

    def migrate(self) -> None:
        """Bring the schema to the newest migration (Alembic `upgrade head`)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def dispose(self) -> None:
        self.engine.dispose()
