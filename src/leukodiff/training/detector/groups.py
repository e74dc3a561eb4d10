"""The group classifier's phase: after the detector's epochs, a MobileNetV1-0.5 crop
classifier learns mononuclear / polymorphonuclear from the training fields' cells (+ PBC
cells), on `training.engine`; the best epoch on the val fields' cells is kept."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from leukodiff.data.records import Cell, Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_cells
from leukodiff.models.detector import build_detector
from leukodiff.taxonomy import GROUP_OF, Group
from leukodiff.training.cells import (
    CellTensorDataset,
    CropGeometry,
    augmentation,
    load_cell_tensors,
)
from leukodiff.training.detector.config import DetectorConfig, DetectorTrainingError
from leukodiff.training.detector.fields import DetectorData
from leukodiff.training.engine import (
    KeptBest,
    classifier_epochs,
    new_state,
    run_epochs,
    save_atomic,
    seed_everything,
)


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
                              record.sha256, box=record.in_file(box), subset=record.subset))
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
def group_metrics(classifier, images: torch.Tensor, targets: torch.Tensor, device) -> dict:
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
    state = new_state()
    keep_best = KeptBest(classifier)
    if config.init_weights:  # fine-tuning: the classifier it starts from must be beaten
        val = group_metrics(classifier, val_x, val_y, device)
        state.update(best_score=[val["balanced_accuracy"], -val["loss"]], best_epoch=0)
        keep_best()
        state["history"].append({"epoch": 0, "val": val})
        log(f"group classifier as it came: val accuracy {val['accuracy']:.3f}")
    train = classifier_epochs(
        classifier, loader, loss_fn, optimizer, scheduler, track=track, device=device,
        channels_last=False,
        description=lambda n: f"group classifier {n}/{config.group_epochs}")

    def one_epoch(epoch: int) -> dict:
        done = train(epoch)
        return {"loss": done["loss"], "seconds": done["seconds"]}

    def validate(epoch: int, record: dict) -> tuple[float, float]:
        started = time.perf_counter()
        val = group_metrics(classifier, val_x, val_y, device)
        record["val"] = val
        record["seconds"] = record.pop("seconds") + time.perf_counter() - started
        return val["balanced_accuracy"], -val["loss"]

    def describe(record: dict, best: bool) -> str:
        val = record["val"]
        return (f"group classifier epoch {record['epoch']}: loss {record['loss']:.4f}  val "
                f"accuracy {val['accuracy']:.3f}  mono recall {val['mononuclear_recall']:.3f}"
                f"  poly recall {val['polymorphonuclear_recall']:.3f}  "
                f"{record['seconds']:.1f}s" + ("  (best)" if best else ""))

    run_epochs(config.group_epochs, state, epoch=one_epoch, validate=validate,
               keep_best=keep_best, describe=describe, log=log)
    keep_best.restore()
    info = {"cells": {"bccd train": len(bccd_cells), "pbc": len(pbc_cells),
                      "bccd val": len(val_cells),
                      "mononuclear (train)": int((train_y == 0).sum()),
                      "polymorphonuclear (train)": int((train_y == 1).sum())},
            "geometry": asdict(geometry), "history": state["history"],
            "best_epoch": state["best_epoch"]}
    save_atomic({"model": classifier.state_dict(), "info": info}, saved)
    return info


def restart_group_classifier(model, config: DetectorConfig, weights_dir=None) -> None:
    """Put `model`'s group classifier back where training starts it (ImageNet base, fresh
    seeded head) and give the model `config.spec` (how the new group model cuts crops)."""
    seed_everything(config.seed)
    fresh = build_detector(config.spec, weights_dir=weights_dir,
                           frozen_blocks=config.frozen_blocks).group_classifier
    model.group_classifier.load_state_dict(fresh.state_dict())
    model.spec = config.spec

