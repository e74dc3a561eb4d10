"""Picture of the BCCD eosinophils that the level-2 recipe gets wrong, for a hematologist.

    python experiments/level2_bccd_cv.py baseline      # first: the 2-fold CV models
    python experiments/bccd_eosinophil_review.py       # -> docs/figures/bccd_eosinophil_review.jpg

Top: every BCCD eosinophil (VOC train+val fields) that the 2-fold CV of the shipped
recipe calls a neutrophil, with the field name and the model's confidence. Bottom:
the first eight it gets right. Crops are cut at 1.4x the box and enlarged, so the
granules show. Observation (2026-11-26, a developer's eye, not a hematologist's): the
cells it gets right show orange-red granules; of the 17 it gets wrong, 2 show them
(00044, 00274) and most show a 3-5-lobed nucleus in pale lilac cytoplasm, as BCCD's
neutrophils do. BCCD's `labels.csv` gives one type per field, not per cell.
"""
import json
import os

import torch
from PIL import Image, ImageDraw
from sklearn.model_selection import StratifiedGroupKFold

import leukodiff.training.classifier as tc
from leukodiff.data.crops import load_cell_image
from leukodiff.models.io import load_classifier

config = tc.ClassifierConfig(task="polymorphonuclear", epochs=20, seed=0)
data = tc.prepare(config)
pool = [i for part in ("train", "val") for i in data.parts[part] if data.cells[i].source == "bccd"]
labels = [str(data.cells[i].cell_type) for i in pool]
groups = [str(data.cells[i].group_key) for i in pool]
wrong, right = [], []
splitter = StratifiedGroupKFold(2, shuffle=True, random_state=0)
for fold, (_, held_idx) in enumerate(splitter.split(pool, labels, groups)):
    model, _ = load_classifier(f"runs/cv/baseline-fold{fold}/model.pt")
    held = [pool[j] for j in held_idx]
    probabilities = tc.predict_logits(model, data.images[torch.tensor(held)]).softmax(1)
    for cell_index, p in zip(held, probabilities, strict=True):
        if data.classes[int(data.targets[cell_index])] != "eosinophil":
            continue
        predicted = data.classes[int(p.argmax())]
        (right if predicted == "eosinophil" else wrong).append(
            (data.cells[cell_index], predicted, float(p.max())))
wrong.sort(key=lambda row: str(row[0].group_key))
right.sort(key=lambda row: str(row[0].group_key))
rows = [("BCCD eosinophils called neutrophils (2-fold CV, held-out fold)", wrong),
        ("BCCD eosinophils called eosinophils (first 8)", right[:8])]
size, columns = 160, 6
height = sum(24 + ((len(r) + columns - 1) // columns) * (size + 18) for _, r in rows)
sheet = Image.new("RGB", (columns * (size + 4), height), "white")
draw = ImageDraw.Draw(sheet)
y = 0
for title, cells in rows:
    draw.text((4, y + 6), title, fill="black")
    y += 24
    for k, (cell, predicted, confidence) in enumerate(cells):
        x0, y0 = (k % columns) * (size + 4), y + (k // columns) * (size + 18)
        crop = load_cell_image(cell, 1.4).resize((size, size), Image.Resampling.LANCZOS)
        sheet.paste(crop, (x0 + 2, y0))
        draw.text((x0 + 4, y0 + size + 2),
                  f"{str(cell.group_key).split('_')[-1]}  {predicted} {confidence:.2f}",
                  fill="black")
    y += ((len(cells) + columns - 1) // columns) * (size + 18)
os.makedirs("docs/figures", exist_ok=True)
sheet.save("docs/figures/bccd_eosinophil_review.jpg", quality=85)
print(json.dumps({"wrong": len(wrong), "right": len(right)}))
