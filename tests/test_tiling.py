"""Tile merging on synthetic detections: no cell counted twice, none lost at a border."""

from itertools import pairwise

import numpy as np

from leukodiff.pipeline.boxes import Detections, nms
from leukodiff.pipeline.tiling import merge_tiles, merge_tiles_local, tile_origins


def _found(*boxes, score=0.9, label=2):
    if not boxes:
        return Detections.empty()
    return Detections.of(boxes, [label] * len(boxes), [score] * len(boxes))


def test_numpy_nms_keeps_what_torchvision_keeps():
    import torch
    from torchvision.ops import nms as torch_nms

    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 400, size=(200, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(20, 200, size=(200, 2))], 1)
    scores = rng.uniform(size=200).astype(np.float32)
    for iou in (0.3, 0.5, 0.7):
        expected = torch_nms(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), iou)
        assert nms(boxes.astype(np.float32), scores, iou).tolist() == expected.tolist()


def test_tiles_cover_the_image_with_the_overlap():
    assert tile_origins(640, 640, 160) == [0]
    starts = tile_origins(2000, 640, 160)
    assert starts[0] == 0 and starts[-1] == 2000 - 640
    assert all(b - a <= 640 - 160 for a, b in pairwise(starts))


def test_a_cell_seen_whole_in_two_tiles_counts_once():
    tiles = [(0, 0, 640, 480), (480, 0, 1120, 480)]
    cell = (500, 100, 600, 200)  # inside the overlap: both tiles see it whole
    merged = merge_tiles([_found(cell), _found((20, 100, 120, 200))], tiles, (1120, 480))
    assert merged.boxes.tolist() == [list(map(float, cell))]


def test_a_cell_cut_by_one_tile_is_taken_from_the_tile_that_sees_it_whole():
    tiles = [(0, 0, 640, 480), (480, 0, 1120, 480)]
    piece = (560, 100, 640, 200)  # tile 1 sees only its left part, cut at x = 640
    whole = (80, 100, 200, 200)   # tile 2 coordinates of the same cell: 560..680
    merged = merge_tiles([_found(piece), _found(whole)], tiles, (1120, 480))
    assert merged.boxes.tolist() == [[560.0, 100.0, 680.0, 200.0]]


def test_a_cell_larger_than_the_overlap_is_joined_from_its_pieces():
    tiles = [(0, 0, 640, 480), (480, 0, 1120, 480)]
    left = (400, 100, 640, 300)   # cut at tile 1's right edge
    right = (0, 100, 160, 300)    # cut at tile 2's left edge (x = 480 in the image)
    merged = merge_tiles([_found(left), _found(right, score=0.8)], tiles, (1120, 480))
    assert merged.boxes.tolist() == [[400.0, 100.0, 640.0, 300.0]]
    assert len(merged.scores) == 1


def test_a_low_scored_box_of_a_nucleus_inside_a_cut_cell_does_not_take_the_cell():
    """The shipped detector also boxes a cell's nucleus, far below any threshold (0.06): a
    tile that sees that box whole does not make the cut cell around it a piece of it (on a
    2x2 mosaic of BCCD test fields, a cell at the seam was lost so)."""
    tiles = [(0, 0, 640, 480), (480, 0, 1120, 480)]
    left = (400, 100, 640, 300)   # cut at tile 1's right edge
    right = (0, 100, 160, 300)    # cut at tile 2's left edge
    nucleus = (500, 150, 580, 250)  # inside the cell, clear of tile 1's edges: "whole"
    first = Detections.of([left, nucleus], [2, 2], [0.95, 0.06])
    merged = merge_tiles([first, _found(right, score=0.9)], tiles, (1120, 480))
    assert merged.boxes[0].tolist() == [400.0, 100.0, 640.0, 300.0]
    assert merged.scores[0] == np.float32(0.95) and merged.above(0.5).boxes.shape == (1, 4)


def test_cells_at_the_outer_image_border_are_kept():
    tiles = [(0, 0, 640, 480), (480, 0, 1120, 480)]
    merged = merge_tiles([_found((0, 0, 50, 50)), _found((560, 430, 640, 480))], tiles,
                         (1120, 480))
    assert len(merged.boxes) == 2


