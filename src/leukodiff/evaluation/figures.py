"""Figures drawn from metrics (`leukodiff.metrics`) for the evaluation reports: a
confusion matrix, and the figures of `evaluate all` (`write_study_figures`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leukodiff.evaluation.protocols import Run, combine_levels
from leukodiff.evaluation.provenance import Provenance
from leukodiff.metrics.classification import classification_metrics
from leukodiff.metrics.study import (
    PAPER_CLASSES,
    PAPER_TABLE3,
    SPLIT_KINDS,
    ClassTable,
    CrossSource,
)


def plot_confusion(metrics: dict, path: Path, title: str = "") -> Path:
    """Save the confusion matrix (counts, rows = truth) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    classes = metrics["classes"]
    figure, axes = plt.subplots(figsize=(1.6 + 1.1 * len(classes), 1.2 + 1.0 * len(classes)))
    ConfusionMatrixDisplay(np.array(metrics["confusion"]), display_labels=classes).plot(
        ax=axes, cmap="Blues", colorbar=False, values_format="d"
    )
    axes.set_title(title or f"accuracy {metrics['accuracy']:.3f}, macro-F1 "
                   f"{metrics['macro_f1']:.3f} (n={metrics['n']})", fontsize=9)
    plt.setp(axes.get_xticklabels(), rotation=30, ha="right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_study_figures(folder: Path, paper: dict[str, ClassTable], cross: CrossSource,
                        runs: dict[str, dict[str, list[Run]]],
                        comparison_runs: dict[str, tuple[list[Run], list[Run]]],
                        provenance: Provenance) -> list[Path]:
    """The figures of `evaluate all` (docs/RESULTS.md): Table 3 per class, confusion
    matrices, cross-source recall, flat vs two-level per split, provenance."""
    plt = _plt()
    made = []

    # per-class bars with error bars: paper vs the three kinds of split (frozen)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    kinds = [("paper", None), *[(k, k) for k in SPLIT_KINDS]]
    colours = ["#999999", "#1f77b4", "#9ecae1", "#d62728"]
    for ax, metric in zip(axes, ("accuracy", "f1"), strict=True):
        x = np.arange(len(PAPER_CLASSES))
        width = 0.2
        for j, ((label, kind), colour) in enumerate(zip(kinds, colours, strict=True)):
            if kind is None:
                values = [getattr(PAPER_TABLE3[c], metric) for c in PAPER_CLASSES]
            else:
                values = [getattr(paper[kind][c], metric) for c in PAPER_CLASSES]
            ax.bar(x + (j - 1.5) * width, [v[0] for v in values], width,
                   yerr=[v[1] for v in values], capsize=2, color=colour,
                   label=label if kind is None else kind)
        ax.set_xticks(x, PAPER_CLASSES, fontsize=8)
        ax.set_ylim(40, 101)
        ax.set_title(f"{metric} (%), frozen base, mean ± std over splits", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    made.append(_save(figure, folder / "table3_per_class.png"))

    # confusion matrices, summed over splits, two-level with the true group
    for kind in ("random", "source-grouped"):
        combined = combine_levels(runs[kind])
        y_true = np.concatenate([r.y_true for r in combined])
        y_pred = np.concatenate([r.y_pred for r in combined])
        m = classification_metrics(y_true.tolist(), y_pred.tolist(), combined[0].classes)
        made.append(plot_confusion(m, folder / f"confusion_kbc_{kind}.png",
                                   title=f"KBC, {kind} splits (all {len(combined)} summed): "
                                   f"acc {m['accuracy']:.3f}"))

    # cross-source recall per class and variant
    variants = cross.variants
    directions = list(next(iter(variants.values())).keys())
    figure, axes = plt.subplots(1, len(directions), figsize=(4.2 * len(directions), 3.4),
                                squeeze=False)
    for ax, direction in zip(axes[0], directions, strict=True):
        x = np.arange(len(PAPER_CLASSES))
        width = 0.8 / len(variants)
        for j, variant in enumerate(variants):
            per_class = variants[variant][direction].per_class
            ax.bar(x + (j - (len(variants) - 1) / 2) * width,
                   [100 * per_class[c].recall if c in per_class else 0
                    for c in PAPER_CLASSES],
                   width, label=variant)
        ax.set_xticks(x, [c[:5] for c in PAPER_CLASSES], fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(direction, fontsize=9)
        ax.set_ylabel("recall (%)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=6, loc="lower left")
    figure.tight_layout()
    made.append(_save(figure, folder / "cross_source_recall.png"))

    # flat vs two-level, per split
    figure, axes = plt.subplots(1, len(comparison_runs), figsize=(3.3 * len(comparison_runs),
                                                                  3.0), squeeze=False)
    for ax, (name, (flat, two)) in zip(axes[0], comparison_runs.items(), strict=True):
        fa = [100 * r.metrics()["accuracy"] for r in flat]
        ta = [100 * r.metrics()["accuracy"] for r in two]
        for a, b in zip(fa, ta, strict=True):
            ax.plot([0, 1], [a, b], color="#888888", lw=0.8)
        ax.scatter([0] * len(fa), fa, color="#ff7f0e", zorder=3, s=12)
        ax.scatter([1] * len(ta), ta, color="#1f77b4", zorder=3, s=12)
        ax.set_xticks([0, 1], ["flat", "two-level\n(oracle level 1)"], fontsize=8)
        ax.set_xlim(-0.4, 1.4)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("accuracy (%)", fontsize=8)
    figure.tight_layout()
    made.append(_save(figure, folder / "flat_vs_two_level.png"))

    # provenance: copies per source field, and what <n> groups share
    report = provenance.report
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    train = report["subsets"].get("TRAIN", {}).get("per_class", {})
    sources = [s for s, c in zip(provenance.source, provenance.cells, strict=True)
               if c.subset == "TRAIN"]
    types = [str(c.cell_type) for c in provenance.cells if c.subset == "TRAIN"]
    for j, cell_type in enumerate(sorted(train)):
        counts: dict[str, int] = {}
        for s, t in zip(sources, types, strict=True):
            if t == cell_type:
                counts[s] = counts.get(s, 0) + 1
        values = list(counts.values())
        axes[0].scatter(np.full(len(values), j) + np.random.default_rng(j).uniform(
            -0.25, 0.25, len(values)), values, s=6, alpha=0.6)
        expected = sum(values) / max(train[cell_type]["name_groups"], 1)
        axes[0].hlines(expected, j - 0.35, j + 0.35, color="k", lw=1)
    axes[0].set_xticks(range(len(train)), [t[:5] for t in sorted(train)], fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KBC TRAIN copies per BCCD field", fontsize=8)
    axes[0].set_title("copies per linked field (line: images / <n> groups)", fontsize=9)
    names = report.get("name_groups", {})
    if names:
        labels = ["same <n>", "different <n>", "same BCCD field"]
        keys = ["within_name", "across_name", "same_field"]
        axes[1].bar(labels, [names[k]["similarity_mean"] for k in keys],
                    color=["#9ecae1", "#9ecae1", "#d62728"])
        for i, k in enumerate(keys):
            axes[1].text(i, names[k]["similarity_mean"] + 0.01,
                         f"same field {100 * names[k]['same_field_rate']:.1f}%",
                         ha="center", fontsize=7)
        axes[1].set_ylabel("patch similarity (NCC, best flip)", fontsize=8)
        axes[1].set_title("pairs of KBC TRAIN images of one class", fontsize=9)
    figure.tight_layout()
    made.append(_save(figure, folder / "provenance.png"))
    return made


def _save(figure, path: Path) -> Path:
    plt = _plt()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
