"""Where each KBC image comes from: the BCCD field it was made of, and where its white cell is.

KBC (Kaggle "Blood Cell Images", dataset2-master) was made by the notebook
`augment_data.ipynb` of dhruvp/wbc-classification: every BCCD field with one
label was resized to 320x240 *whole*, split 80/20, and the training part run
through Keras' `ImageDataGenerator(rotation_range=20, horizontal_flip=True,
vertical_flip=True, shear_range=0.1, zoom_range=0.1)` with `batch_size=1`,
2,500 times per class. So a KBC image is a whole, half-size BCCD field,
turned by up to 20 degrees, maybe flipped, a little sheared and zoomed; the
white cell sits wherever it was in the field, not in the middle.

Keras 2.0 named a saved image `_<position in the shuffled epoch>_<random>.jpeg`,
so `<n>` in `_<n>_<id>.jpeg` is *not* the source cell: each epoch reshuffles
which cell lands at position n. `verify_name_groups` measures that. The true
source is found by matching each image against the BCCD white cells:

1. `locate_wbc`: the white cell is the strongest blob of nucleus stain
   (blue well above red and green), found on a smoothed stain map.
2. `patch_descriptor`: a 24x24 RGB patch (96 px at KBC scale, 192 px in the
   BCCD field) around that point, inside a disc so that turning it brings no
   corner in or out, mean-removed and unit-norm: cosine = normalised cross-correlation.
3. `bccd_templates`: the same patch around each BCCD white cell, under every
   transform the generator can make (4 flips x rotations -20..20 degrees).
4. `link`: best template per image; the field wins, with its score and its
   margin over the best *other* field.

Checks (`provenance_report`): the 71 un-augmented TEST_SIMPLE originals
against an exact whole-image match; label agreement with `bccd/labels.csv`;
copies per linked field, which the generator made almost exactly equal
(2,500 / cells in the class); and no field shared by TRAIN and TEST_SIMPLE.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from leukodiff.data.records import Box, Cell, Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.imaging import load_image

#: KBC images are BCCD fields at half size (640x480 -> 320x240).
KBC_SCALE = 0.5
#: Side of the matched patch around the nucleus, in KBC pixels, and its grid.
PATCH_SIDE = 112
GRID = 24
#: Median side of a BCCD white-cell box (207 px) at KBC scale: the box given to KBC cells.
KBC_BOX_SIDE = 104
#: The generator's transforms: horizontal/vertical flips and rotations within 20 degrees.
FLIPS = ((False, False), (True, False), (False, True), (True, True))
ANGLES = tuple(range(-20, 21, 5))
#: Zoom of +-10% in the generator: templates at three scales.
SCALES = (0.92, 1.0, 1.08)
_NAME = re.compile(r"_(\d+)_(\d+)\.jpe?g$", re.IGNORECASE)


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


def _to_tensor(image) -> torch.Tensor:
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
        rgb = _to_tensor(load_image(cells[index].image))
        x, y, s = locate_wbc(rgb)
        centres[index] = torch.tensor([x, y])
        strength[index] = s
        descriptors[index] = patch_descriptor(rgb, centres[index:index + 1], side)[0]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in track([pool.submit(one, i) for i in range(n)], "Locating KBC cells"):
            future.result()
    return Scan(centres, strength, descriptors)


def cells_with_boxes(cells: Sequence[Cell], centres: torch.Tensor,
                     side: float = KBC_BOX_SIDE) -> list[Cell]:
    """The cells again, each with a `side` x `side` box on its located white cell, so that
    `load_cell_tensors` crops around the cell (at its crop scale) instead of the image middle."""
    out = []
    for cell, (x, y) in zip(cells, centres.tolist(), strict=True):
        box = Box(x - side / 2, y - side / 2, x + side / 2, y + side / 2,
                  cell_type=cell.cell_type)
        out.append(replace(cell, box=box))
    return out


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
        rgb = _to_tensor(half_size(load_image(field.image)))
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
    return _links(field_scores(descriptors, templates, allowed))


def _links(scores: torch.Tensor, choice: torch.Tensor | None = None) -> Links:
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


def synthetic_copies(fields: Sequence[Field], n: int, seed: int = 0) -> list[tuple[object, str]]:
    """KBC-like copies of random BCCD fields with known source, made as the generator did
    (half size, +-20 degrees, shear ~0.1 rad, zoom +-10%, random flips, JPEG): a test of
    the matcher where the truth is known. Returns (PIL image, field key) pairs."""
    import io
    import random

    from PIL import Image
    from torchvision.transforms import v2

    rng = random.Random(seed)
    torch.manual_seed(seed)
    affine = v2.RandomAffine(degrees=20, shear=5.7, scale=(0.9, 1.1))
    fields = [f for f in fields if f.wbc_boxes]
    out = []
    for _ in range(n):
        field = rng.choice(fields)
        image = affine(half_size(load_image(field.image)))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        buffer.seek(0)
        out.append((Image.open(buffer).convert("RGB"), field.group_key))
    return out


def synthetic_check(fields: Sequence[Field], templates: Templates, n: int = 200,
                    seed: int = 0, min_margin: float = 0.04) -> dict:
    """Accuracy of the unconstrained matcher on `synthetic_copies`, and at the margin cut."""
    copies = synthetic_copies(fields, n, seed)
    descriptors = []
    for image, _ in copies:
        rgb = _to_tensor(image)
        x, y, _ = locate_wbc(rgb)
        descriptors.append(patch_descriptor(rgb, torch.tensor([[x, y]]), PATCH_SIDE)[0])
    links = link(torch.stack(descriptors), templates)
    right = np.array([templates.fields[int(f)] == key
                      for f, (_, key) in zip(links.field.tolist(), copies, strict=True)])
    sure = (links.margin >= min_margin).numpy()
    return {"copies": n, "seed": seed, "accuracy": float(right.mean()),
            "coverage_at_margin": float(sure.mean()),
            "accuracy_at_margin": float(right[sure].mean()) if sure.any() else float("nan")}


# --- what the names say -----------------------------------------------------------------------


def name_position(cell: Cell) -> str:
    """The `<n>` of `_<n>_<id>.jpeg` with subset and class: what the KBC reader groups by."""
    match = _NAME.search(cell.image.name)
    n = match.group(1) if match else cell.image.stem
    return f"{cell.subset}:{cell.cell_type}:{n}"


def verify_name_groups(cells: Sequence[Cell], descriptors: torch.Tensor,
                       source: Sequence[str], pairs_per_class: int = 5_000, seed: int = 0
                       ) -> dict:
    """Do copies that share `<n>` show the same cell? Over pairs of images of one class,
    within vs across `<n>` groups: how often both come from the same BCCD field, and their
    patch similarity (best of the 4 flips; the generator turns copies up to 40 degrees
    apart, so even true copies stay below 1). For scale, the same similarity for pairs
    from the same field."""
    rng = np.random.default_rng(seed)
    names = [name_position(c) for c in cells]
    grids = descriptors.view(len(descriptors), 3, GRID, GRID)
    flipped = [g.flatten(1) for g in (grids, grids.flip(-1), grids.flip(-2), grids.flip(-1, -2))]

    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        return torch.stack([(flipped[0][ta] * f[tb]).sum(1) for f in flipped]).amax(0).numpy()

    by_class: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(cells):
        by_class[str(c.cell_type)].append(i)
    pairs = {"within_name": ([], []), "across_name": ([], []), "same_field": ([], [])}
    for members in by_class.values():
        members_a = np.array(members)
        a = rng.choice(members_a, pairs_per_class)
        b = rng.choice(members_a, pairs_per_class)
        for x, y in zip(a, b, strict=True):
            if x == y:
                continue
            kind = "within_name" if names[x] == names[y] else "across_name"
            pairs[kind][0].append(x)
            pairs[kind][1].append(y)
        groups: dict[str, list[int]] = defaultdict(list)
        for i in members:
            groups[names[i]].append(i)
        fields: dict[str, list[int]] = defaultdict(list)
        for i in members:
            fields[source[i]].append(i)
        for kind, buckets in (("within_name", groups), ("same_field", fields)):
            for bucket in buckets.values():
                if len(bucket) < 2:
                    continue
                picks = rng.choice(len(bucket), (min(4 * len(bucket), 200), 2))
                for x, y in picks:
                    if x != y:
                        pairs[kind][0].append(bucket[x])
                        pairs[kind][1].append(bucket[y])
    out: dict = {}
    for kind, (a, b) in pairs.items():
        a_arr, b_arr = np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)
        same = [source[x] == source[y] for x, y in zip(a, b, strict=True)]
        sims = similarity(a_arr, b_arr) if len(a_arr) else np.zeros(0)
        out[kind] = {"pairs": len(a), "same_field_rate": float(np.mean(same)) if same else 0.0,
                     "similarity_mean": float(sims.mean()) if len(sims) else float("nan")}
    distinct: dict[str, set[str]] = defaultdict(set)
    for name, field in zip(names, source, strict=True):
        distinct[name].add(field)
    out["name_groups"] = len(distinct)
    out["fields_per_name_group"] = float(np.mean([len(v) for v in distinct.values()]))
    out["source_fields"] = len(set(source))
    return out


# --- putting it together ----------------------------------------------------------------------


@dataclass
class Provenance:
    """KBC cells with their white cells located and their BCCD source fields."""

    cells: list[Cell]  # the KBC cells, as read
    centres: torch.Tensor  # (N, 2) white-cell centre per image, KBC pixels
    source: list[str]  # BCCD field key per cell (best match; see `confident`)
    confident: list[bool]  # the match clears the score and margin thresholds
    margin: torch.Tensor  # (N,) final match's lead over the best other allowed field
    report: dict

    def regrouped(self, box_side: float = KBC_BOX_SIDE) -> list[Cell]:
        """Cells with a box on the located white cell and their BCCD field as group key.

        BCCD cells carry the same key (`bccd:BloodImage_NNNNN`), so a grouped split of KBC
        and BCCD together keeps every KBC copy beside its original.
        """
        boxed = cells_with_boxes(self.cells, self.centres, box_side)
        return [replace(c, group_key=k) for c, k in zip(boxed, self.source, strict=True)]


def single_label_fields(templates: Templates) -> dict[str, torch.Tensor]:
    """Per cell type, a mask of the fields labels.csv gives that one type (KBC used no others)."""
    types = sorted({t for labels in templates.labels for t in labels})
    return {t: torch.tensor([labels == (t,) for labels in templates.labels]) for t in types}


def trace_kbc(kbc_cells: Sequence[Cell], bccd_fields: Sequence[Field],
              track: Track = no_progress, min_score: float = 0.5, min_margin: float = 0.04,
              synthetic: int = 200, seed: int = 0, balanced: bool = True, slack: int = 2
              ) -> Provenance:
    """Locate, describe and link every KBC image to its BCCD field; check the links.

    TEST_SIMPLE originals are matched whole (they are un-augmented). A TRAIN image is
    matched by its white-cell patch among the fields that KBC could have made it from:
    the fields labels.csv gives its class alone, less those TEST_SIMPLE holds. The
    unconstrained match (any field) is kept for the report: its label agreement and its
    agreement with the constrained one measure the matcher without using the labels.
    With `balanced`, no field takes more than its share of copies (+ `slack`): the
    generator drew each source cell equally often (`balanced_assignment`).
    """
    kbc_cells = list(kbc_cells)
    scan = scan_images(kbc_cells, track)
    templates = bccd_templates(bccd_fields, track)
    free = link(scan.descriptors, templates)
    source = [templates.fields[int(f)] for f in free.field.tolist()]
    confident = ((free.score >= min_score) & (free.margin >= min_margin)).tolist()
    margin = free.margin.clone()

    simple = [i for i, c in enumerate(kbc_cells) if c.subset != "TRAIN"]
    exact = exact_field_matches([kbc_cells[i] for i in simple], bccd_fields)
    for i, (key, score) in zip(simple, exact, strict=True):
        source[i], confident[i] = key, score > 0.99
    held_out = {key for key, _ in exact}
    single = single_label_fields(templates)
    not_held = torch.tensor([f not in held_out for f in templates.fields])
    capacities = {}
    for cell_type, mask in single.items():
        index = [i for i, c in enumerate(kbc_cells)
                 if c.subset == "TRAIN" and str(c.cell_type) == cell_type]
        if not index:
            continue
        allowed = mask & not_held
        if not bool(allowed.any()):
            allowed = mask
        scores = field_scores(scan.descriptors[index], templates, allowed)
        choice = None
        if balanced:
            # `<n>` runs over the generator's source cells, each drawn equally often
            sources = len({name_position(kbc_cells[i]) for i in index})
            capacity = math.ceil(len(index) / sources) + slack
            if capacity * int(allowed.sum()) >= len(index):
                choice = balanced_assignment(scores, capacity)
                capacities[cell_type] = capacity
        links = _links(scores, choice)
        for j, i in enumerate(index):
            source[i] = templates.fields[int(links.field[j])]
            confident[i] = bool(links.score[j] >= min_score and links.margin[j] >= min_margin)
            margin[i] = links.margin[j]
    report = provenance_report(kbc_cells, templates, free, source, confident, exact)
    report["thresholds"] = {"min_score": min_score, "min_margin": min_margin}
    report["capacity_per_field"] = capacities
    if synthetic:
        report["synthetic"] = synthetic_check(bccd_fields, templates, synthetic, seed, min_margin)
    train = [i for i, c in enumerate(kbc_cells) if c.subset == "TRAIN"]
    if train:
        report["name_groups"] = verify_name_groups(
            [kbc_cells[i] for i in train], scan.descriptors[train], [source[i] for i in train],
            seed=seed)
    return Provenance(kbc_cells, scan.centres, source, confident, margin, report)


def provenance_report(cells: Sequence[Cell], templates: Templates, free: Links,
                      source: Sequence[str], confident: Sequence[bool],
                      exact: Sequence[tuple[str, float]]) -> dict:
    """Coverage, label agreement, copies per field, TRAIN/TEST_SIMPLE overlap, exact check."""
    labels_of = dict(zip(templates.fields, templates.labels, strict=True))
    free_source = [templates.fields[int(f)] for f in free.field.tolist()]
    report: dict = {"bccd_fields_with_wbc": len(templates.fields), "subsets": {}}
    for subset in sorted({str(c.subset) for c in cells}):
        index = [i for i, c in enumerate(cells) if str(c.subset) == subset]
        per_class = {}
        for cell_type in sorted({str(cells[i].cell_type) for i in index}):
            members = [i for i in index if str(cells[i].cell_type) == cell_type]
            copies = Counter(source[i] for i in members)
            per_class[cell_type] = {
                "images": len(members),
                "confident": int(sum(confident[i] for i in members)),
                "fields": len(copies),
                "name_groups": len({name_position(cells[i]) for i in members}),
                "free_label_agreement": float(np.mean(
                    [cell_type in labels_of.get(free_source[i], ()) for i in members])),
                "free_equals_final": float(np.mean([free_source[i] == source[i]
                                                    for i in members])),
                "copies_min": min(copies.values()),
                "copies_median": float(np.median(list(copies.values()))),
                "copies_max": max(copies.values()),
                "expected_copies": round(2500 / len(copies), 1),
            }
        report["subsets"][subset] = {
            "images": len(index),
            "confident": int(sum(confident[i] for i in index)),
            "coverage": float(np.mean([confident[i] for i in index])),
            "fields": len({source[i] for i in index}),
            "free_label_agreement": float(np.mean(
                [str(cells[i].cell_type) in labels_of.get(free_source[i], ()) for i in index])),
            "free_equals_final": float(np.mean([free_source[i] == source[i] for i in index])),
            "per_class": per_class,
        }
    train = {source[i] for i, c in enumerate(cells) if c.subset == "TRAIN"}
    simple_index = [i for i, c in enumerate(cells) if c.subset != "TRAIN"]
    report["fields_in_train_and_test_simple"] = sorted(
        train & {source[i] for i in simple_index})
    report["bccd_fields_used"] = len(set(source))
    if exact:
        report["test_simple_exact"] = {
            "images": len(exact),
            "exact_score_min": min(s for _, s in exact),
            "patch_matcher_agrees": float(np.mean(
                [free_source[i] == key for i, (key, _) in zip(simple_index, exact,
                                                              strict=True)])),
            "same_field_twice": len(exact) - len({k for k, _ in exact}),
        }
    return report
