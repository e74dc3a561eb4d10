"""Detection on images larger than a field: overlapping tiles, merged so no cell counts twice.

A cell cut by a tile's inner edge is seen whole by a neighbouring tile when the
overlap is larger than the cell; its cut piece is then dropped. A cell larger
than the overlap is cut in every tile: its pieces are joined into one box. The
detector sometimes boxes the visible part of a cut cell short of the tile's edge
(a nucleus, a lobe); such a box lying mostly inside another tile's larger box of
the same cell is dropped too, when that tile saw the part's whole area and found no
cell of its own there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from leukodiff.pipeline.boxes import (
    Detections,
    box_area,
    box_iou,
    intersection_over_smaller,
    nms,
)

EDGE_MARGIN = 2.0  # pixels: a box this close to an inner tile edge is cut by it
# A box this much inside (intersection over its own area) another tile's larger box is
# part of the same cell. Two white cells of one smear rarely overlap half as much.
CONTAINED = 0.6


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile starts covering [0, length) with at least `overlap` between tiles."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def merge_tiles(found: Sequence[Detections], origins: Sequence[tuple[int, int, int, int]],
                size: tuple[int, int], iou: float = 0.5) -> Detections:
    """Put per-tile detections (tile = x0, y0, x1, y1) back in image pixels, without doubles."""
    width, height = size
    parts, cut = [], []
    for detections, (x0, y0, x1, y1) in zip(found, origins, strict=True):
        shifted = detections.boxes + np.array([x0, y0, x0, y0], dtype=np.float32)
        inner = np.array([x0 > 0, y0 > 0, x1 < width, y1 < height])
        edges = np.array([x0, y0, x1, y1], dtype=np.float32)
        near = np.abs(shifted - edges) <= EDGE_MARGIN
        cut.append((near & inner).any(axis=1))
        parts.append(Detections(shifted, detections.labels, detections.scores))
    if not parts:
        return Detections.empty()
    everything = Detections.of(np.concatenate([p.boxes for p in parts]),
                               np.concatenate([p.labels for p in parts]),
                               np.concatenate([p.scores for p in parts]))
    boxes, labels, scores = everything
    cut = np.concatenate(cut)
    tile_of = np.concatenate([np.full(len(p.boxes), t) for t, p in enumerate(parts)])

    whole = np.flatnonzero(~cut)
    whole = whole[nms(boxes[whole], scores[whole], iou)]
    whole = _drop_pieces_seen_whole(boxes, tile_of, np.asarray(origins, dtype=np.float32),
                                    whole)
    pieces = np.flatnonzero(cut)
    if len(pieces) and len(whole):  # pieces of cells some tile saw whole
        covered = intersection_over_smaller(boxes[pieces], boxes[whole]).max(1) >= 0.5
        pieces = pieces[~covered]
    merged = [(boxes[i], labels[i], scores[i]) for i in whole]
    if len(pieces):  # cells larger than the overlap: join their pieces
        links = intersection_over_smaller(boxes[pieces], boxes[pieces]) >= 0.3
        cluster = list(range(len(pieces)))
        for i in range(len(pieces)):
            for j in range(i):
                if links[i, j]:
                    old, new = cluster[i], cluster[j]
                    cluster = [new if c == old else c for c in cluster]
        for root in sorted(set(cluster)):
            members = pieces[[k for k, c in enumerate(cluster) if c == root]]
            best = members[scores[members].argmax()]
            union = np.concatenate([boxes[members, :2].min(0), boxes[members, 2:].max(0)])
            merged.append((union, labels[best], scores[members].max()))
    if not merged:
        return Detections.empty()
    merged.sort(key=lambda item: -float(item[2]))
    return Detections.of([m[0] for m in merged], [m[1] for m in merged], [m[2] for m in merged])


def _drop_pieces_seen_whole(boxes: np.ndarray, tile_of: np.ndarray, windows: np.ndarray,
                            candidates: np.ndarray) -> np.ndarray:
    """Candidates that are not a piece of a larger cell another tile saw whole.

    Box i is such a piece when a larger kept box k of another tile mostly holds it, k's
    tile saw all of i's area, and k's tile reported nothing there but k. Had k's tile
    also found a cell where i is (any box of it, kept or not), i is a cell of its own
    beside k, which only looked like a piece because of which copy survived NMS.
    """
    order = candidates[np.argsort(-box_area(boxes[candidates]), kind="stable")]
    kept: list[int] = []
    for i in order:
        piece = False
        for k in kept:
            tile = tile_of[k]
            if tile == tile_of[i]:
                continue
            if intersection_over_smaller(boxes[[i]], boxes[[k]])[0, 0] < CONTAINED:
                continue
            x0, y0, x1, y1 = windows[tile]
            b = boxes[i]
            if not (b[0] >= x0 + EDGE_MARGIN and b[1] >= y0 + EDGE_MARGIN
                    and b[2] <= x1 - EDGE_MARGIN and b[3] <= y1 - EDGE_MARGIN):
                continue  # k's tile did not see all of i
            own = np.flatnonzero((tile_of == tile) & (np.arange(len(boxes)) != k))
            if len(own) and box_iou(boxes[[i]], boxes[own]).max() >= 0.5:
                continue  # k's tile found a cell where i is: i is a cell, not a piece
            piece = True
            break
        if not piece:
            kept.append(int(i))
    return np.array(sorted(kept), dtype=np.int64)


def detect_tiled(run: Callable[[Image.Image], Detections], image: Image.Image,
                 tile: tuple[int, int], overlap: int | None = None) -> Detections:
    """Run `run` (a detector on one image) on overlapping tiles of `image`, merged.

    `overlap` defaults to half the tile's shorter side (240 px for 640x480 tiles), so a
    cell up to that size is seen whole by some tile (BCCD's cells: ~210 px at native
    size); larger ones are joined from their pieces."""
    width, height = image.size
    tile_w, tile_h = min(tile[0], width), min(tile[1], height)
    overlap = overlap if overlap is not None else min(tile_w, tile_h) // 2
    windows = [(x, y, x + tile_w, y + tile_h)
               for y in tile_origins(height, tile_h, overlap)
               for x in tile_origins(width, tile_w, overlap)]
    found = [run(image.crop(window)) for window in windows]
    return merge_tiles(found, windows, (width, height))
