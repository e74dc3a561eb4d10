"""`leukodiff evaluate all`: every protocol of issue #6, as one typed `Study`.

    study = evaluate_all(Path("docs"), config=EvalConfig(seed=0))   # + docs/figures/*.png
    write_study_report(study, Path("docs"))   # reports.study: RESULTS.md, study.json

Runs, in order: KBC provenance (where each KBC image comes from), the paper's
protocol on KBC with random / name-grouped / source-grouped splits (frozen base,
and fine-tuned on a few splits), flat versus two-level on KBC and on PBC
(5 classes), and cross-source with and without colour handling. `EvalConfig.quick()`
runs the same code on a tiny subset (tests); its numbers mean nothing.
"""

from __future__ import annotations

import pickle
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from leukodiff.data.records import Cell
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_cells, load_fields
from leukodiff.data.splits import monte_carlo
from leukodiff.evaluation.detector import evaluate_detector
from leukodiff.evaluation.figures import write_study_figures
from leukodiff.evaluation.pipeline import evaluate_bccd_test
from leukodiff.evaluation.protocols import (
    FIVE_CLASS_TASKS,
    PAPER_TASKS,
    Domain,
    HeadConfig,
    Run,
    backbone_features,
    combine_levels,
    cross_source,
    finetune_split,
    flat_runs,
    flat_vs_two_level,
    normalise_colour,
    paper_table,
    stain_augment,
    two_level_runs,
)
from leukodiff.evaluation.provenance import Provenance, trace_kbc
from leukodiff.metrics.study import (
    COMMAND,
    CROSS_VARIANTS,
    PAPER_CLASSES,
    SPLIT_KINDS,
    ClassScores,
    CrossMetrics,
    CrossSource,
    FinetunedSplit,
    Overall,
    SplitSizes,
    Study,
    TaskScores,
    Timing,
)
from leukodiff.pipeline import Analyzer
from leukodiff.training.cells import CropGeometry, load_cell_tensors


@dataclass(frozen=True)
class EvalConfig:
    seed: int = 0
    repeats: int = 10
    train_fraction: float = 0.7
    head: HeadConfig = field(default_factory=HeadConfig)
    kbc_crop_scale: float = 1.2  # paper protocol: tight crops, like the paper's boxes
    cross_crop_scale: float = 2.6  # cross-source: the project's geometry (PBC-like framing)
    finetune_splits: int = 2  # fine-tuned mode on the first few splits of each kind
    finetune_epochs: int = 5
    max_per_class: int = 0  # > 0: a seeded subset per class and source (quick runs)
    synthetic: int = 200  # synthetic KBC copies to check the matcher on
    augment_copies: int = 1  # colour-jittered copies of the training set (cross-source)

    @classmethod
    def quick(cls, seed: int = 0) -> EvalConfig:
        """Every protocol end to end on a few dozen cells: for tests, not for numbers."""
        return cls(seed=seed, repeats=2, head=HeadConfig(epochs=2), finetune_splits=1,
                   finetune_epochs=1, max_per_class=24, synthetic=10)


class Timer:
    def __init__(self, log: Callable[[str], None]) -> None:
        self.start = time.perf_counter()
        self.sections: dict[str, float] = {}
        self.log = log
        self._last = self.start

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.sections[name] = now - self._last
        self._last = now
        self.log(f"{name}: {self.sections[name]:.0f} s")

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


# --- data -------------------------------------------------------------------------------------


def _subsample(cells: Sequence[Cell], per_class: int, seed: int) -> list[Cell]:
    if not per_class:
        return list(cells)
    rng = random.Random(seed)
    by: dict[tuple, list[Cell]] = {}
    for c in cells:
        by.setdefault((c.subset, str(c.cell_type)), []).append(c)
    out = []
    for key in sorted(by, key=str):
        group = by[key]
        out.extend(rng.sample(group, per_class) if len(group) > per_class else group)
    return out


def _cached(cache_dir: Path | None, name: str, make: Callable[[], object]):
    if cache_dir is None:
        return make()
    path = Path(cache_dir) / name
    if path.exists():
        with path.open("rb") as handle:
            return pickle.load(handle)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(value, handle)
    return value


