"""What the leave-one-lab-out detector experiments share (run them from the repository root:
`python experiments/NAME.py` puts this folder on the import path)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from leukodiff.data.records import Field
from leukodiff.pipeline.boxes import Detections


def exact_share(detections: Sequence[Detections], fields: Sequence[Field], threshold: float,
                ignore: Mapping[str, Sequence]) -> float:
    """Share of fields whose white-cell count at `threshold` is exact; a reviewed unboxed
    white cell (`ignore`, by image stem) counts as a cell."""
    return float(np.mean([len(found.above(threshold).boxes)
                          == len(f.wbc_boxes) + len(ignore.get(f.image.stem, ()))
                          for found, f in zip(detections, fields, strict=True)]))
