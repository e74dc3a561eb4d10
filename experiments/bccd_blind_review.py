"""Blind review sheets of BCCD's granulocytes, for a hematologist to type each cell.

    python experiments/bccd_blind_review.py [OUT]   # default out/bccd-review; ~20 s

Why: BCCD's `labels.csv` names one type per field, not per cell, and most BCCD
"eosinophils" our models miss look like neutrophils (docs/figures/
bccd_eosinophil_review.jpg). The #3 and #5 targets are measured against those labels,
so they wait for a person who can tell. This makes that review fair: every typed
polymorphonuclear cell of BCCD (all subsets: neutrophils, eosinophils, basophils, one
per single-WBC field) in a fixed random order, numbered, with no label and no model
call on the sheet, so that neither the base rates nor our models steer the reader.

Writes OUT/sheet_NN.jpg (48 cells each, crops at 1.4x the box, 192 px), OUT/answers.csv
(number, call: fill in neutrophil | eosinophil | basophil | other | unsure) for the
reviewer, and OUT/key.csv (number, field, BCCD label, VOC subset) to keep away from the
reviewer until the answers are back.
"""
import csv
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from leukodiff.data.crops import load_cell_image
from leukodiff.data.sources import load_cells
from leukodiff.taxonomy import Group

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/bccd-review")
if (out / "key.csv").exists():
    sys.exit(f"{out} already holds a review; choose another folder")
cells = [c for c in load_cells("bccd").records if c.group == Group.POLYMORPHONUCLEAR]
cells.sort(key=lambda c: str(c.group_key))
random.Random(20261126).shuffle(cells)
out.mkdir(parents=True, exist_ok=True)
size, columns, rows = 192, 8, 6
per_sheet = columns * rows
for first in range(0, len(cells), per_sheet):
    sheet = Image.new("RGB", (columns * (size + 6), rows * (size + 22)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, cell in enumerate(cells[first:first + per_sheet]):
        x, y = (k % columns) * (size + 6), (k // columns) * (size + 22)
        crop = load_cell_image(cell, 1.4).resize((size, size), Image.Resampling.LANCZOS)
        sheet.paste(crop, (x + 3, y))
        draw.text((x + 6, y + size + 4), f"#{first + k + 1}", fill="black")
    sheet.save(out / f"sheet_{first // per_sheet + 1:02d}.jpg", quality=90)
with open(out / "answers.csv", "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["number", "call"])
    writer.writerows([n, ""] for n in range(1, len(cells) + 1))
with open(out / "key.csv", "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["number", "field", "bccd_label", "subset"])
    writer.writerows([n, Path(c.image).name, str(c.cell_type), c.subset]
                     for n, c in enumerate(cells, 1))
counts = {t: sum(str(c.cell_type) == t for c in cells)
          for t in ("neutrophil", "eosinophil", "basophil")}
print(f"{len(cells)} cells {counts} on {(len(cells) + per_sheet - 1) // per_sheet} sheets in {out}")
