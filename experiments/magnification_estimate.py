"""Can a field's magnification be read off its red cells, so `analyze` could rescale it?

    python experiments/magnification_estimate.py     # ~1 min

Why: `leukodiff evaluate robustness` holds at 0.5-1.4x BCCD's magnification, but the
pipeline collapses beyond the detector's trained scale range (0.5-1.25), measured on
BCCD's 72 test fields (single-WBC cells found / right type / count MAE):
x1.7 57/64, 47, 1.38; x2.0 35/64, 25, 2.25; x2.5 21/64, 14, 4.53 (x0.5: 62/64, 55, 0.10).
A camera with more pixels per cell than BCCD's (~200 px per white cell) is common.
Red cells are ~7.5 um in every lab, so their apparent size gives the scale.

The estimator tried here: threshold the green channel (Otsu; cells are darker than the
background), then the half-width of the radial autocorrelation of that mask, a
correlation length set by the red cells' size whatever their density. Results on 60
BCCD training fields (estimate / enlargement, pixels at native scale): median 24.0 px;
from field to field p10-p90 19.2-28.8 and p5-p95 17.6-30.5, i.e. +-20%; at 0.5x, 24.0
(p10-p90 20-28). The 1.4-3x rows repeat the 1x row by construction (an enlarged field
shrunk to the 400-px working copy is the same copy), so they test nothing: a real higher
magnification shows fewer, sharper cells, which only a second lab's images can test.
It takes ~20 ms per 640x480 field
(FFT on a 400-px copy), too slow for every field (the whole pipeline is 24 ms). Other
estimators were worse: the median inscribed radius at distance-transform peaks (holes
filled) spread 9-32 px per field, because dense smears enclose background gaps
that the hole filling joins into huge blobs.

What shipped instead (src/leukodiff/pipeline/scale.py, same day): the same measure at
full resolution in up to 4 windows of 512 px (a shrunk copy makes a larger frame look
coarser: 2x2 mosaics of native fields read 1.25x at the median), run only on frames
larger than a field, shrinking those whose cells look over 1.5x BCCD's, with fields of
too few or too many cell pixels left alone. Still to do: validate on a second lab at a
known magnification (BCD's tiles are at about half BCCD's scale, too small to test it).
"""
import glob
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path("../shared/data/bccd/BCCD")


def otsu_mask(image: Image.Image) -> np.ndarray:
    green = np.asarray(image.convert("RGB"))[..., 1]
    hist = np.bincount(green.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return (green <= int(np.argmax(between))).astype(np.float32)


def correlation_length(image: Image.Image, work: int = 400) -> float:
    """Half-width (pixels of `image`) of the radial autocorrelation of the cell mask."""
    factor = min(1.0, work / max(image.size))
    if factor < 1:
        image = image.resize((round(image.width * factor), round(image.height * factor)),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
    mask = otsu_mask(image)
    centred = mask - mask.mean()
    h, w = centred.shape
    power = np.abs(np.fft.rfft2(centred, s=(2 * h, 2 * w))) ** 2
    auto = np.fft.fftshift(np.fft.irfft2(power, s=(2 * h, 2 * w)))
    auto /= auto.max()
    yy, xx = np.indices(auto.shape)
    radius = np.hypot(yy - h, xx - w).astype(np.int64).ravel()
    profile = np.bincount(radius, auto.ravel()) / np.maximum(np.bincount(radius), 1)
    return int(np.argmax(profile < 0.5)) / factor


train = set((DATA / "ImageSets" / "Main" / "train.txt").read_text().split())
fields = [Image.open(f).convert("RGB") for f in sorted(glob.glob(str(DATA / "JPEGImages/*.jpg")))
          if Path(f).stem in train][:60]
for zoom in (0.5, 1.0, 1.4, 2.0, 3.0):
    estimates = np.array([correlation_length(field if zoom == 1 else field.resize(
        (round(640 * zoom), round(480 * zoom)), Image.Resampling.BILINEAR))
        for field in fields]) / zoom
    print(f"x{zoom}: median {np.median(estimates):.1f} px, p5/p10/p90/p95 "
          f"{np.percentile(estimates, [5, 10, 90, 95]).round(1).tolist()}")
