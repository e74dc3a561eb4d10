"""Does an operating threshold chosen on the training labs' validation fields help on a
lab the detector never saw?

    python experiments/labs_detector_threshold.py runs/labs-det-stain   # ~5 min per fold
    python experiments/labs_detector_threshold.py runs/labs-det-stain background

The shipped detector keeps the fixed score threshold of its spec (0.5). On Chula the fold
detector's false cells were pale red cells scored just above it (0.50-0.58), so the
threshold may be what is wrong, not the boxes. Rule, set before any fold was measured:
for each fold detector in RUNS/without-LAB/detector/detector.pt, detect (down to 0.05)
on the validation fields of the labs it was trained on (`prepare_fields`, the split the
training selected its epochs on, reviewed unboxed cells included as boxes), and take the
threshold among 0.30, 0.35, ..., 0.95 with the highest F1 there (ties: the lower). Then
the held-out lab's fields, detected once, are measured at the spec threshold and at the
chosen one: precision / recall at IoU 0.5 and the share of fields whose count is exact
(reviewed unboxed cells ignored and counted as cells, as `evaluate labs` does).
Nothing here looks at the held-out lab before the threshold is fixed.

Result (2026-12-06, the stain-jitter folds of labs_detector_stain.py): chosen 0.45 for
Chula (precision / recall 0.882 / 0.896 -> 0.701 / 0.931, exact count 82.1% -> 80.9%),
0.50 for BCD (unchanged), 0.55 for BCCD (0.263 / 0.954 -> 0.303 / 0.933, exact 11.8% ->
21.4%). Not kept. Validation F1 falls to 0 above 0.6 on every fold: no box scores higher,
because the detector's score is its best group's share of a 3-way softmax.

## The score itself (second argument `background`)

Is the detector's white-cell score the problem on a lab it never saw?

The detector's box head is a 3-way softmax (background, mononuclear, polymorphonuclear);
torchvision keeps a box per group with that group's probability as its score, and the
pipeline's agnostic NMS keeps the best. A white cell whose group is uncertain (a new lab,
colour jittered away) therefore cannot score much above 0.5, the operating threshold. Here
the same fold detectors (no retraining) score each box by 1 - P(background), the group
being the likelier of the two (the group classifier relabels it in the shipped pipeline
anyway), and are measured as `labs_detector_threshold.py` measures: held-out lab's fields
at 0.5 and at the threshold with the best F1 on the training labs' validation fields.
Torch backend, the detector's `roi_heads.cell_score` (the score of `DetectorSpec.score`
"cell"; the figures below came from a copy of the same computation in this file).

Result (2026-12-06, the stain-jitter folds; precision / recall / AP50 / exact count):

    held out    group score, 0.5 (stain log)        1 - P(background), val-chosen threshold
    Chula       0.882 / 0.896 / 0.895 / 82.1%       0.90: 0.773 / 0.916 / 0.906 / 82.5%
    BCD         0.530 / 0.951 / 0.531 / 45.0%       0.95: 0.664 / 0.883 / 0.807 / 60.0%
    BCCD        0.263 / 0.954 / 0.698 / 11.8%       0.95: 0.385 / 0.895 / 0.803 / 31.9%

AP50 (threshold-free) rises on every fold: the better ranking. The score is now
`DetectorSpec.score = "cell"` (ONNX export included; `leukodiff train score`);
labs_detector_cell_score.py measures it on the unjittered folds the shipped way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import exact_share
from rich.console import Console

from leukodiff.data.sources import load_fields
from leukodiff.data.sources.unboxed import unboxed_white_cells
from leukodiff.evaluation.labs import DETECTION_LABS, FoldModels, available_labs
from leukodiff.imaging import load_image
from leukodiff.metrics.detection import best_threshold, detection_scores
from leukodiff.models.io import load_detector
from leukodiff.pipeline.analyzer import Analyzer
from leukodiff.training.detector import DetectorConfig
from leukodiff.training.detector.fields import prepare_fields

GRID = [round(0.30 + 0.05 * i, 2) for i in range(14)]


def analyzer_for(model_path: Path, score: str) -> Analyzer:
    """The fold detector as `evaluate labs` runs it (onnxruntime), or in torch with the
    background score."""
    if score == "group":
        return FoldModels(detector=model_path).analyzer(None, detection_threshold=0.05)
    model, _ = load_detector(model_path)
    model.roi_heads.cell_score = True  # DetectorSpec.score "cell" (then a local copy here)
    return Analyzer.of_detector(model, group=False, detection_threshold=0.05)


runs = Path(sys.argv[1])
score = sys.argv[2] if len(sys.argv) > 2 else "group"
console = Console()
present = available_labs(None)
for lab in (x for x in DETECTION_LABS if present[x]):
    model = runs / f"without-{lab}" / "detector" / "detector.pt"
    if not model.exists():
        continue
    sources = tuple(x for x in DETECTION_LABS if x != lab and present[x])
    val = prepare_fields(DetectorConfig(sources=sources)).val
    held = sorted(load_fields(lab).records, key=lambda r: r.image.name)
    ignore = unboxed_white_cells(lab)
    with analyzer_for(model, score) as analyzer:
        val_found = [analyzer.detect(load_image(r.image)) for r in val]
        # ties: the lower threshold (nearest the grid's first)
        chosen = best_threshold(val_found, val, GRID[0], grid=GRID)
        held_found = [analyzer.detect(load_image(r.image)) for r in held]
    f1 = {t: round(detection_scores(val_found, val, t)["f1"], 4) for t in GRID}
    console.print(f"held out {lab} ({score} score): trained on {', '.join(sources)}; "
                  f"{len(val)} val fields; val F1 by threshold {f1}; chosen {chosen}")
    for t in sorted({0.5, chosen}):
        m = detection_scores(held_found, held, t, ignore)
        console.print(f"  threshold {t}: precision {m['precision']:.3f} recall "
                      f"{m['recall']:.3f} AP50 {m['ap50']:.3f} exact count "
                      f"{exact_share(held_found, held, t, ignore):.1%}")
