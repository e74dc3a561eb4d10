"""Should a detector's operating threshold sit at the bottom of its flat F1 range?

    python experiments/labs_detector_threshold_plateau.py RUNS [RUNS ...]

Why (2026-12-07): the detector shipped with the other-cell class chose 0.95 as its
threshold, the F1-best on its validation fields (0.979; 0.976 at 0.90, 0.968 at 0.85),
and under `evaluate robustness`'s magnification found 51 and 52 of 64 BCCD test cells at
1.4x and 2x, against 62 and 57 for the detector before it at 0.85; at equal thresholds
the two find about as many. `labs_detector_threshold_margin.py` tried the top of the flat
range (not kept: recall fell on every held-out lab); this tries its bottom.

Rule, set before any held-out figure below was computed: the lowest threshold of the grid
(`metrics.detection.OPERATING_THRESHOLDS`) whose validation F1 (each fold detector's
manifest, `training.operating_point.val_f1`) is within MARGIN = 0.005 of the best. Each
held-out lab is detected once through onnxruntime as `evaluate labs` does (detections
down to 0) and measured at the fold's own threshold and at the rule's: precision / recall
at IoU 0.5 and the share of fields whose white-cell count is exact (reviewed unboxed cells
ignored and counted as cells). Keep rule: adopt when, over every fold, mean recall rises
by at least 0.02 and the mean exact count falls by no more than 1 point.

Result (2026-12-07, runs/labs-det-other seeds 0-2, the six other-cell folds; two change
threshold, the rest keep theirs; precision / recall / exact count):

    held out      own threshold                  plateau rule
    Chula s0      0.90: 0.862 / 0.809 / 70.6%    0.85: 0.738 / 0.862 / 74.1%
    Chula s1      0.95: 0.693 / 0.611 / 59.5%    0.80: 0.188 / 0.819 / 41.8%
    (BCCD s0 0.97, BCD s0 0.95, BCCD s1 0.95, Chula s2 0.97: the same either way)
    mean of six   0.778 / 0.777 / 67.6%          0.673 / 0.821 / 65.2%

Recall +0.044 but exact count -2.4 points: not kept. Chula seed 1 shows why: just below
its plateau its false cells (Chula's red cells) pour in (precision 0.69 -> 0.19).

RUNS are folders holding `without-LAB/detector/detector.pt` and the fold's `result.json`
at its own threshold (e.g. runs/labs-det-other/seed-0, the other-cell folds of
`labs_detector_other_cells.py`); a fold whose two thresholds agree is not detected again.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from common import fold_detectors, held_out_at_thresholds
from rich.console import Console

MARGIN = 0.005


def plateau_threshold(val_f1: dict[str, float]) -> float:
    """The lowest threshold whose validation F1 is within MARGIN of the best."""
    best = max(val_f1.values())
    return min(float(t) for t, f1 in val_f1.items() if f1 >= best - MARGIN)


def main() -> None:
    console = Console()
    rows = []
    for runs, lab, model, point in fold_detectors(sys.argv[1:]):
        own, lowest = point["threshold"], plateau_threshold(point["val_f1"])
        if lowest == own:  # the same threshold: the fold's own figures, measured already
            same = json.loads((model.parents[1] / "result.json").read_text())
            for rule in ("own", "plateau"):
                rows.append((str(runs), lab, rule, own, same["precision"], same["recall"],
                             same["exact_count"]))
            console.print(f"{runs} held out {lab}: threshold {own} either way")
            continue
        measured = held_out_at_thresholds(model, lab, {"own": own, "plateau": lowest},
                                          threads=2)
        for rule, m in measured.items():
            rows.append((str(runs), lab, rule, m["threshold"], m["precision"],
                         m["recall"], m["exact_count"]))
            console.print(f"{runs} held out {lab}, {rule} threshold {m['threshold']}: "
                          f"precision {m['precision']:.3f} recall {m['recall']:.3f} AP50 "
                          f"{m['ap50']:.3f} exact count {m['exact_count']:.1%}")
    means = {}
    for rule in ("own", "plateau"):
        picked = [r for r in rows if r[2] == rule]
        if not picked:
            console.print("no fold detectors found")
            return
        means[rule] = [float(np.mean([r[k] for r in picked])) for k in (4, 5, 6)]
        console.print(f"{rule}: mean precision {means[rule][0]:.3f}, mean recall "
                      f"{means[rule][1]:.3f}, mean exact count {means[rule][2]:.1%} over "
                      f"{len(picked)} folds")
    kept = (means["plateau"][1] - means["own"][1] >= 0.02
            and means["plateau"][2] - means["own"][2] >= -0.01)
    console.print("KEPT" if kept else "not kept")


if __name__ == "__main__":
    main()
