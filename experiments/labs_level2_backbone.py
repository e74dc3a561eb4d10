"""Does a wider ImageNet backbone make level 2 work on a lab it never saw?

    python experiments/labs_level2_backbone.py 0.75 runs/labs-l2-w075   # ~40 min on 2 cores

Leave one lab out, level 2 alone, exactly as experiments/labs_level2_augmentation.py
(the schedule of `leukodiff evaluate labs`: 20 epochs, at most 400 cells per class,
source and part, seed 0, augmentation "lab", crop normalisation "reinhard", selected on
the training labs' validation parts), with the MobileNetV1 width as the only change
(0.5 is the paper's and the shipped one; ../shared/weights also has 0.25 and 0.75).
Measured on every typed cell of the held-out lab (true boxes, true group).

Status (2026-12-06): width 0.75, two of three folds: macro-F1 BCCD 0.715, PBC 0.376 (the
Chula fold stopped at its polymorphonuclear model's first epoch to free the CPU;
runs/labs-l2-w075 resumes it). Width 0.5 (the shipped recipe, today's code, one CPU
thread) was run as the baseline of labs_level2_lab_norm.py: macro-F1 BCCD 0.757, PBC
0.408, Chula 0.782 (mean 0.649; the 2026-11-29 run of the same recipe gave 0.809 / 0.395
/ 0.708, mean 0.637: one seed moves a held-out lab by up to 0.07).
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import level2_fold
from rich.console import Console

from leukodiff.data.sources import load_cells
from leukodiff.evaluation.labs import (
    TYPED_LABS,
    FoldModels,
    LabsConfig,
    available_labs,
    measure_types,
)
from leukodiff.training.classifier import ClassifierConfig

width, out = float(sys.argv[1]), Path(sys.argv[2])
config = LabsConfig(augmentation="lab", stain="reinhard")
console = Console()
present = available_labs(None)
for lab in (x for x in TYPED_LABS if present[x]):
    sources = [x for x in TYPED_LABS if x != lab and present[x]]
    models = FoldModels()
    for task in ("mononuclear", "polymorphonuclear"):
        folder = out / f"without-{lab}" / task
        recipe = ClassifierConfig(task=task, sources=tuple(sources),
                                  epochs=config.classifier_epochs,
                                  max_per_class=config.max_per_class, seed=config.seed,
                                  augmentation=config.augmentation, stain=config.stain,
                                  width=width)
        setattr(models, task, level2_fold(recipe, folder))
    with models.analyzer(threads=None) as analyzer:
        result = measure_types(analyzer, load_cells(lab).records, lab)
    recall = ", ".join(f"{t} {r:.2f}" for t, r in result.recall.items())
    console.print(f"held out {lab}: accuracy {result.accuracy:.3f} macro-F1 "
                  f"{result.macro_f1:.3f} ({recall})")
