"""Uploaded images: checked by content, stored once under their sha256, never overwritten.

A user's filename is only ever a label shown back to them; files on disk are
named by the server (a random temporary name, then the content hash). Every file and
folder made here is its owner's alone (0600 / 0400 files, 0700 folders), whatever the umask.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image as PILImage

from leukodiff.imaging import MAX_PIXELS, ImageError, load_image, probe_image
from leukodiff.server.settings import PRIVATE_FILE, private_dir

# Formats a camera or slide scanner writes; checked on the decoded content, not the name.
ALLOWED_FORMATS = {"JPEG", "PNG", "TIFF", "BMP", "WEBP"}
CHUNK = 1024 * 1024


class UploadError(ValueError):
    """An upload refused, with the reason shown to the user."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    size_bytes: int
    format: str
    width: int
    height: int


def display_name(filename: str | None) -> str:
    """The last path part of a client's filename, printable and short: a label, never a path."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:200] or "unnamed"


class BlobStore:
    """Content-addressed files: `root/ab/abcdef...` holds the bytes whose sha256 is abcdef..."""

    def __init__(self, root: Path, tmp: Path, max_pixels: int = MAX_PIXELS) -> None:
        self.root, self.tmp = root, tmp
        self.max_pixels = max_pixels  # judged from the header, before any pixel is decoded

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def receive(self, stream: BinaryIO, max_bytes: int) -> StoredImage:
        """Copy an upload to a temporary file (bounded), check it is a whole image, keep it."""
        tmp_path = self.tmp / f"upload-{secrets.token_hex(16)}"
        try:
            digest, size = self._copy_bounded(stream, tmp_path, max_bytes)
            stored = self._check(tmp_path, digest, size)
            self._keep(tmp_path, self.path(digest))
            return stored
        finally:
            tmp_path.unlink(missing_ok=True)

    @staticmethod
    def _copy_bounded(stream: BinaryIO, target: Path, max_bytes: int) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        os.fchmod(descriptor, PRIVATE_FILE)
        with os.fdopen(descriptor, "wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise UploadError(f"file is larger than the {max_bytes // (1024 * 1024)} MB "
                                      "limit", status=413)
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise UploadError("empty file (0 bytes)")
        return digest.hexdigest(), size

    def _check(self, path: Path, digest: str, size: int) -> StoredImage:
        pixels = 0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PILImage.DecompressionBombWarning)
                with PILImage.open(path) as image:  # reads the header only
                    kind, pixels = image.format, image.width * image.height
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
            kind, pixels = "too large", self.max_pixels + 1
        except OSError:
            kind = None
        if pixels > self.max_pixels:  # a small file can declare a huge, memory-filling image
            raise UploadError(f"image too large: over {self.max_pixels:,} pixels", status=413)
        if kind not in ALLOWED_FORMATS:
            raise UploadError("not an image leukodiff accepts (JPEG, PNG, TIFF, BMP or WebP, "
                              "judged by the file's content)", status=415)
        try:
            info = probe_image(path)  # decodes every byte: truncated or corrupt files fail here
        except ImageError as error:
            raise UploadError(str(error).removeprefix(f"{path}: ")) from None
        return StoredImage(digest, size, kind, info.width, info.height)

    @staticmethod
    def _keep(tmp_path: Path, final: Path) -> None:
        """Link the checked file into place; an existing blob (same bytes) is left untouched."""
        private_dir(final.parent)
        try:
            os.link(tmp_path, final)  # atomic, and fails rather than overwrite
        except FileExistsError:
            return
        os.chmod(final, 0o400)


class ViewCache:
    """Upright 8-bit RGB JPEG renderings of stored images, for browsers (EXIF, TIFF, 16-bit)."""

    def __init__(self, store: BlobStore, root: Path) -> None:
        self.store, self.root = store, root

    def image(self, sha256: str) -> PILImage.Image:
        """The image as the analyzer sees it (upright RGB)."""
        return load_image(self.store.path(sha256))

    def view_path(self, sha256: str) -> Path:
        target = self.root / f"{sha256}.jpg"
        if not target.exists():
            tmp = self.root / f".{sha256}.{secrets.token_hex(4)}.tmp"
            descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
            os.fchmod(descriptor, PRIVATE_FILE)
            try:
                with os.fdopen(descriptor, "wb") as out:
                    self.image(sha256).save(out, format="JPEG", quality=90)
                os.replace(tmp, target)  # derived data: replacing an identical one is harmless
            finally:
                tmp.unlink(missing_ok=True)  # gone after the replace; a failed save's leftover
        return target
