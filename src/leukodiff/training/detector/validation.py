"""How a detector is validated during training (the score its epochs are chosen on) and
measured at its end (the figures its manifest reports)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from leukodiff.data.crops import field_image
from leukodiff.data.records import Field
from leukodiff.metrics.detection import detection_metrics, f1_best, f1_by_threshold
from leukodiff.models.detector import DetectorSpec
from leukodiff.pipeline.analyzer import Analyzer
from leukodiff.training.detector.config import DetectorConfig
from leukodiff.training.detector.fields import DetectorData, FieldImages


def selection_score(metrics: dict, with_groups: bool = True) -> tuple[float, float]:
    """Validation score: mean of class-agnostic AP50 and the per-group mean AP50 (or
    AP50 alone when a group classifier will relabel the boxes); ties broken by
    class-agnostic AP50:95."""
    first = metrics["wbc"]["ap50"] or 0.0
    if with_groups:
        first = (first + metrics["groups"]["map50"]) / 2
    return first, metrics["wbc"]["ap50_95"] or 0.0


def detect_all(model, records: Sequence[Field], images: FieldImages | None = None,
               refine: bool = True) -> list:
    """The detections of `records` (decoded from disk unless `images` holds them) by the
    pipeline's own detection on the model in memory (`Analyzer.of_detector`: what ships,
    down to the box head's floor for AP). `refine=False`: Faster R-CNN's own group labels
    (the group classifier is trained after the detector's epochs)."""
    detections = []
    with Analyzer.of_detector(model, group=refine) as analyzer:
        for index, record in enumerate(records):
            image = (Image.fromarray(images.image(index).permute(1, 2, 0).numpy())
                     if images is not None else field_image(record))
            detections.append(analyzer.detect(image))
    return detections


def validate(model, records: Sequence[Field], images: FieldImages | None = None,
             refine: bool = True, detections: list | None = None) -> dict:
    """Detection metrics on `records` at the model's operating threshold (`detect_all`,
    unless `detections` already holds its boxes: they do not depend on the threshold)."""
    spec: DetectorSpec = model.spec
    if detections is None:
        detections = detect_all(model, records, images, refine)
    return detection_metrics(detections, records, score_threshold=spec.score_threshold)


def operating_threshold(model, records: Sequence[Field], detections: list
                        ) -> tuple[float, dict[float, float]]:
    """The operating threshold with the best F1 on `records` (the run's validation fields,
    as shipped: group classifier included; `detections` are `detect_all`'s) among
    `metrics.detection.OPERATING_THRESHOLDS` (ties: nearest the spec's), and the F1 at
    each. For a detector scored 1 - P(background), whose white cells score ~0.99 and a new
    lab's debris anything up to it, 0.5 means little."""
    f1 = f1_by_threshold(detections, records)
    return f1_best(f1, model.spec.score_threshold), f1


def final_metrics(model, config: DetectorConfig, data: DetectorData,
                  val_detections: list) -> dict:
    """What a finished detector's manifest reports: val (`detect_all`'s detections of
    `data.val`), each source's test part, and the test part with Faster R-CNN's own group
    labels (when a group classifier relabels)."""
    metrics = {"val": validate(model, data.val, detections=val_detections)}
    for source in config.sources:
        tested = [r for r in data.test if r.source == source]
        if tested:
            metrics[test_key(source)] = validate(model, tested)
    if config.spec.group_classifier and data.test:
        metrics["test, Faster R-CNN labels (no group classifier)"] = validate(
            model, data.test, refine=False)
    return {name: short(m) for name, m in metrics.items()}


def test_key(source: str) -> str:
    """The manifest's name for the test figures of one source."""
    return "test (BCCD VOC test list)" if source == "bccd" else f"test ({source} held-out part)"


def short(metrics: dict) -> dict:
    """Metrics without per-image lists (for logs and manifests)."""
    return {k: v for k, v in metrics.items() if k != "per_image"}

