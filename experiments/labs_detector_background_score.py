"""Is the detector's white-cell score the problem on a lab it never saw?

    python experiments/labs_detector_background_score.py runs/labs-det-stain   # ~10 min

The detector's box head is a 3-way softmax (background, mononuclear, polymorphonuclear);
torchvision keeps a box per group with that group's probability as its score, and the
pipeline's agnostic NMS keeps the best. A white cell whose group is uncertain (a new lab,
colour jittered away) therefore cannot score much above 0.5, the operating threshold. Here
the same fold detectors (no retraining) score each box by 1 - P(background), the group
being the likelier of the two (the group classifier relabels it in the shipped pipeline
anyway), and are measured as `labs_detector_threshold.py` measures: held-out lab's fields
at 0.5 and at the threshold with the best F1 on the training labs' validation fields.
Torch backend (the ONNX export keeps torchvision's scoring; torch and onnx gave the same
figures for the shipped detector).

Result (2026-12-06, the stain-jitter folds; precision / recall / AP50 / exact count):

    held out    group score, 0.5 (stain log)        1 - P(background), val-chosen threshold
    Chula       0.882 / 0.896 / 0.895 / 82.1%       0.90: 0.773 / 0.916 / 0.906 / 82.5%
    BCD         0.530 / 0.951 / 0.531 / 45.0%       0.95: 0.664 / 0.883 / 0.807 / 60.0%
    BCCD        0.263 / 0.954 / 0.698 / 11.8%       0.95: 0.385 / 0.895 / 0.803 / 31.9%

AP50 (threshold-free) rises on every fold: the better ranking. Next: the unjittered folds
retrained and scored this way, and the score in the ONNX export.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torchvision.ops import boxes as box_ops

from leukodiff.data.sources import load_fields
from leukodiff.data.sources.unboxed import unboxed_white_cells
from leukodiff.evaluation.labs import DETECTION_LABS, available_labs
from leukodiff.imaging import load_image
from leukodiff.metrics.detection import detection_metrics
from leukodiff.models.io import load_detector
from leukodiff.pipeline.analyzer import Analyzer
from leukodiff.training.detector import DetectorConfig
from leukodiff.training.detector.fields import prepare_fields

GRID = [round(0.30 + 0.05 * i, 2) for i in range(14)]


def white_cell_scores(self, class_logits, box_regression, proposals, image_shapes):
    """torchvision's postprocess_detections with one box per proposal scored
    1 - P(background), labelled with the likelier group."""
    boxes_per_image = [len(p) for p in proposals]
    pred_boxes = self.box_coder.decode(box_regression, proposals)
    probs = F.softmax(class_logits, -1)
    out_boxes, out_scores, out_labels = [], [], []
    for boxes, p, shape in zip(pred_boxes.split(boxes_per_image), probs.split(boxes_per_image),
                               image_shapes, strict=True):
        boxes = box_ops.clip_boxes_to_image(boxes, shape)
        labels = p[:, 1:].argmax(1) + 1
        boxes = boxes[torch.arange(len(boxes)), labels]
        scores = 1 - p[:, 0]
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.nms(boxes, scores, self.nms_thresh)[: self.detections_per_img]
        out_boxes.append(boxes[keep])
        out_scores.append(scores[keep])
        out_labels.append(labels[keep])
    return out_boxes, out_scores, out_labels


def rates(found, fields, threshold, ignore=None):
    wbc = detection_metrics(found, fields, score_threshold=threshold, ignore=ignore)["wbc"]
    return wbc["precision"], wbc["recall"], wbc["ap50"]


def exact_share(found, fields, threshold, ignore):
    return float(np.mean([len(d.above(threshold).boxes)
                          == len(f.wbc_boxes) + len(ignore.get(f.image.stem, ()))
                          for d, f in zip(found, fields, strict=True)]))


runs = Path(sys.argv[1])
console = Console()
present = available_labs(None)
for lab in (x for x in DETECTION_LABS if present[x]):
    path = runs / f"without-{lab}" / "detector" / "detector.pt"
    if not path.exists():
        continue
    sources = tuple(x for x in DETECTION_LABS if x != lab and present[x])
    val = prepare_fields(DetectorConfig(sources=sources)).val
    held = sorted(load_fields(lab).records, key=lambda r: r.image.name)
    ignore = unboxed_white_cells(lab)
    model, _ = load_detector(path)
    model.roi_heads.postprocess_detections = types.MethodType(white_cell_scores,
                                                              model.roi_heads)
    with Analyzer.of_detector(model, group=False, detection_threshold=0.05) as analyzer:
        val_found = [analyzer.detect(load_image(r.image)) for r in val]
        f1 = {}
        for t in GRID:
            p, r, _ = rates(val_found, val, t)
            f1[t] = 2 * p * r / (p + r) if p + r else 0.0
        chosen = max(GRID, key=lambda t: (f1[t], -t))
        held_found = [analyzer.detect(load_image(r.image)) for r in held]
    console.print(f"held out {lab}: 1 - P(background); val F1 {f1}; chosen {chosen}")
    for t in sorted({0.5, chosen}):
        p, r, ap = rates(held_found, held, t, ignore)
        console.print(f"  threshold {t}: precision {p:.3f} recall {r:.3f} AP50 {ap:.3f} "
                      f"exact count {exact_share(held_found, held, t, ignore):.1%}")
