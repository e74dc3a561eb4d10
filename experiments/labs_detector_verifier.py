"""Does a crop verifier ("is this a white cell?") give an unseen lab's detector its precision?

    OMP_NUM_THREADS=1 python experiments/labs_detector_verifier.py RUNS LAB [LAB ...]

On a lab it never saw, the detector's false cells are red-cell clusters and stain debris
(precision 0.27-0.72 in runs/labs-v5), and no threshold chosen on the training labs
separates them (experiments/labs_detector_threshold_margin.py): the box head sees a 7x7
pooled patch of a stride-16 map. A second look at each found box, cut as the level-2
models cut a cell (2.6 x the box, 128 px, Reinhard stain), by a MobileNetV1-0.5 trained
on crops, may tell a nucleus from a clump of red cells whatever the stain.

Recipe, set before any held-out figure was computed. For each fold `RUNS/without-LAB/`
(detector trained on the other labs, seed 0):

- crops from the fold detector's own training and validation fields (its manifest's
  recipe, `prepare_fields`; at most 150 training and 60 validation fields of each lab,
  drawn with seed 0, for CPU time): positives are every white-cell box and every detection
  (score >= 0.05) with IoU >= 0.5 to one; negatives are detections with IoU < 0.2 to
  every white cell (the training labs' false cells), the red-cell and platelet boxes the
  labs annotate (at most 4 a field), and 2 random windows a field of a white cell's size
  that touch no white cell;
- the verifier: MobileNetV1-0.5 (ImageNet base, FC 128), the "lab" crop augmentation,
  class-weighted cross-entropy, 6 epochs, Adam 5e-4 cosine (the group classifier's
  recipe); the epoch kept by balanced accuracy on the validation fields' crops;
- the rule: a box is kept when its detector score >= t and the verifier's P(white cell)
  >= v, (t, v) chosen by F1 at IoU 0.5 on the validation fields (t on the detector's grid,
  v in 0.1 ... 0.9); without the verifier the fold's own threshold stands;
- measured on every field of the held-out lab through onnxruntime: precision / recall at
  IoU 0.5, AP50 (verified: detector score x P(white cell)) and the share of fields whose
  white-cell count is exact (reviewed unboxed cells ignored and counted as cells); also at
  the chosen t without the verifier ("t alone"), to tell the verifier from the threshold.

Keep rule: adopt when the mean exact count and the mean precision over the folds rise and
no fold's recall falls by more than 0.02.

Result (2026-12-07, runs/labs-v5, seed 0; precision / recall / AP50 / exact count):

    held out  own threshold               t alone                     t and verifier
    Chula     .85 .456/.798/.739/60.7%    .90 .585/.754/.739/66.7%    v .1 .833/.676/.721/65.8%
    BCCD      .90 .723/.914/.903/75.8%    .75 .626/.935/.903/65.7%    v .1 .674/.935/.841/72.0%
    BCD       .60 .270/.961/.783/5.0%     .90 .381/.932/.783/25.0%    v .2 .530/.932/.849/45.0%

Mean precision 0.483 -> 0.679, exact count 47.2% -> 60.9%, but recall falls by 0.12 on
Chula and 0.03 on BCD, and AP50 does not rise on average (0.808 -> 0.804): not kept.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import fold_detector, held_out_row, per_lab
from rich.console import Console
from torch.utils.data import DataLoader

from leukodiff.data.crops import cell_batch
from leukodiff.data.records import Box, Field
from leukodiff.data.sources import load_fields
from leukodiff.data.sources.unboxed import unboxed_white_cells
from leukodiff.evaluation.labs import FoldModels
from leukodiff.imaging import load_image
from leukodiff.metrics.detection import OPERATING_THRESHOLDS, detection_scores
from leukodiff.models.detector import DetectorSpec
from leukodiff.models.mobilenet import MobileNetClassifier
from leukodiff.models.tflite import load_imagenet_backbone
from leukodiff.pipeline.boxes import Detections, box_iou
from leukodiff.taxonomy import ObjectKind
from leukodiff.training.cells import CellTensorDataset, augmentation
from leukodiff.training.detector import DetectorConfig
from leukodiff.training.detector.fields import DetectorData, prepare_fields
from leukodiff.training.engine import KeptBest, classifier_epochs, seed_everything

MINE_SCORE = 0.05
POSITIVE_IOU, NEGATIVE_IOU = 0.5, 0.2
VERIFIER_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))
EPOCHS, SEED = 6, 0
TRAIN_FIELDS, VAL_FIELDS = 150, 60  # per training lab
console = Console()


def geometry(spec: DetectorSpec) -> tuple[float, int, str]:
    return spec.group_crop_scale, spec.group_input_size, spec.group_stain


def random_windows(record: Field, rng: random.Random, n: int) -> list[Box]:
    wbc = record.wbc_boxes
    sides = [max(b.x1 - b.x0, b.y1 - b.y0) for b in wbc] or [0.3 * min(record.width,
                                                                        record.height)]
    truth = np.array([b.xyxy for b in wbc], dtype=np.float32).reshape(-1, 4)
    windows = []
    for _ in range(20 * n):
        side = rng.choice(sides)
        if side >= min(record.width, record.height):
            break
        x, y = rng.uniform(0, record.width - side), rng.uniform(0, record.height - side)
        box = np.array([[x, y, x + side, y + side]], dtype=np.float32)
        if not len(truth) or box_iou(box, truth).max() == 0:
            windows.append(Box(x, y, x + side, y + side))
        if len(windows) == n:
            break
    return windows


def field_crops(analyzer, record: Field, spec: DetectorSpec, rng: random.Random
                ) -> tuple[np.ndarray, list[int], dict]:
    """The verifier's training crops of one field (uint8 (N, 3, S, S)) and targets."""
    image = load_image(record.image)
    found = analyzer.detect(image).above(MINE_SCORE)
    truth = np.array([b.xyxy for b in record.wbc_boxes], dtype=np.float32).reshape(-1, 4)
    best = (box_iou(found.boxes, truth).max(1) if len(truth) and len(found)
            else np.zeros(len(found)))
    positives = [*record.wbc_boxes, *(Box(*b) for b, i in zip(found.boxes.tolist(), best,
                                                              strict=True) if i >= POSITIVE_IOU)]
    mined = [Box(*b) for b, i in zip(found.boxes.tolist(), best, strict=True)
             if i < NEGATIVE_IOU]
    others = [b for b in record.boxes if b.kind is not ObjectKind.WBC]
    annotated = rng.sample(others, min(4, len(others)))
    windows = random_windows(record, rng, 2)
    negatives = mined + annotated + windows
    crop_scale, size, stain = geometry(spec)
    crops = cell_batch(image, positives + negatives, crop_scale, size, stain)
    counts = {"positive": len(positives), "mined": len(mined), "annotated": len(annotated),
              "windows": len(windows)}
    return ((crops * 255).round().astype(np.uint8), [1] * len(positives) + [0] * len(negatives),
            counts)



