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

from leukodiff.data.splits import connected_components
from leukodiff.pipeline.boxes import (
    Detections,
    box_area,
    box_iou,
    intersection_over_smaller,
    nms,
    share_inside,
)

# Pixels: a box this close to an inner tile edge is cut by it. The detector boxes a cut
# cell short of the edge, by up to 11 px on the benchmark slide (benchmarks/wholeslide.py:
# 6-7.5 px for the cell in tests/test_tiling.py's real case); at 2 px such a piece passed
# for a whole cell and was counted beside the cell it is part of.
EDGE_MARGIN = 16.0
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
    flat = _flatten(found, origins, size)
    if flat is None:
        return Detections.empty()
    return _merge_group(*flat, np.arange(len(flat[0])), iou)


def merge_tiles_local(found: Sequence[Detections],
                      origins: Sequence[tuple[int, int, int, int]],
                      size: tuple[int, int], iou: float = 0.5) -> Detections:
    """`merge_tiles`, in time linear in the number of boxes (for a bounded density).

    Every rule of the merge compares overlapping boxes only (IoU, intersection over the
    smaller, containment, a tile's own box where another is), so it gives the same cells
    run on each group of boxes that overlap one another, directly or through a chain,
    as on all of them at once. The groups come from a grid of buckets (`overlap_groups`),
    not from all pairs: a slide of 10^5 cells costs what its windows cost."""
    flat = _flatten(found, origins, size)
    if flat is None:
        return Detections.empty()
    boxes, labels, scores = flat[:3]
    merged = [_merge_group(*flat, members, iou) for members in overlap_groups(boxes)]
    merged = [m for m in merged if len(m)]
    if not merged:
        return Detections.empty()
    boxes = np.concatenate([m.boxes for m in merged])
    labels = np.concatenate([m.labels for m in merged])
    scores = np.concatenate([m.scores for m in merged])
    order = np.argsort(-scores, kind="stable")
    return Detections.of(boxes[order], labels[order], scores[order])


def overlap_groups(boxes: np.ndarray, bucket: float | None = None) -> list[np.ndarray]:
    """Indices of `boxes` grouped by overlap (touching counts), connected through chains;
    found through a grid of `bucket`-pixel squares (default: the largest box side), so
    only boxes sharing a square are compared. Groups in order of their first box."""
    count = len(boxes)
    if count == 0:
        return []
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    bucket = float(bucket if bucket is not None else max(float(sides.max()), 1.0))
    first = np.floor(boxes[:, :2] / bucket).astype(np.int64)
    last = np.floor(boxes[:, 2:] / bucket).astype(np.int64)
    squares: dict[tuple[int, int], list[int]] = {}
    for i in range(count):
        for gy in range(first[i, 1], last[i, 1] + 1):
            for gx in range(first[i, 0], last[i, 0] + 1):
                squares.setdefault((gx, gy), []).append(i)

    def touching_pairs():
        for members in squares.values():
            if len(members) < 2:
                continue
            index = np.asarray(members)
            b = boxes[index]
            touch = ((b[:, None, 0] <= b[None, :, 2]) & (b[None, :, 0] <= b[:, None, 2])
                     & (b[:, None, 1] <= b[None, :, 3]) & (b[None, :, 1] <= b[:, None, 3]))
            yield from index[np.argwhere(np.triu(touch, 1))].tolist()

    groups: dict[int, list[int]] = {}
    for i, component in enumerate(connected_components(count, touching_pairs())):
        groups.setdefault(component, []).append(i)
    return [np.asarray(g, dtype=np.int64) for g in groups.values()]


def _flatten(found: Sequence[Detections], origins: Sequence[tuple[int, int, int, int]],
             size: tuple[int, int]):
    """All tiles' boxes in image pixels: boxes, labels, scores, cut (by an inner tile
    edge), tile_of (each box's tile), windows; None without tiles."""
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
        return None
    everything = Detections.of(np.concatenate([p.boxes for p in parts]),
                               np.concatenate([p.labels for p in parts]),
                               np.concatenate([p.scores for p in parts]))
    boxes, labels, scores = everything
    tile_of = np.concatenate([np.full(len(p.boxes), t) for t, p in enumerate(parts)]
                             ).astype(np.int64)
    return (boxes, labels, scores, np.concatenate(cut).astype(bool), tile_of,
            np.asarray(origins, dtype=np.float32).reshape(-1, 4))


def _merge_group(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                 cut: np.ndarray, tile_of: np.ndarray, windows: np.ndarray,
                 members: np.ndarray, iou: float) -> Detections:
    """The merge of the boxes `members` (indices into the flat arrays), on their own."""
    boxes, labels, scores = boxes[members], labels[members], scores[members]
    cut, tile_of = cut[members], tile_of[members]
    whole = np.flatnonzero(~cut)
    whole = whole[nms(boxes[whole], scores[whole], iou)]
    whole = _drop_pieces_seen_whole(boxes, tile_of, windows, whole)
    pieces = np.flatnonzero(cut)
    if len(pieces) and len(whole):  # pieces of cells some tile saw whole
        # half the piece inside a whole box: not half the smaller box, or a whole box of a
        # nucleus inside a cut cell (scored far below any threshold) would take the cell
        covered = share_inside(boxes[pieces], boxes[whole]) >= 0.5
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
