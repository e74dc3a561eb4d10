"""`leukodiff evaluate detector`: the level-1 detector on held-out smear fields.

Boxes come from the pipeline's own detection (`Analyzer.detect`: the agnostic NMS,
tiling and group classifier that `analyze` runs), on onnxruntime by default, down to
score 0 for AP; recall, precision and group accuracy are counted at the detector's
operating threshold.

* BCCD's VOC test list (never used in training or selection): COCO-style AP
  from torchmetrics' `MeanAveragePrecision` (pycocotools backend): white-cell
  AP50 and AP50:95 class-agnostic, per-group AP; then, at the operating score
  threshold, recall/precision (IoU >= 0.5) and the mononuclear/polymorphonuclear
  accuracy of the matched detections.
* BCD (another lab, never trained on): class-agnostic recall/precision at IoU
  0.5, by default as `leukodiff analyze` sees a field: native size, colours as
  they are. Beside it, a sweep of enlargement factors with and without colour
  standardisation to BCCD's statistics (label-free, per image), and, on request
  (`bcd_scale=0`), the factor from the ratio of median red-cell box sides in BCCD
  and BCD (BCD's cells are about half BCCD's size in pixels; the detector is
  trained on scales 0.5-1.25 of BCCD to cover that).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from leukodiff.data.records import Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_fields
from leukodiff.data.sources.unboxed import unboxed_white_cells
from leukodiff.imaging import Mark, annotate, load_image
from leukodiff.metrics.detection import MONO, POLY, detection_metrics
from leukodiff.metrics.heldout import BcdDetection, DetectorEvaluation, FieldTiming, SweepRow
from leukodiff.models.detector import standardise_colour
from leukodiff.models.files import Manifest
from leukodiff.pipeline.analyzer import Analyzer
from leukodiff.pipeline.boxes import Detections
from leukodiff.taxonomy import Group, ObjectKind

# --- scale between sources ---------------------------------------------------------------------


def median_rbc_side(records: Sequence[Field]) -> float:
    """Median of sqrt(w * h) over the red-cell boxes that do not touch the image border."""
    sides = [np.sqrt(b.width * b.height) for r in records for b in r.boxes
             if b.kind is ObjectKind.RBC and b.x0 > 1 and b.y0 > 1
             and b.x1 < r.width - 1 and b.y1 < r.height - 1 and b.width > 0 and b.height > 0]
    if not sides:
        raise ValueError("no whole red-cell boxes to measure the scale from")
    return float(np.median(sides))


def scale_between(reference: Sequence[Field], other: Sequence[Field]) -> float:
    """Factor that gives `other`'s cells the pixel size of `reference`'s (by red-cell size)."""
    return median_rbc_side(reference) / median_rbc_side(other)


# --- pictures ----------------------------------------------------------------------------------

_COLOURS = {MONO: (30, 90, 255), POLY: (255, 140, 0)}
_SHORT = {MONO: "mono", POLY: "poly"}


def _marks(detections, record: Field, score_threshold: float) -> list[Mark]:
    """Truth boxes (thin green) and detections at the operating threshold (blue
    mononuclear, orange polymorphonuclear, with score), for `imaging.annotate`."""
    truth = {Group.MONONUCLEAR: "mono", Group.POLYMORPHONUCLEAR: "poly"}
    marks = [Mark(box.xyxy, f"truth {truth.get(box.group, 'wbc')}", (0, 160, 0), line=1,
                  below=True)
             for box in record.wbc_boxes]
    boxes, labels, scores = detections
    marks += [Mark(box, f"{_SHORT[label]} {score:.2f}", _COLOURS[label])
              for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist(),
                                           strict=True) if score >= score_threshold]
    return marks


def _without_per_image(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "per_image"}


def _analyzer(model: str | Path | torch.nn.Module, backend: str
              ) -> tuple[Analyzer, Manifest | None]:
    """Level 1 as `analyze` runs it, down to score 0 (AP needs every box), and the
    detector's manifest (None for a model in memory, which runs on torch)."""
    if isinstance(model, str | Path):
        analyzer = Analyzer.load(model, backend=backend, detection_threshold=0.0)
        return analyzer, analyzer.backend.manifests["detector"]
    return Analyzer.of_detector(model), None


