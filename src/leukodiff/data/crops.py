"""Single-cell crops cut from boxes in smear fields.

Crop geometry decides whether a classifier trained on one source works on
another (a tight crop of a BCCD cell looks nothing like a PBC image, where the
cell sits in the middle of ~2.6 times its width of context), so the scale is
always an explicit argument, recorded with each model that uses it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from leukodiff.data.records import Box, Cell, Field
from leukodiff.imaging import load_image, normalise_stain


def square_window(box: Box, scale: float, image_size: tuple[int, int]) -> tuple[int, ...]:
    """A square of side `scale` x the box's longer side, centred on the box.

    Near a border the square is shifted to stay inside the image (keeping it
    square and the cell whole); only a square wider than the image is clipped.
    """
    if scale <= 0:
        raise ValueError(f"crop scale must be positive, got {scale}")
    width, height = image_size
    side = max(box.width, box.height, 1.0) * scale
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    bounds = []
    for centre, limit in ((cx, width), (cy, height)):
        low = min(max(centre - side / 2, 0.0), max(limit - side, 0.0))
        bounds.append((round(low), max(round(min(low + side, limit)), round(low) + 1)))
    (x0, x1), (y0, y1) = bounds
    return x0, y0, x1, y1


def crop_cell(image: Image.Image, box: Box, scale: float) -> Image.Image:
    return image.crop(square_window(box, scale, image.size))


def cells_from_fields(fields: Iterable[Field]) -> list[Cell]:
    """One Cell per white-cell box whose type is known, keyed to its field (its box in the
    file's own pixels, `Field.in_file`)."""
    return [
        Cell(field.image, field.source, box.cell_type, field.group_key, field.sha256,
             box=field.in_file(box), subset=field.subset)
        for field in fields
        for box in field.wbc_boxes
        if box.cell_type is not None
    ]


def field_image(field: Field) -> Image.Image:
    """A field's RGB image at the size its boxes are given in (enlarged by `field.zoom`)."""
    return enlarge(load_image(field.image), field)


def enlarge(image: Image.Image, field: Field) -> Image.Image:
    """`field`'s image as read from its file, brought to the size its boxes are given in."""
    if field.zoom == 1.0:
        return image
    return image.resize((field.width, field.height), Image.Resampling.BICUBIC)


def load_cell_image(cell: Cell, crop_scale: float) -> Image.Image:
    """The cell's RGB image: the whole file, or its box cropped at `crop_scale`."""
    image = load_image(cell.image)
    return image if cell.box is None else crop_cell(image, cell.box, crop_scale)


def square_input(image: Image.Image, size: int, stain: str = "none") -> Image.Image:
    """Centre square of a cell image, resized to the network's input side, its colour
    normalised by `stain` (`imaging.normalise_stain`; "none" leaves it as it is)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    square = square.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return square if stain == "none" else Image.fromarray(
        normalise_stain(np.asarray(square), stain))


def cell_input(cell: Cell, crop_scale: float, size: int, stain: str = "none") -> Image.Image:
    """The model's view of a cell: cropped (boxes) or centre-squared (whole images), resized
    and stain-normalised."""
    return square_input(load_cell_image(cell, crop_scale), size, stain)


def network_input(crops: Sequence[Image.Image], size: int) -> np.ndarray:
    """Square RGB crops of `size` a side as a network takes them: (N, 3, size, size)
    float32 in [0, 1] (the models normalise further themselves)."""
    if not crops:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return np.stack([np.asarray(c) for c in crops]).transpose(0, 3, 1, 2).astype(
        np.float32) / 255.0


def cell_batch(image: Image.Image, boxes: Iterable[Box], crop_scale: float,
               size: int, stain: str = "none") -> np.ndarray:
    """A network's input for the cells in `boxes`, each cut, resized and normalised exactly
    as the training crops were (`crop_cell`, `square_input`)."""
    return network_input([square_input(crop_cell(image, box, crop_scale), size, stain)
                          for box in boxes], size)


# Level 2 types a cell by its softmax averaged over the cell's orientations: a cell on a
# slide has no up or right, and the answer should not depend on how the camera was turned
# (experiments/labs_level2_tta.py, leave one lab out).
LEVEL2_VIEWS = 8


def check_views(views: int) -> None:
    """A crop has 8 distinct orientations (4 turns, each mirrored or not): 1 to 8 views."""
    if not 1 <= views <= 8:
        raise ValueError(f"views must be 1 to 8 (the turns and mirrors of a crop), got {views}")


def orientation(crops: np.ndarray, view: int) -> np.ndarray:
    """View `view` (0-7) of a batch of crops (..., H, W): turned by 0, 90, 180 or 270
    degrees (view % 4), mirrored left to right from view 4 on."""
    turned = np.rot90(crops, view % 4, axes=(-2, -1))
    return np.ascontiguousarray(turned[..., ::-1] if view >= 4 else turned)


def orientations(crops: np.ndarray, views: int) -> np.ndarray:
    """The first `views` (1-8) orientations of a batch (N, C, H, W), one after the other:
    (views * N, C, H, W); 1: the batch itself."""
    check_views(views)
    if views == 1:
        return crops
    return np.concatenate([orientation(crops, view) for view in range(views)])
