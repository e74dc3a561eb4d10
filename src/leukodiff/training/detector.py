"""Training the level-1 detector (Faster R-CNN, MobileNetV1-0.5) on smear fields.

    config = DetectorConfig(epochs=40, sources=("bccd", "bcd", "chula"))
    manifest = train_detector(config, Path("runs/detector"))

Data: the fields of `sources` (BCCD by default), each white-cell box labelled with
its group (mononuclear / polymorphonuclear) where the source says it (`Box.group`;
BCCD via `labels.csv`). BCCD's VOC `test` list is never read here except for the
final report; model selection uses the VOC `val` list (or, with
`validation="grouped"`, a grouped split of train+val). Other sources are split by
`data.splits.holdout` (grouped by slide or field): their train parts train, their
val parts join the selection, their test parts are only reported. Fields larger
than the detector's native field (Chula's 1440x900) are trained on as windows of
that size, mostly around a white cell, sometimes anywhere (red cells, debris and
stain from that lab as background).

Boxes whose group is unknown (a field whose labels name both groups, or fewer
labels than boxes: 9 boxes in 5 of 205 VOC train fields; every BCD box) are not
guessed: they are "ignore" boxes (`DetectorConfig.unknown_group="ignore"`): the
class-agnostic RPN learns them as cells, the RoI heads neither as a group nor as
background (`models.detector.IgnoringRPN`, `IgnoringRoIHeads`), while the field's
other cells train as usual. `unknown_group="drop"` leaves such fields out instead. The
white cells a source leaves unboxed altogether (reviewed lists of BCCD and Chula,
`data.sources.unboxed`) join the training and validation fields as such boxes.

Balance (BCCD's train list has ~36 mononuclear vs ~170 polymorphonuclear
boxes): fields holding a mononuclear cell are drawn `mono_oversample` times
per epoch, and with probability `copy_paste` a mononuclear cell cut from
another training field (elliptical, feathered mask) is pasted into the field.

Cells of every type (`pbc_paste`): the field sets hold almost no basophils and few
eosinophils or monocytes, so with probability `pbc_paste` a PBC cell of any of the
five types is pasted too (`pbc_donors`: boxed by the shipped detector), its colours
moved from PBC's to the field's (CIELAB statistics of the whole image) and its size
to the field's own white cells.

Augmentation (torchvision.transforms.v2 with tv_tensors.BoundingBoxes):
flips, 90-degree rotations (one per batch, so batches need no padding),
scale jitter (one factor per batch; enlarged fields are cropped back to their
size) and colour jitter.

Group classifier (`DetectorSpec.group_classifier`, on by default): Faster
R-CNN's RoI head learns the groups poorly from BCCD's ~36 mononuclear training
cells (63-96% group accuracy on the VOC test list over five runs), so after the detector's
epochs a MobileNetV1-0.5 crop classifier is fine-tuned on the training fields'
cells (drawn `group_bccd_repeat` times) plus `group_pbc_per_type` PBC cells of
each type, cropped as the level-2 models crop them; the pipeline relabels every box
the detector finds with it (`Analyzer.detect`). It is selected on the val fields' cells.
"""

from __future__ import annotations

import json
import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from leukodiff.data.records import Cell, Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_cells, load_fields
from leukodiff.data.sources.unboxed import unboxed_white_cells
from leukodiff.data.splits import holdout, monte_carlo
from leukodiff.imaging import STAIN_NORMALISATIONS, lab_to_srgb, load_image, srgb_to_lab
from leukodiff.metrics.detection import detection_metrics
from leukodiff.models.detector import (
    CLASSES,
    LABEL_OF,
    DetectorSpec,
    build_detector,
    parameter_count,
)
from leukodiff.models.files import read_checked, resolve
from leukodiff.models.io import load_detector, save_model
from leukodiff.pipeline.analyzer import Analyzer
from leukodiff.taxonomy import GROUP_OF, Group
from leukodiff.training.cells import (
    AUGMENTATIONS,
    CellTensorDataset,
    CropGeometry,
    augmentation,
    load_cell_tensors,
)
from leukodiff.training.common import (
    resume_checkpoint,
    save_checkpoint,
    seed_everything,
    warmup_cosine,
)

VALIDATIONS = ("voc", "grouped")


class DetectorTrainingError(RuntimeError):
    """Detector training cannot start or go on."""


