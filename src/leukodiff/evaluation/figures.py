"""Figures drawn from metrics (`leukodiff.metrics`) for the evaluation reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
