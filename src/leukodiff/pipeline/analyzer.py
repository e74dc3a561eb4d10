"""The multi-level pipeline: level 1 finds white cells and their group, level 2 names them.

    analyzer = Analyzer.load()                 # shipped models
    field = analyzer("BloodImage_00001.jpg")   # FieldResult: every cell, box + group + type
    report = analyzer.differential([field, ...])
    field.to_geojson(); field.to_coco(); field.to_pandas()   # for QuPath, COCO tools, pandas

Each box goes to the level-2 model of its group; all crops of one group go in
one batch, and the two group models run concurrently (paper, section 4). Level 2
averages its softmax over each crop's eight orientations (`pipeline.classify`).
Crop geometry and the "unidentified" threshold come from each model's manifest.
The networks run on onnxruntime or torch (`pipeline.backends`); everything
around them is numpy, shared by both, so no torch is needed for inference.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from leukodiff.data.records import Box
from leukodiff.imaging import load_image, to_rgb
from leukodiff.models.files import ModelFileError, resolve
from leukodiff.pipeline.backends import Backend, open_backend
from leukodiff.pipeline.boxes import Detections, agnostic_nms
from leukodiff.pipeline.classify import GroupClassifier
from leukodiff.pipeline.familiarity import Familiarity, familiarity_path
from leukodiff.pipeline.scale import SHRINK_ABOVE, cell_size_ratio
from leukodiff.pipeline.tiling import detect_tiled
from leukodiff.taxonomy import (
    DETECTOR_LABEL_OF,
    GROUP_OF,
    REVIEW_CLASS,
    UNIDENTIFIED,
    CellType,
    Group,
)

if TYPE_CHECKING:
    import pandas

# Each label's colour (RGB) wherever cells are drawn: annotated fields, the HTML report,
# the classification colour in QuPath (`FieldResult.to_geojson`); the review station's
# colours, from the one registry (`taxonomy.REVIEW_CLASSES`).
COLOURS: dict[str, tuple[int, int, int]] = {
    label: REVIEW_CLASS[label].rgb for label in (*(str(t) for t in CellType), UNIDENTIFIED)}
#: COCO category id of each cell label, fixed (files written by one version are read by
#: the next): the five types in `CellType` order, then "unidentified".
COCO_CATEGORY_IDS: dict[str, int] = {
    "lymphocyte": 1,
    "monocyte": 2,
    "neutrophil": 3,
    "eosinophil": 4,
    "basophil": 5,
    UNIDENTIFIED: 6,
}
# The smallest field that can hold a white cell (~12 um) at any useful magnification.
MIN_SIDE = 32
# Bright-field smears have a bright background (BCCD's is ~200/255): a field whose
# brightest 5% stay below this is a dark frame (lamp off, lens cap) or not a bright-field
# image, and the detector, never trained on such images, finds "cells" in it.
MIN_BACKGROUND = 60
# Median difference between horizontally neighbouring gray levels: 0-2 in every image of the
# shared data sets (BCCD, BCD, PBC, KBC), 13 for a BCCD field with Gaussian noise of sigma 20,
# 49 for uniform random pixels, in which the detector "finds" cells.
MAX_ROUGHNESS = 24


class AnalysisError(ValueError):
    """An image that cannot be analysed, with the reason (reported, never a traceback)."""


def coco_categories(category_ids: dict[str, int] | None = None) -> list[dict]:
    """The COCO "categories" list of `category_ids` (default `COCO_CATEGORY_IDS`), the
    supercategory being the type's group ("white cell" for unidentified cells)."""
    category_ids = COCO_CATEGORY_IDS if category_ids is None else category_ids
    types = {str(t) for t in CellType}
    return [{"id": number, "name": label,
             "supercategory": str(GROUP_OF[CellType(label)]) if label in types
             else "white cell"}
            for label, number in sorted(category_ids.items(), key=lambda item: item[1])]


@dataclass(frozen=True)
class CellCall:
    """One white cell: where it is, its group (level 1) and its type (level 2)."""

    box: tuple[float, float, float, float]
    group: Group
    group_confidence: float
    cell_type: CellType | None  # None: below the confidence threshold, "unidentified"
    type_confidence: float
    probabilities: dict[str, float]

    @property
    def label(self) -> str:
        return str(self.cell_type) if self.cell_type else UNIDENTIFIED

    def to_dict(self) -> dict:
        return {**asdict(self), "box": [round(v, 1) for v in self.box], "label": self.label,
                "group": str(self.group),
                "cell_type": str(self.cell_type) if self.cell_type else None}