@dataclass(frozen=True)
class DetectorConfig:
    spec: DetectorSpec = field(default_factory=DetectorSpec)
    epochs: int = 40
    batch_size: int = 8
    lr: float = 1e-3  # AdamW; linear warm-up, then cosine to zero
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    frozen_blocks: int = 3  # MobileNet conv blocks kept at their ImageNet weights
    seed: int = 0
    # field sets to learn from: BCCD keeps its VOC lists, others are split by holdout()
    sources: tuple[str, ...] = ("bccd",)
    validation: str = "voc"  # "voc": BCCD's VOC val list; "grouped": split of train+val
    val_fraction: float = 0.2  # only for validation="grouped"
    val_every: int = 2  # epochs between validations (the last epoch is always validated)
    unknown_group: str = "ignore"  # WBC boxes of unknown group: "ignore" them, or "drop" fields
    mono_oversample: int = 5  # times a field with a mononuclear cell is drawn per epoch
    copy_paste: float = 0.5  # probability of pasting one mononuclear cell into a field
    # Down to 0.5: other labs' cameras show white cells at half BCCD's ~200 px (BCD: ~100)
    scale_range: tuple[float, float] = (0.5, 1.25)
    color_jitter: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.04)
    channel_gain: float = 0.15  # each RGB channel times 1 +- this: stain and lamp balance
    blur: float = 0.3  # probability of a Gaussian blur (sigma 0.3-1.5): focus and optics
    # probability that a window cut from a field larger than the detector's native one
    # holds a white cell (the rest are anywhere: that lab's background as negatives)
    window_on_cell: float = 0.75
    max_train_fields: int = 0  # > 0: only this many training fields (tests, quick runs)
    max_val_fields: int = 0
    # group classifier (when spec.group_classifier): training fields' cells + PBC cells
    group_epochs: int = 8
    group_lr: float = 5e-4
    group_batch_size: int = 64
    group_pbc_per_type: int = 800  # PBC cells per type (0: no PBC)
    group_bccd_repeat: int = 5  # training fields' cells are drawn this many times per epoch
    group_augmentation: str = "basic"  # training.cells.AUGMENTATIONS
    # start from a trained detector.pt (fine-tuning); with group_epochs=0 its group
    # classifier is kept as it is
    init_weights: str = ""
    # Cells of every type from another lab: with this probability a field gets one PBC
    # cell pasted in (`pbc_donors`), coloured like the field and sized like its white
    # cells. The detection labs have almost no basophils (BCCD names 4; BCD: untyped): without
    # this a detector trained on them misses most basophils of a new lab.
    pbc_paste: float = 0.0
    pbc_paste_per_type: int = 100  # PBC cells per type to draw from
    pbc_box_detector: str = "detector"  # the detector that boxes the PBC cells

    def check(self) -> None:
        if self.validation not in VALIDATIONS:
            raise DetectorTrainingError(f"validation must be one of {VALIDATIONS}")
        if self.unknown_group not in ("ignore", "drop"):
            raise DetectorTrainingError("unknown_group must be 'ignore' or 'drop'")
        if self.epochs < 1 or self.batch_size < 1:
            raise DetectorTrainingError("epochs and batch_size must be at least 1")
        if not self.sources:
            raise DetectorTrainingError("sources must name at least one field data set")
        if self.group_augmentation not in AUGMENTATIONS:
            raise DetectorTrainingError(f"group_augmentation must be one of {AUGMENTATIONS}")
        if not 0.0 <= self.pbc_paste <= 1.0:
            raise DetectorTrainingError("pbc_paste is a probability: 0 to 1")
        if self.spec.group_stain not in STAIN_NORMALISATIONS:
            raise DetectorTrainingError(f"unknown stain normalisation {self.spec.group_stain!r}"
                                        f"; choose one of {', '.join(STAIN_NORMALISATIONS)}")

    @classmethod
    def from_dict(cls, data: dict) -> DetectorConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("spec"), dict):
            known["spec"] = DetectorSpec.from_dict(known["spec"])
        for key in ("scale_range", "color_jitter", "sources"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


# --- data ------------------------------------------------------------------------------------


def has_unknown_group(record: Field) -> bool:
    return any(box.group is None for box in record.wbc_boxes)


def unknown_group_boxes(record: Field) -> torch.Tensor:
    """(N, 4) float xyxy: the field's white-cell boxes whose group is unknown."""
    boxes = [b.xyxy for b in record.wbc_boxes if b.group is None]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def field_target(record: Field) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes (N, 4) float xyxy, labels (N,) int64) of a field's WBC boxes of known group."""
    boxes = [b.xyxy for b in record.wbc_boxes if b.group is not None]
    labels = [LABEL_OF[Group(b.group)] for b in record.wbc_boxes if b.group is not None]
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(labels, dtype=torch.int64))


def has_mononuclear(record: Field) -> bool:
    return any(box.group == Group.MONONUCLEAR for box in record.wbc_boxes)


@dataclass
class DetectorData:
    """The fields of one run, by part."""

    train: list[Field]
    val: list[Field]
    test: list[Field]
    dropped: list[Field] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        def count(records: list[Field]) -> dict[str, int]:
            boxes = [b for r in records for b in r.wbc_boxes]
            return {"fields": len(records),
                    "mononuclear": sum(b.group == Group.MONONUCLEAR for b in boxes),
                    "polymorphonuclear": sum(b.group == Group.POLYMORPHONUCLEAR for b in boxes),
                    "unknown group": sum(b.group is None for b in boxes)}

        return {"train": count(self.train), "val": count(self.val), "test": count(self.test),
                "dropped (unknown group)": count(self.dropped)}


def _bccd_parts(config: DetectorConfig, data_root, track: Track
                ) -> dict[str, list[Field]]:
    """BCCD by its VOC lists (or a grouped split of train+val). White cells that BCCD
    leaves unboxed in train and val fields are added as boxes (`unboxed_white_cells`):
    left out, they would teach the detector that a white cell is background. Test
    fields stay as annotated."""
    records = sorted(load_fields("bccd", data_root, track).records, key=lambda r: r.image.name)
    unboxed = unboxed_white_cells("bccd")
    by_subset: dict[str, list[Field]] = {"train": [], "val": [], "test": []}
    for record in records:
        if record.subset in ("train", "val") and record.image.stem in unboxed:
            record = replace(record, boxes=record.boxes + unboxed[record.image.stem])
        if record.subset in by_subset:
            by_subset[record.subset].append(record)
    if config.validation == "grouped":
        pool = by_subset["train"] + by_subset["val"]
        split = monte_carlo(pool, repeats=1, train_fraction=1 - config.val_fraction,
                            seed=config.seed, grouped=True)[0]
        by_subset["train"] = [pool[i] for i in split.train]
        by_subset["val"] = [pool[i] for i in split.test]
    return by_subset


def _holdout_parts(source: str, config: DetectorConfig, data_root, track: Track
                   ) -> dict[str, list[Field]]:
    """Any other field set: grouped (by slide or field) train / val / test parts. Its
    reviewed unboxed white cells (`data.sources.unboxed`) join the train and val fields
    as boxes of unknown group, as BCCD's do; test fields stay as annotated."""
    records = sorted(load_fields(source, data_root, track).records, key=lambda r: r.image.name)
    parts = holdout(records, seed=config.seed)
    unboxed = unboxed_white_cells(source)
    by_part = {name: [records[i] for i in indices] for name, indices in parts.items()}
    for name in ("train", "val"):
        by_part[name] = [replace(r, boxes=r.boxes + unboxed.get(r.image.stem, ()))
                         for r in by_part[name]]
    return by_part


