"""Matching a KBC image to the BCCD field it was made of, by its white cell.

A KBC image is a whole BCCD field at half size, turned by up to 20 degrees, maybe
flipped, a little sheared and zoomed (`leukodiff.evaluation.provenance` tells how KBC
was made and puts the match to use). The match:

1. `locate_wbc`: the white cell is the strongest blob of nucleus stain
   (blue well above red and green), found on a smoothed stain map.
2. `patch_descriptor`: a 24x24 RGB patch (96 px at KBC scale, 192 px in the
   BCCD field) around that point, inside a disc so that turning it brings no
   corner in or out, mean-removed and unit-norm: cosine = normalised cross-correlation.
3. `bccd_templates`: the same patch around each BCCD white cell, under every
   transform the generator can make (4 flips x rotations -20..20 degrees).
4. `link`: best template per image; the field wins, with its score and its
   margin over the best *other* field (`balanced_assignment`: at most so many
   images per field). The 71 un-augmented TEST_SIMPLE originals are matched whole
   (`exact_field_matches`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from leukodiff.data.records import Cell, Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.imaging import load_image

#: KBC images are BCCD fields at half size (640x480 -> 320x240).
KBC_SCALE = 0.5
#: Side of the matched patch around the nucleus, in KBC pixels, and its grid.
PATCH_SIDE = 112
GRID = 24
#: The generator's transforms: horizontal/vertical flips and rotations within 20 degrees.
FLIPS = ((False, False), (True, False), (False, True), (True, True))
ANGLES = tuple(range(-20, 21, 5))
#: Zoom of +-10% in the generator: templates at three scales.
SCALES = (0.92, 1.0, 1.08)


# --- finding the white cell -------------------------------------------------------------------


def stain_map(rgb: torch.Tensor) -> torch.Tensor:
    """Nucleus stain (H, W) from a (3, H, W) RGB tensor in 0..255: blue over red where blue
    also clearly exceeds green (Giemsa/Wright nuclei); red cells and background give 0."""
    r, g, b = rgb.float()
    return (b - r).clamp(min=0) * ((b - g) > 40)


def locate_wbc(rgb: torch.Tensor, window: int = 21, region: tuple[int, ...] | None = None,
               refine: int = 3, refine_radius: float = 40.0) -> tuple[float, float, float]:
    """(x, y, strength) of the white cell: the densest `window`-sized patch of nucleus stain.

    Computed at half resolution; `region` (x0, y0, x1, y1) limits the search (e.g. to a box).
    """
    stain = stain_map(rgb)
    if region is not None:
        x0, y0, x1, y1 = (round(v) for v in region)
        mask = torch.zeros_like(stain)
        mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
        stain = stain * mask
    half = F.avg_pool2d(stain[None, None], 2, ceil_mode=True)
    k = max(window // 2 | 1, 3)
    smooth = F.avg_pool2d(half, k, stride=1, padding=k // 2, count_include_pad=False)[0, 0]
    index = int(smooth.argmax())
    y, x = divmod(index, smooth.shape[1])
    x, y = 2 * x + 1.0, 2 * y + 1.0
    # mean shift: the stain-weighted centroid near the peak moves with the cell when it turns,
    # where the peak of a flat-topped blob may jump
    yy, xx = torch.meshgrid(torch.arange(stain.shape[0], dtype=torch.float32),
                            torch.arange(stain.shape[1], dtype=torch.float32), indexing="ij")
    for _ in range(refine):
        weight = stain * (((xx - x) ** 2 + (yy - y) ** 2) <= refine_radius ** 2)
        total = float(weight.sum())
        if total <= 0:
            break
        x, y = float((weight * xx).sum()) / total, float((weight * yy).sum()) / total
    return x, y, float(smooth.max())


# --- descriptors ------------------------------------------------------------------------------


def _disc(grid: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centre = (grid - 1) / 2
    return (((yy - centre) ** 2 + (xx - centre) ** 2) <= (grid / 2) ** 2).float()


def _normalise(patches: torch.Tensor, disc: torch.Tensor) -> torch.Tensor:
    """(N, 3, G, G) -> (N, 3*G*G): mean removed per channel inside the disc, unit norm."""
    inside = disc.sum()
    mean = (patches * disc).sum((-2, -1), keepdim=True) / inside
    centred = (patches - mean) * disc
    flat = centred.flatten(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-6)


def patch_descriptor(rgb: torch.Tensor, centres: torch.Tensor, side: float,
                     angles: Sequence[float] = (0.0,),
                     flips: Sequence[tuple[bool, bool]] = ((False, False),),
                     grid: int = GRID, bandpass: int = 5,
                     scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Descriptors of square patches of `side` px around `centres` (K, 2) of one image,
    sampled flipped (horizontal, vertical), turned by each angle (degrees) and scaled.

    Returns (K * len(flips) * len(angles) * len(scales), 3 * grid * grid), centre-major.
    The image is box-filtered to the grid's pixel size first (no aliasing);
    outside the image counts as black, as the generator's fill does.
    """
    image = rgb.float()[None]
    factor = max(int(side / grid), 1)
    small = F.avg_pool2d(image, factor, ceil_mode=True)
    if bandpass:  # keep detail (red-cell rims, lobes), drop the nucleus' broad blob
        small = small - F.avg_pool2d(small, bandpass, stride=1, padding=bandpass // 2,
                                     count_include_pad=False)
    height, width = small.shape[-2:]
    half = side / 2 / factor
    steps = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1  # -1..1
    gy, gx = torch.meshgrid(steps, steps, indexing="ij")
    thetas = []
    for cx, cy in centres.tolist():
        for (flip_h, flip_v), angle, scale in itertools.product(flips, angles, scales):
            a = math.radians(angle)
            u = gx * (-1 if flip_h else 1) * scale
            v = gy * (-1 if flip_v else 1) * scale
            x = (math.cos(a) * u - math.sin(a) * v) * half + cx / factor
            y = (math.sin(a) * u + math.cos(a) * v) * half + cy / factor
            # grid_sample wants -1..1 over the image (align_corners=False)
            thetas.append(torch.stack([x / width * 2 - 1, y / height * 2 - 1], -1))
    sample_grid = torch.stack(thetas)
    patches = F.grid_sample(small.expand(len(thetas), -1, -1, -1), sample_grid,
                            mode="bilinear", padding_mode="zeros", align_corners=False)
    return _normalise(patches, _disc(grid))


