"""Training-time augmentation of detector fields: native-size windows of large fields,
mononuclear cells copied between fields, PBC cells of every type pasted in the field's
colours, then flips, a rotation and a scale per batch, colour, gain and blur."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_cells
from leukodiff.imaging import lab_to_srgb, load_image, srgb_to_lab
from leukodiff.models.detector import LABEL_OF
from leukodiff.models.io import load_detector
from leukodiff.pipeline.analyzer import Analyzer
from leukodiff.taxonomy import GROUP_OF, Group
from leukodiff.training.cells import StainJitter
from leukodiff.training.detector.config import DetectorConfig
from leukodiff.training.detector.fields import (
    FieldImages,
    field_target,
    other_cell_boxes,
    unknown_group_boxes,
)


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


def uniform(low: float, high: float) -> float:
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
UNKNOWN_GROUP = 99  # label of a whole white cell of unknown group, until the target is made
# label of an annotated red cell or platelet (`DetectorSpec.other_cell_class`), until then;
# one cut by a window is kept while WINDOW_VISIBLE of it shows, else dropped
OTHER = 98


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
        self.stain = StainJitter(config.stain_jitter) if config.stain_jitter else None
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
        white = boxes[labels != OTHER]
        if len(white) and torch.rand(()) < self.config.window_on_cell:
            bx0, by0, bx1, by1 = white[int(torch.randint(len(white), ()))].tolist()
            # any window position that holds the whole cell (or as much as fits)
            low_x, high_x = max(0.0, bx1 - win_w), min(bx0, width - win_w)
            low_y, high_y = max(0.0, by1 - win_h), min(by0, height - win_h)
            x0 = round(uniform(low_x, high_x)) if high_x > low_x else round(min(max(
                (bx0 + bx1 - win_w) / 2, 0), width - win_w))
            y0 = round(uniform(low_y, high_y)) if high_y > low_y else round(min(max(
                (by0 + by1 - win_h) / 2, 0), height - win_h))
        image = image[:, y0:y0 + win_h, x0:x0 + win_w]
        if not len(boxes):
            return image, boxes, labels
        shifted = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        clipped = torch.stack([shifted[:, 0].clamp(0, win_w), shifted[:, 1].clamp(0, win_h),
                               shifted[:, 2].clamp(0, win_w), shifted[:, 3].clamp(0, win_h)], 1)
        area = (shifted[:, 2:] - shifted[:, :2]).clamp(min=1e-6).prod(1)
        visible = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(1) / area
        other = labels == OTHER
        labels = torch.where((visible >= WINDOW_VISIBLE) | other, labels,
                             torch.full_like(labels, -1))
        keep = torch.where(other, visible >= WINDOW_VISIBLE, visible >= WINDOW_DROPPED)
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
        factor *= uniform(0.85, 1.15)  # cells of one lab differ in size too
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
        free spot of `image`, touching no white cell already there; its box added, and
        the other cells it covers by a fifth or more of their box removed."""
        if torch.rand(()) < 0.5:
            patch = patch.flip(-1)
        patch = torch.rot90(patch, int(torch.randint(4, ())), dims=(1, 2))
        _, ph, pw = patch.shape
        _, height, width = image.shape
        if ph >= height or pw >= width:
            return image, boxes, labels
        white = boxes[labels != OTHER]
        for _ in range(20):  # a free spot: no overlap with any white cell already there
            px, py = int(torch.randint(width - pw, ())), int(torch.randint(height - ph, ()))
            new = torch.tensor([[px, py, px + pw, py + ph]], dtype=torch.float32)
            if not len(white):
                break
            low, high = torch.maximum(white[:, :2], new[:, :2]), torch.minimum(white[:, 2:],
                                                                               new[:, 2:])
            overlap = (high > low).all(dim=1)
            if not bool(overlap.any()):
                break
        else:
            return image, boxes, labels
        if len(boxes):
            low, high = torch.maximum(boxes[:, :2], new[:, :2]), torch.minimum(boxes[:, 2:],
                                                                               new[:, 2:])
            covered = (high - low).clamp(min=0).prod(1) / (boxes[:, 2:] - boxes[:, :2]).clamp(
                min=1e-6).prod(1)
            kept = (labels != OTHER) | (covered < 0.2)
            boxes, labels = boxes[kept], labels[kept]
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
        unknown = unknown_group_boxes(self.images.records[index])
        boxes = torch.cat([boxes, unknown])
        labels = torch.cat([labels, torch.full((len(unknown),), UNKNOWN_GROUP,
                                               dtype=torch.int64)])
        if self.config.spec.other_cell_class:
            others = other_cell_boxes(self.images.records[index])
            boxes = torch.cat([boxes, others])
            labels = torch.cat([labels, torch.full((len(others),), OTHER, dtype=torch.int64)])
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
        if self.stain is not None:
            image = tv_tensors.wrap(self.stain(image.as_subclass(torch.Tensor)), like=image)
        if self.config.gamma:
            power = math.exp(self.config.gamma * (2 * float(torch.rand(())) - 1))
            image = tv_tensors.wrap(((image.float() / 255) ** power * 255).round()
                                    .to(torch.uint8), like=image)
        if self.config.channel_gain:
            gain = 1 + self.config.channel_gain * (2 * torch.rand(3, 1, 1) - 1)
            image = tv_tensors.wrap((image.float() * gain).clamp(0, 255).to(torch.uint8),
                                    like=image)
        if torch.rand(()) < self.config.blur:
            image = TF.gaussian_blur(image, [7, 7], [uniform(0.3, 1.5)])
        image, target = v2.SanitizeBoundingBoxes(min_size=8)(image, target)
        boxes, labels = target["boxes"].as_subclass(torch.Tensor).float(), target["labels"]
        other = labels == OTHER
        known = (labels > 0) & (labels != UNKNOWN_GROUP) & ~other
        as_cells = self.config.unknown_group == "cell"  # taught as white cells of no group
        target = {"boxes": boxes[known], "labels": labels[known],
                  "ignore": boxes[labels < 0] if as_cells else boxes[~known & ~other]}
        if as_cells:
            target["cells"] = boxes[labels == UNKNOWN_GROUP]
        if self.config.spec.other_cell_class:
            target["others"] = boxes[other]
        return image.as_subclass(torch.Tensor).float().div_(255), target