def crops_of(analyzer, records, spec, what: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    rng = random.Random(SEED)
    images, targets, counts = [], [], {}
    for record in records:
        x, y, c = field_crops(analyzer, record, spec, rng)
        images.append(x)
        targets += y
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
    console.print(f"  {what}: {len(records)} fields, crops {counts}")
    return torch.from_numpy(np.concatenate(images)), torch.tensor(targets), counts


@torch.inference_mode()
def p_white(verifier, crops: np.ndarray) -> np.ndarray:
    if not len(crops):
        return np.zeros(0, dtype=np.float32)
    verifier.eval()
    logits = torch.cat([verifier(torch.from_numpy(crops[s:s + 128]))
                        for s in range(0, len(crops), 128)])
    return torch.softmax(logits, 1)[:, 1].numpy()


def balanced_accuracy(verifier, x: torch.Tensor, y: torch.Tensor) -> float:
    p = p_white(verifier, x.float().div(255).numpy())
    said = p >= 0.5
    return float(np.mean([np.mean(said[y.numpy() == 1]), np.mean(~said[y.numpy() == 0])]))


def train_verifier(analyzer, config: DetectorConfig, data: DetectorData, fold_dir: Path
                   ) -> MobileNetClassifier:
    spec = config.spec
    verifier = MobileNetClassifier(2, width=spec.width, hidden=spec.group_hidden)
    saved = fold_dir / "verifier.pt"
    if saved.exists():
        verifier.load_state_dict(torch.load(saved, weights_only=True))
        return verifier.eval()
    seed_everything(SEED)
    load_imagenet_backbone(verifier.backbone)
    verifier.unfreeze_backbone(train_batchnorm=False)
    train_x, train_y, _ = crops_of(analyzer, per_lab(data.train, TRAIN_FIELDS), spec,
                                   "training fields")
    val_x, val_y, _ = crops_of(analyzer, per_lab(data.val, VAL_FIELDS), spec,
                               "validation fields")
    counts = torch.bincount(train_y, minlength=2).clamp(min=1).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (2 * counts))
    dataset = CellTensorDataset(train_x, train_y, augmentation("lab", spec.group_input_size))
    loader = DataLoader(dataset, batch_size=config.group_batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(SEED), drop_last=True)
    optimizer = torch.optim.Adam([p for p in verifier.parameters() if p.requires_grad],
                                 lr=config.group_lr, eps=1e-7)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS * len(loader))
    epoch = classifier_epochs(verifier, loader, loss_fn, optimizer, scheduler,
                              description=lambda n: f"verifier {n}/{EPOCHS}",
                              channels_last=False)
    keep, best = KeptBest(verifier), -1.0
    for number in range(1, EPOCHS + 1):
        started = time.perf_counter()
        loss = epoch(number)["loss"]
        score = balanced_accuracy(verifier, val_x, val_y)
        console.print(f"  verifier epoch {number}: loss {loss:.4f} val balanced accuracy "
                      f"{score:.3f} ({time.perf_counter() - started:.0f} s)")
        if score > best:
            best = score
            keep()
    keep.restore()
    torch.save(verifier.state_dict(), saved)
    return verifier.eval()


