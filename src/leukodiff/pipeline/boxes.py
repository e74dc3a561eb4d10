"""Detections as numpy arrays, and the box arithmetic the pipeline needs (NMS, overlaps).

The pipeline runs on onnxruntime without torch installed, so everything after
the networks (agnostic NMS, tile merging, routing) is plain numpy. Greedy NMS
here keeps exactly what `torchvision.ops.nms` keeps: boxes in descending score
order, dropping any whose IoU with a kept box is above the threshold.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from leukodiff.taxonomy import GROUP_OF_DETECTOR_LABEL, Group


class Detections(NamedTuple):
    """White cells found in one image, in its pixels: boxes (N, 4) x0 y0 x1 y1,
    labels (N,) 1 mononuclear / 2 polymorphonuclear, scores (N,) descending."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray

    @classmethod
    def of(cls, boxes, labels, scores) -> Detections:
        """From any array-likes (e.g. a network's outputs), with the pipeline's dtypes."""
        return cls(np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                   np.asarray(labels, dtype=np.int64).reshape(-1),
                   np.asarray(scores, dtype=np.float32).reshape(-1))

    @classmethod
    def empty(cls) -> Detections:
        return cls.of(np.zeros((0, 4)), np.zeros(0), np.zeros(0))

    def __len__(self) -> int:  # the number of cells, not of fields
        return len(self.scores)

    @property
    def groups(self) -> list[Group]:
        return [GROUP_OF_DETECTOR_LABEL[int(label)] for label in self.labels]

    def take(self, index: np.ndarray | list[int]) -> Detections:
        index = np.asarray(index, dtype=np.int64)
        return Detections(self.boxes[index], self.labels[index], self.scores[index])

    def above(self, threshold: float) -> Detections:
        return self.take(np.flatnonzero(self.scores >= threshold))


def box_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]).clip(min=0) * (boxes[:, 3] - boxes[:, 1]).clip(min=0)


def intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) areas of overlap."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    return (bottom_right - top_left).clip(min=0).prod(-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = intersection(a, b)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / np.maximum(union, 1e-9)


def intersection_over_smaller(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How much of the smaller box of each pair lies in the other (1: one holds the other)."""
    smaller = np.minimum(box_area(a)[:, None], box_area(b)[None, :])
    return intersection(a, b) / np.maximum(smaller, 1e-6)


def share_inside(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """For each box, the largest share of its own area lying in one of `regions` (0 with
    no regions)."""
    if not len(boxes) or not len(regions):
        return np.zeros(len(boxes))
    return (intersection(boxes, regions) / np.maximum(box_area(boxes), 1e-6)[:, None]).max(1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    overlaps = box_iou(boxes[order], boxes[order])
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for rank in range(len(order)):
        if suppressed[rank]:
            continue
        keep.append(order[rank])
        suppressed |= overlaps[rank] > iou
    return np.asarray(keep, dtype=np.int64)


def agnostic_nms(found: Detections, iou: float) -> Detections:
    """A cell is reported once, with the group of its best-scoring box."""
    if len(found) < 2 or iou >= 1:
        return found
    return found.take(nms(found.boxes, found.scores, iou))