def image_tensor(image) -> torch.Tensor:
    """A PIL image as a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


# --- the KBC side -----------------------------------------------------------------------------


@dataclass
class Scan:
    """Per KBC image: the white cell's centre (x, y) and stain strength, and its descriptor."""

    centres: torch.Tensor  # (N, 2) in image pixels
    strength: torch.Tensor  # (N,)
    descriptors: torch.Tensor  # (N, D)


def scan_images(cells: Sequence[Cell], track: Track = no_progress,
                side: float = PATCH_SIDE, workers: int = 2) -> Scan:
    """Decode each whole-image cell once: locate its white cell and describe the patch."""
    n = len(cells)
    centres = torch.zeros((n, 2))
    strength = torch.zeros(n)
    descriptors = torch.zeros((n, 3 * GRID * GRID))

    def one(index: int) -> None:
        rgb = image_tensor(load_image(cells[index].image))
        x, y, s = locate_wbc(rgb)
        centres[index] = torch.tensor([x, y])
        strength[index] = s
        descriptors[index] = patch_descriptor(rgb, centres[index:index + 1], side)[0]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in track([pool.submit(one, i) for i in range(n)], "Locating KBC cells"):
            future.result()
    return Scan(centres, strength, descriptors)

# --- the BCCD side ----------------------------------------------------------------------------


def half_size(image):
    """A BCCD field as KBC made it: the whole image at half size."""
    size = (round(image.width * KBC_SCALE), round(image.height * KBC_SCALE))
    return image.resize(size, resample=2, reducing_gap=None)  # bilinear


@dataclass
class Templates:
    """Descriptors of every BCCD white cell under every flip, angle and scale."""

    fields: list[str]  # group key of each field, e.g. "bccd:BloodImage_00012"
    labels: list[tuple[str, ...]]  # the field's cell types from labels.csv, may be empty
    field_index: torch.Tensor  # (T,) template -> index into `fields`
    descriptors: torch.Tensor  # (T, D)


def field_labels(field: Field) -> tuple[str, ...]:
    """The cell types labels.csv gives a field (typed boxes, or a two-label field's labels)."""
    types = {str(b.cell_type) for b in field.wbc_boxes if b.cell_type is not None}
    for box in field.wbc_boxes:
        types.update(str(t) for t in box.candidates)
    return tuple(sorted(types))


