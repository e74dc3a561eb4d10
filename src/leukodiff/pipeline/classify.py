"""Crop classifiers as the pipeline runs them: level 2's two models and the detector's
group classifier, each with the crop geometry and threshold its manifest records.

Level 2 averages its softmax over a cell's orientations (`data.crops.LEVEL2_VIEWS`, as
many as the model's threshold was calibrated on): the same cell turned or mirrored gets
one answer, whatever way the camera faced.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from leukodiff.data.crops import cell_batch, orientations
from leukodiff.data.records import Box
from leukodiff.models.files import ModelFileError
from leukodiff.pipeline.backends import Backend


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, classes) logits, shifted by each row's maximum."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class GroupClassifier:
    """A crop classifier with the crop geometry and threshold its manifest records, its
    softmax averaged over `views` orientations of each crop (default: as many as its
    threshold was calibrated on, `Manifest.views`; 1: the crop as cut)."""

    def __init__(self, backend: Backend, role: str, threshold: float | None = None,
                 views: int | None = None) -> None:
        manifest = backend.manifests[role]
        self.backend, self.role, self.manifest = backend, role, manifest
        if manifest.input is None:
            raise ModelFileError(f"the {role} model's manifest gives no crop geometry")
        self.classes = list(manifest.classes)
        self.crop_scale = manifest.input.crop_scale
        self.input_size = manifest.input.size
        self.stain = manifest.input.stain
        self.threshold = manifest.threshold if threshold is None else threshold
        self.views = manifest.views if views is None else views

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) of a batch of inputs (N, 3, size, size) in
        [0, 1], averaged over the views (one run of the network for all of them)."""
        if not len(crops):
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        logits = self.backend.classify(self.role, orientations(crops, self.views))
        return softmax(logits).reshape(self.views, len(crops), -1).mean(0)

    def __call__(self, image: Image.Image, boxes: Sequence[Box]) -> np.ndarray:
        """Class probabilities (N, classes) of the cells in `boxes`."""
        return self.probabilities(cell_batch(image, boxes, self.crop_scale, self.input_size,
                                             self.stain))
