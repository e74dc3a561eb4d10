"""Does an image look like the labs the models learnt from? The honest warning.

On a lab it never saw, leukodiff can call red-cell clusters white cells at 0.99
confidence; its confidences say nothing there. What does differ, before any
network runs, is how the image looks: the background's colour (the lamp, white
balance), the stain's colours, the contrast, and how large the red cells are
(magnification; `pipeline.scale`). Each of those is measured per image
(`image_features`, ~30 ms), and a `Familiarity` reference holds their mean and
covariance for each lab the models trained on. An image's score is its smallest
Mahalanobis distance to a training lab; above the threshold (set so that about
1 in 50 of the training labs' own held-out fields pass it), the image is
"unlike the training labs", and `analyze` and the station say so: review every
cell. Plain numpy, so inference-only installs have it too.

The reference is fitted by `leukodiff train familiarity` on the training labs'
train parts (threshold from their validation parts) and shipped beside the
detector as `detector.familiarity.json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from leukodiff.imaging import srgb8_lightness, srgb8_to_lab
from leukodiff.pipeline.scale import correlation_length

FEATURES = ("background L", "background a", "background b", "stain L", "stain a", "stain b",
            "red cells a", "red cells b", "contrast", "red-cell size")
# 20 x log(red-cell correlation length): a 1.5x magnification moves it by 8, as much as a
# clear change of background colour moves a or b.
SIZE_UNITS = 20.0
# Share of the training labs' held-out fields the threshold lets through as "unlike".
FALSE_ALARM = 0.02
# Shrinkage of each lab's covariance towards its diagonal, and a floor on every variance
# (in squared feature units), so a lab of a few dozen similar fields is not so tight that
# any new slide of the same lab looks foreign.
SHRINK, VARIANCE_FLOOR = 0.2, 1.0
SIDE = 480  # features are read on a copy whose longer side is this (speed, and camera size)


def image_features(image: Image.Image) -> np.ndarray:
    """The image's look, as the FEATURES vector (CIELAB medians of its brightest quarter,
    darkest 2% and middle band of pixels; lightness spread; red-cell correlation length in
    full-resolution pixels, SIZE_UNITS x log, NaN when it cannot be measured)."""
    rgb_image = image.convert("RGB")
    length = correlation_length(rgb_image)
    scale = SIDE / max(rgb_image.size)
    if scale < 1:
        rgb_image = rgb_image.resize((max(1, round(rgb_image.width * scale)),
                                      max(1, round(rgb_image.height * scale))),
                                     Image.Resampling.BILINEAR, reducing_gap=2.0)
    pixels = np.asarray(rgb_image).reshape(-1, 3)
    lightness = srgb8_lightness(pixels)  # colour only where a median needs it: 3/5 of them
    low, q5, q30, q60, high, q95 = np.percentile(lightness, [2, 5, 30, 60, 75, 95])
    background = np.median(srgb8_to_lab(pixels[lightness >= high]), axis=0)
    stain = np.median(srgb8_to_lab(pixels[lightness <= low]), axis=0)
    middle = np.median(srgb8_to_lab(pixels[(lightness >= q30) & (lightness <= q60)])[:, 1:],
                       axis=0)
    spread = float(q95 - q5)
    return np.array([*background, *stain, *middle, spread,
                     SIZE_UNITS * np.log(length) if length else np.nan])


@dataclass(frozen=True)
class LabReference:
    name: str
    fields: int
    mean: list[float]
    inverse_covariance: list[list[float]]


@dataclass(frozen=True)
class Familiarity:
    """Per-lab feature statistics and the distance above which an image is unfamiliar."""

    labs: tuple[LabReference, ...]
    threshold: float
    features: tuple[str, ...] = FEATURES

    @classmethod
    def fit(cls, train: Mapping[str, np.ndarray], held_out: Sequence[np.ndarray],
            false_alarm: float = FALSE_ALARM) -> Familiarity:
        """Reference from each lab's training features (rows = images); the threshold is
        the (1 - false_alarm) quantile of the scores of the labs' held-out images."""
        labs = []
        for name, rows in sorted(train.items()):
            rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
            if len(rows) < 2:
                raise ValueError(f"lab {name!r}: at least 2 images are needed, got {len(rows)}")
            mean = np.nanmean(rows, axis=0)
            covariance = np.cov(_fill(rows, mean), rowvar=False)
            covariance = (1 - SHRINK) * covariance + SHRINK * np.diag(np.diag(covariance))
            covariance += VARIANCE_FLOOR * np.eye(len(mean))
            labs.append(LabReference(name, len(rows), mean.tolist(),
                                     np.linalg.inv(covariance).tolist()))
        unfitted = cls(tuple(labs), threshold=np.inf)
        scores = unfitted.scores(np.concatenate([np.atleast_2d(h) for h in held_out]))
        return cls(tuple(labs), float(np.quantile(scores, 1 - false_alarm)))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Smallest Mahalanobis distance of each row to a training lab."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        distances = []
        for lab in self.labs:
            mean = np.asarray(lab.mean)
            delta = _fill(features, mean) - mean
            inverse = np.asarray(lab.inverse_covariance)
            distances.append(np.sqrt(np.einsum("ij,jk,ik->i", delta, inverse, delta)))
        return np.min(distances, axis=0)

    def score(self, image: Image.Image) -> float:
        return float(self.scores(image_features(image))[0])

    def to_dict(self) -> dict:
        return {"features": list(self.features), "threshold": self.threshold,
                "false_alarm": FALSE_ALARM, "labs": [asdict(lab) for lab in self.labs]}

    @classmethod
    def from_dict(cls, data: dict) -> Familiarity:
        if tuple(data["features"]) != FEATURES:
            raise ValueError("familiarity reference made for other features; refit it with "
                             "`leukodiff train familiarity`")
        return cls(tuple(LabReference(**lab) for lab in data["labs"]), float(data["threshold"]))

    def save(self, path: Path, provenance: dict | None = None) -> Path:
        path.write_text(json.dumps({**self.to_dict(), **(provenance or {})}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Familiarity:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _fill(rows: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Unmeasurable features (NaN: no red-cell size) count as the lab's mean: no evidence."""
    rows = np.array(rows, dtype=np.float64)
    if mean is not None:
        missing = np.isnan(rows)
        rows[missing] = np.broadcast_to(mean, rows.shape)[missing]
    return rows


def familiarity_path(detector_weights: Path) -> Path:
    """Where a detector's familiarity reference lives: beside it."""
    return detector_weights.with_name(detector_weights.stem.split(".")[0]
                                      + ".familiarity.json")
