"""What one review-station instance needs to know: where its data lives and its limits."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

# A 12 MP camera JPEG is ~5 MB; a lossless TIFF of a stitched field can be larger.
DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_FILES_PER_REQUEST = 50
# A field from a 20 MP camera is far below this; decoding 100 MP already takes ~300 MB of RGB
# (the Analyzer needs four times that as float32), so larger images are refused by their header.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# The session-signing key: shorter than this is a truncated key file or a placeholder.
MIN_SECRET_KEY = 32


class SettingsError(ValueError):
    """A data directory or database setting that cannot be used."""


DEFAULT_DATA_DIR = Path("leukodiff-data")  # beside where the station is started
DATABASE_FILE = "leukodiff.sqlite3"  # in the data dir, unless a database URL is given
# Everything the station makes in its data dir is its owner's alone (password hashes,
# patient images), whatever the umask: set explicitly after creation.
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


@dataclass(frozen=True)
class Listening:
    """Where `leukodiff serve` listens: uvicorn's address and the proxies it trusts (the
    station itself does not need them)."""

    host: str = "127.0.0.1"  # this machine only; 0.0.0.0: every network
    port: int = 8000
    # Proxies whose X-Forwarded-For names the real client (comma-separated addresses).
    forwarded_allow_ips: str = "127.0.0.1"


@dataclass
class Settings:
    """Paths, database and limits of one server; `data_dir` holds the SQLite file and images."""

    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str | None = None  # None: SQLite file data_dir/DATABASE_FILE
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_files_per_request: int = DEFAULT_MAX_FILES_PER_REQUEST
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    secure_cookies: bool = False  # True behind HTTPS: cookies are then never sent over plain HTTP
    session_hours: float = 12.0
    # Failed sign-ins allowed per account in the window before tries are refused (429).
    login_max_failures: int = 5
    login_window_minutes: float = 15.0
    secret_key: str | None = field(default=None, repr=False)  # None: data_dir/secret_key
    # Where the adapt job finds the base models' own training data to replay (None: the
    # usual data roots, `data.root.data_roots`); a set missing there is left out, and said.
    data_root: Path | None = None
    # The adapt job's configuration (`adapt_job.AdaptJobConfig`: level-2 and detector
    # overrides, detector on/off); None: the library's defaults, as `leukodiff adapt`.
    adapt_job: dict | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def cache_dir(self) -> Path:
        """Derived files (upright JPEG views); safe to delete, rebuilt on demand."""
        return self.data_dir / "cache"

    @property
    def models_dir(self) -> Path:
        """Model sets adapted from the station's signed cases, one folder each (written
        once, never overwritten or deleted)."""
        return self.data_dir / "models"

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / DATABASE_FILE}"

    def prepare(self) -> None:
        """Create the data folders, the SQLite file and the session-signing key (kept across
        restarts), all private to the server's user (0700 folders, 0600 files)."""
        try:
            created = not self.data_dir.exists()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if created:  # a folder given to us that already existed keeps its mode
                os.chmod(self.data_dir, PRIVATE_DIR)
            for folder in (self.blob_dir, self.cache_dir, self.data_dir / "tmp",
                           self.models_dir):
                private_dir(folder)
            if self.database_url is None:
                self._private_database()
        except OSError as error:
            raise SettingsError(
                f"data dir {self.data_dir}: cannot create ({error.strerror})") from None
        source = "secret_key setting"
        if self.secret_key is None:
            self.secret_key = _load_or_create_key(self.data_dir / "secret_key")
            source = str(self.data_dir / "secret_key")
        if len(self.secret_key) < MIN_SECRET_KEY:  # an empty key would let anyone sign cookies
            raise SettingsError(f"{source}: session key shorter than {MIN_SECRET_KEY} "
                                "characters; delete the file to have a new one made")

    def _private_database(self) -> None:
        """The SQLite file made 0600 before SQLite opens it: SQLite gives its -wal and -shm
        files the database file's mode. Files of an older, laxer station are tightened."""
        database = self.data_dir / DATABASE_FILE
        os.close(os.open(database, os.O_RDONLY | os.O_CREAT, PRIVATE_FILE))  # empty: valid
        for path in (database, *(database.with_name(database.name + suffix)
                                 for suffix in ("-wal", "-shm", "-journal"))):
            if path.exists():
                os.chmod(path, PRIVATE_FILE)


def private_dir(folder: Path) -> None:
    """`folder` made if missing (with its parents) and set to 0700, whatever the umask."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, PRIVATE_DIR)


def _load_or_create_key(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(48)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    os.fchmod(descriptor, PRIVATE_FILE)  # the umask may have taken bits away, never added
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key)
    return key
