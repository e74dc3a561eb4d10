"""Does stain and camera augmentation make the group classifier work on a lab it never saw?

    python experiments/labs_group_augmentation.py [LABS_DIR]   # ~10 min; after evaluate labs

The detector's group classifier (mononuclear / polymorphonuclear, a MobileNet crop
classifier inside the detector) decides which level-2 model names a cell. In the
leave-one-lab-out folds of `leukodiff evaluate labs` it is the weak link on BCCD
(first run: 35% group accuracy on BCCD's matched cells, neutrophils called
mononuclear). For each detector fold in LABS_DIR (default runs/labs) this retrains
only the group classifier, as `training.detector.train_group_classifier` does with
that fold's settings, once with augmentation "basic" and once with "lab"
(training.cells), and measures both on every typed cell of the held-out lab, cropped
as the pipeline crops it (true boxes, so the detector's misses do not enter).
Selection inside each run is on the training labs' validation cells only.

Result (2026-11-29, runs/labs detector folds, seed 0; group accuracy / balanced accuracy
on every typed cell of the held-out lab, true boxes):

    held out    basic           lab
    BCCD        0.501 / 0.705   0.700 / 0.822   (353 cells; neutrophils: 41% -> 64% right)
    Chula       0.719 / 0.660   0.731 / 0.695   (509 cells; mononuclear: 40% -> 54% right)

"lab" wins on both held-out labs: the next detector recipe should take
`--group-augmentation lab` (not yet shipped: the shipped detector's group classifier is
the BCCD + PBC one with "basic").
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
    _group_eval,
    prepare_fields,
    train_group_classifier,
)

labs_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/labs")
results = {}
for lab in ("bccd", "chula"):
    fold = labs_dir / f"without-{lab}" / "detector"
    model, manifest = load_detector(fold / "detector.pt")
    config = DetectorConfig.from_dict(manifest["training"])
    data = prepare_fields(config)
    cells = load_cells(lab).records
    spec = model.spec
    images = load_cell_tensors(cells, CropGeometry(spec.group_input_size, spec.group_crop_scale))
    targets = torch.tensor([0 if GROUP_OF[c.cell_type] is Group.MONONUCLEAR else 1
                            for c in cells])
    for name in ("basic", "lab"):
        out = labs_dir / "group-experiment" / f"without-{lab}-{name}"
        out.mkdir(parents=True, exist_ok=True)
        info = train_group_classifier(model, replace(config, group_augmentation=name), data,
                                      out, device=torch.device("cpu"),
                                      log=lambda m: print(m, flush=True))
        held_out = _group_eval(model.group_classifier, images, targets, torch.device("cpu"))
        results[f"{lab} {name}"] = {"held_out": held_out, "best_epoch": info.get("best_epoch")}
        print(lab, name, json.dumps(held_out), flush=True)
(labs_dir / "group-experiment" / "results.json").write_text(json.dumps(results, indent=1))