def prepare_fields(config: DetectorConfig, data_root: str | Path | None = None,
                   track: Track = no_progress) -> DetectorData:
    """The training, selection and test fields of every source in `config.sources`."""
    by_part: dict[str, list[Field]] = {"train": [], "val": [], "test": []}
    for source in config.sources:
        parts = (_bccd_parts(config, data_root, track) if source == "bccd"
                 else _holdout_parts(source, config, data_root, track))
        for name, records in parts.items():
            by_part[name].extend(records)
    train, val = by_part["train"], by_part["val"]
    dropped = [r for r in train if has_unknown_group(r)] if config.unknown_group == "drop" \
        else []
    train = [r for r in train if r not in dropped]
    if config.max_train_fields:
        # keep both groups in small runs: mononuclear fields first, alternating
        mono = [r for r in train if has_mononuclear(r)]
        rest = [r for r in train if not has_mononuclear(r)]
        mixed = [r for pair in zip(mono, rest, strict=False) for r in pair]
        mixed += mono[len(rest):] + rest[len(mono):]
        train = mixed[: config.max_train_fields]
    if config.max_val_fields:
        val = val[: config.max_val_fields]
    if not train or not val:
        raise DetectorTrainingError(f"no training or validation fields found in "
                                    f"{', '.join(config.sources)}")
    return DetectorData(train, val, by_part["test"], dropped)


@dataclass(frozen=True)
class PastedCell:
    """A white cell from another lab, ready to paste: its box's pixels, the colour
    statistics (CIELAB mean and spread) of the image it came from, and its group."""

    patch: torch.Tensor  # uint8 (3, h, w)
    lab_mean: np.ndarray
    lab_std: np.ndarray
    group: Group
    cell_type: str


