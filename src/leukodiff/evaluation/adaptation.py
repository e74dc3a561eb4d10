"""`leukodiff evaluate adaptation`: how fast does a lab teach the models its own look?

For each typed lab, the level-2 models trained *without* it (the leave-one-lab-out
folds of `leukodiff evaluate labs`, read from its `--out` folder) are adapted with k
reviewed cells per type drawn from that lab's training part (seeded; several draws),
exactly as `leukodiff adapt` does (fine-tuning with a replay sample of their own
training cells), and measured on that lab's test part, which no draw touches. k = 0 is
the model as it came. The lab's parts come from `data.splits.holdout` (grouped by slide
or field; BCCD keeps its VOC lists), so a slide is never on both sides.

Level 2 only: the detector and its group classifier are not adapted yet (issue #15).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from leukodiff.data.records import Cell
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_cells
from leukodiff.data.splits import holdout
from leukodiff.evaluation.labs import TYPED_LABS, available_labs
from leukodiff.models.files import read_checked
from leukodiff.models.io import load_classifier
from leukodiff.taxonomy import CellType
from leukodiff.training.adapt import (
    TASKS,
    AdaptConfig,
    adapt_task,
    crop_geometry,
    replay_cells,
    scores,
)
from leukodiff.training.cells import CellImages
from leukodiff.training.classifier import predict_logits


@dataclass(frozen=True)
class AdaptationConfig:
    labs: tuple[str, ...] = TYPED_LABS
    shots: tuple[int, ...] = (0, 5, 10, 25, 50)  # reviewed cells per type
    draws: int = 3
    seed: int = 0
    adapt: AdaptConfig = field(default_factory=AdaptConfig)


def lab_parts(cells: Sequence[Cell], seed: int) -> tuple[list[Cell], list[Cell]]:
    """(pool to draw reviewed cells from, test part) of a lab, grouped by slide/field."""
    parts = holdout(cells, val_fraction=0.1, test_fraction=0.3, seed=seed)
    pool = [cells[i] for i in (*parts["train"], *parts["val"])]
    return pool, [cells[i] for i in parts["test"]]


def draw(pool: Sequence[Cell], k: int, seed: int) -> list[Cell]:
    """k cells of each type in the pool (all of a type that has fewer), seeded."""
    rng = random.Random(seed)
    by_type: dict[str, list[Cell]] = {}
    for cell in pool:
        by_type.setdefault(str(cell.cell_type), []).append(cell)
    chosen = []
    for name in sorted(by_type):
        group = by_type[name]
        chosen.extend(rng.sample(group, k) if len(group) > k else group)
    return chosen


def adaptation_curve(lab: str, bases: dict[str, Path], config: AdaptationConfig, *,
                     data_root=None, track: Track = no_progress,
                     log: Callable[[str], None] = lambda m: None) -> dict:
    """Level-2 macro-F1 (both models' cells together) on the lab's test part after adapting
    with k cells per type, for every k and draw."""
    cells = load_cells(lab, data_root, track).records
    pool, test = lab_parts(cells, config.seed)
    manifests = {task: read_checked(bases[task])[1] for task in TASKS}
    classes = {task: [str(c) for c in manifests[task]["classes"]] for task in TASKS}
    images = {task: CellImages(crop_geometry(manifests[task])) for task in TASKS}
    replay = {task: replay_cells(manifests[task], config.adapt.replay_per_class,
                                 config.adapt.seed, data_root, track, log) for task in TASKS}
    held = {task: [c for c in test if str(c.cell_type) in classes[task]] for task in TASKS}
    runs = []
    for k in config.shots:
        for index in range(config.draws if k else 1):
            started = time.perf_counter()
            chosen = draw(pool, k, config.seed + index) if k else []
            truth, said = [], []
            for task in TASKS:
                if not held[task]:
                    continue
                learn = [c for c in chosen if str(c.cell_type) in classes[task]]
                if learn:
                    model = adapt_task(task, bases[task], learn, held[task], config.adapt,
                                       data_root=data_root, images=images[task],
                                       replay=replay[task], track=track).model
                else:
                    model = load_classifier(bases[task])[0]
                logits = predict_logits(model, images[task](held[task], track))
                truth += [str(c.cell_type) for c in held[task]]
                said += [classes[task][i] for i in logits.argmax(1).tolist()]
            names = [str(t) for t in CellType]
            result = scores([names.index(t) for t in truth], [names.index(t) for t in said],
                            names)
            runs.append({"k": k, "draw": index, "cells": len(chosen),
                         "seconds": time.perf_counter() - started, **result})
            log(f"{lab}: k {k} draw {index}: macro-F1 {result['macro_f1']:.3f} "
                f"({len(chosen)} cells, {runs[-1]['seconds']:.0f} s)")
    return {"test_cells": len(test), "pool_cells": len(pool), "runs": runs,
            "summary": _summary(runs)}


def _summary(runs: Sequence[dict]) -> list[dict]:
    rows = []
    for k in sorted({r["k"] for r in runs}):
        mine = [r for r in runs if r["k"] == k]
        f1 = [r["macro_f1"] for r in mine]
        rows.append({"k": k, "draws": len(mine), "macro_f1": float(np.mean(f1)),
                     "macro_f1_sd": float(np.std(f1)), "accuracy": float(np.mean(
                         [r["accuracy"] for r in mine])),
                     "seconds": float(np.mean([r["seconds"] for r in mine]))})
    return rows


def evaluate_adaptation(labs_dir: Path, out: Path, config: AdaptationConfig, *,
                        data_root=None, track: Track = no_progress,
                        log: Callable[[str], None] = lambda m: None) -> dict:
    """Every lab's curve; the fold models come from `labs_dir` (`evaluate labs --out`);
    `out/adaptation.json` is written as each lab finishes."""
    out = Path(out)
    present = available_labs(data_root)
    results: dict = {"config": asdict(config), "labs_dir": str(labs_dir), "labs": {}}
    for lab in config.labs:
        if not present.get(lab):
            results["labs"][lab] = {"skipped": "data absent"}
            continue
        bases = {task: Path(labs_dir) / f"without-{lab}" / task / "model.pt" for task in TASKS}
        if missing := [str(p) for p in bases.values() if not p.exists()]:
            results["labs"][lab] = {"skipped": f"no fold models ({', '.join(missing)}): run "
                                    f"`leukodiff evaluate labs --labs {lab} --out {labs_dir}`"}
            log(f"{lab}: {results['labs'][lab]['skipped']}")
            continue
        results["labs"][lab] = adaptation_curve(lab, bases, config, data_root=data_root,
                                                track=track, log=log)
        out.mkdir(parents=True, exist_ok=True)  # each lab kept as it finishes
        (out / "adaptation.json").write_text(json.dumps(results, indent=1) + "\n")
    return results
