"""`leukodiff evaluate robustness`: the shipped pipeline on fields and cells as other labs'
cameras and stains would show them.

We have two labelled labs (BCCD's fields, PBC's CellaVision cells); users have
others. This applies fixed, deterministic changes of the kinds that differ between
labs to data the models never trained on, and measures what ships (the Analyzer, on
its default backend):

- end to end on BCCD's VOC test fields: cells found, right type (single-WBC fields),
  white-cell count error;
- the level-2 models on PBC's held-out cells of their own split (the whole cell image
  changed, then cut as in training).

The changes: JPEG compression, lower camera resolution, defocus, lamp colour, stain
strength, hue and brightness, and (fields only) magnification. A row far below the
"none" row is a way a new lab could lose accuracy; it is not a prediction of it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from leukodiff.data.crops import network_input, square_input
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_fields
from leukodiff.evaluation.classifier import held_out_cells
from leukodiff.evaluation.pipeline import evaluate_end_to_end
from leukodiff.imaging import load_image
from leukodiff.metrics.classification import classification_metrics
from leukodiff.metrics.heldout import CellScores, PerturbedFields, Robustness, RobustnessRow
from leukodiff.pipeline import Analyzer
from leukodiff.taxonomy import Group


@dataclass(frozen=True)
class Perturbation:
    """A change of a whole image; `scale`: how it resizes the image (1: it does not)."""

    name: str
    apply: Callable[[Image.Image], Image.Image]
    scale: float = 1.0

    def __call__(self, image: Image.Image) -> tuple[Image.Image, float]:
        return self.apply(image), self.scale


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def apply(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")
    return apply


def _resolution(factor: float) -> Callable[[Image.Image], Image.Image]:
    """A camera with `factor` times fewer pixels, shown at the original size."""
    def apply(image: Image.Image) -> Image.Image:
        small = image.resize((max(1, round(image.width / factor)),
                              max(1, round(image.height / factor))),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
        return small.resize(image.size, Image.Resampling.BILINEAR)
    return apply


def _zoom(factor: float) -> Callable[[Image.Image], Image.Image]:
    """Another objective or camera adapter: cells `factor` times as large in pixels."""
    def apply(image: Image.Image) -> Image.Image:
        size = (round(image.width * factor), round(image.height * factor))
        return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return apply


def _gain(red: float, green: float, blue: float) -> Callable[[Image.Image], Image.Image]:
    """Lamp colour / white balance: each channel times its gain."""
    def apply(image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.float32) * np.array([red, green, blue])
        return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    return apply


def _enhance(kind: type, factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda image: kind(image).enhance(factor)


def _hue(shift: float) -> Callable[[Image.Image], Image.Image]:
    """Stain hue: every colour turned by `shift` of a full turn."""
    def apply(image: Image.Image) -> Image.Image:
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(256 * shift)) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    return apply


PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("none", lambda image: image),
    Perturbation("JPEG quality 30", _jpeg(30)),
    Perturbation("JPEG quality 10", _jpeg(10)),
    Perturbation("camera resolution / 2", _resolution(2)),
    Perturbation("camera resolution / 3", _resolution(3)),
    Perturbation("defocus (blur 1.5 px)", lambda image: image.filter(
        ImageFilter.GaussianBlur(1.5))),
    Perturbation("warm lamp (R +15%, B -15%)", _gain(1.15, 1.0, 0.85)),
    Perturbation("cool lamp (R -15%, B +15%)", _gain(0.85, 1.0, 1.15)),
    Perturbation("pale stain (saturation x0.6)", _enhance(ImageEnhance.Color, 0.6)),
    Perturbation("strong stain (saturation x1.5)", _enhance(ImageEnhance.Color, 1.5)),
    Perturbation("stain hue +0.04 turn", _hue(0.04)),
    Perturbation("stain hue -0.04 turn", _hue(-0.04)),
    Perturbation("dim (brightness x0.8)", _enhance(ImageEnhance.Brightness, 0.8)),
    Perturbation("magnification x0.7", _zoom(0.7), 0.7),
    Perturbation("magnification x1.4", _zoom(1.4), 1.4),
    Perturbation("magnification x2", _zoom(2.0), 2.0),
)


def _classify_cells(analyzer: Analyzer, group: Group, images: list[Image.Image],
                    perturbation: Perturbation, batch: int = 64) -> np.ndarray:
    """Level-2 calls of whole-cell images (as `data.crops.cell_input` cuts them)."""
    classifier = analyzer.classifiers[group]
    calls = []
    for start in range(0, len(images), batch):
        crops = network_input([square_input(perturbation(image)[0], classifier.input_size,
                                            classifier.stain)
                               for image in images[start:start + batch]], classifier.input_size)
        calls.append(classifier.probabilities(crops).argmax(1))
    return np.concatenate(calls) if calls else np.zeros(0, dtype=np.int64)


def evaluate_robustness(analyzer: Analyzer, data_root: str | Path | None = None, *,
                        perturbations: tuple[Perturbation, ...] = PERTURBATIONS,
                        max_fields: int = 0, max_cells: int = 0,
                        track: Track = no_progress) -> Robustness:
    """One row per perturbation: BCCD test fields end to end, PBC held-out cells per model.

    `max_fields` / `max_cells` (> 0) take the first fields and cells only (quick runs).
    """
    fields = sorted((f for f in load_fields("bccd", data_root, track).records
                     if f.subset == "test"), key=lambda f: f.image.name)
    fields = fields[:max_fields] if max_fields else fields
    cells = {}
    for group, classifier in analyzer.classifiers.items():
        chosen = held_out_cells(classifier.manifest, ("pbc",), "test", data_root, track)
        chosen = chosen[:max_cells] if max_cells else chosen
        cells[group] = ([load_image(c.image) for c in track(chosen, f"PBC {group} cells")],
                        [classifier.classes.index(str(c.cell_type)) for c in chosen])
    rows = []
    for perturbation in track(perturbations, "Perturbations"):
        end_to_end = evaluate_end_to_end(analyzer, fields, perturb=perturbation)
        single = end_to_end.single_wbc_fields
        on_fields = PerturbedFields(
            single_wbc_cells=single.cells, found=sum(r.found for r in single.per_type.values()),
            right_type=single.right, accuracy=single.accuracy,
            count_mae=end_to_end.count_error.mean_absolute, confusion=end_to_end.confusion)
        pbc = {}
        for group, (images, truth) in cells.items():
            if perturbation.scale != 1.0:
                continue  # a whole-cell image is resized to the input anyway: no change
            predicted = _classify_cells(analyzer, group, images, perturbation)
            metrics = classification_metrics(truth, predicted,
                                             analyzer.classifiers[group].classes)
            pbc[str(group)] = CellScores(metrics["n"], metrics["accuracy"], metrics["macro_f1"])
        rows.append(RobustnessRow(perturbation.name, on_fields, pbc))
    return Robustness(backend=analyzer.backend.name, bccd_test_fields=len(fields), rows=rows)


def plot_robustness(results: Robustness, path: Path) -> Path:
    """One panel per measure, one bar per change: the loss (or gain) against no change, in
    percentage points, labelled with the value itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.rows
    names = [r.perturbation for r in rows]
    panels = [("BCCD test fields: cell found and typed right",
               [r.bccd_end_to_end.accuracy for r in rows])]
    for group in ("mononuclear", "polymorphonuclear"):
        panels.append((f"PBC held-out cells: {group} macro-F1",
                       [r.pbc[group].macro_f1 if group in r.pbc else np.nan for r in rows]))
    deltas = [100 * (np.array(values) - values[0]) for _, values in panels]
    low = min(-5.0, float(np.nanmin(np.concatenate(deltas))) - 3)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels),
                                                         0.32 * len(rows) + 1.6), sharey=True)
    for axis, (title, values), delta in zip(axes, panels, deltas, strict=True):
        colours = ["#c44e52" if d < -1 else "#4c72b0" for d in np.nan_to_num(delta)]
        axis.barh(range(len(rows)), delta, color=colours)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_xlim(low, 5)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("change against none (percentage points)", fontsize=8)
        for i, (value, d) in enumerate(zip(values, delta, strict=True)):
            if not np.isnan(value):
                axis.text(min(d, 0) - 0.3, i, f"{value:.2f}", va="center", ha="right",
                          fontsize=7)
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle(f"Shipped pipeline ({results.backend}) under other cameras and stains "
                    "(red: more than 1 point lost)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
