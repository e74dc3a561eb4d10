"""Does white-balancing each field on its glass before the detector make it work on a lab
it never saw?

    python experiments/labs_detector_glass.py runs/labs-det-glass 0 chula,bccd   # ~15 min a fold
    python experiments/labs_detector_glass.py runs/labs-det-glass 0 bcd          # (another shell)
    python experiments/labs_detector_glass.py runs/labs-det-glass summary

Leave one lab out, detector alone, against runs/labs-v5 (`evaluate labs`' folds; its
labs.json is docs/labs-v5.json) seed for seed (`common.detector_fold`,
`common.detector_rule`). Each fold's detector learns from the other detection labs with
the schedule of `leukodiff evaluate labs --pbc-paste 0.5` (10 epochs, mononuclear fields
drawn 2x, a PBC cell pasted into half the training fields, selected and thresholded on
the training labs' validation parts) and one change, set before any fold was measured:
**the model white-balances each field on its glass** (`DetectorSpec.glass_grey` 0.8,
`models.detector.balance_on_glass`, inside the network, so training, ONNX and the
pipeline alike): each RGB channel is scaled so that the mean colour of the field's
brightest tenth (the glass between cells) is grey 0.8 (BCCD's glass is ~0.81).

Why this and not the last try: standardising each field's whole-image colour statistics
(experiments/labs_detector_colour.py) won Chula and lost BCCD, whose fields are crowded
with red cells: a field's mean colour is mostly its red cells, so it normalised how many
red cells there are as much as the lamp and stain. The glass is the one thing every
field holds whatever its cells, and it carries the lab's lamp and camera cast: sampled
60 fields a lab, the glass is (R, G, B) 0.81 / 0.81 / 0.80 in BCCD, 0.71 / 0.55 / 0.63
in Chula (a pink cast of ~28%, beyond the training's +-15% channel gain) and
0.69 / 0.86 / 0.76 in BCD.

Keep rule: `common.detector_rule` as it was before any fold was measured (against
runs/labs-v5 seed for seed, seeds 0 and 1, all three labs).

Result (2026-12-07, one CPU thread each, runs/labs-det-glass; precision / recall / AP50 /
exact count on the held-out lab):

    held out  seed  runs/labs-v5                       glass-balanced
    Chula     0     0.456 / 0.798 / 0.741 / 60.7%      0.404 / 0.564 / 0.511 / 45.9%
    Chula     1     0.418 / 0.625 / 0.579 / 58.6%      0.265 / 0.961 / 0.909 / 44.2%

**Not kept**, stopped after the Chula folds: Chula's mean exact count fell by 14.6
points (the rule allows 5 for any lab), so no BCCD or BCD figure could keep it. Chula's
mean AP50 rose (0.660 -> 0.710) but the two seeds went opposite ways (-0.23, +0.33), and
seed 1, which now ranks Chula's boxes well, found them at a threshold (chosen on BCCD
and BCD) that lets in 2.8 false cells for every true one. Removing the lamp's cast did
not make Chula's red cells look less like the training labs' white cells.
"""

from __future__ import annotations

from dataclasses import replace

from common import detector_experiment

from leukodiff.training.detector import DetectorConfig

GLASS_GREY = 0.8


def change(recipe: DetectorConfig, lab: str) -> DetectorConfig:
    return replace(recipe, spec=replace(recipe.spec, glass_grey=GLASS_GREY))


if __name__ == "__main__":
    detector_experiment(change)
