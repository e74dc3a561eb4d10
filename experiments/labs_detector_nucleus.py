"""Does "a white cell has a nucleus" give an unseen lab's detector its precision?

    OMP_NUM_THREADS=1 python experiments/labs_detector_nucleus.py RUNS LAB [LAB ...]

On a lab it never saw, the detector's false cells are pale red cells (Chula), red-cell
clusters and platelets (BCD, BCCD), and neither a threshold nor a crop classifier trained
on the other labs separates them there (experiments/labs_detector_threshold_margin.py,
labs_detector_verifier.py): what they learn of two labs' look does not carry to a third.
What every Romanowsky-stained smear shares is physics: the nucleus (azure / methylene
blue on DNA) absorbs red light; red cells (eosin) absorb green and pass red; the
background passes everything. A box with no red-absorbing core is not a white cell,
whatever the lab's stain strength or camera.

Recipe, set before any held-out figure was computed. For each fold `RUNS/without-LAB/`
(detector trained on the other labs, seed 0, its own operating threshold unchanged):

- each field's optical density in the red channel relative to its own background:
  OD_R = -log10(R / R_bg), R_bg the field's 99th percentile of red (the brightest pixels
  are the glass between cells, whatever the lamp or exposure);
- a box's nucleus share: the share of the pixels of its inner half (the box shrunk to
  half its width and height about its centre, where a white cell's nucleus lies; a red
  cell's pale centre lies there too) with OD_R >= tau;
- the rule: a detection is kept when its nucleus share >= s. For each tau in TAU_GRID, s
  is the 2nd percentile of the nucleus share of the training labs' validation detections
  that match a white cell (IoU >= 0.5) at the fold's threshold (so ~98% of those labs'
  found cells pass); tau is the one with the best F1 on the same validation fields (ties:
  the lower tau);
- measured on every field of the held-out lab through onnxruntime at the fold's own
  threshold, with and without the rule: precision / recall at IoU 0.5, AP50 (filtered
  boxes removed), exact-count share (reviewed unboxed cells ignored, counted as cells).

Keep rule (as the verifier's): adopt when the mean exact count and the mean precision over
the folds rise and no fold's recall falls by more than 0.02.

Result (2026-12-07, runs/labs-v5, seed 0): the rule could not be set. On every fold the
2nd percentile of the found white cells' nucleus share is 0 at every tau >= 0.2 (and
< 0.01 at 0.15), so the rule keeps every box and every held-out figure is unchanged
(Chula 0.456 / 0.798 / AP50 0.741 / 60.7%; BCCD 0.723 / 0.914 / 0.909 / 75.8%; BCD as the
fold's own). Why, on the Chula fold's validation fields (BCCD and BCD): BCCD's nuclei
are pale violet, their red channel within ~0.15 OD of the glass (median core share at
0.2: 0.15, 10% of cells 0), while BCD's are dark (median 0.63): the red channel's optical
density is not one scale across labs after all (camera gamma, exposure, JPEG). A
bluer-than-red measure (OD_R - OD_B) overlaps as much, and those fields hold 6 false
cells at score >= 0.3 (72 true): the training labs cannot choose a colour rule for a
lab's false cells because they have almost none. Not kept; nothing to adopt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from common import fold_detector, held_out_row, per_lab
from rich.console import Console

from leukodiff.data.sources import load_fields
from leukodiff.data.sources.unboxed import unboxed_white_cells
from leukodiff.evaluation.labs import FoldModels
from leukodiff.imaging import load_image
from leukodiff.metrics.detection import detection_scores, match
from leukodiff.pipeline.boxes import Detections
from leukodiff.training.detector.fields import prepare_fields

TAU_GRID = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
KEEP_PERCENTILE = 2.0
VAL_FIELDS, SEED = 60, 0  # validation fields per training lab, as the verifier's
LOW = 0.05  # detections kept for AP50
console = Console()


def red_density(image) -> np.ndarray:
    red = np.asarray(image, dtype=np.float32)[..., 0] + 1.0
    return -np.log10(red / np.percentile(red, 99))


def nucleus_shares(density: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, len(TAU_GRID)): per box and tau, the share of its inner half with OD_R >= tau."""
    shares = np.zeros((len(boxes), len(TAU_GRID)), dtype=np.float32)
    h, w = density.shape
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
        core = density[max(0, int(cy - hh)):min(h, int(np.ceil(cy + hh))),
                       max(0, int(cx - hw)):min(w, int(np.ceil(cx + hw)))]
        if core.size:
            shares[i] = [(core >= tau).mean() for tau in TAU_GRID]
    return shares