@dataclass
class FieldResult:
    """All white cells found in one image."""

    image: str
    width: int
    height: int
    cells: list[CellCall] = field(default_factory=list)
    # how far the image looks from the training labs (`pipeline.familiarity`; None: not
    # measured), and whether that is beyond the reference's threshold
    familiarity: float | None = None
    unlike_training: bool = False

    def counts(self) -> Counter:
        return Counter(cell.label for cell in self.cells)

    def to_dict(self) -> dict:
        return {"image": self.image, "width": self.width, "height": self.height,
                "cells": [c.to_dict() for c in self.cells], "counts": dict(self.counts()),
                "familiarity": self.familiarity, "unlike_training": self.unlike_training}

    def to_geojson(self) -> dict:
        """The cells as a GeoJSON FeatureCollection that QuPath (0.4 and later) imports as
        detection objects (File > Import objects, or drop the file on the open image).

        One Feature per cell, in `cells` order: its box as a closed Polygon ring in the
        image's pixels (origin top left, y down; for an EXIF-rotated JPEG, the upright
        image that was analysed). `properties`: "objectType" "detection"; "name" the
        cell's number and label as on the annotated field ("3 neutrophil");
        "classification" {"name": the label, "color": its RGB as in the report};
        "measurements" (numbers only) "Detection score", "Type confidence", "Group" (1
        mononuclear, 2 polymorphonuclear: the detector's class) and "P(<type>)" for each
        type of the cell's group model; "metadata" {"group": the group's name}.
        """
        features = []
        for index, cell in enumerate(self.cells, start=1):
            x0, y0, x1, y1 = (round(float(v), 2) for v in cell.box)
            measurements = {"Detection score": round(cell.group_confidence, 4),
                            "Type confidence": round(cell.type_confidence, 4),
                            "Group": DETECTOR_LABEL_OF[cell.group],
                            **{f"P({name})": round(p, 4)
                               for name, p in cell.probabilities.items()}}
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon",
                             "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1],
                                              [x0, y0]]]},
                "properties": {
                    "objectType": "detection",
                    "name": f"{index} {cell.label}",
                    "classification": {"name": cell.label, "color": list(COLOURS[cell.label])},
                    "measurements": measurements,
                    "metadata": {"group": str(cell.group)},
                },
            })
        return {"type": "FeatureCollection", "features": features}

    def to_coco(self, image_id: int = 1,
                category_ids: dict[str, int] | None = None) -> list[dict]:
        """The cells in COCO's *results* format (what detectors hand to COCO evaluation):
        one {"image_id", "category_id", "bbox": [x, y, width, height], "score"} per cell,
        in `cells` order. `category_ids` maps each label to its category (default:
        `COCO_CATEGORY_IDS`; `coco_categories()` gives the matching "categories" list).
        The box is in the analysed image's pixels, unrounded; "score" is the detection score
        times the type confidence: how sure the pipeline is of a cell *of that type* there.
        """
        category_ids = COCO_CATEGORY_IDS if category_ids is None else category_ids
        results = []
        for cell in self.cells:
            x0, y0, x1, y1 = (float(v) for v in cell.box)
            results.append({"image_id": image_id, "category_id": category_ids[cell.label],
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": cell.group_confidence * cell.type_confidence})
        return results

    def to_pandas(self) -> pandas.DataFrame:
        """One row per cell (in `cells` order), a pandas DataFrame with the columns of
        `cells.csv`: image, cell (1, 2, ...), x0, y0, x1, y1, group, group_confidence (the
        detection score), label, type_confidence; then p_<type> for each of the five types
        (NaN for the types of the other group's model). Needs pandas: the [pandas] extra."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("FieldResult.to_pandas needs pandas: pip install "
                              "'leukodiff[pandas]' (or pip install pandas)") from None
        types = [str(t) for t in CellType]
        rows = [{"image": self.image, "cell": index,
                 **dict(zip(("x0", "y0", "x1", "y1"), map(float, cell.box), strict=True)),
                 "group": str(cell.group), "group_confidence": cell.group_confidence,
                 "label": cell.label, "type_confidence": cell.type_confidence,
                 **{f"p_{t}": cell.probabilities.get(t, float("nan")) for t in types}}
                for index, cell in enumerate(self.cells, start=1)]
        columns = ["image", "cell", "x0", "y0", "x1", "y1", "group", "group_confidence",
                   "label", "type_confidence", *(f"p_{t}" for t in types)]
        return pd.DataFrame(rows, columns=columns)


@dataclass
class Differential:
    """Counts and percentages per cell type over many fields (one sample)."""

    counts: dict[str, int]  # every cell type, plus "unidentified"
    percentages: dict[str, float]  # of identified cells; unidentified cells are left out
    total: int  # white cells found
    identified: int
    fields: int
    unlike_training: int = 0  # fields that look unlike the training labs

    @classmethod
    def of_counts(cls, counts: Mapping[str, int], fields: int,
                  unlike_training: int = 0) -> Differential:
        """The differential of cells counted per label (every type and "unidentified"
        filled in), over `fields` fields: how a run accumulates it field by field,
        without keeping the fields' results."""
        counts = {**{str(t): 0 for t in CellType}, UNIDENTIFIED: 0, **counts}
        identified = sum(n for label, n in counts.items() if label != UNIDENTIFIED)
        percentages = {str(t): 100.0 * counts[str(t)] / identified if identified else 0.0
                       for t in CellType}
        return cls(counts, percentages, sum(counts.values()), identified, fields,
                   unlike_training)

    @property
    def warning(self) -> str | None:
        return unlike_training_warning(self.unlike_training, self.fields)

    def to_dict(self) -> dict:
        return {**asdict(self), "warning": self.warning}


def unlike_training_warning(unlike: int, fields: int) -> str | None:
    """What to tell the technologist when `unlike` of `fields` images look unlike the
    training labs (the report, the station and the FHIR conclusion say the same)."""
    if not unlike:
        return None
    return (f"{unlike} of {fields} field(s) look unlike the images the models learnt from "
            "(lamp colour, stain or magnification): the types and counts may be wrong "
            "without the models knowing it; review every cell")


def _familiarity_of(detector: str | Path) -> Familiarity | None:
    """The detector's familiarity reference (None: it has none, so no look check)."""
    reference = familiarity_path(resolve(detector))
    if not reference.is_file():
        return None
    try:
        return Familiarity.load(reference)
    except (ValueError, KeyError, TypeError) as error:
        raise ModelFileError(f"{reference}: unreadable familiarity reference ({error}); refit "
                             "it with `leukodiff train familiarity`") from None


def as_image(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image of `image`: as it is, or a uint8 numpy array (H, W, 3) RGB, (H, W) gray
    or (H, W, 4) RGBA; AnalysisError for other arrays, TypeError for other objects."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise AnalysisError(f"image array has shape {image.shape}; expected (H, W, 3) RGB, "
                                "(H, W) gray or (H, W, 4) RGBA")
        if image.dtype != np.uint8:
            raise AnalysisError(f"image array has dtype {image.dtype}; expected uint8 (scale "
                                "it to 0-255, then .astype(numpy.uint8))")
        return Image.fromarray(np.ascontiguousarray(image))  # L, RGB or RGBA by its shape
    raise TypeError(f"cannot analyse a {type(image).__name__}: give a file path, a PIL image "
                    "or a uint8 numpy array (H, W, 3) RGB, (H, W) gray or (H, W, 4) RGBA")


def pixel_roughness(image: Image.Image, window: int = 1024) -> float:
    """Median absolute gray-level step between horizontal neighbours, at full resolution
    (on a central window of at most `window` pixels a side, so huge images cost little).
    A photograph has smooth background between cells; random pixels do not."""
    left = max(0, (image.width - window) // 2)
    top = max(0, (image.height - window) // 2)
    gray = image.crop((left, top, left + min(window, image.width),
                       top + min(window, image.height))).convert("L")
    return float(np.median(np.abs(np.diff(np.asarray(gray, dtype=np.int16), axis=1))))


class Analyzer:
    """Level 1 (detector) + level 2 (one classifier per group), called on an image.

    Use `Analyzer.load()`; `close()` (or a `with` block) frees the worker threads.
    """

    def __init__(self, backend: Backend, *, min_confidence: float | None = None,
                 detection_threshold: float | None = None,
                 familiarity: Familiarity | None = None) -> None:
        self.backend = backend
        self.familiarity = familiarity
        spec = backend.manifests["detector"].architecture
        self.spec = spec
        self.detection_threshold = (float(spec["score_threshold"]) if detection_threshold
                                    is None else detection_threshold)
        self.tile = (int(spec["max_size"]), int(spec["min_size"]))  # its native field size
        self.group_refiner = (GroupClassifier(backend, "group", 0.0, views=1)
                              if "group" in backend.manifests else None)
        # level 2, one model per group (none on a level-1-only backend: `of_detector`), on
        # as many orientations of each crop as its threshold was calibrated on
        self.classifiers = {Group(role): GroupClassifier(backend, role, min_confidence)
                            for role in ("mononuclear", "polymorphonuclear")
                            if role in backend.manifests}
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.classifiers)))

    @classmethod
    def load(cls, detector: str | Path = "detector",
             mononuclear: str | Path = "mononuclear",
             polymorphonuclear: str | Path = "polymorphonuclear", *,
             backend: str = "auto", threads: int | None = None,
             min_confidence: float | None = None,
             detection_threshold: float | None = None) -> Analyzer:
        """The shipped models, or the given model files (names of shipped ones also work).

        `backend`: "onnx" (onnxruntime, fast), "torch", or "auto" (onnxruntime when the
        exported ONNX files are there and current). `min_confidence` overrides each
        level-2 model's calibrated threshold.
        """
        models = {"detector": detector, "mononuclear": mononuclear,
                  "polymorphonuclear": polymorphonuclear}
        return cls(open_backend(backend, models, threads), min_confidence=min_confidence,
                   detection_threshold=detection_threshold,
                   familiarity=_familiarity_of(detector))

    @classmethod
    def of_detector(cls, detector, *, group: bool = True,
                    detection_threshold: float = 0.0) -> Analyzer:
        """Level 1 of a torch detector in memory (`pipeline.backends.TorchBackend.of_detector`):
        `detect` as `analyze` runs it, down to `detection_threshold` (0: every box the network
        keeps, as AP needs). Training validates with it; it has no level-2 models."""
        from leukodiff.pipeline.backends import TorchBackend

        return cls(TorchBackend.of_detector(detector, group=group),
                   detection_threshold=detection_threshold)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Analyzer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _detect_raw(self, image: Image.Image) -> Detections:
        """The network's boxes, at most spec["detections_per_image"] (any score, any group)."""
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return Detections.of(*self.backend.detect(np.ascontiguousarray(pixels)))

    def _detect_field(self, image: Image.Image) -> Detections:
        return agnostic_nms(self._detect_raw(image), float(self.spec["agnostic_nms_iou"]))

    def detect(self, image: Image.Image) -> Detections:
        """Level 1: white cells above the detection threshold, with their group. Frames
        larger than the detector's native size are tiled with overlap; first shrunk, when
        their cells look much larger than BCCD's (`pipeline.scale`), so that tiles hold
        whole cells at sizes the detector knows. Boxes are in `image`'s pixels."""
        width, height = image.size
        tile_w, tile_h = self.tile
        if width <= 1.25 * tile_w and height <= 1.25 * tile_h:
            found = self._detect_field(image)
        else:
            ratio = cell_size_ratio(image)
            shrink = ratio if ratio is not None and ratio > SHRINK_ABOVE else 1.0
            work = image if shrink == 1.0 else image.resize(
                (max(1, round(width / shrink)), max(1, round(height / shrink))),
                Image.Resampling.BILINEAR, reducing_gap=2.0)
            if work.width <= 1.25 * tile_w and work.height <= 1.25 * tile_h:
                found = self._detect_field(work)
            else:
                found = detect_tiled(self._detect_field, work, self.tile)
            if shrink != 1.0:
                back = np.array([width / work.width, height / work.height] * 2,
                                dtype=np.float32)
                boxes = np.minimum(found.boxes * back, np.array([width, height] * 2,
                                                                dtype=np.float32))
                found = Detections(boxes, found.labels, found.scores)
        found = found.above(self.detection_threshold)
        if self.group_refiner is None or not len(found):
            return found
        boxes = [Box(*box) for box in found.boxes.tolist()]
        groups = self.group_refiner(image, boxes).argmax(1) + 1  # column 0: mononuclear
        return Detections(found.boxes, groups.astype(np.int64), found.scores)

    def __call__(self, image: Image.Image | np.ndarray | str | Path, name: str | None = None,
                 *, look: bool = False) -> FieldResult:
        """Every white cell in one image; raises AnalysisError for images it cannot use.
        `image`: a file path, a PIL image (any mode) or a uint8 numpy array, (H, W, 3) RGB
        (not OpenCV's BGR), (H, W) gray or (H, W, 4) RGBA (`as_image`).
        With `look`, also how far the image looks from the training labs (~20 ms more
        a 640x480 field, ~30 a 1440x900 one, at one thread: `analyze` and the station do
        it, per-field benchmarks do not)."""
        if isinstance(image, str | Path):
            name = name or str(image)
            image = load_image(image)
        image = self.check(as_image(image))
        result = FieldResult(name or "image", image.width, image.height,
                             self.classify(image, self.detect(image)))
        if look:
            result.familiarity, result.unlike_training = self.look(image)
        return result

    def look(self, image: Image.Image) -> tuple[float | None, bool]:
        """How far `image` looks from the training labs, and whether that is beyond the
        reference's threshold ((None, False) for a detector without a reference)."""
        if self.familiarity is None:
            return None, False
        score = self.familiarity.score(image)
        return score, score > self.familiarity.threshold

    @staticmethod
    def check(image: Image.Image) -> Image.Image:
        """The image as RGB, or AnalysisError when it cannot be a bright-field smear."""
        image = to_rgb(image)
        width, height = image.size
        if min(width, height) < MIN_SIDE:
            raise AnalysisError(f"image is {width}x{height} pixels, too small to hold a "
                                f"white cell (at least {MIN_SIDE} pixels a side)")
        background = np.percentile(np.asarray(image.convert("L").reduce(4)), 95)
        if background < MIN_BACKGROUND:
            raise AnalysisError(f"image is too dark to be a bright-field smear (brightest 5% "
                                f"below {MIN_BACKGROUND}/255): lamp off or not a smear?")
        if (roughness := pixel_roughness(image)) > MAX_ROUGHNESS:
            raise AnalysisError(f"image looks like noise, not a photograph of a smear "
                                f"(neighbouring pixels differ by {roughness:.0f}/255 at the "
                                f"median; above {MAX_ROUGHNESS})")
        return image

    def classify(self, image: Image.Image, found: Detections) -> list[CellCall]:
        """Level 2: each detected cell to its group's model, the groups concurrently."""
        boxes = [Box(*(float(v) for v in b)) for b in found.boxes.tolist()]
        groups = found.groups
        routed = {g: [i for i, group in enumerate(groups) if group is g] for g in Group}
        if missing := [str(g) for g in Group if routed[g] and g not in self.classifiers]:
            raise ValueError(f"no level-2 model for {', '.join(missing)} cells (a level-1-only "
                             "Analyzer detects; `Analyzer.load` also names the cells)")
        futures = {g: self._pool.submit(clf, image, [boxes[i] for i in routed[g]])
                   for g, clf in self.classifiers.items() if routed[g]}
        cells: list[CellCall | None] = [None] * len(boxes)
        for group, future in futures.items():
            clf = self.classifiers[group]
            for i, probs in zip(routed[group], future.result(), strict=True):
                best = int(probs.argmax())
                confident = probs[best] >= clf.threshold
                cells[i] = CellCall(
                    box=boxes[i].xyxy, group=group,
                    group_confidence=float(found.scores[i]),
                    cell_type=CellType(clf.classes[best]) if confident else None,
                    type_confidence=float(probs[best]),
                    probabilities={c: float(p) for c, p in zip(clf.classes, probs,
                                                                strict=True)})
        return [c for c in cells if c]

    @staticmethod
    def differential(results: Iterable[FieldResult]) -> Differential:
        """Counts per type over all fields; percentages of identified cells only."""
        results = list(results)
        counts: Counter = Counter()
        for result in results:
            counts.update(result.counts())
        return Differential.of_counts(counts, len(results),
                                      sum(r.unlike_training for r in results))
