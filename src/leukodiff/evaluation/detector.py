"""`leukodiff evaluate detector`: the level-1 detector on held-out smear fields.

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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from leukodiff.data.records import Box, Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.pipeline.boxes import box_area, intersection
from leukodiff.taxonomy import Group, ObjectKind

MONO, POLY = 1, 2  # label indices of leukodiff.models.detector.CLASSES
_LABEL = {Group.MONONUCLEAR: MONO, Group.POLYMORPHONUCLEAR: POLY}


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    if not len(a) or not len(b):
        return torch.zeros((len(a), len(b)))
    return box_iou(a, b)


def match(boxes: torch.Tensor, scores: torch.Tensor, truth: torch.Tensor, iou: float = 0.5
          ) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, best score first: (detection index, truth index) pairs."""
    overlaps = _iou(boxes, truth)
    taken: set[int] = set()
    pairs = []
    for d in torch.argsort(scores, descending=True).tolist():
        if not len(truth):
            break
        row = overlaps[d].clone()
        if taken:
            row[list(taken)] = -1
        best = int(row.argmax())
        if float(row[best]) >= iou:
            taken.add(best)
            pairs.append((d, best))
    return pairs


def _inside(boxes: torch.Tensor, regions: torch.Tensor) -> np.ndarray:
    """For each box, the largest share of its own area lying in one of `regions`."""
    if not len(boxes) or not len(regions):
        return np.zeros(len(boxes))
    a, b = boxes.numpy(), regions.numpy()
    return (intersection(a, b) / np.maximum(box_area(a), 1e-6)[:, None]).max(1)


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

    `detections[i]` is `(boxes, labels, scores)` for `records[i]` (as from
    `models.detector.predict`). Truth boxes whose group is unknown count as
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
    for (boxes, labels, scores), record in zip(detections, records, strict=True):
        truth, groups = _truth(record)
        unboxed = ignore.get(record.image.stem, ())
        regions = torch.tensor([b.xyxy for b in unboxed], dtype=torch.float32).reshape(-1, 4)
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
        keep = scores >= score_threshold
        kept_boxes, kept_labels, kept_scores = boxes[keep], labels[keep], scores[keep]
        pairs = match(kept_boxes, kept_scores, truth, iou)
        unmatched = sorted(set(range(len(kept_boxes))) - {d for d, _ in pairs})
        ignored = int((_inside(kept_boxes[unmatched], regions) >= iou).sum())
        found += len(pairs)
        missed += len(truth) - len(pairs)
        false += len(unmatched) - ignored
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


def annotate(image: Image.Image, detections, record: Field | None = None,
             score_threshold: float = 0.5) -> Image.Image:
    """The image with truth boxes (thin green) and detections (thick; blue mononuclear,
    orange polymorphonuclear, with score)."""
    picture = image.convert("RGB").copy()
    draw = ImageDraw.Draw(picture)
    if record is not None:
        for box in record.wbc_boxes:
            draw.rectangle(box.xyxy, outline=(0, 200, 0), width=1)
            name = {Group.MONONUCLEAR: "mono", Group.POLYMORPHONUCLEAR: "poly"}.get(
                box.group, "wbc")
            draw.text((box.x0 + 3, box.y1 - 12), f"truth {name}", fill=(0, 160, 0))
    boxes, labels, scores = detections
    for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist(), strict=True):
        if score < score_threshold:
            continue
        draw.rectangle(box, outline=_COLOURS[label], width=3)
        draw.text((box[0] + 4, box[1] + 3), f"{_SHORT[label]} {score:.2f}",
                  fill=_COLOURS[label])
    return picture


def _without_per_image(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "per_image"}


def _resolve(model):
    from leukodiff.models.io import load_detector

    if isinstance(model, str | Path):
        return load_detector(model)
    return model, {}


def _timed_predict(network, images: Sequence, scale: float = 1.0, track: Track = no_progress,
                   description: str = "Detecting", colour: bool = False
                   ) -> tuple[list, list[float]]:
    from leukodiff.models.detector import predict

    predict(network, images[:1], scale=scale, colour_standardise=colour)  # warm-up
    detections, seconds = [], []
    for image in track(images, description):
        start = time.perf_counter()
        detections.extend(predict(network, [image], scale=scale, colour_standardise=colour))
        seconds.append(time.perf_counter() - start)
    return detections, seconds


