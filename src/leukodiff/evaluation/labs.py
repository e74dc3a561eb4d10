"""`leukodiff evaluate labs`: leave-one-lab-out, the figure for a lab leukodiff never saw.

Every lab has its own stain, microscope and camera, so the figure that predicts how
leukodiff does in a new lab is the one on a lab it never trained on. For each lab in
turn, the models are trained with the shipped recipe on the *other* labs only
(selected on their validation parts), exported to ONNX, and measured on every
labelled image of the held-out lab through the shipped pipeline on onnxruntime:

- level 1 (held-out BCCD, BCD, Chula): precision and recall at IoU 0.5 and the
  operating threshold, COCO AP50, and the share of fields whose white-cell count
  is exact (the reviewed unboxed cells of BCCD and Chula,
  `data.sources.unboxed`, are ignore regions and count as cells);
- level 2 (held-out BCCD, PBC, Chula): each true box (PBC: each image) cropped as
  the pipeline crops it and given to its true group's model: 5-type accuracy,
  macro-F1, per-type recall, confusion;
- end to end (held-out BCCD, Chula): the share of the true typed cells found and
  typed right.

Labs: BCCD (Shenggan/BCCD_Dataset), PBC (Acevedo et al. 2020), BCD (Aslan 2020; boxes
only) from ../shared, and Chula (singgihbekti/WBC_Dataset @ 45759ab, fetched into a
data root; `data.root.FETCHED_SETS`). A lab whose data is absent is left out and
said so; a fold needs at least one other lab of each kind to train on.

Each fold's models live in `OUT/without-LAB/` and are reused when a run is repeated
(an interrupted training resumes), so the command can be stopped and run again.
CPU time forces a shorter schedule than the shipped models' (`LabsConfig`); the
schedule is written with the results.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from leukodiff.data.crops import cell_input, field_image, network_input
from leukodiff.data.records import Cell, Field
from leukodiff.data.root import has_dataset
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_cells, load_fields
from leukodiff.data.sources.unboxed import unboxed_white_cells
from leukodiff.evaluation.pipeline import match_truth
from leukodiff.metrics.classification import classification_metrics
from leukodiff.metrics.detection import detection_metrics
from leukodiff.metrics.labs import (
    Fires,
    LabDetection,
    LabEndToEnd,
    LabRun,
    LabsResults,
    LabTyping,
    TrainedOn,
    TypeCounts,
)
from leukodiff.metrics.records import from_plain, to_plain
from leukodiff.models.detector import DetectorSpec
from leukodiff.models.export import export_classifier, export_detector
from leukodiff.models.files import read_checked
from leukodiff.pipeline.analyzer import Analyzer
from leukodiff.pipeline.familiarity import familiarity_path
from leukodiff.taxonomy import GROUP_OF, CellType, Group
from leukodiff.training.classifier import ClassifierConfig, train_classifier
from leukodiff.training.detector import DetectorConfig, train_detector
from leukodiff.training.familiarity import FeatureCache, write_familiarity

TYPED_LABS = ("bccd", "pbc", "chula")  # labs whose white cells are typed: level 2
DETECTION_LABS = ("bccd", "bcd", "chula")  # labs with boxed smear fields: level 1
LABS = ("bccd", "pbc", "chula", "bcd")
MARKER = {"bccd": "BCCD/Annotations", "pbc": "", "chula": "WBC_Samples",
          "bcd": "annotations.csv"}
TYPES = tuple(str(t) for t in CellType)
# LabsConfig settings a labs.json written before they existed ran with (not their default)
ABSENT_BEFORE = {"other_cells": False}
FEATURES = FeatureCache()  # how each field looks, shared by the folds' familiarity fits


@dataclass(frozen=True)
class LabsConfig:
    """The schedule of each fold: the shipped recipe, shortened for 2 CPU cores."""

    labs: tuple[str, ...] = ("chula", "pbc", "bccd", "bcd")  # held-out labs, run in this order
    seed: int = 0
    # each fold trained and measured again with these seeds (OUT/seed-N/): the spread of
    # one recipe from run to run, which decides whether two recipes differ at all
    repeat_seeds: tuple[int, ...] = ()
    classifier_epochs: int = 20  # as shipped
    max_per_class: int = 400  # cells per class, source and part (shipped: all)
    # every crop classifier's (level 2 and the detector's group classifier)
    augmentation: str = "basic"  # training.cells.AUGMENTATIONS
    stain: str = "none"  # imaging.STAIN_NORMALISATIONS
    balance_by_source: bool = False  # level 2: ClassifierConfig.balance_by_source
    detector_epochs: int = 10  # shipped: 40
    mono_oversample: int = 2  # shipped: 5 (BCCD alone is 1 mononuclear in 6; Chula 2 in 5)
    group_epochs: int = 6  # shipped: 8
    group_pbc_per_type: int = 400  # shipped: 800
    pbc_paste: float = 0.0  # detectors: DetectorConfig.pbc_paste
    # detectors: red cells and platelets as a box-head class of their own
    # (DetectorSpec.other_cell_class; labs.json files from before it read as False)
    other_cells: bool = True
    threads: int | None = None
    # quick runs and tests only: training fields per detector, measured images per lab
    max_train_fields: int = 0
    max_measured: int = 0

    def __post_init__(self) -> None:
        if self.seed in self.repeat_seeds or len(set(self.repeat_seeds)) < len(self.repeat_seeds):
            raise ValueError(f"repeat seeds {list(self.repeat_seeds)} must differ from each "
                             f"other and from the seed ({self.seed})")

    @classmethod
    def quick(cls, labs: tuple[str, ...] = LABS) -> LabsConfig:
        """Every step on a few images (a few minutes): the numbers mean nothing."""
        return cls(labs=labs, classifier_epochs=1, max_per_class=8, detector_epochs=1,
                   group_epochs=1, group_pbc_per_type=8, max_train_fields=8, max_measured=12)


@dataclass
class FoldModels:
    """Model files of one fold (None: not trained in this fold; the shipped one stands in
    for a role the held-out lab does not measure)."""

    detector: Path | None = None
    mononuclear: Path | None = None
    polymorphonuclear: Path | None = None
    minutes: dict[str, float] = field(default_factory=dict)

    def analyzer(self, threads: int | None, detection_threshold: float | None = None
                 ) -> Analyzer:
        return Analyzer.load(self.detector or "detector", self.mononuclear or "mononuclear",
                             self.polymorphonuclear or "polymorphonuclear", backend="onnx",
                             threads=threads, detection_threshold=detection_threshold)


def available_labs(data_root: str | Path | None) -> dict[str, bool]:
    return {lab: has_dataset(lab, data_root, MARKER[lab]) for lab in LABS}


# --- training --------------------------------------------------------------------------------


class FoldMismatchError(ValueError):
    """A fold folder holding models trained with another recipe than the one asked for."""


def _settings(config: ClassifierConfig | DetectorConfig | LabsConfig) -> dict:
    """A config as its manifest or labs.json stores it (tuples as lists)."""
    return json.loads(json.dumps(asdict(config)))


def _needs_training(model: Path, recipe: ClassifierConfig | DetectorConfig) -> bool:
    """False for a finished fold model trained with `recipe` (reused); a finished one
    trained otherwise is refused (a setting its manifest lacks was added later: the
    model had its default)."""
    if not model.exists():
        return True
    trained = read_checked(model)[1].training.settings
    if isinstance(recipe, DetectorConfig):  # the spec too, fields added later at defaults
        trained = _settings(DetectorConfig.from_dict(trained))
    wanted, default = _settings(recipe), _settings(type(recipe)())
    differ = sorted(k for k, v in wanted.items() if trained.get(k, default[k]) != v)
    if differ:
        raise FoldMismatchError(f"{model} was trained with other settings ({', '.join(differ)})"
                                "; choose another --out or remove that fold's folder")
    return False


def _train_once(model: Path, recipe: ClassifierConfig | DetectorConfig, train: Callable,
                export: Callable[[Path], object], what: str, data_root, weights_dir,
                track: Track, log: Callable[[str], None]) -> None:
    """`model` trained by `recipe` in its folder unless that finished run is there
    (`_needs_training`; an interrupted one is resumed), and exported to ONNX once."""
    if _needs_training(model, recipe):
        log(what)
        train(recipe, model.parent, data_root=data_root, weights_dir=weights_dir,
              resume=(model.parent / "last.pt").exists(), track=track, log=log)
    if not model.with_suffix(".onnx").exists():
        export(model)


def train_level2(lab: str, task: str, sources: Sequence[str], config: LabsConfig,
                 fold_dir: Path, data_root, weights_dir, track: Track,
                 log: Callable[[str], None]) -> tuple[Path, float]:
    model = fold_dir / task / "model.pt"
    started = time.perf_counter()
    recipe = ClassifierConfig(task=task, sources=tuple(sources),
                              epochs=config.classifier_epochs,
                              max_per_class=config.max_per_class, seed=config.seed,
                              augmentation=config.augmentation, stain=config.stain,
                              balance_by_source=config.balance_by_source)
    _train_once(model, recipe, train_classifier, export_classifier,
                f"without {lab}: level 2 {task} on {', '.join(sources)}", data_root,
                weights_dir, track, log)
    return model, (time.perf_counter() - started) / 60


def _train_detector(lab: str, sources: Sequence[str], config: LabsConfig, fold_dir: Path,
                    data_root, weights_dir, track: Track, log: Callable[[str], None]
                    ) -> tuple[Path, float]:
    model = fold_dir / "detector" / "detector.pt"
    started = time.perf_counter()
    recipe = DetectorConfig(sources=tuple(sources), epochs=config.detector_epochs,
                            mono_oversample=config.mono_oversample,
                            group_epochs=config.group_epochs, seed=config.seed,
                            max_train_fields=config.max_train_fields,
                            max_val_fields=config.max_measured,
                            group_pbc_per_type=config.group_pbc_per_type,
                            group_augmentation=config.augmentation,
                            pbc_paste=config.pbc_paste,
                            spec=DetectorSpec(group_stain=config.stain,
                                              other_cell_class=config.other_cells))
    _train_once(model, recipe, train_detector, export_detector,
                f"without {lab}: detector on {', '.join(sources)}", data_root, weights_dir,
                track, log)
    if not familiarity_path(model).exists():
        write_familiarity(model, sources, data_root, seed=config.seed, features=FEATURES,
                          track=track)
    return model, (time.perf_counter() - started) / 60


def train_fold(lab: str, present: dict[str, bool], config: LabsConfig, out_dir: Path, *,
               data_root=None, weights_dir=None, track: Track = no_progress,
               log: Callable[[str], None] = lambda m: None) -> FoldModels:
    """Every model the held-out `lab` is measured with, trained on the other labs."""
    fold_dir = out_dir / f"without-{lab}"
    models = FoldModels()
    typed = [x for x in TYPED_LABS if x != lab and present[x]]
    if lab in TYPED_LABS and typed:
        for task in ("mononuclear", "polymorphonuclear"):
            path, minutes = train_level2(lab, task, typed, config, fold_dir, data_root,
                                         weights_dir, track, log)
            setattr(models, task, path)
            models.minutes[task] = minutes
    boxed = [x for x in DETECTION_LABS if x != lab and present[x]]
    if lab in DETECTION_LABS and boxed:
        models.detector, models.minutes["detector"] = _train_detector(
            lab, boxed, config, fold_dir, data_root, weights_dir, track, log)
    return models


# --- measuring -------------------------------------------------------------------------------


def measure_fields(analyzer: Analyzer, fields: Sequence[Field], lab: str,
                   track: Track = no_progress) -> LabRun:
    """Level 1 and end to end on a lab's fields, one detection pass per field.

    `analyzer` must detect down to a low threshold (for AP); cells at or above the
    detector's operating threshold are then typed, as `analyze` would."""
    operating = float(analyzer.spec["score_threshold"])
    ignore = unboxed_white_cells(lab)
    detections, counts, said, unlike = [], [], Counter(), []
    per_type: dict[str, Counter] = {t: Counter() for t in TYPES}
    for record in track(fields, f"Analysing {lab} fields"):
        image = analyzer.check(field_image(record))
        found = analyzer.detect(image)
        detections.append(found)
        if analyzer.familiarity is not None:
            unlike.append(analyzer.look(image)[1])
        cells = analyzer.classify(image, found.above(operating))
        truth = len(record.wbc_boxes) + len(ignore.get(record.image.stem, ()))
        counts.append(len(cells) - truth)
        for name, label in match_truth(cells, record):
            said[(name, label)] += 1
            per_type[name].update(cells=1, found=int(label != "missed"),
                                  right=int(label == name))
    level1 = detection_metrics(detections, fields, score_threshold=operating, ignore=ignore)
    cells = sum(c["cells"] for c in per_type.values())
    right = sum(c["right"] for c in per_type.values())
    wbc = level1["wbc"]
    return LabRun(
        fields=len(fields),
        # the honest warning: share of this lab's fields that look unlike the training labs
        unlike_training=sum(unlike) / len(unlike) if unlike else None,
        detector=LabDetection(
            precision=wbc["precision"], recall=wbc["recall"], ap50=wbc["ap50"],
            truth=wbc["truth"], found=wbc["found"], false=wbc["false"],
            group_accuracy=level1["matched"]["group_accuracy"],
            exact_count=sum(e == 0 for e in counts) / max(1, len(counts)),
            count_mae=float(np.mean(np.abs(counts))) if counts else 0.0,
            extra_cells_per_field=float(np.mean(counts)) if counts else 0.0),
        end_to_end=LabEndToEnd(
            cells=cells, right=right, share=right / cells if cells else None,
            per_type={t: TypeCounts(**c) for t, c in per_type.items() if c["cells"]},
            said={f"{t} -> {s}": n for (t, s), n in sorted(said.items())}),
    )


