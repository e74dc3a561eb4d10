"""Detection metrics: COCO AP (torchmetrics' `MeanAveragePrecision`, pycocotools
backend), class-agnostic and per group, and, at an operating score threshold, greedy
one-to-one matching (IoU >= 0.5) with recall, precision and the mononuclear /
polymorphonuclear accuracy of the matched detections.

Training selects and validates detectors with them; evaluation reports them
(`evaluation.detector`, `evaluation.labs`). Needs torch, torchvision and torchmetrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from leukodiff.data.records import Box, Field
from leukodiff.pipeline.boxes import Detections, box_iou, share_inside
from leukodiff.taxonomy import Group

MONO, POLY = 1, 2  # label indices of leukodiff.models.detector.CLASSES
_LABEL = {Group.MONONUCLEAR: MONO, Group.POLYMORPHONUCLEAR: POLY}


def match(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou: float = 0.5
          ) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, best score first: (detection index, truth index) pairs."""
    boxes, truth = np.asarray(boxes).reshape(-1, 4), np.asarray(truth).reshape(-1, 4)
    if not len(boxes) or not len(truth):
        return []
    overlaps = box_iou(boxes, truth)
    taken = np.zeros(len(truth), dtype=bool)
    pairs = []
    for d in np.argsort(-np.asarray(scores), kind="stable").tolist():
        row = np.where(taken, -1.0, overlaps[d])
        best = int(row.argmax())
        if row[best] >= iou:
            taken[best] = True
            pairs.append((d, best))
    return pairs


def _at_threshold(field: Detections, truth: np.ndarray, regions: np.ndarray,
                  threshold: float, iou: float
                  ) -> tuple[Detections, list[tuple[int, int]], int, int]:
    """One field's detections at or above `threshold` matched to its truth: the kept
    detections, the (detection, truth) pairs, the false ones, and those lying in an
    ignore region (neither a hit nor a false positive)."""
    kept = field.above(threshold)
    pairs = match(kept.boxes, kept.scores, truth, iou)
    unmatched = sorted(set(range(len(kept.boxes))) - {d for d, _ in pairs})
    ignored = int((share_inside(kept.boxes[unmatched], regions) >= iou).sum())
    return kept, pairs, len(unmatched) - ignored, ignored


def _regions(record: Field, ignore: Mapping[str, Sequence[Box]]) -> np.ndarray:
    unboxed = ignore.get(record.image.stem, ())
    return np.array([b.xyxy for b in unboxed], dtype=np.float32).reshape(-1, 4)


def _truth(record: Field) -> tuple[torch.Tensor, list[Group | None]]:
    boxes = [b.xyxy for b in record.wbc_boxes]
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            [Group(b.group) if b.group is not None else None for b in record.wbc_boxes])


def _map(preds: list[dict], targets: list[dict], iou_thresholds=None,
         class_metrics: bool = False) -> dict:
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools",
                                  iou_thresholds=iou_thresholds, class_metrics=class_metrics)
    metric.update(preds, targets)
    return metric.compute()


def _safe(value: float) -> float | None:
    return None if value < 0 else round(float(value), 4)  # torchmetrics: -1 = no such boxes


