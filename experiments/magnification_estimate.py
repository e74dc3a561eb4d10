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
BCCD training fields (estimate / enlargement, pixels at native scale): median 23.0 px;
from field to field p10-p90 18.6-27.7 and p5-p95 17.0-30.5, i.e. +-20%; at 0.5x, 23.1
(p10-p90 18.4-27.5). The 1.4-3x rows repeat the 1x row by construction (an enlarged field
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

from leukodiff.pipeline.scale import _half_width

DATA = Path("../shared/data/bccd/BCCD")


def correlation_length(image: Image.Image, work: int = 400) -> float:
    """The shipped measure (pipeline.scale) on a copy shrunk to `work` pixels a side, in
    pixels of `image`: the variant tried first."""
    factor = min(1.0, work / max(image.size))
    if factor < 1:
        image = image.resize((round(image.width * factor), round(image.height * factor)),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
    return _half_width(image) / factor


train = set((DATA / "ImageSets" / "Main" / "train.txt").read_text().split())
fields = [Image.open(f).convert("RGB") for f in sorted(glob.glob(str(DATA / "JPEGImages/*.jpg")))
          if Path(f).stem in train][:60]
for zoom in (0.5, 1.0, 1.4, 2.0, 3.0):
    estimates = np.array([correlation_length(field if zoom == 1 else field.resize(
        (round(640 * zoom), round(480 * zoom)), Image.Resampling.BILINEAR))
        for field in fields]) / zoom
    print(f"x{zoom}: median {np.median(estimates):.1f} px, p5/p10/p90/p95 "
          f"{np.percentile(estimates, [5, 10, 90, 95]).round(1).tolist()}")
