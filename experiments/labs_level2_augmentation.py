"""Does stain and camera augmentation make level 2 work on a lab it never saw? (leave one lab out)

    python experiments/labs_level2_augmentation.py basic runs/labs-l2-basic
    python experiments/labs_level2_augmentation.py lab runs/labs-l2-lab
    # each ~20 min on 2 cores; the detector folds are taken from runs/labs (train them first
    # with `leukodiff evaluate labs`)

The folds of `leukodiff evaluate labs` (its schedule, seed and data) with the level-2
models trained with the given augmentation (training.cells.AUGMENTATIONS): "basic" as
shipped up to now, "lab" adds HED stain jitter, white balance, gamma and lower
resolution. The detector folds are linked from runs/labs, not retrained (level-1
training does not depend on level 2). The parameters of "lab" were set from the
literature (Tellez et al. 2018's HED jitter) before any fold was measured, and not
changed after. Writes OUT/labs.json and prints the table.

Result (2026-11-29, seed 0; level-2 macro-F1 on the held-out lab, true boxes, true group):

    held out    basic   lab
    Chula       0.615   0.576
    PBC         0.273   0.317
    BCCD        0.713   0.822
    mean        0.534   0.572

"lab" is kept (better on 2 of 3 labs and on average) and the shipped level-2 models use it;
docs/RESULTS.md section 0 is the "lab" run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from leukodiff.evaluation.labs import LabsConfig, evaluate_labs
from leukodiff.reports.labs import labs_table

augmentation, out = sys.argv[1], Path(sys.argv[2])
detectors = Path(sys.argv[3] if len(sys.argv) > 3 else "runs/labs")
labs = ("chula", "pbc", "bccd")
for lab in labs:
    detector = detectors / f"without-{lab}" / "detector"
    link = out / f"without-{lab}" / "detector"
    if detector.exists() and not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(detector.resolve(), target_is_directory=True)
console = Console()
results = evaluate_labs(out, LabsConfig(labs=labs, augmentation=augmentation),
                        log=console.print)
console.print(labs_table(results))