def detect(analyzer, records) -> tuple[list[Detections], list[np.ndarray]]:
    found, shares = [], []
    for record in records:
        image = load_image(record.image)
        detections = analyzer.detect(image).above(LOW)
        found.append(detections)
        shares.append(nucleus_shares(red_density(image), detections.boxes))
    return found, shares


def filtered(found, shares, tau_index: int | None, least: float) -> list[Detections]:
    if tau_index is None:
        return list(found)
    return [d.take(np.flatnonzero(s[:, tau_index] >= least))
            for d, s in zip(found, shares, strict=True)]



def matched_shares(found, shares, records, threshold: float) -> np.ndarray:
    rows = []
    for d, s, record in zip(found, shares, records, strict=True):
        keep = np.flatnonzero(d.scores >= threshold)
        truth = np.array([b.xyxy for b in record.wbc_boxes], dtype=np.float32).reshape(-1, 4)
        rows += [s[keep[i]] for i, _ in match(d.boxes[keep], d.scores[keep], truth)]
    return np.array(rows).reshape(-1, len(TAU_GRID))


def fold(runs: Path, lab: str) -> dict:
    model, config, own = fold_detector(runs, lab)
    with FoldModels(detector=model).analyzer(1, detection_threshold=0.0) as analyzer:
        val = per_lab(prepare_fields(config).val, VAL_FIELDS)
        val_found, val_shares = detect(analyzer, val)
        positives = matched_shares(val_found, val_shares, val, own)
        rules = {}
        for t, tau in enumerate(TAU_GRID):
            least = float(np.percentile(positives[:, t], KEEP_PERCENTILE))
            f1 = detection_scores(filtered(val_found, val_shares, t, least), val, own)["f1"]
            rules[t] = (least, f1)
            console.print(f"  validation: tau {tau} -> share >= {least:.3f}, F1 {f1:.4f}")
        best = max(rules, key=lambda t: (round(rules[t][1], 6), -t))
        least = rules[best][0]
        console.print(f"  chosen: tau {TAU_GRID[best]}, share >= {least:.3f} (validation F1 "
                      f"{rules[best][1]:.4f}; without the rule "
                      f"{detection_scores(val_found, val, own)['f1']:.4f})")
        fields = sorted(load_fields(lab).records, key=lambda r: r.image.name)
        ignore = unboxed_white_cells(lab)
        found, shares = detect(analyzer, fields)
    result = {"lab": lab, "own_threshold": own, "tau": TAU_GRID[best], "least_share": least,
              "validation": {str(TAU_GRID[t]): {"least_share": v[0], "f1": v[1]}
                             for t, v in rules.items()}}
    for name, tau_index in (("own", None), ("nucleus", best)):
        detections = filtered(found, shares, tau_index, least)
        result[name] = held_out_row(lab, name, detections, fields, own, ignore)
    return result


if __name__ == "__main__":
    runs = Path(sys.argv[1])
    results = [fold(runs, lab) for lab in sys.argv[2:]]
    (runs / "nucleus.json").write_text(json.dumps(results, indent=1) + "\n")
    for name in ("own", "nucleus"):
        console.print(f"{name}: " + ", ".join(
            f"mean {k} {np.mean([r[name][k] for r in results]):.3f}"
            for k in ("precision", "recall", "ap50", "exact")))
