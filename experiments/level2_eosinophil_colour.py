"""Does the crop colour normalisation take away an eosinophil's red?

    python experiments/level2_eosinophil_colour.py     # ~1 min; Chula fetched (README)

Level 2 cuts every crop and gives it one CIELAB mean and spread ("reinhard",
`imaging.normalise_stain`) before the network sees it. An eosinophil is a neutrophil-sized
cell whose granules stain red-orange: the one colour cue between the two. The whole-crop
statistics include the cell, so a red cell's crop is shifted away from red. For 40 cells
of each polymorphonuclear type per lab (seeded), this prints the mean of R - G and B - G
over the crop's central 48 x 48 pixels (the cell), as the level-2 models are given them,
without and with the normalisation.

Result (2026-12-08): eosinophil minus neutrophil R - G, raw -> normalised: PBC +0.047 ->
+0.019, Chula +0.068 -> -0.016, BCCD -0.001 -> -0.007. The normalisation shrinks PBC's
eosinophil red by 60% and turns Chula's around; after it neither training lab of the PBC
fold (BCCD, Chula) shows its eosinophils redder than its neutrophils, so the fold's models
learn eosinophils from texture, which changes with the camera. This is where PBC's
eosinophils go (13% right even after adapting with 25 of them, section 0b).
"""

from __future__ import annotations

import dataclasses
import random

from leukodiff.data.sources import load_cells
from leukodiff.evaluation.labs import available_labs
from leukodiff.models.files import read_checked
from leukodiff.training.adapt import crop_geometry
from leukodiff.training.cells import CellImages

TYPES = ("neutrophil", "eosinophil", "basophil")
LABS = ("pbc", "chula", "bccd")

present = available_labs(None)
geometry = crop_geometry(read_checked("polymorphonuclear")[1])  # the shipped model's crops
cut = {"raw": CellImages(dataclasses.replace(geometry, stain="none")),
       "normalised": CellImages(geometry)}
centre = slice(geometry.input_size // 2 - 24, geometry.input_size // 2 + 24)
for lab in (x for x in LABS if present[x]):
    cells = load_cells(lab).records
    rng = random.Random(0)
    red: dict[str, dict[str, float]] = {}
    for name in TYPES:
        pool = [c for c in cells if str(c.cell_type) == name]
        chosen = rng.sample(pool, min(40, len(pool)))
        line = []
        for how, images in cut.items():
            pixels = images(chosen).float()
            pixels = pixels / 255 if pixels.max() > 1.5 else pixels
            mean = pixels[:, :, centre, centre].mean((0, 2, 3))
            red.setdefault(how, {})[name] = float(mean[0] - mean[1])
            line.append(f"{how} R-G {mean[0] - mean[1]:+.3f} B-G {mean[2] - mean[1]:+.3f}")
        print(f"{lab:6s} {name:11s} {len(chosen):3d}  " + "   ".join(line))
    print(f"{lab:6s} eosinophil - neutrophil R-G: " + ", ".join(
        f"{how} {red[how]['eosinophil'] - red[how]['neutrophil']:+.3f}" for how in cut))