def detect_and_verify(analyzer, verifier, records, spec) -> tuple[list, list]:
    """Each field's detections (down to the lowest grid threshold) and P(white cell)."""
    crop_scale, size, stain = geometry(spec)
    found, probs = [], []
    for record in records:
        image = load_image(record.image)
        detections = analyzer.detect(image).above(min(OPERATING_THRESHOLDS))
        found.append(detections)
        probs.append(p_white(verifier, cell_batch(image, [Box(*b) for b in
                                                          detections.boxes.tolist()],
                                                  crop_scale, size, stain)))
    return found, probs


def verified(found, probs, v: float, rescore: bool = False) -> list[Detections]:
    out = []
    for d, p in zip(found, probs, strict=True):
        kept = d.take(np.flatnonzero(p >= v))
        if rescore:
            kept = Detections(kept.boxes, kept.labels, kept.scores * p[p >= v])
        out.append(kept)
    return out


def fold(runs: Path, lab: str) -> dict:
    model, config, own = fold_detector(runs, lab)
    with FoldModels(detector=model).analyzer(1, detection_threshold=0.0) as analyzer:
        data = prepare_fields(config)  # the fold detector's own parts, read once
        verifier = train_verifier(analyzer, config, data, model.parent.parent)
        val = per_lab(data.val, VAL_FIELDS)
        val_found, val_probs = detect_and_verify(analyzer, verifier, val, config.spec)
        grid = {(t, v): detection_scores(verified(val_found, val_probs, v), val, t)["f1"]
                for t in OPERATING_THRESHOLDS for v in VERIFIER_GRID}
        t, v = max(grid, key=lambda k: (grid[k], -k[1], k[0]))
        console.print(f"  chosen on validation: t {t} v {v} (val F1 {grid[(t, v)]:.4f}; "
                      f"own threshold without verifier "
                      f"{detection_scores(val_found, val, own)['f1']:.4f})")
        fields = sorted(load_fields(lab).records, key=lambda r: r.image.name)
        ignore = unboxed_white_cells(lab)
        found, probs = detect_and_verify(analyzer, verifier, fields, config.spec)
    result = {"lab": lab, "own_threshold": own, "t": t, "v": v}
    for name, detections, threshold in (("own", found, own), ("t alone", found, t),
                                        ("verified", verified(found, probs, v), t)):
        ap = detection_scores(verified(found, probs, 0.0, rescore=True), fields, 0.0,
                              ignore)["ap50"] if name == "verified" else None
        result[name] = held_out_row(lab, name, detections, fields, threshold, ignore, ap)
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    runs = Path(sys.argv[1])
    results = [fold(runs, lab) for lab in sys.argv[2:]]
    (runs / "verifier.json").write_text(json.dumps(results, indent=1) + "\n")
    for name in ("own", "t alone", "verified"):
        console.print(f"{name}: " + ", ".join(
            f"mean {k} {np.mean([r[name][k] for r in results]):.3f}"
            for k in ("precision", "recall", "ap50", "exact")))
