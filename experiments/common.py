"""What the leave-one-lab-out detector experiments share (run them from the repository root:
`python experiments/NAME.py` puts this folder on the import path)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
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


def fold_detectors(runs_folders: Sequence[str]):
    """(RUNS, lab, detector.pt, its operating point) of each fold detector under each of
    `runs_folders` (`RUNS/without-LAB/detector/detector.pt`), labs in DETECTION_LABS order."""
    from leukodiff.evaluation.labs import DETECTION_LABS

    for runs in map(Path, runs_folders):
        for lab in DETECTION_LABS:
            model = runs / f"without-{lab}" / "detector" / "detector.pt"
            if model.exists():
                manifest = json.loads(model.with_suffix(".json").read_text())
                yield runs, lab, model, manifest["training"]["operating_point"]


def held_out_at_thresholds(model: Path, lab: str, thresholds: Mapping[str, float],
                           threads: int = 1) -> dict[str, dict[str, float]]:
    """A fold detector on every labelled field of its held-out `lab`, detected once through
    onnxruntime as `evaluate labs` does (down to score 0), measured at each named threshold:
    precision, recall, AP50 and exact count (reviewed unboxed cells ignored and counted)."""
    from leukodiff.data.sources import load_fields
    from leukodiff.data.sources.unboxed import unboxed_white_cells
    from leukodiff.evaluation.labs import FoldModels
    from leukodiff.imaging import load_image

    fields = sorted(load_fields(lab).records, key=lambda r: r.image.name)
    ignore = unboxed_white_cells(lab)
    with FoldModels(detector=model).analyzer(threads, detection_threshold=0.0) as analyzer:
        found = [analyzer.detect(load_image(r.image)) for r in fields]
    figures = {}
    for name, threshold in thresholds.items():
        m = detection_scores(found, fields, threshold, ignore)
        figures[name] = {"threshold": threshold, "precision": m["precision"],
                         "recall": m["recall"], "ap50": m["ap50"],
                         "exact_count": exact_share(found, fields, threshold, ignore)}
    return figures


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


# --- a detector recipe change, fold by fold, against runs/labs-v5 seed for seed -----------

# runs/labs-v5's labs.json where that run is on this machine, else its copy in docs/
# (docs/labs.json is the section's current table, runs/labs-v6 since 2026-12-08)
BASELINE = next((p for p in (Path("runs/labs-v5/labs.json"), Path("docs/labs-v5.json"))
                 if p.exists()), Path("docs/labs-v5.json"))
FIGURES = ("precision", "recall", "ap50", "exact_count")


def labs_v5_detector(lab: str, seed: int) -> dict | None:
    """runs/labs-v5's held-out detector figures for `lab` at `seed` (None: not run)."""
    runs = json.loads(BASELINE.read_text())
    fold = runs["folds"] if seed == 0 else runs.get("repeats", {}).get(str(seed), {})
    return (fold.get(lab) or {}).get("detector")


def detector_fold(recipe: DetectorConfig, folder: Path, lab: str) -> dict:
    """The detector of one fold trained with `recipe` in `folder` (resumed, reused), exported,
    and measured on every labelled field of `lab` as `evaluate labs` measures it; its
    figures are written beside it (`result.json`) and returned."""
    from leukodiff.data.sources import load_fields
    from leukodiff.evaluation.labs import FoldModels, measure_fields
    from leukodiff.models.export import export_detector
    from leukodiff.training.detector import train_detector

    if not (folder / "detector.pt").exists():
        train_detector(recipe, folder, resume=(folder / "last.pt").exists(),
                       log=Console().print)
    if not (folder / "detector.onnx.json").exists():
        export_detector(folder / "detector.pt")
    fields = sorted(load_fields(lab).records, key=lambda r: r.image.name)
    with FoldModels(detector=folder / "detector.pt").analyzer(
            1, detection_threshold=0.05) as analyzer:
        result = measure_fields(analyzer, fields, lab).detector
    measured = {k: getattr(result, k) for k in FIGURES}
    (folder.parent / "result.json").write_text(json.dumps(measured, indent=1))
    Console().print(f"seed {recipe.seed}, held out {lab}: {measured}; runs/labs-v5: "
                    f"{ {k: (labs_v5_detector(lab, recipe.seed) or {}).get(k) for k in FIGURES} }")
    return measured


