"""Classification metrics as the paper reports them (scikit-learn), and the confidence
calibration that sets a classifier's "unidentified" threshold.

Numbers only (numpy, scikit-learn): training validates with them, evaluation reports
them; the figures drawn from them are in `evaluation.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]
) -> dict:
    """Accuracy, macro-F1, and per class: one-vs-rest accuracy (the paper's Table 3),
    precision, recall, F1, support; plus the confusion matrix (rows = truth)."""
    labels = list(range(len(classes)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    per_class = {}
    for i, name in enumerate(classes):
        one_vs_rest = float(np.mean((y_true == i) == (y_pred == i))) if len(y_true) else 0.0
        per_class[name] = {
            "accuracy": one_vs_rest,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
    present = [i for i in labels if support[i] > 0]
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(np.mean(f1[present])) if present else 0.0,
        "per_class": per_class,
        "confusion": matrix.tolist(),
        "classes": list(classes),
    }


def calibrate_confidence(
    probabilities: np.ndarray, targets: Sequence[int], target_accuracy: float = 0.99
) -> dict:
    """The lowest top-class probability at which kept cells are still `target_accuracy` right.

    Cells below it are reported as "unidentified" (as clinical analyzers flag
    cells for review) and left out of the percentages. Calibrate on validation
    data, never on the test part.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(targets)
    order = np.argsort(-confidence, kind="stable")
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    good = np.flatnonzero(running >= target_accuracy)
    kept = int(good.max()) + 1 if len(good) else 0
    threshold = float(confidence[order][kept - 1]) if kept else 1.0
    if kept == len(order):  # every validation cell qualifies: flag nothing it saw
        threshold = float(confidence.min())
    return {
        "threshold": threshold,
        "target_accuracy": target_accuracy,
        "validation_cells": len(order),
        "validation_coverage": kept / len(order) if len(order) else 0.0,
        "validation_accuracy_kept": float(running[kept - 1]) if kept else 0.0,
    }
