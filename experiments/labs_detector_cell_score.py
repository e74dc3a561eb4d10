"""Is a detector that scores a box as a white cell, 1 - P(background), with its operating
threshold chosen on the training labs' validation F1, better on a lab it never saw?

    python experiments/labs_detector_cell_score.py runs/labs-det-base    # ~10 min per fold
    python experiments/labs_detector_cell_score.py runs/labs-det-stain chula,bcd   # some folds

For each fold detector RUNS/without-LAB/detector/detector.pt (trained by
labs_detector_stain.py on the other detection labs, scored by its best group), the
shipped code path: `rescore_detector` (`leukodiff train score`: same weights, scored
1 - P(background), operating threshold the F1-best among
`metrics.detection.OPERATING_THRESHOLDS` on the validation parts of the labs it trained
on), ONNX export, then every labelled field of the held-out lab measured as `evaluate
labs` measures detection (`measure_fields`, onnxruntime): precision / recall at IoU 0.5
at the operating threshold, AP50, exact count. The group-scored figures of the same
detectors are the last line of each fold in labs_detector_stain.py's log. Rule (score,
grid, F1 on the training labs' validation parts) fixed before the unjittered folds were
measured; nothing here reads the held-out lab before the threshold is set. Kept (the
default score of new detectors, the shipped one rescored) if, on the unjittered folds,
the mean AP50 and the mean exact count over the three held-out labs both rise and no
lab's exact count falls by more than 5 points (rule written before they were measured).

Result (2026-12-06, seed 0; precision / recall / AP50 / exact count on the held-out lab;
group score at 0.5 -> cell score at the chosen threshold):

    unjittered folds (runs/labs-det-base)
    Chula   0.098 / 0.644 / 0.120 / 23.5%  ->  0.90: 0.101 / 0.760 / 0.459 / 24.9%
    BCD     0.887 / 0.913 / 0.953 / 83.0%  ->  0.90: 0.887 / 0.913 / 0.956 / 83.0%
    BCCD    0.774 / 0.973 / 0.901 / 79.9%  ->  0.95: 0.834 / 0.960 / 0.945 / 83.0%
    stain + gamma jitter folds (runs/labs-det-stain; the same as the torch figures of
    labs_detector_threshold.py)
    Chula   0.882 / 0.896 / 0.895 / 82.1%  ->  0.90: 0.773 / 0.916 / 0.906 / 82.5%
    BCD     0.530 / 0.951 / 0.531 / 45.0%  ->  0.95: 0.664 / 0.883 / 0.807 / 60.0%
    BCCD    0.263 / 0.954 / 0.698 / 11.8%  ->  0.95: 0.385 / 0.895 / 0.803 / 31.9%

Kept by the rule (unjittered: mean AP50 0.658 -> 0.787, mean exact count 62.1% -> 63.6%,
no lab lower): `DetectorSpec.score` defaults to "cell", the shipped detector rescored.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from leukodiff.data.sources import load_fields
from leukodiff.evaluation.labs import (
    DETECTION_LABS,
    FoldModels,
    available_labs,
    measure_fields,
)
from leukodiff.models.export import export_detector
from leukodiff.training.detector import rescore_detector

runs = Path(sys.argv[1])
labs = sys.argv[2].split(",") if len(sys.argv) > 2 else list(DETECTION_LABS)
console = Console()
present = available_labs(None)
for lab in (x for x in labs if present[x]):
    source = runs / f"without-{lab}" / "detector" / "detector.pt"
    if not source.exists():
        continue
    folder = runs / f"without-{lab}" / "detector-cell"
    if not (folder / "detector.pt").exists():
        rescore_detector(source, folder, log=console.print)
    if not (folder / "detector.onnx").exists():
        export_detector(folder / "detector.pt")
    fields = sorted(load_fields(lab).records, key=lambda r: r.image.name)
    with FoldModels(detector=folder / "detector.pt").analyzer(
            None, detection_threshold=0.05) as analyzer:
        threshold = analyzer.spec["score_threshold"]
        result = measure_fields(analyzer, fields, lab)
    d = result.detector
    console.print(f"held out {lab}, cell score at {threshold}: precision {d.precision:.3f} "
                  f"recall {d.recall:.3f} AP50 {d.ap50:.3f} exact count {d.exact_count:.1%} "
                  f"({d.false} false cells, {d.truth} true)")