def paired_folds(out: Path, base: Path | None = None) -> list[tuple[str, int, dict, dict]] | None:
    """(lab, seed, before, after) for every OUT/seed-S/without-LAB/result.json, `before` the
    fold of the same lab and seed in `base` (its result.json) or, without `base`,
    runs/labs-v5's; None (said) when one has no baseline."""
    rows = []
    for path in sorted(out.glob("seed-*/without-*/result.json")):
        seed = int(path.parts[-3].removeprefix("seed-"))
        lab = path.parts[-2].removeprefix("without-")
        before = (labs_v5_detector(lab, seed) if base is None else
                  json.loads(p.read_text()) if (p := base / path.relative_to(out)).exists()
                  else None)
        if before is None:
            print(f"no baseline for {lab} seed {seed} in {base or BASELINE}: no verdict")
            return None
        rows.append((lab, seed, before, json.loads(path.read_text())))
    return rows


def mean_changes(rows: Sequence[tuple[str, int, dict, dict]]
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Mean after - before of each figure over `rows`, and of the exact count by lab."""

    def mean(key: str, which: int, lab: str | None = None) -> float:
        values = [r[2 + which][key] for r in rows if lab is None or r[0] == lab]
        return sum(values) / len(values)

    gains = {k: round(mean(k, 1) - mean(k, 0), 4) for k in FIGURES}
    by_lab = {lab: round(mean("exact_count", 1, lab) - mean("exact_count", 0, lab), 4)
              for lab in sorted({r[0] for r in rows})}
    return gains, by_lab


def detector_rule(out: Path, base: Path | None = None) -> bool:
    """Every OUT/seed-S/without-LAB/result.json against the fold of the same lab and seed
    in `base` (its result.json: the unchanged recipe trained on the same code) or, without
    `base`, runs/labs-v5's, as a table, and the detector keep rule: over every (lab, seed),
    mean AP50 +0.03, mean exact count +3 points, mean recall no worse than -0.02, no lab's
    mean exact count down by more than 5 points."""
    rows = paired_folds(out, base)
    if rows is None:
        return False
    print(f"| held-out lab | seed | {base or BASELINE} P / R / AP50 / exact | changed |")
    print("|---|---|---|---|")
    for lab, seed, before, after in rows:
        cells = [" / ".join(f"{d[k]:.3f}" if k != "exact_count" else f"{100 * d[k]:.1f}%"
                            for k in FIGURES) for d in (before, after)]
        print(f"| {lab} | {seed} | {cells[0]} | {cells[1]} |")
    if not rows:
        return False
    gains, by_lab = mean_changes(rows)
    kept = (gains["ap50"] >= 0.03 and gains["exact_count"] >= 0.03
            and gains["recall"] >= -0.02 and min(by_lab.values()) >= -0.05)
    print(f"{len(rows)} folds; mean change {gains}; exact count by lab {by_lab}; "
          f"{'KEPT' if kept else 'not kept'}")
    return kept


def detector_experiment(change: Callable[..., DetectorConfig]) -> None:
    """The command line of a detector recipe experiment:

        python experiments/NAME.py OUT SEED [LABS [ARG]]   # train and measure the folds
        python experiments/NAME.py OUT summary [BASE]     # the table and the keep rule

    Each fold's recipe is `evaluate labs --pbc-paste 0.5`'s detector without the group
    classifier (detection figures only), one CPU thread, then `change(recipe, lab, *ARG)`.
    Since the other-cell class became the default (issue #14), that recipe has it; the
    experiments measured before it (everything but labs_detector_other_cells.py and
    labs_detector_batch_threshold.py's `unchanged`) ran without it: `git checkout a7b2a05`
    reruns them as measured."""
    import sys

    import torch

    from leukodiff.evaluation.labs import DETECTION_LABS, LabsConfig, available_labs
    from leukodiff.models.detector import DetectorSpec

    out = Path(sys.argv[1])
    if sys.argv[2] == "summary":
        detector_rule(out, Path(sys.argv[3]) if len(sys.argv) > 3 else None)
        return
    seed = int(sys.argv[2])
    labs = sys.argv[3].split(",") if len(sys.argv) > 3 else list(DETECTION_LABS)
    torch.set_num_threads(1)
    config = LabsConfig(augmentation="lab", stain="reinhard", pbc_paste=0.5, seed=seed)
    present = available_labs(None)
    for lab in (x for x in labs if present[x]):
        sources = tuple(x for x in DETECTION_LABS if x != lab and present[x])
        recipe = DetectorConfig(sources=sources, epochs=config.detector_epochs,
                                mono_oversample=config.mono_oversample, group_epochs=0,
                                seed=seed, pbc_paste=config.pbc_paste,
                                spec=DetectorSpec(group_stain=config.stain))
        detector_fold(change(recipe, lab, *sys.argv[4:5]),
                      out / f"seed-{seed}" / f"without-{lab}" / "detector", lab)