def evaluate_detector(
    model: str | Path | torch.nn.Module = "detector",
    *,
    data_root: str | Path | None = None,
    out_dir: Path | None = None,
    bcd: bool = True,
    bcd_scale: float = 1.0,
    bcd_colour_standardise: bool = False,
    scale_sweep: Sequence[float] = (1.0, 1.5, 2.0),
    examples: int = 6,
    max_fields: int = 0,
    track: Track = no_progress,
) -> dict:
    """Metrics of a detector (a .pt with manifest, a shipped name, or a model) on BCCD's
    VOC test list and on BCD; with `out_dir`, also metrics.json and annotated PNGs."""
    from leukodiff.data.sources import load_fields
    from leukodiff.data.sources.unboxed import unboxed_white_cells
    from leukodiff.imaging import load_image

    network, manifest = _resolve(model)
    threshold = network.spec.score_threshold
    bccd = sorted(load_fields("bccd", data_root, track).records, key=lambda r: r.image.name)
    test = [r for r in bccd if r.subset == "test"]
    if max_fields:
        test = test[:max_fields]
    images = [load_image(r.image) for r in test]
    detections, seconds = _timed_predict(network, images, track=track,
                                         description="BCCD test fields")
    results: dict = {
        "model": str(model) if isinstance(model, str | Path) else "in memory",
        "model_sha256": manifest.get("sha256"),
        "bccd_test": detection_metrics(detections, test, score_threshold=threshold),
        # BCCD leaves some white cells unboxed (4 test fields have no WBC box although
        # one is visible), so finding them counts as false. Reported beside the official
        # figure: those cells as ignore regions (data.sources.unboxed).
        "bccd_test_unboxed_ignored": _without_per_image(detection_metrics(
            detections, test, score_threshold=threshold, ignore=unboxed_white_cells("bccd"))),
        "bccd_test_fields_with_a_wbc_box": _without_per_image(detection_metrics(
            [d for d, r in zip(detections, test, strict=True) if r.wbc_boxes],
            [r for r in test if r.wbc_boxes], score_threshold=threshold)),
        "ms_per_field": {"median": 1000 * statistics.median(seconds),
                         "mean": 1000 * statistics.fmean(seconds), "n": len(seconds),
                         "threads": torch.get_num_threads(),
                         "size": f"{test[0].width}x{test[0].height}" if test else ""},
    }
    saved = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # errors first, then mononuclear fields, then the rest
        per_image = results["bccd_test"]["per_image"]
        order = sorted(range(len(test)), key=lambda i: (
            -(per_image[i]["wrong_group"] + per_image[i]["truth"] - per_image[i]["matched"]
              + per_image[i]["detected"] - per_image[i]["matched"]),
            not any(b.group == Group.MONONUCLEAR for b in test[i].wbc_boxes), i))
        for i in order[:examples]:
            path = out_dir / f"bccd_{test[i].image.stem}.png"
            annotate(images[i], detections[i], test[i], threshold).save(path)
            saved.append(path.name)
    if bcd:
        tiles = sorted(load_fields("bcd", data_root, track).records, key=lambda r: r.image.name)
        if max_fields:
            tiles = tiles[:max_fields]
        train = [r for r in bccd if r.subset == "train"]
        estimated = scale_between(train, tiles)
        scale = bcd_scale or estimated  # 0: from the red-cell sizes
        tile_images = [load_image(r.image) for r in tiles]
        in_model = bool(network.spec.colour_standardise)  # trained with it: always on
        colour = bcd_colour_standardise or in_model
        bcd_detections, _ = _timed_predict(network, tile_images, scale, track, "BCD tiles",
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
                    found, _ = _timed_predict(network, tile_images, factor, track,
                                              f"BCD x{factor:g}", standardise)
                    metrics = detection_metrics(found, tiles, score_threshold=threshold)
                name = f"x{factor:g}" + (", colour standardised" if standardise else "")
                if factor == from_rbc and factor not in scale_sweep:
                    name += " (red-cell sizes)"
                sweep[name] = {k: metrics["wbc"][k] for k in keys}
        results["bcd"] = {"scale": scale, "scale_from_rbc_sizes": estimated,
                          "colour_standardised": colour, "wbc": main["wbc"],
                          "per_image": main["per_image"], "sweep": sweep}
        if out_dir is not None:
            per_image = main["per_image"]
            order = sorted(range(len(tiles)), key=lambda i: (
                -(per_image[i]["truth"] - per_image[i]["matched"]
                  + per_image[i]["detected"] - per_image[i]["matched"]), i))
            for i in order[: max(1, examples // 2)]:
                picture = annotate(tile_images[i], bcd_detections[i], tiles[i], threshold)
                path = out_dir / f"bcd_{tiles[i].image.stem}.png"
                picture.resize((picture.width * 2, picture.height * 2)).save(path)
                saved.append(path.name)
    results["pictures"] = saved
    if out_dir is not None:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
