"""Recipe selection without BCCD's test list: 2-fold CV over BCCD's VOC train+val crops.

    python experiments/level2_bccd_cv.py RECIPE  # baseline|camera|balance1|stain|gray|sizeN

Folds are grouped by field; each fold's crops leave training and validation and are
only tested. "camera" adds low-resolution/soft-focus augmentation (downscale 1.5-3x
and back, p 0.5; Gaussian blur, p 0.3) to the shipped recipe (polymorphonuclear, 20
epochs, seed 0). Result (2026-11-26), BCCD held-out fold, accuracy / N-E macro-F1:
baseline 89.8% / 0.862 and 90.6% / 0.883; camera 87.3% / 0.846 and 86.3% / 0.840.
Eosinophil recall rose (22->26 of 33, 27->28 of 33) but neutrophils paid more: not adopted.
"balance1" draws each source with equal weight (source_balance 1.0 instead of 0.5):
85.6% / 0.831 and 92.3% / 0.906, mean N/E macro-F1 0.869 vs 0.872: not adopted. The
fold-to-fold spread (±0.02-0.04) is larger than any recipe difference seen so far.
"stain" adds the detector's per-channel gain (each RGB channel x 1 +- 0.15), which took the
detector from BCD recall 0.68 to 0.97: fold 1 scored 84.7% / 0.806 (6 neutrophils called
eosinophils, none before; eosinophils unchanged at 22/33), so fold 2 was not run: not adopted.
"gray" drops colour from 30% of training images (RandomGrayscale), so that nuclear shape
counts more: fold 1 scored 85.6% / 0.815 (5 neutrophils called eosinophils; eosinophils again
22/33, 9 of the 11 misses the baseline's); fold 2 not run: not adopted.
"size224" (session 4) feeds the network 224x224 crops of the same geometry instead of 128,
so that a cell spans ~90 px rather than ~50 and eosinophil granules survive the resize
(3.2x the training time: ~45 s per epoch): 89.8% / 0.862 and 89.7% / 0.876 (eosinophils 23/33
and 28/33, neutrophils 82/84 and 77/84), mean 0.869 vs the baseline's 0.876: not adopted.
Test-time augmentation (mean of the 8 flips/90-degree turns) lowered the baseline to 0.848 and
0.846; an eosinophil logit bias, the best on either fold, moved it by +0.004 to +0.016 (noise).
Six fold-1 eosinophils are missed by all six recipes: BloodImage_00023, 00064, 00090, 00114,
00144, 00259 (see experiments/bccd_eosinophil_review.py for what they look like).

    python experiments/level2_bccd_cv.py size224   # ~30 min
"""
import json
import os
import random
import sys

import torch
from sklearn.model_selection import StratifiedGroupKFold
from torchvision.transforms import v2

import leukodiff.training.classifier as tc
from leukodiff.training.cells import training_augmentation


class Downscale(torch.nn.Module):
    """A lower-resolution camera: shrink by 1.5-3x and enlarge back (bilinear, antialiased)."""
    def forward(self, image):
        size = image.shape[-1]
        small = max(8, round(size / random.uniform(1.5, 3.0)))
        shrunk = v2.functional.resize(image, [small, small], antialias=True)
        return v2.functional.resize(shrunk, [size, size], antialias=True)

def camera_augmentation(input_size):
    base = training_augmentation(input_size)
    return v2.Compose([*base.transforms,
                       v2.RandomApply([Downscale()], p=0.5),
                       v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.2))], p=0.3)])

class ChannelGain(torch.nn.Module):
    """Stain and lamp balance: each RGB channel times 1 +- 0.15 (as the detector's training)."""
    def forward(self, image):
        gain = 1 + 0.15 * (2 * torch.rand(3, 1, 1) - 1)
        return (image.float() * gain).clamp(0, 255).to(torch.uint8)

def stain_augmentation(input_size):
    return v2.Compose([*training_augmentation(input_size).transforms, ChannelGain()])

def gray_augmentation(input_size):
    """Colour dropped from 30% of images: makes the model use nuclear shape and texture too."""
    return v2.Compose([*training_augmentation(input_size).transforms,
                       v2.RandomGrayscale(p=0.3)])

recipe = sys.argv[1]
config = tc.ClassifierConfig(task="polymorphonuclear", epochs=20, seed=0,
                             source_balance=1.0 if recipe == "balance1" else 0.5,
                             input_size=int(recipe[4:]) if recipe.startswith("size") else 128)
data = tc.prepare(config)
pool = [i for part in ("train", "val") for i in data.parts[part] if data.cells[i].source == "bccd"]
labels = [str(data.cells[i].cell_type) for i in pool]
groups = [str(data.cells[i].group_key) for i in pool]
splitter = StratifiedGroupKFold(2, shuffle=True, random_state=0)
for fold, (_, held_idx) in enumerate(splitter.split(pool, labels, groups)):
    held = {pool[j] for j in held_idx}
    parts = {"train": tuple(i for i in data.parts["train"] if i not in held),
             "val": tuple(i for i in data.parts["val"] if i not in held),
             "test": tuple(sorted(held))}
    prepared = tc.Prepared(data.classes, data.cells, parts, data.images, data.targets)
    if recipe == "camera":
        tc.training_augmentation = camera_augmentation
    if recipe == "stain":
        tc.training_augmentation = stain_augmentation
    if recipe == "gray":
        tc.training_augmentation = gray_augmentation
    if not os.path.exists(f"runs/cv/{recipe}-fold{fold}/model.json"):
        tc.train_classifier(config, f"runs/cv/{recipe}-fold{fold}", prepared=prepared,
                            log=lambda m: print(m, flush=True))
    with open(f"runs/cv/{recipe}-fold{fold}/model.json") as manifest:
        t = json.load(manifest)["metrics"]["test"]
    m = t.get("bccd", t["all"])
    print("RESULT", recipe, fold, json.dumps({"acc": m["accuracy"], "confusion": m["confusion"],
          "f1": {k: v["f1"] for k, v in m["per_class"].items()}}), flush=True)
