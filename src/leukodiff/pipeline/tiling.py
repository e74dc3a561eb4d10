"""Detection on images larger than a field: overlapping tiles, merged so no cell counts twice.

A cell cut by a tile's inner edge is seen whole by a neighbouring tile when the
overlap is larger than the cell; its cut piece is then dropped. A cell larger
than the overlap is cut in every tile: its pieces are joined into one box.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.ops import box_area, nms

from leukodiff.models.detector import Detections

EDGE_MARGIN = 2.0  # pixels: a box this close to an inner tile edge is cut by it


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile starts covering [0, length) with at least `overlap` between tiles."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _intersection_over_smaller(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    smaller = torch.minimum(box_area(a)[:, None], box_area(b)[None, :]).clamp(min=1e-6)
    return inter / smaller


def merge_tiles(found: Sequence[Detections], origins: Sequence[tuple[int, int, int, int]],
                size: tuple[int, int], iou: float = 0.5) -> Detections:
    """Put per-tile detections (tile = x0, y0, x1, y1) back in image pixels, without doubles."""
    width, height = size
    boxes, labels, scores, cut = [], [], [], []
    for detections, (x0, y0, x1, y1) in zip(found, origins, strict=True):
        shifted = detections.boxes + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        inner = torch.tensor([x0 > 0, y0 > 0, x1 < width, y1 < height])
        edges = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        near = (shifted - edges).abs() <= EDGE_MARGIN
        cut.append((near & inner).any(dim=1))
        boxes.append(shifted)
        labels.append(detections.labels)
        scores.append(detections.scores)
    if not boxes:
        return Detections(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    boxes, labels = torch.cat(boxes), torch.cat(labels)
    scores, cut = torch.cat(scores), torch.cat(cut)

    whole = torch.nonzero(~cut).flatten()
    whole = whole[nms(boxes[whole], scores[whole], iou)]
    pieces = torch.nonzero(cut).flatten()
    if len(pieces) and len(whole):  # pieces of cells some tile saw whole
        covered = _intersection_over_smaller(boxes[pieces], boxes[whole]).max(1).values >= 0.5
        pieces = pieces[~covered]
    merged = [(boxes[i], labels[i], scores[i]) for i in whole.tolist()]
    if len(pieces):  # cells larger than the overlap: join their pieces
        links = _intersection_over_smaller(boxes[pieces], boxes[pieces]) >= 0.3
        cluster = list(range(len(pieces)))
        for i in range(len(pieces)):
            for j in range(i):
                if links[i, j]:
                    old, new = cluster[i], cluster[j]
                    cluster = [new if c == old else c for c in cluster]
        for root in sorted(set(cluster)):
            members = pieces[[k for k, c in enumerate(cluster) if c == root]]
            best = members[scores[members].argmax()]
            union = torch.cat([boxes[members, :2].min(0).values, boxes[members, 2:].max(0).values])
            merged.append((union, labels[best], scores[members].max()))
    merged.sort(key=lambda item: -float(item[2]))
    if not merged:
        return Detections(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    return Detections(torch.stack([m[0] for m in merged]),
                      torch.stack([m[1] for m in merged]), torch.stack([m[2] for m in merged]))


def detect_tiled(run: Callable[[list[Image.Image]], list[Detections]], image: Image.Image,
                 tile: tuple[int, int], overlap: int = 160) -> Detections:
    """Run `run` (a detector over a list of images) on overlapping tiles of `image`."""
    width, height = image.size
    tile_w, tile_h = min(tile[0], width), min(tile[1], height)
    windows = [(x, y, x + tile_w, y + tile_h)
               for y in tile_origins(height, tile_h, overlap)
               for x in tile_origins(width, tile_w, overlap)]
    found = run([image.crop(window) for window in windows])
    return merge_tiles(found, windows, (width, height))