def lab_statistics(pixels: np.ndarray, step: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """CIELAB mean and standard deviation of an (H, W, 3) uint8 image (every `step`th
    pixel: the statistics, not the detail)."""
    lab = srgb_to_lab(pixels[::step, ::step].reshape(-1, 3).astype(np.float32) / 255)
    return lab.mean(0), lab.std(0) + 1e-3


def pbc_donors(config: DetectorConfig, data_root: str | Path | None = None,
               track: Track = no_progress) -> list[PastedCell]:
    """`pbc_paste_per_type` PBC cells of each type (seeded), each boxed by
    `pbc_box_detector`: its most confident box (score >= 0.5) holding the image centre
    (PBC centres its cell), kept when whole (off the image border) and 60-300 px across.

    PBC gives no boxes, and a box drawn from colour alone misses pale cytoplasm; the
    shipped detector boxes all five types well (30 of 30 of each checked by eye). It
    learnt BCCD, so a fold without BCCD gets BCCD's sense of where a cell ends, never
    its pixels."""
    cells = [c for c in load_cells("pbc", data_root, track).records if c.cell_type in GROUP_OF]
    rng = random.Random(config.seed)
    chosen = []
    for cell_type in sorted({c.cell_type for c in cells}):
        mine = sorted((c for c in cells if c.cell_type == cell_type), key=lambda c: c.image.name)
        chosen += rng.sample(mine, min(config.pbc_paste_per_type, len(mine)))
    analyzer = Analyzer.of_detector(load_detector(config.pbc_box_detector)[0], group=False,
                                    detection_threshold=0.5)
    donors = []
    for start in track(range(0, len(chosen), 16), "Boxing PBC cells to paste"):
        batch = chosen[start:start + 16]
        pixels = [np.asarray(load_image(c.image), dtype=np.uint8) for c in batch]
        found = [analyzer.detect(Image.fromarray(image)) for image in pixels]
        for cell, image, detections in zip(batch, pixels, found, strict=True):
            height, width = image.shape[:2]
            best = None
            for box, score in zip(detections.boxes.tolist(), detections.scores.tolist(),
                                  strict=True):
                x0, y0, x1, y1 = box
                central = x0 < width / 2 < x1 and y0 < height / 2 < y1
                whole = x0 > 2 and y0 > 2 and x1 < width - 2 and y1 < height - 2
                if central and whole and 60 <= max(x1 - x0, y1 - y0) <= 300 and (
                        best is None or score > best[1]):
                    best = (box, score)
            if best is None:
                continue
            x0, y0, x1, y1 = (round(v) for v in best[0])
            patch = torch.from_numpy(image[y0:y1, x0:x1].copy()).permute(2, 0, 1).contiguous()
            donors.append(PastedCell(patch, *lab_statistics(image), GROUP_OF[cell.cell_type],
                                     str(cell.cell_type)))
    return donors


class FieldImages:
    """Decoded fields as uint8 (3, H, W) tensors, decoded once and kept in memory."""

    def __init__(self, records: Sequence[Field]) -> None:
        self.records = list(records)
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            array = np.asarray(load_image(self.records[index].image), dtype=np.uint8)
            self._cache[index] = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
        return self._cache[index]


def _rand(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _ellipse_mask(height: int, width: int, feather: float = 0.12) -> torch.Tensor:
    """Soft elliptical alpha filling a (height, width) box: 1 inside, 0 at the box edge."""
    yy = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 - 1
    xx = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 - 1
    radius = torch.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    return ((1.0 - radius) / feather).clamp(0, 1)


# A white cell cut by a training window keeps its (clipped) box when at least this share
# of it is inside; less, and it becomes an ignore box (a cell to the RPN, nothing to the
# RoI heads); under WINDOW_DROPPED, its sliver is left as background.
WINDOW_VISIBLE, WINDOW_DROPPED = 0.6, 0.25


class Augmenter:
    """Windows of large fields, copy-paste of mononuclear cells, then flips, rotation,
    scale and colour jitter."""

    def __init__(self, config: DetectorConfig, images: FieldImages,
                 pbc: Sequence[PastedCell] = ()) -> None:
        self.config = config
        self.images = images
        self.pbc = list(pbc)
        # donor cells: whole (not border-cut) mononuclear boxes of the training fields
        self.donors: list[tuple[int, tuple[int, int, int, int]]] = []
        for index, record in enumerate(images.records):
            for box in record.wbc_boxes:
                whole = box.x0 > 1 and box.y0 > 1 and box.x1 < record.width - 1 \
                    and box.y1 < record.height - 1
                if box.group == Group.MONONUCLEAR and whole and min(box.width, box.height) > 60:
                    self.donors.append((index, tuple(round(c) for c in box.xyxy)))
        self.color = v2.ColorJitter(*config.color_jitter)
        self.window = (config.spec.max_size, config.spec.min_size)  # native field (w, h)

    def cut_window(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A native-size window of a larger field: around a random white cell with
        probability `window_on_cell`, else anywhere. Cut cells: see WINDOW_VISIBLE."""
        _, height, width = image.shape
        long_side, short_side = self.window
        win_w, win_h = (long_side, short_side) if width >= height else (short_side, long_side)
        win_w, win_h = min(win_w, width), min(win_h, height)
        if (win_w, win_h) == (width, height):
            return image, boxes, labels
        x0, y0 = int(torch.randint(width - win_w + 1, ())), int(torch.randint(height - win_h + 1,
                                                                             ()))
        if len(boxes) and torch.rand(()) < self.config.window_on_cell:
            bx0, by0, bx1, by1 = boxes[int(torch.randint(len(boxes), ()))].tolist()
            # any window position that holds the whole cell (or as much as fits)
            low_x, high_x = max(0.0, bx1 - win_w), min(bx0, width - win_w)
            low_y, high_y = max(0.0, by1 - win_h), min(by0, height - win_h)
            x0 = round(_rand(low_x, high_x)) if high_x > low_x else round(min(max(
                (bx0 + bx1 - win_w) / 2, 0), width - win_w))
            y0 = round(_rand(low_y, high_y)) if high_y > low_y else round(min(max(
                (by0 + by1 - win_h) / 2, 0), height - win_h))
        image = image[:, y0:y0 + win_h, x0:x0 + win_w]
        if not len(boxes):
            return image, boxes, labels
        shifted = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        clipped = torch.stack([shifted[:, 0].clamp(0, win_w), shifted[:, 1].clamp(0, win_h),
                               shifted[:, 2].clamp(0, win_w), shifted[:, 3].clamp(0, win_h)], 1)
        area = (shifted[:, 2:] - shifted[:, :2]).clamp(min=1e-6).prod(1)
        visible = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(1) / area
        labels = torch.where(visible >= WINDOW_VISIBLE, labels, torch.full_like(labels, -1))
        keep = visible >= WINDOW_DROPPED
        return image, clipped[keep], labels[keep]

    def paste(self, index: int, image: torch.Tensor, boxes: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        donors = [d for d in self.donors if d[0] != index]
        if not donors:
            return image, boxes, labels
        donor, (x0, y0, x1, y1) = donors[int(torch.randint(len(donors), ()))]
        patch = self.images.image(donor)[:, y0:y1, x0:x1].float()
        return self._place(patch, Group.MONONUCLEAR, image, boxes, labels)

    def paste_pbc(self, index: int, image: torch.Tensor, boxes: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One PBC cell, its colours moved from PBC's to this field's (CIELAB mean and
        spread of the whole image: the lab's look, not the cell's) and its size to the
        field's own white cells (median box; as cut when the field has none)."""
        donor = self.pbc[int(torch.randint(len(self.pbc), ()))]
        sizes = [max(b.width, b.height) for b in self.images.records[index].wbc_boxes]
        _, ph, pw = donor.patch.shape
        factor = min(max(float(np.median(sizes)) / max(ph, pw), 0.4), 2.5) if sizes else 1.0
        factor *= _rand(0.85, 1.15)  # cells of one lab differ in size too
        patch = TF.resize(donor.patch, [max(8, round(ph * factor)), max(8, round(pw * factor))],
                          antialias=True)
        mean, std = lab_statistics(image.permute(1, 2, 0).numpy())
        lab = srgb_to_lab(patch.permute(1, 2, 0).numpy().astype(np.float32) / 255)
        # spreads scaled at most 2x either way: a field of saturated red cells would
        # otherwise paint the donor's granules an unnatural red
        lab = (lab - donor.lab_mean) * np.clip(std / donor.lab_std, 0.5, 2.0) + mean
        rgb = lab_to_srgb(lab) * 255
        patch = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)
        return self._place(patch, donor.group, image, boxes, labels)

    def _place(self, patch: torch.Tensor, group: Group, image: torch.Tensor,
               boxes: torch.Tensor, labels: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`patch` (float, 0-255) flipped, turned and blended (feathered ellipse) into a
        free spot of `image`, touching no white cell already there; its box added."""
        if torch.rand(()) < 0.5:
            patch = patch.flip(-1)
        patch = torch.rot90(patch, int(torch.randint(4, ())), dims=(1, 2))
        _, ph, pw = patch.shape
        _, height, width = image.shape
        if ph >= height or pw >= width:
            return image, boxes, labels
        for _ in range(20):  # a free spot: no overlap with any white cell already there
            px, py = int(torch.randint(width - pw, ())), int(torch.randint(height - ph, ()))
            new = torch.tensor([[px, py, px + pw, py + ph]], dtype=torch.float32)
            if not len(boxes):
                break
            low, high = torch.maximum(boxes[:, :2], new[:, :2]), torch.minimum(boxes[:, 2:],
                                                                               new[:, 2:])
            overlap = (high > low).all(dim=1)
            if not bool(overlap.any()):
                break
        else:
            return image, boxes, labels
        alpha = _ellipse_mask(ph, pw)
        image = image.clone()
        region = image[:, py:py + ph, px:px + pw].float()
        image[:, py:py + ph, px:px + pw] = (alpha * patch + (1 - alpha) * region).round().to(
            torch.uint8)
        return (image, torch.cat([boxes, new]),
                torch.cat([labels, torch.tensor([LABEL_OF[group]])]))

    def __call__(self, index: int, rotation: int, scale: float
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Augmented field `index`: float image in [0, 1] and its target."""
        image = self.images.image(index)
        boxes, labels = field_target(self.images.records[index])
        unknown = unknown_group_boxes(self.images.records[index])  # label -1 until the end
        boxes = torch.cat([boxes, unknown])
        labels = torch.cat([labels, torch.full((len(unknown),), -1, dtype=torch.int64)])
        image, boxes, labels = self.cut_window(image, boxes, labels)
        if self.config.copy_paste and torch.rand(()) < self.config.copy_paste:
            image, boxes, labels = self.paste(index, image, boxes, labels)
        if self.pbc and torch.rand(()) < self.config.pbc_paste:
            image, boxes, labels = self.paste_pbc(index, image, boxes, labels)
        height, width = image.shape[-2:]
        image = tv_tensors.Image(image)
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY",
                                                    canvas_size=(height, width)),
                  "labels": labels}
        if torch.rand(()) < 0.5:
            image, target = TF.horizontal_flip(image), {**target, "boxes":
                                                        TF.horizontal_flip(target["boxes"])}
        if torch.rand(()) < 0.5:
            image, target = TF.vertical_flip(image), {**target, "boxes":
                                                      TF.vertical_flip(target["boxes"])}
        if rotation:
            image = TF.rotate(image, 90.0 * rotation, expand=True)
            target["boxes"] = TF.rotate(target["boxes"], 90.0 * rotation, expand=True)
        if scale != 1.0:
            h, w = image.shape[-2:]
            size = [max(32, round(h * scale)), max(32, round(w * scale))]
            image = TF.resize(image, size, antialias=True)
            target["boxes"] = TF.resize(target["boxes"], size)
            if scale > 1.0:  # crop back to the unscaled size: the same compute per step
                top, left = int(torch.randint(size[0] - h + 1, ())), int(
                    torch.randint(size[1] - w + 1, ()))
                image = TF.crop(image, top, left, h, w)
                target["boxes"] = TF.crop(target["boxes"], top, left, h, w)
        image = self.color(image)
        if self.config.channel_gain:
            gain = 1 + self.config.channel_gain * (2 * torch.rand(3, 1, 1) - 1)
            image = tv_tensors.wrap((image.float() * gain).clamp(0, 255).to(torch.uint8),
                                    like=image)
        if torch.rand(()) < self.config.blur:
            image = TF.gaussian_blur(image, [7, 7], [_rand(0.3, 1.5)])
        image, target = v2.SanitizeBoundingBoxes(min_size=8)(image, target)
        boxes = target["boxes"].as_subclass(torch.Tensor).float()
        known = target["labels"] > 0
        return (image.as_subclass(torch.Tensor).float().div_(255),
                {"boxes": boxes[known], "labels": target["labels"][known],
                 "ignore": boxes[~known]})


def epoch_order(records: Sequence[Field], oversample: int, generator: torch.Generator
                ) -> list[int]:
    """Field indices for one epoch: mononuclear fields `oversample` times, shuffled."""
    indices = [i for i, r in enumerate(records)
               for _ in range(max(1, oversample) if has_mononuclear(r) else 1)]
    order = torch.randperm(len(indices), generator=generator).tolist()
    return [indices[i] for i in order]


# --- training --------------------------------------------------------------------------------


def selection_score(metrics: dict, with_groups: bool = True) -> tuple[float, float]:
    """Validation score: mean of class-agnostic AP50 and the per-group mean AP50 (or
    AP50 alone when a group classifier will relabel the boxes); ties broken by
    class-agnostic AP50:95."""
    first = metrics["wbc"]["ap50"] or 0.0
    if with_groups:
        first = (first + metrics["groups"]["map50"]) / 2
    return first, metrics["wbc"]["ap50_95"] or 0.0


def validate(model, records: Sequence[Field], images: FieldImages | None = None,
             refine: bool = True) -> dict:
    """Detection metrics on `records` (decoded from disk unless `images` holds them), found
    by the pipeline's own detection on the model in memory (`Analyzer.of_detector`: what
    ships, down to score 0 for AP). `refine=False`: Faster R-CNN's own group labels (the
    group classifier is trained after the detector's epochs)."""
    detections = []
    with Analyzer.of_detector(model, group=refine) as analyzer:
        for index, record in enumerate(records):
            image = (Image.fromarray(images.image(index).permute(1, 2, 0).numpy())
                     if images is not None else load_image(record.image))
            detections.append(analyzer.detect(image))
    spec: DetectorSpec = model.spec
    return detection_metrics(detections, records, score_threshold=spec.score_threshold)


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_detector(
    config: DetectorConfig,
    out_dir: Path,
    *,
    data_root: str | Path | None = None,
    weights_dir: str | Path | None = None,
    resume: bool = False,
    track: Track = no_progress,
    log: Callable[[str], None] = lambda message: None,
    time_limit_minutes: float | None = None,
    device: str | None = None,
    data: DetectorData | None = None,
) -> dict:
    """Train, validate every `val_every` epochs, keep the best on val, report test.

    Writes `last.pt` (atomic, every epoch; `resume=True` continues it),
    `best.pt` and, at the end, `detector.pt` + `detector.json` (the manifest,
    also returned). With `time_limit_minutes`, stops cleanly after the epoch
    that crosses it and returns `{"finished": False, "epoch": n}`: run again
    with `resume=True` to go on.
    """
    config.check()
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / "last.pt"
    if checkpoint_path.exists() and not resume:
        raise DetectorTrainingError(f"{out_dir} already holds a run; pass --resume to continue "
                                    "it or choose another output folder")
    if resume and not checkpoint_path.exists():
        raise DetectorTrainingError(f"nothing to resume: {checkpoint_path} does not exist")
    if (out_dir / "detector.pt").exists():
        raise DetectorTrainingError(f"{out_dir} holds a finished run (detector.pt)")
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    started = time.perf_counter()
    run_device = _device(device)
    data = data or prepare_fields(config, data_root, track)
    log(f"fields and boxes per part: {json.dumps(data.counts())}")
    model = build_detector(config.spec, weights_dir=weights_dir,
                           frozen_blocks=config.frozen_blocks).to(run_device)
    if config.init_weights:
        model.load_state_dict(torch.load(config.init_weights, map_location=run_device,
                                         weights_only=True))
        log(f"initialised from {config.init_weights}")
    log(f"detector: {parameter_count(model):,} parameters "
        f"({parameter_count(model, trainable=True):,} trained) on {run_device}")
    train_images = FieldImages(data.train)
    val_images = FieldImages(data.val)
    donors = pbc_donors(config, data_root, track) if config.pbc_paste else []
    if donors:
        log(f"PBC cells to paste: {len(donors)}")
    augment = Augmenter(config, train_images, donors)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(epoch_order(data.train, config.mono_oversample,
                                                torch.Generator().manual_seed(0)))
                                / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and not name.startswith("group_classifier.")]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, config.warmup_steps, total_steps))

    state: dict = {"epoch": 0, "best_score": [-1.0, -1.0], "best_epoch": 0, "history": [],
                   "seconds": 0.0}
    if resume:
        state = resume_checkpoint(checkpoint_path, model, optimizer, scheduler, generator,
                                  asdict(config), DetectorTrainingError)
        log(f"resumed after epoch {state['epoch']}")

    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        order = epoch_order(data.train, config.mono_oversample, generator)
        batches = [order[s:s + config.batch_size] for s in range(0, len(order),
                                                                 config.batch_size)]
        sums: dict[str, float] = {}
        for batch in track(batches, f"epoch {epoch}/{config.epochs}"):
            rotation = int(torch.randint(4, ()))
            scale = _rand(*config.scale_range)
            samples = [augment(i, rotation, scale) for i in batch]
            images = [image.to(run_device) for image, _ in samples]
            targets = [{k: v.to(run_device) for k, v in t.items()} for _, t in samples]
            losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            scheduler.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch, **{k: v / len(batches) for k, v in sums.items()},
                  "seconds": seconds, "fields": len(order),
                  "seconds_per_field": seconds / len(order)}
        message = (f"epoch {epoch}: loss {record['loss']:.4f}  {seconds:.1f}s "
                   f"({record['seconds_per_field']:.2f} s/field)")
        if epoch % config.val_every == 0 or epoch == config.epochs:
            val_start = time.perf_counter()
            # Faster R-CNN's own labels: the group classifier is trained after these epochs
            val = validate(model, data.val, val_images, refine=False)
            record["val_seconds"] = time.perf_counter() - val_start
            record["val"] = _short(val)
            score = selection_score(val, with_groups=not config.spec.group_classifier)
            message += (f"  val AP50 {val['wbc']['ap50']:.3f}  AP50:95 "
                        f"{val['wbc']['ap50_95']:.3f}  group mAP50 {val['groups']['map50']:.3f}"
                        f"  group acc {val['matched']['group_accuracy']:.3f}  mono recall "
                        f"{val['matched']['mononuclear_recall']:.3f}")
            if tuple(state["best_score"]) < score:
                state.update(best_score=list(score), best_epoch=epoch)
                torch.save(model.state_dict(), out_dir / "best.pt")
                message += "  (best)"
        log(message)
        state["history"].append(record)
        state["epoch"] = epoch
        state["seconds"] += time.perf_counter() - epoch_start
        save_checkpoint(checkpoint_path, model, optimizer, scheduler, generator, state,
                        asdict(config))
        elapsed = (time.perf_counter() - started) / 60
        if time_limit_minutes is not None and elapsed > time_limit_minutes \
                and epoch < config.epochs:
            log(f"time limit reached after epoch {epoch}; resume to go on")
            return {"finished": False, "epoch": epoch, "best_epoch": state["best_epoch"]}

    model.load_state_dict(torch.load(out_dir / "best.pt", map_location=run_device,
                                     weights_only=True))
    group_info: dict = {}
    if config.spec.group_classifier:
        group_info = train_group_classifier(model, config, data, out_dir, device=run_device,
                                            data_root=data_root, track=track, log=log)
    model = model.cpu()
    metrics = final_metrics(model, config, data, val_images)
    manifest = {
        "architecture": {"name": "fasterrcnn_mobilenet_v1", **config.spec.to_dict(),
                         "parameters": parameter_count(model)},
        "task": "level 1: white-cell detection and group",
        "classes": list(CLASSES),
        "input": {"pixels": "RGB float in [0, 1]; the backbone normalises to (p*255 - 128) / "
                  "128 itself", "resolution": "native: no resize inside the model; BCCD "
                  "640x480 fields go in as they are; rescale other sources so a white cell "
                  "is ~200 px across (predict(..., scale=))"},
        "training": {**asdict(config), "fields": data.counts(),
                     "dropped_fields": [r.image.stem for r in data.dropped],
                     "best_epoch": state["best_epoch"], "history": state["history"],
                     "train_minutes": state["seconds"] / 60, "device": str(run_device),
                     "imagenet_backbone": "mobilenet_v1_0.5_160_quant.tflite",
                     "pbc_pasted_cells": {t: sum(d.cell_type == t for d in donors)
                                          for t in sorted({d.cell_type for d in donors})},
                     "pbc_box_detector_sha256": (read_checked(config.pbc_box_detector)[1]
                                                 ["sha256"] if donors else None),
                     "group_classifier": group_info},
        "data": {"sources": list(config.sources), "origin": {
            "bccd": "Shenggan/BCCD_Dataset fields with labels.csv groups",
            "bcd": "draaslan/blood-cell-detection-dataset (white cells of unknown group)",
            "chula": "singgihbekti/WBC_Dataset @ 45759ab1e6258b9746377a0935077e2eef0da41b",
            **({"pbc": "PBC cells pasted into training fields (pbc_paste)"} if donors else {}),
        }},
        "split": ("BCCD VOC lists: train to train, val to select the epoch, test only reported"
                  if config.validation == "voc" else
                  f"BCCD: grouped split of VOC train+val (val_fraction {config.val_fraction}, "
                  f"seed {config.seed}); VOC test only reported")
        + "; other sources: data.splits.holdout(seed) by slide or field",
        "command": shlex.join(["leukodiff", *sys.argv[1:]]) if "leukodiff" in sys.argv[0]
        else "",
        "metrics": metrics,
        "torch": torch.__version__,
    }
    return save_model(model, manifest, out_dir / "detector.pt")


