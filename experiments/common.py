"""What the leave-one-lab-out detector experiments share (run them from the repository root:
`python experiments/NAME.py` puts this folder on the import path)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from leukodiff.data.records import Field
from leukodiff.metrics.detection import detection_scores
from leukodiff.models.export import export_classifier
from leukodiff.models.files import read_checked
from leukodiff.pipeline.boxes import Detections
from leukodiff.training.classifier import ClassifierConfig, train_classifier
from leukodiff.training.detector import DetectorConfig


def exact_share(detections: Sequence[Detections], fields: Sequence[Field], threshold: float,
                ignore: Mapping[str, Sequence]) -> float:
    """Share of fields whose white-cell count at `threshold` is exact; a reviewed unboxed
    white cell (`ignore`, by image stem) counts as a cell."""
    return float(np.mean([len(found.above(threshold).boxes)
                          == len(f.wbc_boxes) + len(ignore.get(f.image.stem, ()))
                          for found, f in zip(detections, fields, strict=True)]))


def per_lab(records: Sequence[Field], most: int, seed: int = 0) -> list[Field]:
    """At most `most` fields of each source, drawn with `seed` (for CPU time)."""
    rng = random.Random(seed)
    out = []
    for source in sorted({r.source for r in records}):
        mine = [r for r in records if r.source == source]
        out += rng.sample(mine, most) if len(mine) > most else mine
    return out


def fold_detector(runs: Path, lab: str) -> tuple[Path, DetectorConfig, float]:
    """The detector of fold `RUNS/without-LAB/` (trained without `lab`): its file, its
    training config and its own operating threshold (chosen on its training labs)."""
    model = runs / f"without-{lab}" / "detector" / "detector.pt"
    config = DetectorConfig.from_dict(read_checked(model)[1].training.settings)
    own = json.loads(model.with_suffix(".json").read_text())["training"]["operating_point"][
        "threshold"]
    Console().print(f"[bold]without {lab}[/]: detector on {', '.join(config.sources)}, "
                    f"own threshold {own}")
    return model, config, own


def held_out_row(lab: str, name: str, detections: Sequence[Detections], fields: Sequence[Field],
                 threshold: float, ignore: Mapping[str, Sequence], ap50: float | None = None
                 ) -> dict:
    """Precision / recall at `threshold`, AP50 (`ap50` when the ranking differs from the
    detections' own scores) and exact-count share on the held-out lab, printed."""
    m = detection_scores(detections, fields, threshold, ignore)
    row = {"precision": m["precision"], "recall": m["recall"],
           "ap50": m["ap50"] if ap50 is None else ap50,
           "exact": exact_share(detections, fields, threshold, ignore)}
    Console().print(f"  held out {lab}, {name}: precision {row['precision']:.3f} recall "
                    f"{row['recall']:.3f} AP50 {row['ap50']:.3f} exact count "
                    f"{row['exact']:.1%}")
    return row


def level2_fold(recipe: ClassifierConfig, folder: Path) -> Path:
    """A fold's level-2 model trained with `recipe` in `folder` (resumed when interrupted,
    reused when done) and exported to ONNX: its model.pt."""
    if not (folder / "model.pt").exists():
        train_classifier(recipe, folder, resume=(folder / "last.pt").exists(),
                         log=Console().print)
    if not (folder / "model.onnx.json").exists():  # written last: an export cut short redoes
        export_classifier(folder / "model.pt")
    return folder / "model.pt"