def _standardised(image: Image.Image, spec: dict) -> Image.Image:
    """`image` with each channel's colours moved to BCCD's statistics (label-free)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    moved = standardise_colour(pixels, spec["colour_mean"], spec["colour_std"],
                               spec["colour_max_gain"]).clamp(0, 1)
    return Image.fromarray((moved * 255).round().byte().permute(1, 2, 0).numpy())


def _timed_detect(analyzer: Analyzer, images: Sequence[Image.Image], scale: float = 1.0,
                  track: Track = no_progress, description: str = "Detecting",
                  colour: bool = False) -> tuple[list[Detections], list[float]]:
    """`Analyzer.detect` on each image, enlarged by `scale` (boxes mapped back to the image),
    then its colours standardised when `colour`; the seconds of each."""

    def detect(image: Image.Image) -> Detections:
        if scale != 1.0:
            image = image.resize((max(1, round(image.width * scale)),
                                  max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
        if colour and not analyzer.spec["colour_standardise"]:  # else the model does it
            image = _standardised(image, analyzer.spec)
        found = analyzer.detect(image)
        return Detections(found.boxes / np.float32(scale), found.labels, found.scores)

    if images:
        detect(images[0])  # warm-up
    detections, seconds = [], []
    for image in track(images, description):
        start = time.perf_counter()
        detections.append(detect(image))
        seconds.append(time.perf_counter() - start)
    return detections, seconds


def evaluate_detector(
    model: str | Path | torch.nn.Module = "detector",
    *,
    backend: str = "onnx",
    data_root: str | Path | None = None,
    out_dir: Path | None = None,
    bcd: bool = True,
    bcd_scale: float = 1.0,
    bcd_colour_standardise: bool = False,
    scale_sweep: Sequence[float] = (1.0, 1.5, 2.0),
    examples: int = 6,
    max_fields: int = 0,
    track: Track = no_progress,
) -> DetectorEvaluation:
    """Metrics of a detector (a .pt with manifest, a shipped name, or a model in memory) on
    BCCD's VOC test list and on BCD, detected as `analyze` detects (`Analyzer.detect`, on
    `backend`: onnx, torch or auto; a model in memory runs on torch); with `out_dir`, also
    metrics.json and annotated PNGs."""

    analyzer, manifest = _analyzer(model, backend)
    try:
        return _evaluate(analyzer, manifest, "in memory" if isinstance(model, torch.nn.Module)
                         else str(model), data_root, out_dir, bcd, bcd_scale,
                         bcd_colour_standardise, scale_sweep, examples, max_fields, track)
    finally:
        analyzer.close()


def _evaluate(analyzer: Analyzer, manifest: Manifest | None, model_name: str, data_root,
              out_dir, bcd: bool,
              bcd_scale: float, bcd_colour_standardise: bool, scale_sweep: Sequence[float],
              examples: int, max_fields: int, track: Track) -> DetectorEvaluation:
    threshold = float(analyzer.spec["score_threshold"])
    bccd = sorted(load_fields("bccd", data_root, track).records, key=lambda r: r.image.name)
    test = [r for r in bccd if r.subset == "test"]
    if max_fields:
        test = test[:max_fields]
    images = [load_image(r.image) for r in test]
    detections, seconds = _timed_detect(analyzer, images, track=track,
                                        description="BCCD test fields")
    bccd_test = detection_metrics(detections, test, score_threshold=threshold)
    # BCCD leaves some white cells unboxed (4 test fields have no WBC box although one is
    # visible), so finding them counts as false. Reported beside the official figure:
    # those cells as ignore regions (data.sources.unboxed).
    unboxed_ignored = _without_per_image(detection_metrics(
        detections, test, score_threshold=threshold, ignore=unboxed_white_cells("bccd")))
    boxed_fields = _without_per_image(detection_metrics(
        [d for d, r in zip(detections, test, strict=True) if r.wbc_boxes],
        [r for r in test if r.wbc_boxes], score_threshold=threshold))
    timing = FieldTiming(median=1000 * statistics.median(seconds),
                         mean=1000 * statistics.fmean(seconds), n=len(seconds),
                         size=f"{test[0].width}x{test[0].height}" if test else "")
    saved = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # errors first, then mononuclear fields, then the rest
        per_image = bccd_test["per_image"]
        order = sorted(range(len(test)), key=lambda i: (
            -(per_image[i]["wrong_group"] + per_image[i]["truth"] - per_image[i]["matched"]
              + per_image[i]["detected"] - per_image[i]["matched"]),
            not any(b.group == Group.MONONUCLEAR for b in test[i].wbc_boxes), i))
        for i in order[:examples]:
            path = out_dir / f"bccd_{test[i].image.stem}.png"
            annotate(images[i], _marks(detections[i], test[i], threshold)).save(path)
            saved.append(path.name)
    on_bcd = None
    if bcd:
        tiles = sorted(load_fields("bcd", data_root, track).records, key=lambda r: r.image.name)
        if max_fields:
            tiles = tiles[:max_fields]
        train = [r for r in bccd if r.subset == "train"]
        estimated = scale_between(train, tiles)
        scale = bcd_scale or estimated  # 0: from the red-cell sizes
        tile_images = [load_image(r.image) for r in tiles]
        in_model = bool(analyzer.spec["colour_standardise"])  # trained with it: always on
        colour = bcd_colour_standardise or in_model
        bcd_detections, _ = _timed_detect(analyzer, tile_images, scale, track, "BCD tiles",
                                          colour)
        main = detection_metrics(bcd_detections, tiles, score_threshold=threshold)
        keys = ("ap50", "recall", "precision", "found", "false", "truth")
        sweep = {}
        from_rbc = round(estimated, 2)
        for factor in dict.fromkeys((*scale_sweep, from_rbc)):
            for standardise in (True,) if in_model else (False, True):
                if (factor, standardise) == (scale, colour):
                    metrics = main  # the headline run: not detected twice
                else:
                    found, _ = _timed_detect(analyzer, tile_images, factor, track,
                                             f"BCD x{factor:g}", standardise)
                    metrics = detection_metrics(found, tiles, score_threshold=threshold)
                name = f"x{factor:g}" + (", colour standardised" if standardise else "")
                if factor == from_rbc and factor not in scale_sweep:
                    name += " (red-cell sizes)"
                sweep[name] = SweepRow(**{k: metrics["wbc"][k] for k in keys})
        on_bcd = BcdDetection(scale=scale, scale_from_rbc_sizes=estimated,
                              colour_standardised=colour, wbc=main["wbc"],
                              per_image=main["per_image"], sweep=sweep)
        if out_dir is not None:
            per_image = main["per_image"]
            order = sorted(range(len(tiles)), key=lambda i: (
                -(per_image[i]["truth"] - per_image[i]["matched"]
                  + per_image[i]["detected"] - per_image[i]["matched"]), i))
            for i in order[: max(1, examples // 2)]:
                picture = annotate(tile_images[i], _marks(bcd_detections[i], tiles[i], threshold))
                path = out_dir / f"bcd_{tiles[i].image.stem}.png"
                picture.resize((picture.width * 2, picture.height * 2)).save(path)
                saved.append(path.name)
    results = DetectorEvaluation(
        model=model_name, backend=analyzer.backend.name,
        model_sha256=manifest.sha256 if manifest else None, bccd_test=bccd_test,
        bccd_test_unboxed_ignored=unboxed_ignored,
        bccd_test_fields_with_a_wbc_box=boxed_fields, ms_per_field=timing, bcd=on_bcd,
        pictures=saved)
    if out_dir is not None:
        (Path(out_dir) / "metrics.json").write_text(
            json.dumps(results.to_dict(), indent=2) + "\n")
    return results