def final_metrics(model, config: DetectorConfig, data: DetectorData,
                  val_images: FieldImages | None = None) -> dict:
    """What a finished detector's manifest reports: val, each source's test part, and the
    test part with Faster R-CNN's own group labels (when a group classifier relabels)."""
    metrics = {"val": validate(model, data.val, val_images)}
    for source in config.sources:
        tested = [r for r in data.test if r.source == source]
        if tested:
            metrics[test_key(source)] = validate(model, tested)
    if config.spec.group_classifier and data.test:
        metrics["test, Faster R-CNN labels (no group classifier)"] = validate(
            model, data.test, refine=False)
    return {name: _short(m) for name, m in metrics.items()}


def restart_group_classifier(model, config: DetectorConfig, weights_dir=None) -> None:
    """Put `model`'s group classifier back where training starts it (ImageNet base, fresh
    seeded head) and give the model `config.spec` (how the new group model cuts crops)."""
    seed_everything(config.seed)
    fresh = build_detector(config.spec, weights_dir=weights_dir,
                           frozen_blocks=config.frozen_blocks).group_classifier
    model.group_classifier.load_state_dict(fresh.state_dict())
    model.spec = config.spec


def retrain_group_classifier(
    detector: str | Path,
    out_dir: Path,
    *,
    augmentation: str,
    stain: str,
    data_root: str | Path | None = None,
    weights_dir: str | Path | None = None,
    track: Track = no_progress,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """A trained detector with only its group classifier trained again, from ImageNet,
    with another augmentation and crop stain normalisation (`train group`).

    The group phase runs after the detector's epochs and never touches the detector's
    own weights, so the result is the detector its whole recipe would have given with
    these group settings, minutes instead of an hour. Written to `out_dir/detector.pt`
    with a manifest naming the detector it came from; the source is never changed.
    """
    source = resolve(detector)
    model, manifest = load_detector(source)
    out_dir = Path(out_dir)
    if (out_dir / "detector.pt").exists():
        raise DetectorTrainingError(f"{out_dir} already holds a detector; choose another --out")
    if resolve(out_dir / "detector.pt") == source:
        raise DetectorTrainingError("--out must not be the source detector's folder")
    trained = DetectorConfig.from_dict(manifest["training"])
    if not trained.spec.group_classifier:
        raise DetectorTrainingError(f"{source} has no group classifier")
    config = replace(trained, group_augmentation=augmentation,
                     spec=replace(trained.spec, group_stain=stain))
    config.check()
    out_dir.mkdir(parents=True, exist_ok=True)
    restart_group_classifier(model, config, weights_dir)
    data = prepare_fields(config, data_root, track)
    info = train_group_classifier(model, config, data, out_dir, device=torch.device("cpu"),
                                  data_root=data_root, track=track, log=log)
    manifest = {
        **manifest,
        "architecture": {**manifest["architecture"], **config.spec.to_dict()},
        "training": {**manifest["training"], **json.loads(json.dumps(asdict(config))),
                     "group_classifier": info,
                     "group_retrained_from": {"model": _shown(source),
                                              "sha256": manifest["sha256"]}},
        "command": shlex.join(["leukodiff", *sys.argv[1:]]) if "leukodiff" in sys.argv[0]
        else "",
        "metrics": final_metrics(model, config, data),
        "torch": torch.__version__,
    }
    return save_model(model, manifest, out_dir / "detector.pt")


def _shown(path: Path) -> str:
    """A path as a manifest records it: relative to the working folder when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def test_key(source: str) -> str:
    """The manifest's name for the test figures of one source."""
    return "test (BCCD VOC test list)" if source == "bccd" else f"test ({source} held-out part)"


def _short(metrics: dict) -> dict:
    """Metrics without per-image lists (for logs and manifests)."""
    return {k: v for k, v in metrics.items() if k != "per_image"}


def epochs_done(out_dir: Path) -> int:
    """How many epochs the checkpoint in `out_dir` holds (0 if none)."""
    path = Path(out_dir) / "last.pt"
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=False)["state"]["epoch"])


