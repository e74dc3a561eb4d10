"""Should a detector's operating threshold sit at the top of its flat F1 range?

    OMP_NUM_THREADS=1 python experiments/labs_detector_threshold_margin.py RUNS [RUNS ...]

Scored 1 - P(background) (`DetectorSpec.score` "cell"), the white cells of the training
labs score ~0.99, so F1 on their validation fields is flat over a wide range of
thresholds, and `train_detector` takes its maximum wherever rounding puts it: the BCD fold
of runs/labs-v5 chose 0.60 (validation F1 0.9735) over 0.90 (0.9732), and on BCD, a lab it
never saw, found white cells at precision 0.270 with an exact count on 5% of fields. A new
lab's debris scores anywhere below the white cells, so inside the flat range a higher
threshold costs the training labs nothing and may spare a new lab its false cells.

Rule, set before any held-out figure below was computed: the highest threshold of the grid
(`metrics.detection.OPERATING_THRESHOLDS`) whose validation F1 (stored in each fold
detector's manifest, `training.operating_point.val_f1`) is within MARGIN = 0.005 of the
best. The held-out lab's fields are detected once through onnxruntime as `evaluate labs`
does (detections down to 0) and measured at the fold's own threshold and at the rule's:
precision / recall at IoU 0.5, AP50 (the same for both) and the share of fields whose
white-cell count is exact (reviewed unboxed cells ignored and counted as cells). Keep
rule: adopt when the mean exact count over the folds rises and no fold's recall falls by
more than 0.02.

Result (2026-12-07, runs/labs-v5, seed 0; precision / recall / exact count):

    held out   own threshold                        margin rule
    Chula      0.85: 0.456 / 0.798 / 60.7%          0.95: 0.797 / 0.656 / 63.4%
    BCCD       0.90: 0.723 / 0.914 / 75.8%          0.97: 0.819 / 0.852 / 79.7%
    BCD        0.60: 0.270 / 0.961 / 5.0%           0.99: 0.685 / 0.718 / 60.0%

Mean exact count 47.2% -> 67.7%, but recall falls on every fold (by 0.06 to 0.24): not
kept. On a lab it never saw, the detector's true white cells score lower too, not only its
false ones: no threshold chosen on the training labs separates them there.
"""

from __future__ import annotations

import sys

import numpy as np
from common import fold_detectors, held_out_at_thresholds
from rich.console import Console

MARGIN = 0.005


def margin_threshold(val_f1: dict[str, float]) -> float:
    best = max(val_f1.values())
    return max(float(t) for t, f1 in val_f1.items() if f1 >= best - MARGIN)


console = Console()
rows = []
for runs, lab, model, point in fold_detectors(sys.argv[1:]):
    thresholds = {"own": point["threshold"], "margin": margin_threshold(point["val_f1"])}
    for rule, m in held_out_at_thresholds(model, lab, thresholds).items():
        rows.append((str(runs), lab, rule, m["threshold"], m["precision"], m["recall"],
                     m["exact_count"]))
        console.print(f"{runs} held out {lab}, {rule} threshold {m['threshold']}: precision "
                      f"{m['precision']:.3f} recall {m['recall']:.3f} AP50 "
                      f"{m['ap50']:.3f} exact count {m['exact_count']:.1%}")
for rule in ("own", "margin"):
    picked = [r for r in rows if r[2] == rule]
    console.print(f"{rule}: mean precision {np.mean([r[4] for r in picked]):.3f}, mean recall "
                  f"{np.mean([r[5] for r in picked]):.3f}, mean exact count "
                  f"{np.mean([r[6] for r in picked]):.1%} over {len(picked)} folds")