def test_no_detections_anywhere():
    merged = merge_tiles([_found(), _found()], [(0, 0, 640, 480), (480, 0, 1120, 480)],
                         (1120, 480))
    assert merged.boxes.shape == (0, 4)


def test_part_of_a_cut_cell_boxed_short_of_the_edge_is_dropped():
    """Tile 1 sees the cell cut at x = 640 but boxes only its nucleus (ending at 610, so it
    does not touch the edge); tile 2 sees the whole cell: one cell."""
    tiles = [(0, 0, 640, 480), (400, 0, 1040, 480)]
    part = (560, 120, 610, 190)
    whole = (130, 100, 300, 220)  # 530..700 in the image
    merged = merge_tiles([_found(part, score=0.95), _found(whole, score=0.8)], tiles,
                         (1040, 480))
    assert merged.boxes.tolist() == [[530.0, 100.0, 700.0, 220.0]]


def test_neighbouring_cells_from_two_tiles_are_both_kept():
    tiles = [(0, 0, 640, 480), (400, 0, 1040, 480)]
    left, right = (420, 100, 560, 240), (150, 120, 290, 260)  # right: 550..690, touching
    merged = merge_tiles([_found(left), _found(right)], tiles, (1040, 480))
    assert len(merged.boxes) == 2



def test_a_small_cell_beside_a_large_one_is_kept_whichever_copy_wins():
    """Two cells, the small one mostly inside the large one's box, both seen by both tiles;
    tile 1 scores the small one higher, tile 2 the large one (the surviving copies then
    come from different tiles): both are kept."""
    tiles = [(0, 0, 640, 480), (400, 0, 1040, 480)]
    large, small = (450, 100, 600, 250), (550, 180, 620, 250)
    first = Detections.of([large, small], [2, 2], [0.6, 0.9])
    second = Detections.of([(50, 100, 200, 250), (150, 180, 220, 250)], [2, 2], [0.9, 0.6])
    merged = merge_tiles([first, second], tiles, (1040, 480))
    assert sorted(merged.boxes.tolist()) == [list(map(float, large)), list(map(float, small))]


def test_a_cell_cut_by_four_windows_and_boxed_short_of_their_edges_counts_once():
    """A real case (benchmarks/wholeslide.py, the 6,000 px slide, BCCD's cell at
    3443..3597 x 3525..3670): the windows above it cut it at y = 3600 and box it 6-7.5 px
    short of that edge, the window right of it (x >= 3446) boxes it 7.5 px short of its
    left edge; only window 46 sees it whole. Boxes as the detector found them (window
    pixels), low scores included: one cell."""
    windows = [(3063, 3120, 3703, 3600), (3446, 3120, 4086, 3600),
               (3063, 3360, 3703, 3840), (3446, 3360, 4086, 3840),
               (3063, 3600, 3703, 4080), (3446, 3600, 4086, 4080)]
    found = [
        Detections.of([(380.0, 409.9, 532.9, 474.0), (3.1, 1.8, 43.9, 54.2),
                       (383.3, 413.2, 460.2, 473.1)], [2, 1, 2], [0.86, 0.216, 0.059]),
        Detections.of([(10.0, 407.8, 139.0, 472.5)], [2], [0.847]),
        Detections.of([(380.5, 165.5, 533.7, 310.4)], [2], [0.966]),
        Detections.of([(7.5, 167.3, 148.6, 308.9)], [2], [0.967]),
        Detections.of([(390.6, 0.4, 527.4, 65.9), (388.5, 1.7, 464.7, 85.3)], [2, 1],
                      [0.687, 0.067]),
        Detections.of([(8.0, 1.8, 148.2, 68.9)], [2], [0.724]),
    ]
    for merge in (merge_tiles, merge_tiles_local):
        cells = merge(found, windows, (6000, 6000)).above(0.5)
        near = cells.boxes[(cells.boxes[:, 0] > 3400) & (cells.boxes[:, 1] > 3480)]
        assert np.allclose(near, [[3443.5, 3525.5, 3596.7, 3670.4]], atol=0.1), near