def detection_metrics(detections: Sequence, records: Sequence[Field], *,
                      score_threshold: float = 0.5, iou: float = 0.5,
                      ignore: Mapping[str, Sequence[Box]] | None = None) -> dict:
    """COCO AP (class-agnostic and per group) and matched-detection figures for `records`.

    `detections[i]` is `(boxes, labels, scores)` for `records[i]` (`pipeline.boxes.Detections`,
    as `Analyzer.detect` gives them; numpy or torch). Truth boxes whose group is unknown count as
    white cells; for per-group AP they are marked crowd (ignored) in both
    groups, and they are left out of the group accuracy. `ignore` maps a field
    name to regions holding a white cell the annotation left out (e.g.
    `data.sources.unboxed.unboxed_white_cells`): COCO crowd regions, so a
    detection mostly inside one (intersection over its own area >= `iou`) is
    neither a hit nor a false positive.
    """
    if len(detections) != len(records):
        raise ValueError(f"{len(detections)} detection sets for {len(records)} fields")
    ignore = ignore or {}
    ignored_total = 0
    agnostic_preds, agnostic_targets, group_preds, group_targets = [], [], [], []
    found = missed = false = 0
    pairs_by_group = {MONO: [0, 0], POLY: [0, 0]}  # truth label -> [correct, total]
    confusion = [[0, 0], [0, 0]]  # rows: truth mono/poly; columns: predicted mono/poly
    truth_counts = {MONO: 0, POLY: 0}
    detected_right = {MONO: 0, POLY: 0}
    per_image = []
    for given, record in zip(detections, records, strict=True):
        field = Detections.of(*(np.asarray(part) for part in given))
        boxes, labels, scores = (torch.from_numpy(part) for part in field)
        truth, groups = _truth(record)
        unboxed = ignore.get(record.image.stem, ())
        regions = torch.from_numpy(_regions(record, ignore))
        agnostic_preds.append({"boxes": boxes, "scores": scores,
                               "labels": torch.ones_like(labels)})
        agnostic_targets.append({
            "boxes": torch.cat([truth, regions]),
            "labels": torch.ones(len(truth) + len(regions), dtype=torch.int64),
            "iscrowd": torch.tensor([0] * len(truth) + [1] * len(regions), dtype=torch.int64)})
        known = [i for i, g in enumerate(groups) if g is not None]
        # crowd (ignored) per group: a cell of unknown group in both groups, an unboxed
        # cell of known group in its own group only
        crowd = [(truth[i], label) for i, g in enumerate(groups) if g is None
                 for label in (MONO, POLY)]
        crowd += [(regions[j], label) for j, b in enumerate(unboxed)
                  for label in ((_LABEL[Group(b.group)],) if b.group else (MONO, POLY))]
        group_boxes = torch.cat([truth[known], *[box[None] for box, _ in crowd]])
        group_labels = [_LABEL[groups[i]] for i in known] + [label for _, label in crowd]
        group_preds.append({"boxes": boxes, "scores": scores, "labels": labels})
        group_targets.append({
            "boxes": group_boxes, "labels": torch.tensor(group_labels, dtype=torch.int64),
            "iscrowd": torch.tensor([0] * len(known) + [1] * len(crowd), dtype=torch.int64)})
        kept, pairs, false_here, ignored = _at_threshold(
            field, truth.numpy(), regions.numpy(), score_threshold, iou)
        kept_boxes, kept_labels = kept.boxes, kept.labels
        found += len(pairs)
        missed += len(truth) - len(pairs)
        false += false_here
        ignored_total += ignored
        wrong = 0
        for d, t in pairs:
            if groups[t] is None:
                continue
            truth_label, predicted = _LABEL[groups[t]], int(kept_labels[d])
            pairs_by_group[truth_label][1] += 1
            pairs_by_group[truth_label][0] += predicted == truth_label
            confusion[truth_label - 1][predicted - 1] += 1
            detected_right[truth_label] += predicted == truth_label
            wrong += predicted != truth_label
        for g in groups:
            if g is not None:
                truth_counts[_LABEL[g]] += 1
        per_image.append({"field": record.image.stem, "truth": len(truth),
                          "detected": len(kept_boxes), "matched": len(pairs),
                          "ignored": ignored, "wrong_group": wrong})
    agnostic = _map(agnostic_preds, agnostic_targets)
    grouped = _map(group_preds, group_targets, class_metrics=True)
    grouped50 = _map(group_preds, group_targets, iou_thresholds=[0.5], class_metrics=True)

    def per_class(result: dict) -> dict[str, float | None]:
        classes = result["classes"].reshape(-1).tolist()
        values = result["map_per_class"].reshape(-1).tolist()
        out: dict[str, float | None] = {str(Group.MONONUCLEAR): None,
                                        str(Group.POLYMORPHONUCLEAR): None}
        for c, v in zip(classes, values, strict=True):
            out[str(Group.MONONUCLEAR if c == MONO else Group.POLYMORPHONUCLEAR)] = _safe(v)
        return out

    ap50_groups = per_class(grouped50)
    present = [v for v in ap50_groups.values() if v is not None]
    matched_total = sum(t for _, t in pairs_by_group.values())
    matched_right = sum(c for c, _ in pairs_by_group.values())
    return {
        "fields": len(records),
        "wbc": {"ap50": _safe(agnostic["map_50"]), "ap50_95": _safe(agnostic["map"]),
                "ap75": _safe(agnostic["map_75"]),
                "recall": found / max(1, found + missed),
                "precision": found / max(1, found + false),
                "truth": found + missed, "found": found, "false": false,
                "ignored": ignored_total},
        "groups": {"map50": float(np.mean(present)) if present else 0.0,
                   "ap50": ap50_groups, "ap50_95": per_class(grouped),
                   "map50_95": _safe(grouped["map"])},
        "matched": {
            "n": matched_total,
            "group_accuracy": matched_right / matched_total if matched_total else 0.0,
            "mononuclear_recall": (pairs_by_group[MONO][0] / pairs_by_group[MONO][1]
                                   if pairs_by_group[MONO][1] else 0.0),
            "polymorphonuclear_recall": (pairs_by_group[POLY][0] / pairs_by_group[POLY][1]
                                         if pairs_by_group[POLY][1] else 0.0),
            "confusion": confusion, "confusion_rows": "truth mono, poly; columns predicted",
        },
        "end_to_end": {  # found and labelled right, over all truth cells of the group
            str(Group.MONONUCLEAR): {"right": detected_right[MONO], "truth": truth_counts[MONO]},
            str(Group.POLYMORPHONUCLEAR): {"right": detected_right[POLY],
                                           "truth": truth_counts[POLY]},
        },
        "score_threshold": score_threshold,
        "iou": iou,
        "per_image": per_image,
    }