# --- group classifier ------------------------------------------------------------------------


def group_cells(records: Sequence[Field]) -> tuple[list[Cell], list[int]]:
    """Cells of the fields' white-cell boxes of known group, and their group (0 mono, 1 poly).

    A box with a group but no single type (two labels of one group) gets its first
    candidate as type; only the group is used.
    """
    cells, targets = [], []
    for record in records:
        for box in record.wbc_boxes:
            if box.group is None:
                continue
            cell_type = box.cell_type or next(
                (t for t in box.candidates if GROUP_OF[t] == box.group), None)
            if cell_type is None:
                continue
            cells.append(Cell(record.image, record.source, cell_type, record.group_key,
                              record.sha256, box=box, subset=record.subset))
            targets.append(0 if box.group == Group.MONONUCLEAR else 1)
    return cells, targets


def _pbc_cells(per_type: int, seed: int, data_root, track: Track) -> tuple[list[Cell], list[int]]:
    if per_type <= 0:
        return [], []
    by_type: dict[str, list[Cell]] = {}
    for cell in load_cells("pbc", data_root, track).records:
        by_type.setdefault(str(cell.cell_type), []).append(cell)
    rng = random.Random(seed)
    cells = []
    for name in sorted(by_type):
        group = sorted(by_type[name], key=lambda c: c.image.name)
        cells.extend(rng.sample(group, per_type) if len(group) > per_type else group)
    return cells, [0 if GROUP_OF[c.cell_type] == Group.MONONUCLEAR else 1 for c in cells]


