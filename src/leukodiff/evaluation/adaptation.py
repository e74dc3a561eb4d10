"""`leukodiff evaluate adaptation`: how fast does a lab teach the models its own look?

For each typed lab, the level-2 models trained *without* it (the leave-one-lab-out
folds of `leukodiff evaluate labs`, read from its `--out` folder) are adapted with k
reviewed cells per type drawn from that lab's training part (seeded; several draws),
exactly as `leukodiff adapt` does (fine-tuning with a replay sample of their own
training cells), and measured on that lab's test part, which no draw touches. k = 0 is
the model as it came. The lab's parts come from `data.splits.holdout` (grouped by slide
or field; BCCD keeps its VOC lists), so a slide is never on both sides.

The detector (`detector_labs`) is adapted the same way (`training.adapt_detector`):
the reviewed fields are those holding k drawn cells per type (untyped labs such as BCD:
5k cells), its fold detector starts, and precision / recall at IoU 0.5 are measured on
the lab's test fields through onnxruntime (one draw per k by default: each adaptation
takes minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from leukodiff.data.records import Cell, Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_cells, load_fields
from leukodiff.data.sources.unboxed import unboxed_white_cells
from leukodiff.data.splits import holdout
from leukodiff.evaluation.labs import available_labs
from leukodiff.metrics.adaptation import (
    AdaptationResults,
    DetectorCurve,
    DetectorPoint,
    DetectorRun,
    TypingCurve,
    TypingPoint,
    TypingRun,
)
from leukodiff.metrics.detection import detection_scores
from leukodiff.metrics.records import from_plain, to_plain
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
from leukodiff.training.adapt_detector import (
    DetectorAdaptConfig,
    adapt_detector,
    detect_fields,
)
from leukodiff.training.cells import CellImages
from leukodiff.training.classifier import predict_probabilities


@dataclass(frozen=True)
class AdaptationConfig:
    labs: tuple[str, ...] = ("chula", "bccd", "pbc")  # of TYPED_LABS, run in this order
    shots: tuple[int, ...] = (0, 5, 10, 25, 50)  # reviewed cells per type
    draws: int = 3
    seed: int = 0
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    # level 1: labs whose fold detector is adapted, with k reviewed cells per type
    detector_labs: tuple[str, ...] = ()
    detector_shots: tuple[int, ...] = (0, 10, 25)
    detector_draws: int = 1
    detector: DetectorAdaptConfig = field(default_factory=DetectorAdaptConfig)


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
                     log: Callable[[str], None] = lambda m: None) -> TypingCurve:
    """Level-2 macro-F1 (both models' cells together) on the lab's test part after adapting
    with k cells per type, for every k and draw."""
    cells = load_cells(lab, data_root, track).records
    pool, test = lab_parts(cells, config.seed)
    manifests = {task: read_checked(bases[task])[1] for task in TASKS}
    classes = {task: list(manifests[task].classes) for task in TASKS}
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
                probabilities = predict_probabilities(model, images[task](held[task], track))
                truth += [str(c.cell_type) for c in held[task]]
                said += [classes[task][i] for i in probabilities.argmax(1).tolist()]
            names = [str(t) for t in CellType]
            result = scores([names.index(t) for t in truth], [names.index(t) for t in said],
                            names)
            runs.append(TypingRun(k=k, draw=index, cells=len(chosen),
                                  seconds=time.perf_counter() - started, **result))
            log(f"{lab}: k {k} draw {index}: macro-F1 {result['macro_f1']:.3f} "
                f"({len(chosen)} cells, {runs[-1].seconds:.0f} s)")
    return TypingCurve(test_cells=len(test), pool_cells=len(pool), runs=runs,
                       summary=_summary(runs))


def _summary(runs: Sequence[TypingRun]) -> list[TypingPoint]:
    rows = []
    for k in sorted({r.k for r in runs}):
        mine = [r for r in runs if r.k == k]
        f1 = [r.macro_f1 for r in mine]
        rows.append(TypingPoint(k=k, draws=len(mine), macro_f1=float(np.mean(f1)),
                                macro_f1_sd=float(np.std(f1)),
                                accuracy=float(np.mean([r.accuracy for r in mine])),
                                seconds=float(np.mean([r.seconds for r in mine]))))
    return rows


def field_parts(fields: Sequence[Field], seed: int) -> tuple[list[Field], list[Field]]:
    """(pool to draw reviewed fields from, test part) of a lab's fields, as `lab_parts`."""
    parts = holdout(fields, val_fraction=0.1, test_fraction=0.3, seed=seed)
    return ([fields[i] for i in (*parts["train"], *parts["val"])],
            [fields[i] for i in parts["test"]])


def draw_fields(pool: Sequence[Field], k: int, seed: int) -> list[Field]:
    """The fields holding k drawn white cells of each type (seeded); a lab whose cells
    have no type (BCD) gives the fields of 5k drawn cells."""
    rng = random.Random(seed)
    by_type: dict[str, list[int]] = {}
    for index, record in enumerate(pool):
        for box in record.wbc_boxes:
            by_type.setdefault(str(box.cell_type or "untyped"), []).append(index)
    if len(by_type) > 1:  # a typed lab: its few cells of unknown type are not drawn
        by_type.pop("untyped", None)
    chosen: set[int] = set()
    for name in sorted(by_type):
        want = 5 * k if name == "untyped" else k
        indices = by_type[name]
        chosen.update(rng.sample(indices, want) if len(indices) > want else indices)
    return [pool[i] for i in sorted(chosen)]


def detector_curve(lab: str, base: Path, config: AdaptationConfig, out: Path, *,
                   data_root=None, threads: int | None = None, track: Track = no_progress,
                   log: Callable[[str], None] = lambda m: None) -> DetectorCurve:
    """Detector precision / recall / F1 on the lab's test fields after adapting the fold
    detector `base` with the fields of k reviewed cells per type, for every k and draw."""
    fields = sorted(load_fields(lab, data_root, track).records, key=lambda r: r.image.name)
    pool, test = field_parts(fields, config.seed)
    ignore = unboxed_white_cells(lab)
    base_threshold = read_checked(base)[1].score_threshold
    before = detection_scores(detect_fields(base, test, track=track,
                                            description=f"{lab} test fields, fold detector"),
                              test, base_threshold, ignore)
    runs = [DetectorRun(k=0, draw=0, seconds=0.0, **before, reviewed_fields=0)]
    log(f"{lab} detector: k 0: precision {before['precision']:.3f} recall "
        f"{before['recall']:.3f} ({len(test)} test fields)")
    for k in [k for k in config.detector_shots if k]:
        for index in range(config.detector_draws):
            chosen = draw_fields(pool, k, config.seed + index)
            adapted = adapt_detector(chosen, out / f"{lab}-k{k}-draw{index}", config.detector,
                                     base=base, held=test, ignore=ignore, before=before,
                                     force=True, data_root=data_root, threads=threads,
                                     track=track, log=log)
            runs.append(DetectorRun(k=k, draw=index, seconds=adapted["seconds"],
                                    **adapted["after"], reviewed_fields=len(chosen)))
            log(f"{lab} detector: k {k} draw {index}: precision "
                f"{adapted['after']['precision']:.3f} recall {adapted['after']['recall']:.3f} "
                f"({len(chosen)} fields, {adapted['seconds']:.0f} s)")
    summary = []
    for k in sorted({r.k for r in runs}):
        mine = [r for r in runs if r.k == k]
        medians = {name: float(np.median([getattr(r, name) for r in mine]))
                   for name in ("precision", "recall", "f1", "threshold", "seconds")}
        summary.append(DetectorPoint(k=k, draws=len(mine), reviewed_fields=float(np.mean(
            [r.reviewed_fields for r in mine])), **medians))
    return DetectorCurve(test_fields=len(test), pool_fields=len(pool),
                         test_cells=before["truth"], runs=runs, summary=summary)


def evaluate_adaptation(labs_dir: Path, out: Path, config: AdaptationConfig, *,
                        data_root=None, track: Track = no_progress,
                        log: Callable[[str], None] = lambda m: None) -> AdaptationResults:
    """Every lab's curve; the fold models come from `labs_dir` (`evaluate labs --out`);
    `out/adaptation.json` is written as each lab finishes."""
    out = Path(out)
    present = available_labs(data_root)
    results = AdaptationResults(config=asdict(config), labs_dir=str(labs_dir), labs={})
    earlier_path = Path(out) / "adaptation.json"
    earlier = (from_plain(AdaptationResults, json.loads(earlier_path.read_text()))
               if earlier_path.exists() else None)
    if earlier and not config.labs and earlier.labs:  # a detector-only run keeps level 2's
        results = replace(results, config=earlier.config, labs_dir=earlier.labs_dir,
                          labs=earlier.labs)
    if earlier and not config.detector_labs and earlier.detector:
        results = replace(results, detector=earlier.detector,
                          detector_config=earlier.detector_config)
    detectors: dict[str, DetectorCurve] = {}
    if config.detector_labs:
        results = replace(results, detector=detectors, detector_config={
            "labs_dir": str(labs_dir), "labs": list(config.detector_labs),
            "shots": list(config.detector_shots), "draws": config.detector_draws,
            "seed": config.seed, "adapt": asdict(config.detector)})
    for lab in config.labs:
        if not present.get(lab):
            results.labs[lab] = TypingCurve(skipped="data absent")
            continue
        bases = {task: Path(labs_dir) / f"without-{lab}" / task / "model.pt" for task in TASKS}
        if missing := [str(p) for p in bases.values() if not p.exists()]:
            results.labs[lab] = TypingCurve(
                skipped=f"no fold models ({', '.join(missing)}): run "
                        f"`leukodiff evaluate labs --labs {lab} --out {labs_dir}`")
            log(f"{lab}: {results.labs[lab].skipped}")
            continue
        results.labs[lab] = adaptation_curve(lab, bases, config, data_root=data_root,
                                             track=track, log=log)
        _write(results, out)  # each lab kept as it finishes
    for lab in config.detector_labs:
        base = Path(labs_dir) / f"without-{lab}" / "detector" / "detector.pt"
        if not present.get(lab):
            detectors[lab] = DetectorCurve(skipped="data absent")
        elif not base.exists():
            detectors[lab] = DetectorCurve(
                skipped=f"no fold detector ({base}): run `leukodiff evaluate labs --labs "
                        f"{lab} --out {labs_dir}`")
        else:
            detectors[lab] = detector_curve(lab, base, config, out / "detectors",
                                            data_root=data_root, track=track, log=log)
        _write(results, out)
    return results


def _write(results: AdaptationResults, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptation.json").write_text(json.dumps(to_plain(results), indent=1) + "\n")