#: Operating thresholds a detector's is chosen among (training's validation fields, a
#: lab's own reviewed fields). Up to 0.99: scored 1 - P(background) (`DetectorSpec.score`
#: "cell"), a white cell's score is ~0.99 and false cells' spread up to it.
OPERATING_THRESHOLDS = (*(round(0.30 + 0.05 * i, 2) for i in range(14)), 0.97, 0.99)


def detection_scores(detections: Sequence, fields: Sequence[Field], threshold: float,
                     ignore: Mapping[str, Sequence[Box]] | None = None) -> dict:
    """Precision, recall, F1 (IoU 0.5), AP50 and the counts behind them at `threshold`."""
    metrics = detection_metrics(detections, fields, score_threshold=threshold, ignore=ignore)
    wbc = metrics["wbc"]
    precision, recall = wbc["precision"] or 0.0, wbc["recall"] or 0.0
    f1 = _f1(precision, recall)
    matched = metrics["matched"]
    return {"threshold": threshold, "precision": precision, "recall": recall, "f1": f1,
            "ap50": wbc["ap50"], "truth": wbc["truth"], "found": wbc["found"],
            "false": wbc["false"], "fields": len(fields),
            # of the found cells whose group the truth names, the share grouped right
            "group_accuracy": matched["group_accuracy"]}


def f1_by_threshold(detections: Sequence, fields: Sequence[Field],
                    ignore: Mapping[str, Sequence[Box]] | None = None,
                    grid: Sequence[float] = OPERATING_THRESHOLDS) -> dict[float, float]:
    """F1 (IoU 0.5, rounded to 4 places) at each threshold of `grid`: the matching of
    `detection_scores` alone (no AP, which does not depend on the threshold)."""
    if len(detections) != len(fields):
        raise ValueError(f"{len(detections)} detection sets for {len(fields)} fields")
    ignore = ignore or {}
    prepared = [(Detections.of(*(np.asarray(part) for part in given)),
                 _truth(record)[0].numpy(), _regions(record, ignore))
                for given, record in zip(detections, fields, strict=True)]
    f1 = {}
    for t in grid:
        found = truth = false = 0
        for field, boxes, regions in prepared:
            _, pairs, false_here, _ = _at_threshold(field, boxes, regions, t, 0.5)
            found, truth, false = found + len(pairs), truth + len(boxes), false + false_here
        f1[t] = round(_f1(found / max(1, found + false), found / max(1, truth)), 4)
    return f1


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def f1_best(f1: Mapping[float, float], default: float) -> float:
    """The threshold with the best F1 (ties: the one nearest `default`)."""
    return max(f1, key=lambda t: (f1[t], -abs(t - default), t))


def best_threshold(detections: Sequence, fields: Sequence[Field], default: float,
                   ignore: Mapping[str, Sequence[Box]] | None = None,
                   grid: Sequence[float] = OPERATING_THRESHOLDS) -> float:
    """The F1-best operating threshold on `fields` among `grid` (ties: the one nearest
    `default`)."""
    return f1_best(f1_by_threshold(detections, fields, ignore, grid), default)
