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


DATABASE_FILE = "leukodiff.sqlite3"  # in the data dir, unless a database URL is given

@dataclass
class Settings:
    """Paths, database and limits of one server; `data_dir` holds the SQLite file and images."""

    data_dir: Path
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
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / DATABASE_FILE}"

    def prepare(self) -> None:
        """Create the data folders and the session-signing key (kept across restarts)."""
        try:
            for folder in (self.data_dir, self.blob_dir, self.cache_dir, self.data_dir / "tmp"):
                folder.mkdir(parents=True, exist_ok=True)
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


def _load_or_create_key(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(48)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key)
    return key