def measure_types(analyzer: Analyzer, cells: Sequence[Cell], lab: str,
                  track: Track = no_progress, batch: int = 64) -> LabTyping:
    """Level 2 on true boxes: each cell cropped as the pipeline crops it, given to its true
    group's model as the pipeline gives it (every orientation), argmax: the model's best
    type, confident or not."""
    truth, predicted, unsure = [], [], 0
    for group in Group:
        clf = analyzer.classifiers[group]
        mine = [c for c in cells if GROUP_OF[c.cell_type] is group]
        for start in track(range(0, len(mine), batch), f"Typing {lab} {group} cells"):
            chunk = mine[start:start + batch]
            crops = network_input([cell_input(c, clf.crop_scale, clf.input_size, clf.stain)
                                   for c in chunk], clf.input_size)
            probs = clf.probabilities(crops)
            truth += [TYPES.index(str(c.cell_type)) for c in chunk]
            predicted += [TYPES.index(clf.classes[i]) for i in probs.argmax(1)]
            unsure += int((probs.max(1) < clf.threshold).sum())
    metrics = classification_metrics(truth, predicted, TYPES)
    present = [t for t in TYPES if metrics["per_class"][t]["support"]]
    return LabTyping(n=metrics["n"], accuracy=metrics["accuracy"],
                     macro_f1=metrics["macro_f1"],
                     recall={t: metrics["per_class"][t]["recall"] for t in present},
                     min_recall=min(metrics["per_class"][t]["recall"] for t in present),
                     confusion=metrics["confusion"], classes=list(TYPES),
                     unidentified_share=unsure / max(1, metrics["n"]))


