"""The fields of a detector run: split by source, their targets, decoded once, drawn per epoch."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from leukodiff.data.crops import enlarge
from leukodiff.data.records import Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_fields
from leukodiff.data.sources.pig import SOURCE as PIG
from leukodiff.data.sources.pig import TRAINING_FIELDS
from leukodiff.data.sources.unboxed import unboxed_white_cells
from leukodiff.data.splits import holdout, monte_carlo
from leukodiff.imaging import load_image
from leukodiff.models.detector import LABEL_OF
from leukodiff.taxonomy import Group, ObjectKind
from leukodiff.training.detector.config import DetectorConfig, DetectorTrainingError


def has_unknown_group(record: Field) -> bool:
    return any(box.group is None for box in record.wbc_boxes)


def unknown_group_boxes(record: Field) -> torch.Tensor:
    """(N, 4) float xyxy: the field's white-cell boxes whose group is unknown."""
    boxes = [b.xyxy for b in record.wbc_boxes if b.group is None]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def other_cell_boxes(record: Field) -> torch.Tensor:
    """(N, 4) float xyxy: the field's red-cell and platelet boxes (none where its lab
    boxes white cells only)."""
    boxes = [b.xyxy for b in record.boxes if b.kind is not ObjectKind.WBC]
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

    def digest(self) -> str:
        """The fields of each part and their boxes, in a word (file names, not paths)."""
        def line(part: str, record: Field) -> str:
            boxes = ";".join(f"{b.kind}/{b.cell_type or b.group}@"
                             + ",".join(f"{v:.1f}" for v in b.xyxy) for b in record.boxes)
            return f"{part}:{record.image.name}:{boxes}"

        text = "\n".join(line(part, r) for part in ("train", "val", "test")
                         for r in getattr(self, part))
        return hashlib.sha256(text.encode()).hexdigest()

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


def _boxes_only_parts(source: str, config: DetectorConfig, data_root, track: Track
                      ) -> dict[str, list[Field]]:
    """A set of white-cell boxes from another species and camera (the pig fields): a
    seeded draw of at most `data.sources.pig.TRAINING_FIELDS` of its own training photos,
    so it does not outweigh the human labs, for training only. Its cells have no group and
    its look is no lab a user has, so it neither selects the model nor chooses its
    threshold: validation stays on the human labs."""
    records = [r for r in load_fields(source, data_root, track).records if r.subset == "train"]
    records.sort(key=lambda r: r.image.name)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed))
    return {"train": [records[i] for i in order[:TRAINING_FIELDS].tolist()], "val": [],
            "test": []}


def prepare_fields(config: DetectorConfig, data_root: str | Path | None = None,
                   track: Track = no_progress) -> DetectorData:
    """The training, selection and test fields of every source in `config.sources`."""
    by_part: dict[str, list[Field]] = {"train": [], "val": [], "test": []}
    for source in config.sources:
        if source == "bccd":
            parts = _bccd_parts(config, data_root, track)
        elif source == PIG:
            parts = _boxes_only_parts(source, config, data_root, track)
        else:
            parts = _holdout_parts(source, config, data_root, track)
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


class FieldImages:
    """Decoded fields as uint8 (3, H, W) tensors, decoded once and kept in memory; a field
    read enlarged (`Field.zoom`) is kept at its own size and enlarged when asked for
    (200 pig photos: 0.1 GB kept, rather than 2.6 GB)."""

    def __init__(self, records: Sequence[Field]) -> None:
        self.records = list(records)
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> torch.Tensor:
        record = self.records[index]
        if index not in self._cache:
            self._cache[index] = _chw(np.asarray(load_image(record.image), dtype=np.uint8))
        if record.zoom == 1.0:
            return self._cache[index]
        native = Image.fromarray(self._cache[index].permute(1, 2, 0).numpy())
        return _chw(np.asarray(enlarge(native, record), dtype=np.uint8))


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def epoch_order(records: Sequence[Field], oversample: int, generator: torch.Generator
                ) -> list[int]:
    """Field indices for one epoch: mononuclear fields `oversample` times, shuffled."""
    indices = [i for i, r in enumerate(records)
               for _ in range(max(1, oversample) if has_mononuclear(r) else 1)]
    order = torch.randperm(len(indices), generator=generator).tolist()
    return [indices[i] for i in order]

