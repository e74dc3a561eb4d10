"""Does standardising each field's colours before the detector make it work on a lab it
never saw?

    python experiments/labs_detector_colour.py runs/labs-det-colour 0 chula,bccd   # ~15 min a fold
    python experiments/labs_detector_colour.py runs/labs-det-colour 0 bcd          # (another shell)
    python experiments/labs_detector_colour.py runs/labs-det-colour summary

Leave one lab out, detector alone, against runs/labs-v5 (`evaluate labs`' folds) seed for
seed (`common.detector_fold`, `common.detector_rule`). Each fold's detector learns from
the other detection labs with the schedule of `leukodiff evaluate labs --pbc-paste 0.5`
(10 epochs, mononuclear fields drawn 2x, a PBC cell pasted into half the training fields,
selected and thresholded on the training labs' validation parts, scored 1 - P(background))
and one change, set before any fold was measured: **the model standardises each field's
colours** (`DetectorSpec.colour_standardise`, inside the network, so training, ONNX and
the pipeline alike): every RGB channel shifted to a target mean and its spread scaled
down (never up: `colour_max_gain` 1.0) to a target spread. The targets are the fold's own
training labs' (each lab's mean over its training fields of the per-field channel mean
and spread, the labs weighted equally), never the held-out lab's. A new lab's colour cast
(Chula's fields run from pink to blue) then reaches the detector as the training labs'
colours; stain jitter, which widens the training colours instead, won Chula and lost BCCD
and BCD (experiments/labs_detector_stain.py).

Keep rule (written before any fold was measured; `common.detector_rule`): over every
(held-out lab, seed) measured, against runs/labs-v5's fold of the same lab and seed, kept
if mean AP50 rises by >= 0.03, mean exact count by >= 3 points, mean recall falls by no
more than 0.02, and no lab's mean exact count falls by more than 5 points. Seeds 0 and 1,
all three labs.

Result (2026-12-07, one CPU thread each, runs/labs-det-colour; precision / recall / AP50 /
exact count on the held-out lab):

    held out  seed  runs/labs-v5                       colours standardised
    Chula     0     0.456 / 0.798 / 0.741 / 60.7%      0.687 / 0.923 / 0.912 / 70.0%
    Chula     1     0.418 / 0.625 / 0.579 / 58.6%      0.381 / 0.733 / 0.639 / 41.6%
    BCCD      0     0.723 / 0.914 / 0.909 / 75.8%      0.225 / 0.957 / 0.634 / 7.1%
    BCCD      1     0.674 / 0.973 / 0.946 / 67.0%      0.226 / 0.997 / 0.797 / 3.6%

**Not kept** (mean AP50 -0.048, exact count -35 points; BCCD's -66 points), stopped before
the BCD folds: no BCD figure could bring BCCD's exact count back. Like stain jitter, it
wins Chula (recall up on both seeds, AP50 +0.17 and +0.06) and loses the lab whose
fields are dense with red cells: BCCD's fields, moved to BCD's and Chula's paler colours
(targets: mean 0.61 / 0.52 / 0.57 against the other folds' ~0.64-0.71), show their red
cells as the detector learnt white cells (3.4-3.5 false cells a field). A field's mean
colour is mostly its red cells and glass, so standardising it moves a crowded field and
a sparse one differently: it normalises how many red cells there are as much as the
stain.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np
from common import detector_experiment

from leukodiff.data.crops import field_image
from leukodiff.training.detector import DetectorConfig, prepare_fields


def training_colours(recipe: DetectorConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and spread of the recipe's training fields in [0, 1], each lab's
    mean over its fields, the labs weighted equally."""
    by_lab = defaultdict(list)
    for record in prepare_fields(recipe).train:
        pixels = np.asarray(field_image(record), dtype=np.float32)[::4, ::4].reshape(-1, 3) / 255
        by_lab[record.source].append((pixels.mean(0), pixels.std(0)))
    means = np.mean([np.mean([m for m, _ in v], 0) for v in by_lab.values()], 0)
    spreads = np.mean([np.mean([s for _, s in v], 0) for v in by_lab.values()], 0)
    return tuple(round(float(x), 4) for x in means), tuple(round(float(x), 4) for x in spreads)


def change(recipe: DetectorConfig, lab: str) -> DetectorConfig:
    mean, spread = training_colours(recipe)
    print(f"without {lab}: colour target mean {mean} spread {spread}")
    return replace(recipe, spec=replace(recipe.spec, colour_standardise=True,
                                        colour_mean=mean, colour_std=spread))


if __name__ == "__main__":
    detector_experiment(change)
