"""The one image loader: every image leukodiff reads goes through here (and the one
box drawer, `annotate`, for what `analyze` and `evaluate detector` save).

It turns whatever a user or a data set hands us (EXIF-rotated JPEG, grayscale,
palette, RGBA, 16-bit PNG/TIFF) into 8-bit RGB, and turns every way a file can
be bad into an `ImageError` with a message that names the file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

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


# --- colour ----------------------------------------------------------------------------------

_XYZ_FROM_RGB = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                          [0.0193, 0.1192, 0.9505]])
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 1], shape (..., 3)."""
    return _lab_of_linear(np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92))


def srgb8_to_lab(pixels: np.ndarray) -> np.ndarray:
    """`srgb_to_lab` of 8-bit pixels (..., 3), to the last bit, with the sRGB curve read from
    a table of its 256 values instead of a power per pixel (half the time of a field)."""
    return _lab_of_linear(_LINEAR64[np.asarray(pixels, dtype=np.uint8)])


def srgb8_lightness(pixels: np.ndarray) -> np.ndarray:
    """CIELAB L* of 8-bit pixels (..., 3) alone: `srgb8_to_lab`'s first channel at a third
    of its cost (L* depends on luminance only)."""
    return 116 * _lab_f(_LINEAR64[np.asarray(pixels, dtype=np.uint8)] @ _XYZ_FROM_RGB[1]) - 16


def _lab_f(t: np.ndarray) -> np.ndarray:
    """CIELAB's companding of X/Xn, Y/Yn, Z/Zn: a cube root, linear near black."""
    return np.where(t > 216 / 24389, np.cbrt(t), (24389 / 27 * t + 16) / 116)


def _lab_of_linear(linear: np.ndarray) -> np.ndarray:
    f = _lab_f(linear @ _XYZ_FROM_RGB.T / _WHITE)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (clipped) of CIELAB (D65) values, shape (..., 3)."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f**3, (116 * f - 16) * 27 / 24389) * _WHITE
    linear = np.clip(xyz @ np.linalg.inv(_XYZ_FROM_RGB).T, 0, 1)
    rgb = np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return np.clip(rgb, 0, 1)


# Reinhard et al. 2001 colour transfer to one look: each CIELAB channel of a cell crop is
# given this mean and standard deviation. The values are the mean over PBC and BCCD cell
# crops (2.6 x the cell's box, 128 px) of their own statistics, so a crop from those labs
# barely changes, and one from a pinker, bluer, darker or flatter lab is brought to their
# look. (Measuring only around the cell, so its own colour stays out of the statistics,
# was worse when one lab was left out: experiments/labs_level2_augmentation.py.)
STAIN_MEAN = np.array([76.1, 8.5, 2.3])
STAIN_STD = np.array([12.3, 9.4, 13.6])
STAIN_NORMALISATIONS = ("none", "reinhard")


def normalise_stain(pixels: np.ndarray, method: str = "reinhard") -> np.ndarray:
    """An 8-bit RGB image (H, W, 3) with its colour statistics set to the reference
    (`method` "reinhard"), or as it is ("none"). Used on each cell crop, at training and
    at analysis alike, so a lab's lamp, stain and camera weigh less on the type.

    `srgb_to_lab` and `lab_to_srgb` in float32 with tables for the sRGB curve, channels
    first: ~0.6 ms for a 128 px crop (3x the plain formulas; within 1 grey level of them).
    """
    if method == "none":
        return pixels
    if method not in STAIN_NORMALISATIONS:
        raise ValueError(f"unknown stain normalisation {method!r}; choose one of "
                         f"{', '.join(STAIN_NORMALISATIONS)}")
    pixels = np.asarray(pixels, dtype=np.uint8)
    xyz = _TO_XYZ @ _LINEAR[pixels].reshape(-1, 3).T  # (3, N), divided by the white point
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    lab = np.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])
    mean = lab.mean(axis=1, keepdims=True)
    std = np.sqrt(np.mean((lab - mean) ** 2, axis=1, keepdims=True))
    lab = (lab - mean) * (_STD / np.maximum(std, 1e-3)) + _MEAN
    fy = (lab[0] + 16) / 116
    f = np.stack([fy + lab[1] / 500, fy, fy - lab[2] / 200])
    linear = np.clip(_FROM_XYZ @ np.where(f > 6 / 29, f**3, (116 * f - 16) * 27 / 24389), 0, 1)
    index = np.minimum((linear * _LEVELS).astype(np.int32), _LEVELS - 1)
    return _SRGB8[index].T.reshape(pixels.shape)


_GREY = np.arange(256) / 255
_LINEAR64 = np.where(_GREY > 0.04045, ((_GREY + 0.055) / 1.055) ** 2.4, _GREY / 12.92)
_LINEAR = _LINEAR64.astype(np.float32)
_TO_XYZ = (_XYZ_FROM_RGB / _WHITE[:, None]).astype(np.float32)
_FROM_XYZ = (np.linalg.inv(_XYZ_FROM_RGB) * _WHITE[None, :]).astype(np.float32)
_LEVELS = 1 << 14  # linear light -> 8-bit sRGB by a table of this many steps
_STEPS = (np.arange(_LEVELS) + 0.5) / _LEVELS
_SRGB8 = np.round(255 * np.where(_STEPS > 0.0031308, 1.055 * _STEPS ** (1 / 2.4) - 0.055,
                                 12.92 * _STEPS)).astype(np.uint8)
_MEAN = STAIN_MEAN.astype(np.float32)[:, None]
_STD = STAIN_STD.astype(np.float32)[:, None]


@dataclass(frozen=True)
class Mark:
    """A box to draw: corners (x0, y0, x1, y1), its tag and colour; `line` 0 scales the
    outline with the image. The truth beside the answers: a thin `line=1`, tagged `below`
    the box so that the answer's tag above it stays readable."""

    box: Sequence[float]
    text: str
    colour: tuple[int, int, int]
    line: int = 0
    below: bool = False


def annotate(image: Image.Image, marks: Iterable[Mark]) -> Image.Image:
    """A copy of `image` with each mark's box outlined in its colour and its tag on a
    filled label above the box (readable on any smear)."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    scaled = max(2, round(min(canvas.size) / 200))
    font = ImageFont.load_default(size=max(12, round(min(canvas.size) / 30)))
    for mark in marks:
        box = [float(v) for v in mark.box]
        draw.rectangle(box, outline=mark.colour, width=mark.line or scaled)
        x = box[0]
        y = (min(box[3] + 4, canvas.height - font.size - 4) if mark.below
             else max(0, box[1] - font.size - 4))
        left, top, right, bottom = draw.textbbox((x, y), mark.text, font=font)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=mark.colour)
        draw.text((x, y), mark.text, fill=(255, 255, 255), font=font)
    return canvas