def pooled_features(cells: Sequence[Cell], scale: float, weights_dir, track: Track,
              transform: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> torch.Tensor:
    images = load_cell_tensors(cells, CropGeometry(128, scale), track)
    if transform is not None:
        images = transform(images)
    return backbone_features(images, weights_dir=weights_dir)


# --- the run ----------------------------------------------------------------------------------


def evaluate_all(out_dir: Path, *, config: EvalConfig = EvalConfig(),
                 data_root: str | Path | None = None, weights_dir: str | Path | None = None,
                 cache_dir: Path | None = None, track: Track = no_progress,
                 log: Callable[[str], None] = lambda message: None) -> Study:
    """Run every protocol; draw `out_dir/figures/*.png`. The report is
    `reports.study.write_study_report`'s.

    `cache_dir` keeps provenance and features between runs (development only: a cached
    run's time is not the time of the protocol).
    """
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    tag = f"s{config.seed}-m{config.max_per_class}"
    timer = Timer(log)

    # data
    kbc_all = _subsample(load_cells("kbc", data_root, track).records, config.max_per_class,
                         config.seed)
    bccd_fields = load_fields("bccd", data_root, track).records
    bccd_cells = load_cells("bccd", data_root, track).records
    pbc_cells = _subsample(load_cells("pbc", data_root, track).records, config.max_per_class,
                           config.seed)
    timer.mark("reading data")

    # 2. provenance
    provenance: Provenance = _cached(cache_dir, f"provenance-{tag}.pkl", lambda: trace_kbc(
        kbc_all, bccd_fields, track, synthetic=config.synthetic, seed=config.seed))
    regrouped = provenance.regrouped()
    train_index = [i for i, c in enumerate(regrouped) if c.subset == "TRAIN"]
    train_cells = [regrouped[i] for i in train_index]
    # the same boxed cells with the reader's key (`<n>` of the file name)
    name_cells = [replace(c, group_key=provenance.cells[i].group_key)
                  for c, i in zip(train_cells, train_index, strict=True)]
    timer.mark("provenance")

    # 1 and 3. the paper's protocol, three kinds of split
    kbc_images = load_cell_tensors(train_cells, CropGeometry(128, config.kbc_crop_scale), track)
    kbc_features = _cached(cache_dir, f"kbc-features-{config.kbc_crop_scale}-{tag}.pt",
                           lambda: backbone_features(kbc_images, weights_dir=weights_dir))
    splits = {
        "random": monte_carlo(train_cells, repeats=config.repeats,
                              train_fraction=config.train_fraction, seed=config.seed),
        "name-grouped": monte_carlo(name_cells, repeats=config.repeats,
                                    train_fraction=config.train_fraction, seed=config.seed,
                                    grouped=True),
        "source-grouped": monte_carlo(train_cells, repeats=config.repeats,
                                      train_fraction=config.train_fraction, seed=config.seed,
                                      grouped=True),
    }
    runs = {kind: two_level_runs(kbc_features, train_cells, splits[kind], PAPER_TASKS,
                                 config.head, config.seed) for kind in SPLIT_KINDS}
    paper = {kind: paper_table(runs[kind]) for kind in SPLIT_KINDS}
    own_keys = {"random": train_cells, "name-grouped": name_cells,
                "source-grouped": train_cells}
    split_sizes = {kind: _split_sizes(splits[kind], own_keys[kind], train_cells)
                   for kind in SPLIT_KINDS}
    timer.mark("paper protocol (frozen)")

    # 5. flat versus two-level, KBC (4 classes)
    classes4 = tuple(c for t in PAPER_TASKS.values() for c in t)
    comparisons, comparison_runs = {}, {}
    for kind in ("random", "source-grouped"):
        flat = flat_runs(kbc_features, train_cells, splits[kind], classes4, config.head,
                         config.seed)
        two = combine_levels(runs[kind])
        comparisons[f"KBC, {kind}"] = flat_vs_two_level(flat, two, PAPER_TASKS)
        comparison_runs[f"KBC, {kind}"] = (flat, two)
    timer.mark("flat vs two-level (KBC)")

    # fine-tuned mode, a few splits
    finetuned: dict[str, dict[str, list[Run]]] = {}
    for kind in ("random", "source-grouped") if config.finetune_splits > 0 else ():
        finetuned[kind] = {}
        for task, classes in PAPER_TASKS.items():
            finetuned[kind][task] = [
                finetune_split(kbc_images, train_cells, split, classes,
                               epochs=config.finetune_epochs, seed=config.seed + k,
                               weights_dir=weights_dir)
                for k, split in enumerate(splits[kind][:config.finetune_splits])]
    finetuned_tables = {kind: paper_table(finetuned[kind]) for kind in finetuned}
    finetuned_splits = {
        kind: {task: [FinetunedSplit(accuracy=round(100 * r.metrics()["accuracy"], 2),
                                     best_epoch=r.extra["best_epoch"]) for r in task_runs]
               for task, task_runs in finetuned[kind].items()}
        for kind in finetuned}
    kbc_images = None  # free ~0.5 GB before the next sections
    timer.mark("paper protocol (fine-tuned)")

    # 5. flat versus two-level, PBC (5 classes)
    pbc_features = _cached(cache_dir, f"pbc-features-{tag}.pt", lambda: pooled_features(
        pbc_cells, config.cross_crop_scale, weights_dir, track))
    pbc_splits = monte_carlo(pbc_cells, repeats=config.repeats,
                             train_fraction=config.train_fraction, seed=config.seed)
    classes5 = tuple(c for t in FIVE_CLASS_TASKS.values() for c in t)
    pbc_two = combine_levels(two_level_runs(pbc_features, pbc_cells, pbc_splits,
                                            FIVE_CLASS_TASKS, config.head, config.seed))
    pbc_flat = flat_runs(pbc_features, pbc_cells, pbc_splits, classes5, config.head,
                         config.seed)
    comparisons["PBC, random (5 classes)"] = flat_vs_two_level(pbc_flat, pbc_two,
                                                               FIVE_CLASS_TASKS)
    comparison_runs["PBC, random (5 classes)"] = (pbc_flat, pbc_two)
    timer.mark("flat vs two-level (PBC)")

    # 4. cross-source
    cross = _cross_source(config, provenance, regrouped, bccd_cells, pbc_cells, pbc_features,
                          weights_dir, track, cache_dir, tag)
    timer.mark("cross-source")

    # 6. end to end: the shipped detector + level-2 models on BCCD's VOC test fields
    with Analyzer.load(backend="onnx") as analyzer:
        end_to_end = evaluate_bccd_test(analyzer, data_root, track)
    detector = evaluate_detector("detector", data_root=data_root, bcd=False, track=track)
    timer.mark("end to end")

    # figures
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    made = write_study_figures(figures, paper, cross, runs, comparison_runs, provenance)
    timer.mark("figures")
    return Study(
        config=asdict(config), command=COMMAND, provenance=provenance.report, paper=paper,
        split_sizes=split_sizes, finetuned=finetuned_tables, finetuned_splits=finetuned_splits,
        flat_vs_two_level=comparisons,
        cross_source=cross, end_to_end=end_to_end, detector_test=detector.bccd_test,
        detector_test_unboxed_ignored=detector.bccd_test_unboxed_ignored,
        figures=[str(p.relative_to(out_dir)) for p in made],
        timing=Timing(sections_s=timer.sections, total_s=timer.total, machine=_machine(),
                      torch_threads=torch.get_num_threads()))


def _split_sizes(splits, cells: Sequence[Cell], source_cells: Sequence[Cell]) -> SplitSizes:
    """Sizes of the first split: images, groups by the split's own key, and source cells
    (BCCD fields) with copies on both sides."""
    split = splits[0]
    return SplitSizes(
        train=len(split.train), test=len(split.test),
        train_groups=len({cells[i].group_key for i in split.train}),
        test_groups=len({cells[i].group_key for i in split.test}),
        shared_groups=len({source_cells[i].group_key for i in split.train}
                          & {source_cells[i].group_key for i in split.test}),
        source_fields=len({c.group_key for c in source_cells}))


def _machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def _cross_source(config: EvalConfig, provenance: Provenance, regrouped: list[Cell],
                  bccd_cells: list[Cell], pbc_cells: list[Cell], pbc_features: torch.Tensor,
                  weights_dir, track: Track, cache_dir: Path | None, tag: str) -> CrossSource:
    """Train on one source family, test on another, under each colour variant."""
    scale = config.cross_crop_scale
    kbc_train = [c for c in regrouped if c.subset == "TRAIN"]
    kbc_simple = [c for c in regrouped if c.subset != "TRAIN"]
    train_fields = {c.group_key for c in kbc_train}
    bccd = [c for c in bccd_cells if str(c.cell_type) in PAPER_CLASSES]
    if config.max_per_class:
        bccd = _subsample(bccd, config.max_per_class, config.seed)
    bccd_unseen = [c for c in bccd if c.group_key not in train_fields]
    pbc4 = [c for c in pbc_cells if str(c.cell_type) in PAPER_CLASSES]
    pbc4_index = [i for i, c in enumerate(pbc_cells) if str(c.cell_type) in PAPER_CLASSES]

    def features(name: str, cells, transform=None):
        return _cached(cache_dir, f"cross-{name}-{scale}-{tag}.pt",
                       lambda: pooled_features(cells, scale, weights_dir, track, transform))

    plain = {
        "PBC": pbc_features[pbc4_index],
        "BCCD": features("bccd", bccd),
        "KBC TEST_SIMPLE": features("kbc-simple", kbc_simple),
        "KBC TRAIN": features("kbc-train", kbc_train),
    }
    normalised = {
        "PBC": features("pbc-norm", pbc4, normalise_colour),
        "BCCD": features("bccd-norm", bccd, normalise_colour),
        "KBC TEST_SIMPLE": features("kbc-simple-norm", kbc_simple, normalise_colour),
        "KBC TRAIN": features("kbc-train-norm", kbc_train, normalise_colour),
    }
    augmented = {
        "PBC": features("pbc-aug", pbc4, lambda x: stain_augment(x, config.augment_copies,
                                                                 config.seed)),
        "KBC TRAIN": features("kbc-train-aug", kbc_train,
                              lambda x: stain_augment(x, config.augment_copies, config.seed)),
    }
    cells = {"PBC": pbc4, "BCCD": bccd, "KBC TEST_SIMPLE": kbc_simple, "KBC TRAIN": kbc_train}
    unseen_index = [i for i, c in enumerate(bccd) if c.group_key not in train_fields]

    def domain(name: str, table: dict, label: str | None = None) -> Domain:
        return Domain(label or name, cells[name], table[name])

    def bccd_unseen_domain(table: dict) -> Domain:
        return Domain("BCCD, fields not in KBC TRAIN", bccd_unseen, table["BCCD"][unseen_index])

    def family(table: dict) -> Domain:  # BCCD crops and KBC TRAIN copies of them
        return Domain("BCCD + KBC TRAIN", bccd + kbc_train,
                      torch.cat([table["BCCD"], table["KBC TRAIN"]]))

    directions: dict[str, dict[str, CrossMetrics]] = {}
    for variant in CROSS_VARIANTS:
        table = normalised if "normalisation" in variant else plain
        standardise = "standardisation" in variant
        extra_pbc = extra_family = None
        if variant == "stain augmentation":
            copies = config.augment_copies
            extra_pbc = (augmented["PBC"], pbc4 * copies)
            extra_family = (augmented["KBC TRAIN"], kbc_train * copies)
        runs = cross_source(domain("PBC", table),
                            [domain("BCCD", table), domain("KBC TEST_SIMPLE", table)],
                            config=config.head, seed=config.seed, extra_train=extra_pbc,
                            per_source_standardise=standardise)
        runs.update(cross_source(family(table), [domain("PBC", table)], config=config.head,
                                 seed=config.seed, extra_train=extra_family,
                                 per_source_standardise=standardise))
        directions[variant] = {
            f"{'PBC' if test != 'PBC' else 'BCCD + KBC TRAIN'} -> {test}": _cross_metrics(r)
            for test, r in runs.items()}
    # within the family: KBC TRAIN copies against cells they were or were not made from
    within = cross_source(domain("KBC TRAIN", plain),
                          [domain("KBC TEST_SIMPLE", plain),
                           domain("BCCD", plain, "BCCD, all fields (leaks: KBC copies them)"),
                           bccd_unseen_domain(plain)],
                          config=config.head, seed=config.seed)
    return CrossSource(
        variants=directions,
        within_family={f"KBC TRAIN -> {test}": _cross_metrics(r) for test, r in within.items()},
        sizes={"PBC": len(pbc4), "BCCD": len(bccd), "BCCD unseen": len(bccd_unseen),
               "KBC TEST_SIMPLE": len(kbc_simple), "KBC TRAIN": len(kbc_train)},
        crop_scale=scale,
    )


def _cross_metrics(task_runs: dict[str, Run]) -> CrossMetrics:
    """Per task metrics and, per class, recall / precision / F1; plus the two-level total."""
    tasks, per_class = {}, {}
    for task, run in task_runs.items():
        m = run.metrics()
        tasks[task] = TaskScores(accuracy=m["accuracy"], macro_f1=m["macro_f1"], n=m["n"],
                                 confusion=m["confusion"], classes=m["classes"])
        per_class.update({name: ClassScores(**scores) for name, scores in m["per_class"].items()})
    combined = combine_levels({t: [r] for t, r in task_runs.items()})[0].metrics()
    return CrossMetrics(tasks=tasks, per_class=per_class,
                        two_level=Overall(accuracy=combined["accuracy"],
                                          macro_f1=combined["macro_f1"], n=combined["n"]))


__all__ = ["EvalConfig", "evaluate_all"]