@torch.inference_mode()
def _group_eval(classifier, images: torch.Tensor, targets: torch.Tensor, device) -> dict:
    classifier.eval()
    logits = torch.cat([classifier(images[s:s + 256].to(device).float().div_(255)).cpu()
                        for s in range(0, len(images), 256)])
    predicted = logits.argmax(1)
    recalls = [float((predicted[targets == g] == g).float().mean()) if (targets == g).any()
               else 0.0 for g in (0, 1)]
    return {"n": len(targets), "accuracy": float((predicted == targets).float().mean()),
            "mononuclear_recall": recalls[0], "polymorphonuclear_recall": recalls[1],
            "balanced_accuracy": sum(recalls) / 2,
            "loss": float(torch.nn.functional.cross_entropy(logits, targets))}


def train_group_classifier(model, config: DetectorConfig, data: DetectorData, out_dir: Path, *,
                           device: torch.device, data_root=None, track: Track = no_progress,
                           log: Callable[[str], None] = lambda m: None) -> dict:
    """Fine-tune `model.group_classifier` on the training fields' cells (+ PBC cells); keep
    the epoch with the best balanced accuracy on the validation fields' cells (when
    fine-tuning from `init_weights`, the classifier as it came is a candidate too).

    Runs after the detector's epochs; its result is `group.pt` in `out_dir`, reused when
    a resumed run finds it (the phase takes minutes, so it restarts rather than resumes).
    """
    classifier = model.group_classifier
    if config.group_epochs <= 0:
        return {"trained": False, "weights": config.init_weights or "ImageNet backbone, "
                "untrained head"}
    saved = out_dir / "group.pt"
    if saved.exists():
        checkpoint = torch.load(saved, map_location=device, weights_only=False)
        classifier.load_state_dict(checkpoint["model"])
        log("group classifier: reusing group.pt")
        return checkpoint["info"]
    spec = config.spec
    geometry = CropGeometry(spec.group_input_size, spec.group_crop_scale, spec.group_stain)
    bccd_cells, bccd_targets = group_cells(data.train)
    pbc_cells, pbc_targets = _pbc_cells(config.group_pbc_per_type, config.seed, data_root, track)
    val_cells, val_targets = group_cells(data.val)
    if not val_cells:
        if config.init_weights:  # fine-tuning with nothing to choose on: keep what came
            log("group classifier: no validation cell of a known group; kept as it came")
            return {"trained": False, "weights": config.init_weights,
                    "reason": "no validation cell of a known group"}
        raise DetectorTrainingError("the group classifier needs validation cells of a "
                                    "known group; the validation fields have none")
    train_x = load_cell_tensors(bccd_cells + pbc_cells, geometry, track)
    train_y = torch.tensor(bccd_targets + pbc_targets)
    val_x, val_y = load_cell_tensors(val_cells, geometry, track), torch.tensor(val_targets)
    repeat = torch.tensor([config.group_bccd_repeat] * len(bccd_cells) + [1] * len(pbc_cells))
    index = torch.repeat_interleave(torch.arange(len(train_y)), repeat)
    counts = torch.bincount(train_y[index], minlength=2).clamp(min=1).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=(counts.sum() / (2 * counts)).to(device))
    dataset = CellTensorDataset(train_x[index], train_y[index],
                                augmentation(config.group_augmentation, spec.group_input_size))
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.group_batch_size, shuffle=True,
                        generator=generator, drop_last=len(dataset) > config.group_batch_size)
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.group_lr, eps=1e-7)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, config.group_epochs * len(loader)))
    info: dict = {"cells": {"bccd train": len(bccd_cells), "pbc": len(pbc_cells),
                            "bccd val": len(val_cells),
                            "mononuclear (train)": int((train_y == 0).sum()),
                            "polymorphonuclear (train)": int((train_y == 1).sum())},
                  "geometry": asdict(geometry), "history": []}
    best, best_state = (-1.0, -math.inf), None
    if config.init_weights:  # fine-tuning: the classifier it starts from must be beaten
        val = _group_eval(classifier, val_x, val_y, device)
        best, info["best_epoch"] = (val["balanced_accuracy"], -val["loss"]), 0
        best_state = {k: v.detach().clone() for k, v in classifier.state_dict().items()}
        info["history"].append({"epoch": 0, "val": val})
        log(f"group classifier as it came: val accuracy {val['accuracy']:.3f}")
    for epoch in range(1, config.group_epochs + 1):
        classifier.train()
        start, total, seen = time.perf_counter(), 0.0, 0
        for inputs, targets in track(loader, f"group classifier {epoch}/{config.group_epochs}"):
            inputs, targets = inputs.to(device), targets.to(device)
            loss = loss_fn(classifier(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(targets)
            seen += len(targets)
        val = _group_eval(classifier, val_x, val_y, device)
        record = {"epoch": epoch, "loss": total / max(1, seen), "val": val,
                  "seconds": time.perf_counter() - start}
        info["history"].append(record)
        score = (val["balanced_accuracy"], -val["loss"])
        log(f"group classifier epoch {epoch}: loss {record['loss']:.4f}  val accuracy "
            f"{val['accuracy']:.3f}  mono recall {val['mononuclear_recall']:.3f}  poly recall "
            f"{val['polymorphonuclear_recall']:.3f}  {record['seconds']:.1f}s"
            + ("  (best)" if score > best else ""))
        if score > best:
            best, info["best_epoch"] = score, epoch
            best_state = {k: v.detach().clone() for k, v in classifier.state_dict().items()}
    classifier.load_state_dict(best_state)
    torch.save({"model": classifier.state_dict(), "info": info}, saved.with_suffix(".tmp"))
    saved.with_suffix(".tmp").replace(saved)
    return info
