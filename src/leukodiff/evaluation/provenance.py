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
source is found by matching each image's white cell against the BCCD white cells
(`leukodiff.evaluation.kbc_matching`: locate, describe, template, link); `trace_kbc`
links every image and `Provenance.regrouped` keys it by its field.

Checks (`provenance_report`): the 71 un-augmented TEST_SIMPLE originals
against an exact whole-image match; label agreement with `bccd/labels.csv`;
copies per linked field, which the generator made almost exactly equal
(2,500 / cells in the class); and no field shared by TRAIN and TEST_SIMPLE.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from leukodiff.data.records import Box, Cell, Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.evaluation.kbc_matching import (
    GRID,
    PATCH_SIDE,
    Links,
    Templates,
    balanced_assignment,
    bccd_templates,
    exact_field_matches,
    field_scores,
    half_size,
    image_tensor,
    link,
    links_from_scores,
    locate_wbc,
    patch_descriptor,
    scan_images,
)
from leukodiff.imaging import load_image

#: Median side of a BCCD white-cell box (207 px) at KBC scale: the box given to KBC cells.
KBC_BOX_SIDE = 104
_NAME = re.compile(r"_(\d+)_(\d+)\.jpe?g$", re.IGNORECASE)


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


# --- checks of the matcher --------------------------------------------------------------------


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
        rgb = image_tensor(image)
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
        links = links_from_scores(scores, choice)
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
