"""`leukodiff evaluate classifier`: a trained level-2 model on a part of its split."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Group as RichGroup
from rich.table import Table

from leukodiff.data.records import Cell
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.splits import holdout
from leukodiff.evaluation.figures import plot_confusion
from leukodiff.models.files import Manifest
from leukodiff.models.io import load_classifier
from leukodiff.training.cells import load_cell_tensors
from leukodiff.training.classifier import (
    ClassifierConfig,
    TrainingError,
    evaluate_by_source,
    select_cells,
)

PARTS = ("train", "val", "test", "all")


def held_out_cells(manifest: Manifest, sources: tuple[str, ...] | None = None,
                   part: str = "test", data_root: str | Path | None = None,
                   track: Track = no_progress) -> list[Cell]:
    """The cells of `part` of the split a model was trained with (same seed and fractions),
    over `sources` (default: its own); 'all': every cell of the sources."""
    if part not in PARTS:
        raise TrainingError(f"unknown part {part!r}; parts: {', '.join(PARTS)}")
    config = ClassifierConfig.of_manifest(manifest)
    config_sources = tuple(sources or config.sources)
    cells, _ = select_cells(config_sources, manifest.classes, data_root, track)
    if part == "all":
        chosen = list(range(len(cells)))
    else:
        chosen = list(holdout(cells, val_fraction=config.val_fraction,
                              test_fraction=config.test_fraction, seed=config.seed)[part])
    if not chosen:
        raise TrainingError(f"no cells in the {part} part of {list(config_sources)}")
    return [cells[i] for i in chosen]


def evaluate_classifier(
    model: str | Path,
    sources: tuple[str, ...] | None = None,
    part: str = "test",
    *,
    data_root: str | Path | None = None,
    out_dir: Path | None = None,
    track: Track = no_progress,
) -> dict[str, dict]:
    """Metrics of `model` on `part` of the split it was trained with (same seed and
    fractions), over `sources` (default: the ones it was trained on); 'all' takes every
    cell of the sources (for sources the model never saw)."""
    network, manifest = load_classifier(model)
    config = ClassifierConfig.of_manifest(manifest)
    cells = held_out_cells(manifest, sources, part, data_root, track)
    classes = manifest.classes
    images = load_cell_tensors(cells, config.geometry, track)
    targets = torch.tensor([classes.index(str(c.cell_type)) for c in cells])
    results = evaluate_by_source(network, images, targets, cells, classes, manifest.views)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, metrics in results.items():
            plot_confusion(metrics, out_dir / f"confusion_{name}_{part}.png",
                           title=f"{manifest.task} on {name} ({part}): accuracy "
                           f"{metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
        (out_dir / f"metrics_{part}.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def metrics_table(metrics: dict, title: str = "") -> RichGroup:
    """Per-class metrics and the confusion matrix, as rich tables."""
    table = Table(title=title)
    for column in ("class", "accuracy", "precision", "recall", "F1", "n"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, m in metrics["per_class"].items():
        table.add_row(name, *(f"{100 * m[k]:.2f}" for k in ("accuracy", "precision", "recall",
                                                             "f1")), str(m["support"]))
    table.add_row("[bold]all[/]", f"{100 * metrics['accuracy']:.2f}", "", "",
                  f"{100 * metrics['macro_f1']:.2f} (macro)", str(metrics["n"]))
    confusion = Table(title="confusion matrix (rows: truth, columns: predicted)")
    confusion.add_column("")
    for name in metrics["classes"]:
        confusion.add_column(name[:5], justify="right")
    for name, row in zip(metrics["classes"], metrics["confusion"], strict=True):
        confusion.add_row(name, *(str(v) for v in row))
    return RichGroup(table, confusion)