def measure_lab(models: FoldModels, lab: str, config: LabsConfig, *, data_root=None,
                track: Track = no_progress) -> LabRun:
    """Level 1 and end to end where the lab has boxed fields; level 2 where it has typed
    cells."""
    result = LabRun()
    limit = config.max_measured or None
    if lab in DETECTION_LABS:
        fields = sorted(load_fields(lab, data_root, track).records,
                        key=lambda r: r.image.name)[:limit]
        with models.analyzer(config.threads, detection_threshold=0.0) as analyzer:
            result = measure_fields(analyzer, fields, lab, track)
    if lab in TYPED_LABS:
        with models.analyzer(config.threads) as analyzer:
            cells = load_cells(lab, data_root, track).records
            if limit:  # a spread of types, not the first folder's cells
                cells = cells[::max(1, len(cells) // limit)][:limit]
            result = replace(result, level2=measure_types(analyzer, cells, lab, track))
    return result


def evaluate_labs(out_dir: Path, config: LabsConfig = LabsConfig(), *, data_root=None,
                  weights_dir=None, track: Track = no_progress,
                  log: Callable[[str], None] = lambda m: None) -> LabsResults:
    """Run every fold (training what is missing), measure, write `OUT/labs.json`.

    Beside each fold, the shipped models are measured on the labs they never saw (the
    "before" of a lab that installs leukodiff today)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    present = available_labs(data_root)
    missing = [lab for lab, ok in present.items() if not ok]
    if missing:
        log(f"left out (data absent): {', '.join(missing)}")
    started = time.perf_counter()
    results = LabsResults(config=asdict(config), labs_present=present, folds={}, shipped={})
    earlier = _earlier_results(out_dir / "labs.json", config)
    if earlier is not None:  # folds run before with the same schedule are kept
        for mine, theirs in ((results.folds, earlier.folds), (results.shipped, earlier.shipped)):
            mine.update({lab: run for lab, run in theirs.items() if lab not in config.labs})
        for seed, runs in earlier.repeats.items():  # and repeats not run now
            kept = {lab: run for lab, run in runs.items()
                    if lab not in config.labs or int(seed) not in config.repeat_seeds}
            if kept:
                results.repeats[seed] = kept
    shipped_sources = _shipped_sources()
    for lab in config.labs:
        if not present.get(lab):
            results.folds[lab] = LabRun(skipped="data absent")
            continue
        models = train_fold(lab, present, config, out_dir, data_root=data_root,
                            weights_dir=weights_dir, track=track, log=log)
        fold = measure_lab(models, lab, config, data_root=data_root, track=track)
        fold = replace(fold, trained_on=TrainedOn(
            level2=[x for x in TYPED_LABS if x != lab and present[x]]
            if lab in TYPED_LABS else None,
            detector=[x for x in DETECTION_LABS if x != lab and present[x]]
            if lab in DETECTION_LABS else None), minutes=models.minutes)
        results.folds[lab] = fold
        log(f"without {lab}: {summary_line(fold)}")
        if lab not in shipped_sources:  # the shipped models never saw this lab either
            results.shipped[lab] = measure_lab(FoldModels(), lab, config,
                                               data_root=data_root, track=track)
            log(f"shipped models on {lab}: {summary_line(results.shipped[lab])}")
        _write(results, out_dir / "labs.json")
    for seed in config.repeat_seeds:
        again = replace(config, seed=seed, repeat_seeds=())
        for lab in config.labs:
            if not present.get(lab):
                continue
            log(f"seed {seed}:")
            models = train_fold(lab, present, again, repeat_dir(out_dir, seed),
                                data_root=data_root, weights_dir=weights_dir, track=track,
                                log=log)
            fold = measure_lab(models, lab, again, data_root=data_root, track=track)
            results.repeats.setdefault(str(seed), {})[lab] = fold
            log(f"without {lab}, seed {seed}: {summary_line(fold)}")
            _write(results, out_dir / "labs.json")
    for lab, fold in results.folds.items():
        reference = familiarity_path(out_dir / f"without-{lab}" / "detector" / "detector.pt")
        if reference.is_file():  # how often the warning fires on the labs it was fitted on
            fires = json.loads(reference.read_text())["fitted"]["fires_on_test_parts"]
            results.folds[lab] = replace(fold, warning_on_training_labs=from_plain(
                dict[str, Fires], fires))
    order = [*LabsConfig().labs, *results.folds]  # the table's rows in one order, however run
    results = replace(results, minutes=(time.perf_counter() - started) / 60,
                      folds={lab: results.folds[lab] for lab in dict.fromkeys(order)
                             if lab in results.folds})
    _write(results, out_dir / "labs.json")
    return results


def repeat_dir(out_dir: Path, seed: int) -> Path:
    """Where the folds trained again with `seed` live (`LabsConfig.repeat_seeds`)."""
    return Path(out_dir) / f"seed-{seed}"


def _write(results: LabsResults, path: Path) -> None:
    path.write_text(json.dumps(to_plain(results), indent=1) + "\n")


def _earlier_results(path: Path, config: LabsConfig) -> LabsResults | None:
    """The results already in OUT/labs.json when they were made with the same schedule
    (running `--labs` one lab at a time builds one table); else None."""
    if not path.exists():
        return None
    earlier = json.loads(path.read_text())
    loose = ("labs", "threads", "repeat_seeds")  # none changes a figure
    mine = {k: v for k, v in _settings(config).items() if k not in loose}
    # a setting added since: its default, or what the runs before it did
    default = {**_settings(LabsConfig()), **ABSENT_BEFORE}
    theirs = {k: earlier.get("config", {}).get(k, default[k]) for k in mine}
    return from_plain(LabsResults, earlier) if mine == theirs else None


def _shipped_sources() -> set[str]:
    """Every lab the shipped models learnt from (from their manifests)."""
    sources: set[str] = set()
    for name in ("mononuclear", "polymorphonuclear"):
        sources |= set(read_checked(name)[1].training.sources)
    detector = read_checked("detector")[1].training
    sources |= set(detector.sources or ("bccd",))
    if detector.settings.get("group_pbc_per_type", 0):
        sources.add("pbc")
    return sources


def summary_line(fold: LabRun) -> str:
    parts = []
    if (d := fold.detector) is not None:
        parts.append(f"detector P {d.precision:.3f} R {d.recall:.3f} AP50 "
                     f"{d.ap50 or 0:.3f} exact count {d.exact_count:.1%}")
    if (t := fold.level2) is not None:
        parts.append(f"level 2 acc {t.accuracy:.3f} macro-F1 {t.macro_f1:.3f} "
                     f"min recall {t.min_recall:.3f}")
    if (e := fold.end_to_end) is not None and e.share is not None:
        parts.append(f"end to end {e.right}/{e.cells} = {e.share:.1%}")
    return "; ".join(parts)


