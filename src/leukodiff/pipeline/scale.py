"""How large the cells of a frame are, relative to the fields the detector learned on.

Red cells are ~7.5 um across in every lab, so how large they look says how many
pixels a micrometre spans. The measure: threshold the green channel (cells are darker
than the background; Otsu), then the half-width of the mask's radial autocorrelation,
a correlation length set by the red cells' size whatever their density. It is
measured at full resolution in up to 4 windows of `WINDOW` pixels a side: on a
shrunk copy, a larger frame would look coarser and give a longer length.

On BCCD's 205 training fields it is 18.2 px at the median, and from field to field
0.80-1.39 times that (p10-p90; p5-p95 0.78-1.48); see also
experiments/magnification_estimate.py. About 7 ms a field, 25 ms for a 4000x3000
frame (one thread; 15 and 110 before the FFT was padded only as far as it reads).
The Analyzer uses it only on frames larger than a field, and only to shrink
frames whose cells look much larger than BCCD's: it would otherwise have to tile a
frame into pieces smaller than its cells, at sizes the detector never saw.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

WINDOW = 512
# Lags the autocorrelation is computed exactly to before falling back to all of them
# (`_half_width`): BCCD's red cells cross half at ~18 px, a field at 4x BCCD's
# magnification at ~75.
LAG_PAD = 128
# `correlation_length` of BCCD's VOC training fields at native size: the median over all
# 205 (tests/test_scale.py recomputes it).
REFERENCE_LENGTH = 18.2
# A frame is measured only when cells and background both cover a fair part of it; a
# field with hardly any red cells (the mask is then the white cell) tells nothing.
MIN_CELL_FRACTION, MAX_CELL_FRACTION = 0.15, 0.85
# Shrink a frame only when its cells look this many times BCCD's size. Chosen on BCCD's
# train+val fields (never the test list): 2x2 mosaics of native fields (stitched scans)
# must count as their fields do (threshold 1.25: 5 of 30 mosaics off by a cell; 1.5: 2,
# as without shrinking), and enlarged fields must keep their cells (283 labelled; found /
# count error at 1.7x: 271 / 0.58, at 2x: 266 / 0.41; without shrinking 252 / 1.31 and
# 171 / 2.34).
SHRINK_ABOVE = 1.5
# The detector's scale in micrometres: red cells are ~7.5 um across, and BCCD's whole,
# round red cells (boxes not cut by the field's edge, sides within 0.8-1.25 of each other:
# 2674 of them) are 104 px at the median (p10-p90 91-118; tests/test_scale.py recomputes
# it), so the detector learnt fields of about 0.072 um a pixel. A whole slide whose file
# gives its microns per pixel is resized to this (`pipeline.wholeslide`).
RED_CELL_MICRONS = 7.5
RED_CELL_PIXELS = 104.0
DETECTOR_MPP = RED_CELL_MICRONS / RED_CELL_PIXELS


def cell_mask(image: Image.Image) -> np.ndarray:
    """Cells (darker than the background in green), by Otsu's threshold."""
    green = np.asarray(image.convert("RGB"))[..., 1]
    counts = np.bincount(green.ravel(), minlength=256).astype(np.float64)
    share = counts / counts.sum()
    below, mean_below = np.cumsum(share), np.cumsum(share * np.arange(256))
    between = (mean_below[-1] * below - mean_below) ** 2 / np.maximum(below * (1 - below),
                                                                      1e-12)
    return green <= int(np.argmax(between))


def _half_width(image: Image.Image) -> float | None:
    """Half-width of one window's cell-mask autocorrelation, in its pixels."""
    mask = cell_mask(image).astype(np.float32)
    if not MIN_CELL_FRACTION <= mask.mean() <= MAX_CELL_FRACTION:
        return None
    centred = mask - mask.mean()
    height, width = centred.shape
    # Zero-padding by `pad` makes the FFT's circular correlation the linear one at every
    # lag up to `pad`, all the half-width reads when it falls below it (red cells of any
    # field-sized view cross half well inside LAG_PAD); otherwise the window is padded to
    # twice its size, every lag exact.
    pad = min(LAG_PAD, height, width)
    for rows, columns, exact_below in ((height + pad, width + pad, pad),
                                       (2 * height, 2 * width, None)):
        power = np.abs(np.fft.rfft2(centred, s=(rows, columns))) ** 2
        auto = np.fft.irfft2(power, s=(rows, columns))  # lag (0, 0) at index (0, 0)
        auto /= auto.max()
        radius, counts = _lag_radii(rows, columns)
        profile = np.bincount(radius, auto.ravel()) / counts
        after = int(np.argmax(profile < 0.5))  # first radius below half; profile[0] is 1
        if after > 0 and (exact_below is None or after < exact_below):
            return float(after - 1 + (profile[after - 1] - 0.5)
                         / (profile[after - 1] - profile[after]))
    return None  # never below half (cannot happen for a centred mask; kept safe)


@lru_cache(maxsize=8)
def _lag_radii(rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """For an FFT autocorrelation of this shape (unshifted: lag 0 at index 0, negative lags
    wrapped to the end), each element's lag length in whole pixels, and how many elements
    each length has (at least 1). The same for every window of a size: computed once
    (half the cost of a window otherwise)."""
    lag_rows = np.fft.ifftshift(np.arange(rows) - rows // 2)
    lag_columns = np.fft.ifftshift(np.arange(columns) - columns // 2)
    radius = np.hypot(lag_rows[:, None], lag_columns[None, :]).astype(np.int64).ravel()
    return radius, np.maximum(np.bincount(radius), 1)


def correlation_length(image: Image.Image) -> float | None:
    """Cell correlation length in pixels of `image`: the median over up to 4 windows of
    WINDOW pixels a side at full resolution (so a frame's size does not change it);
    None when no window has enough cell and background pixels to tell."""
    columns = max(1, min(2, image.width // WINDOW))
    rows = max(1, min(2, image.height // WINDOW))
    lengths = []
    for row in range(rows):
        for column in range(columns):
            left = round((column + 0.5) * image.width / columns - WINDOW / 2)
            top = round((row + 0.5) * image.height / rows - WINDOW / 2)
            left, top = max(0, left), max(0, top)
            window = image.crop((left, top, min(image.width, left + WINDOW),
                                 min(image.height, top + WINDOW)))
            if (length := _half_width(window)) is not None:
                lengths.append(length)
    return float(np.median(lengths)) if lengths else None


def cell_size_ratio(image: Image.Image) -> float | None:
    """How many times larger the cells look than in BCCD's fields (None: cannot tell)."""
    length = correlation_length(image)
    return None if length is None else length / REFERENCE_LENGTH
