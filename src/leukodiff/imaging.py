"""The one image loader: every image leukodiff reads goes through here.

It turns whatever a user or a data set hands us (EXIF-rotated JPEG, grayscale,
palette, RGBA, 16-bit PNG/TIFF) into 8-bit RGB, and turns every way a file can
be bad into an `ImageError` with a message that names the file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A 4000x3000 camera frame is 12 MP; stitched scans go much larger. Beyond this
# we refuse rather than exhaust memory (PIL's own bomb check is 89 MP).
MAX_PIXELS = 400_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """An image that cannot be used, with the reason."""


@dataclass(frozen=True)
class ImageInfo:
    """What a quick, full check of an image file found."""

    path: Path
    width: int
    height: int
    sha256: str


def _open(path: Path, data: bytes) -> Image.Image:
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: image too large (over {MAX_PIXELS:,} pixels)") from None
    except OSError as error:
        raise ImageError(f"{path}: unreadable image ({error})") from None
    return image


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except OSError as error:
        raise ImageError(f"{path}: cannot read ({error.strerror})") from None


def _decode(path: Path, image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # truncated / corrupt data
        raise ImageError(f"{path}: corrupt or truncated image ({error})") from None


def probe_image(path: str | Path) -> ImageInfo:
    """Check that an image decodes completely; return its size and content hash.

    JPEGs are decoded at 1/8 scale (DCT scaling), which still reads every byte,
    so checking thousands of files costs seconds, not minutes.
    """
    path = Path(path)
    data = _read(path)
    image = _open(path, data)
    width, height = image.size
    if image.format == "JPEG":
        image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
    _decode(path, image)
    orientation = image.getexif().get(0x0112, 1)
    if orientation in (5, 6, 7, 8):  # EXIF says the stored pixels are rotated 90 degrees
        width, height = height, width
    return ImageInfo(path, width, height, hashlib.sha256(data).hexdigest())


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit and float data are rescaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = array.max()
        if high > 255:  # 16-bit (or wider) data: use its full range
            full_scale = 65535.0 if high <= 65535 else high
            array = array * (255.0 / full_scale)
        image = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # slide background
        image = Image.alpha_composite(background, rgba)
    if image.mode == "RGB" and image.getbands() == ("R", "G", "B"):
        return image
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as upright 8-bit RGB, or raise `ImageError` saying why not."""
    path = Path(path)
    image = _open(path, _read(path))
    _decode(path, image)
    return to_rgb(ImageOps.exif_transpose(image))