def bccd_templates(fields: Sequence[Field], track: Track = no_progress,
                   angles: Sequence[float] = ANGLES,
                   flips: Sequence[tuple[bool, bool]] = FLIPS,
                   scales: Sequence[float] = SCALES, side: float = PATCH_SIDE,
                   workers: int = 2) -> Templates:
    """Templates of every white-cell box of `fields`, at KBC scale (the field halved)."""
    fields = [f for f in fields if f.wbc_boxes]
    parts: list[torch.Tensor] = [torch.empty(0)] * len(fields)

    def one(index: int) -> None:
        field = fields[index]
        rgb = image_tensor(half_size(load_image(field.image)))
        centres = [locate_wbc(rgb, region=tuple(v * KBC_SCALE for v in box.xyxy))[:2]
                   for box in field.wbc_boxes]
        parts[index] = patch_descriptor(rgb, torch.tensor(centres), side, angles, flips,
                                        scales=scales)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in track([pool.submit(one, i) for i in range(len(fields))],
                            "Describing BCCD cells"):
            future.result()
    index = torch.cat([torch.full((len(parts[i]),), i) for i in range(len(fields))])
    return Templates([f.group_key for f in fields], [field_labels(f) for f in fields], index,
                     torch.cat(parts))


# --- linking ----------------------------------------------------------------------------------


@dataclass
class Links:
    """Per KBC image: best field (index into Templates.fields), its score, and the margin
    over the best other field."""

    field: torch.Tensor  # (N,) long
    score: torch.Tensor  # (N,)
    margin: torch.Tensor  # (N,)


def field_scores(descriptors: torch.Tensor, templates: Templates,
                 allowed: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """(N, fields) best template similarity per field; fields not `allowed` score -2."""
    n_fields = len(templates.fields)
    keep = torch.ones(n_fields, dtype=torch.bool) if allowed is None else allowed
    if not bool(keep.any()):
        raise ValueError("no BCCD field is allowed as a source")
    use = keep[templates.field_index]
    bank, index = templates.descriptors[use], templates.field_index[use]
    out = torch.full((len(descriptors), n_fields), -2.0)
    for start in range(0, len(descriptors), chunk):
        sims = descriptors[start:start + chunk] @ bank.T
        out[start:start + chunk].scatter_reduce_(1, index.expand(len(sims), -1), sims,
                                                 reduce="amax")
    return out


def link(descriptors: torch.Tensor, templates: Templates, allowed: torch.Tensor | None = None
         ) -> Links:
    """Match each descriptor against every template (of the `allowed` fields, a bool mask
    over `templates.fields`); keep the best per field, then the best field."""
    return links_from_scores(field_scores(descriptors, templates, allowed))


def links_from_scores(scores: torch.Tensor, choice: torch.Tensor | None = None) -> Links:
    if not len(scores):
        empty = torch.zeros(0)
        return Links(torch.zeros(0, dtype=torch.long), empty, empty)
    top = scores.topk(min(2, scores.shape[1]), dim=1)
    field = top.indices[:, 0] if choice is None else choice
    score = scores.gather(1, field[:, None])[:, 0]
    others = scores.clone()
    others.scatter_(1, field[:, None], -2.0)
    return Links(field, score, score - others.amax(1).clamp(min=-1.0))


def balanced_assignment(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each image to a field, maximising total similarity with at most `capacity` images
    per field (the generator drew every source cell equally often). Columns scoring -2
    (not allowed) are never used."""
    from scipy.optimize import linear_sum_assignment

    allowed = (scores > -2).any(0).nonzero()[:, 0]
    if capacity * len(allowed) < len(scores):
        raise ValueError(f"{len(scores)} images do not fit {len(allowed)} fields x {capacity}")
    cost = -scores[:, allowed].repeat_interleave(capacity, dim=1).double().numpy()
    rows, cols = linear_sum_assignment(cost)
    field = torch.empty(len(scores), dtype=torch.long)
    field[torch.from_numpy(rows)] = allowed[torch.from_numpy(cols // capacity)]
    return field


def exact_field_matches(cells: Sequence[Cell], fields: Sequence[Field], grid: int = 32
                        ) -> list[tuple[str, float]]:
    """Un-augmented KBC images (TEST_SIMPLE): the BCCD field whose half-size image is the
    same picture, by normalised correlation of small grey thumbnails; (field key, score)."""
    def thumb(image) -> torch.Tensor:
        grey = image.convert("L").resize((grid * 4 // 3, grid), resample=2, reducing_gap=None)
        t = torch.from_numpy(np.asarray(grey, dtype=np.float32)).flatten()
        t = t - t.mean()
        return t / t.norm().clamp(min=1e-6)

    if not cells:
        return []
    field_thumbs = torch.stack([thumb(load_image(f.image)) for f in fields])
    out = []
    for cell in cells:
        sims = field_thumbs @ thumb(load_image(cell.image))
        i = int(sims.argmax())
        out.append((fields[i].group_key, float(sims[i])))
    return out
