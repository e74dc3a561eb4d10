"""Level 1's group decision (mononuclear / polymorphonuclear), cross-validated on BCCD.

BCCD's VOC test list holds only 7 mononuclear cells, too few to measure a
mononuclear recall. Here every labelled BCCD field (train, val and test lists)
is split into k folds grouped by field and stratified by "holds a mononuclear
cell"; for each fold the group classifier is trained by the shipped recipe
(`training.detector.train_group_classifier`: ImageNet start, BCCD cells of
the other folds x5 plus PBC cells, epoch chosen on a grouped validation part
of the other folds) and judged on the held-out fold's cells.

The cells are cut around their annotated boxes: in the pipeline the group
classifier relabels detected boxes, and the shipped detector finds every
BCCD test cell at IoU 0.5 (docs/RESULTS.md), so this measures the group
decision of matched detections, not detection itself.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_fields
from leukodiff.metrics.heldout import (
    GroupCrossValidation,
    GroupFigures,
    GroupFold,
    GroupRecipe,
    Spread,
)
from leukodiff.models.detector import DetectorSpec, build_detector
from leukodiff.training.cells import CropGeometry, load_cell_tensors
from leukodiff.training.detector import (
    DetectorConfig,
    DetectorData,
    group_cells,
    has_mononuclear,
    train_group_classifier,
)
from leukodiff.training.engine import seed_everything


def field_folds(records: list, folds: int, seed: int) -> list[tuple[list, list]]:
    """(train, test) field lists per fold: grouped by field (its copies too), stratified by
    "holds a mononuclear cell", so every fold tests some mononuclear cells."""
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    labels = [has_mononuclear(r) for r in records]
    groups = [str(r.group_key) for r in records]
    return [([records[i] for i in train], [records[i] for i in test])
            for train, test in splitter.split(records, labels, groups)]


def group_cross_validation(folds: int = 5, seed: int = 0, *, data_root=None,
                           weights_dir: str | Path | None = None, device: str = "cpu",
                           track: Track = no_progress,
                           log: Callable[[str], None] = lambda message: None
                           ) -> GroupCrossValidation:
    """Per fold and pooled: accuracy, mononuclear and polymorphonuclear recall of the group
    classifier on held-out BCCD fields; mean and std over folds."""
    started = time.perf_counter()
    records = sorted(load_fields("bccd", data_root, track).records, key=lambda r: r.image.name)
    records = [r for r in records if group_cells([r])[0]]  # fields with a cell of known group
    config = DetectorConfig(seed=seed)
    spec = DetectorSpec()
    geometry = CropGeometry(spec.group_input_size, spec.group_crop_scale, spec.group_stain)
    per_fold, truth_all, predicted_all = [], [], []
    for fold, (train_all, test) in enumerate(field_folds(records, folds, seed)):
        seed_everything(seed + fold)
        train, val = field_folds(train_all, 5, seed)[0]  # a grouped 20% selects the epoch
        model = build_detector(spec, weights_dir=weights_dir)
        with tempfile.TemporaryDirectory() as out_dir:
            info = train_group_classifier(model, config, DetectorData(train, val, test),
                                          Path(out_dir), device=torch.device(device),
                                          data_root=data_root, track=track, log=log)
        cells, truth = group_cells(test)
        classifier = model.group_classifier.eval()
        images = load_cell_tensors(cells, geometry).float().div(255)
        with torch.inference_mode():
            predicted = classifier(images).argmax(1).tolist()
        truth_all += truth
        predicted_all += predicted
        result = GroupFold(**asdict(group_figures(truth, predicted)), fold=fold + 1,
                           fields=len(test), best_epoch=info["best_epoch"])
        per_fold.append(result)
        log(f"fold {fold + 1}/{folds}: {result.cells} cells, accuracy "
            f"{result.accuracy:.3f}, mononuclear recall {result.mononuclear_recall:.3f} "
            f"({result.mononuclear} cells)")
    summary = {key: Spread(mean=float(np.mean([getattr(f, key) for f in per_fold])),
                           std=float(np.std([getattr(f, key) for f in per_fold])))
               for key in ("accuracy", "mononuclear_recall", "polymorphonuclear_recall")}
    recipe = GroupRecipe(group_epochs=config.group_epochs, group_lr=config.group_lr,
                         group_pbc_per_type=config.group_pbc_per_type,
                         group_bccd_repeat=config.group_bccd_repeat)
    return GroupCrossValidation(folds=per_fold, pooled=group_figures(truth_all, predicted_all),
                                mean_std=summary, fields=len(records), seed=seed,
                                recipe=recipe, seconds=time.perf_counter() - started)


def group_figures(truth: list[int], predicted: list[int]) -> GroupFigures:
    """Accuracy and per-group recall of group calls (0 mononuclear, 1 polymorphonuclear)."""
    truth_array, predicted_array = np.asarray(truth), np.asarray(predicted)

    def recall(group: int) -> float:
        chosen = truth_array == group
        return float((predicted_array[chosen] == group).mean()) if chosen.any() else float("nan")

    return GroupFigures(cells=len(truth), mononuclear=int((truth_array == 0).sum()),
                        accuracy=float((truth_array == predicted_array).mean()),
                        mononuclear_recall=recall(0), polymorphonuclear_recall=recall(1))
