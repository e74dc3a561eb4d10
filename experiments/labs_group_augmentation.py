"""Which crop treatment makes the group classifier work on a lab it never saw?

    python experiments/labs_group_augmentation.py [LABS_DIR]   # ~25 min; after evaluate labs

The detector's group classifier (mononuclear / polymorphonuclear, a MobileNet crop
classifier inside the detector) decides which level-2 model names a cell. For each
detector fold in LABS_DIR (default runs/labs) this trains only the group classifier
again, from ImageNet, as `training.detector.train_group_classifier` does with that
fold's settings, once per variant (augmentation, crop stain normalisation), and
measures it on every typed cell of the held-out lab, cropped as the pipeline crops it
(true boxes, so the detector's misses do not enter). Selection inside each run is on
the training labs' validation cells only.

Result (2026-11-29, runs/labs detector folds, seed 0; on every typed cell of the held-out
lab: accuracy / balanced accuracy, mononuclear recall):

    held out        basic                 lab                   lab + reinhard
    BCCD (353)      0.915 / 0.868, 0.80   0.972 / 0.954, 0.93   0.898 / 0.828, 0.73
    Chula (509)     0.737 / 0.679, 0.42   0.660 / 0.583, 0.24   0.756 / 0.758, 0.77
    mean balanced   0.773                 0.768                 0.793

The differences are mostly noise: the BCCD fold selects its epoch on ~22 Chula
validation cells (BCD's cells have no group), and an earlier run of this script, which
fine-tuned each variant from the previous one instead of from ImageNet, had BCCD at
0.50 (basic) and 0.70 (lab). "lab + reinhard" has the best mean and is the only variant
that finds most of Chula's mononuclear cells, and it is the same crop treatment as the
level-2 models', so the shipped detector's group classifier was trained again with it
(`leukodiff train group`). A steadier selection (more validation cells of every training
lab) would make the next comparison worth more than this one.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from leukodiff.data.sources import load_cells
from leukodiff.models.io import load_detector
from leukodiff.taxonomy import GROUP_OF, Group
from leukodiff.training.cells import CropGeometry, load_cell_tensors
from leukodiff.training.detector import (
    DetectorConfig,
    group_metrics,
    prepare_fields,
    restart_group_classifier,
    train_group_classifier,
)

labs_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/labs")
# (augmentation, crop stain normalisation); a variant already trained in this folder is
# reused (its group.pt), so adding a variant only trains that one
VARIANTS = (("basic", "none"), ("lab", "none"), ("lab", "reinhard"))
folder = labs_dir / "group-variants"
saved = folder / "results.json"
results = json.loads(saved.read_text()) if saved.exists() else {}
for lab in ("bccd", "chula"):
    fold = labs_dir / f"without-{lab}" / "detector"
    model, manifest = load_detector(fold / "detector.pt")
    trained = DetectorConfig.from_dict(manifest.training.settings)
    data = prepare_fields(trained)
    cells = load_cells(lab).records
    targets = torch.tensor([0 if GROUP_OF[c.cell_type] is Group.MONONUCLEAR else 1
                            for c in cells])
    for name, stain in VARIANTS:
        key = f"{lab} {name}" + ("" if stain == "none" else f" {stain}")
        out = folder / f"without-{key.replace(' ', '-')}"
        out.mkdir(parents=True, exist_ok=True)
        config = replace(trained, group_augmentation=name,
                         spec=replace(trained.spec, group_stain=stain))
        spec = config.spec
        restart_group_classifier(model, config)  # each variant starts from ImageNet
        info = train_group_classifier(model, config, data, out, device=torch.device("cpu"),
                                      log=lambda m: print(m, flush=True))
        images = load_cell_tensors(cells, CropGeometry(spec.group_input_size,
                                                       spec.group_crop_scale, stain))
        held_out = group_metrics(model.group_classifier, images, targets, torch.device("cpu"))
        results[key] = {"held_out": held_out, "best_epoch": info.get("best_epoch")}
        print(key, json.dumps(held_out), flush=True)
        saved.write_text(json.dumps(results, indent=1))
