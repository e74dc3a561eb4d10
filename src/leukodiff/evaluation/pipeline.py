"""End to end: the whole pipeline on labelled smear fields it never trained on.

For every labelled white cell of BCCD's VOC test list: was it found (a
detection with IoU >= 0.5), and is its final type right? Reported per true
type, over the single-WBC fields (the issue's figure) and over all cells.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from leukodiff.data.records import Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.data.sources import load_fields
from leukodiff.imaging import load_image
from leukodiff.metrics.heldout import CountError, EndToEnd, EndToEndPart, TypeRow
from leukodiff.pipeline import Analyzer
from leukodiff.pipeline.analyzer import CellCall
from leukodiff.pipeline.boxes import box_iou
from leukodiff.taxonomy import CellType


def match_truth(cells: Sequence[CellCall], field: Field, scale: float = 1.0
                ) -> list[tuple[str, str]]:
    """(true type, what the pipeline said: its label, or "missed") for each typed white cell
    of `field`: found = a cell with IoU >= 0.5 (boxes in a field scaled by `scale`)."""
    typed = [box for box in field.wbc_boxes if box.cell_type is not None]
    found = np.array([cell.box for cell in cells], dtype=np.float64).reshape(-1, 4) / scale
    overlaps = box_iou(np.array([box.xyxy for box in typed]).reshape(-1, 4), found)
    pairs = []
    for box, row in zip(typed, overlaps, strict=True):
        best = int(row.argmax()) if len(cells) else -1
        said = cells[best].label if best >= 0 and row[best] >= 0.5 else "missed"
        pairs.append((str(box.cell_type), said))
    return pairs


def evaluate_end_to_end(analyzer: Analyzer, fields: list[Field], track: Track = no_progress,
                        perturb: Callable[[Image.Image], tuple[Image.Image, float]] | None
                        = None) -> EndToEnd:
    """Per true cell type: cells, found, right type; and the field-level count errors.

    `perturb` changes each field before analysis (evaluation.robustness) and says by
    what factor it scaled it, so that the cells found are matched in the field's own
    pixels."""
    per_type: dict[str, Counter] = {str(t): Counter() for t in CellType}
    single: dict[str, Counter] = {str(t): Counter() for t in CellType}
    count_errors = []
    confusion: Counter = Counter()
    for field in track(fields, "Analysing test fields"):
        if perturb is None:
            result, scale = analyzer(field.image), 1.0
        else:
            changed, scale = perturb(load_image(field.image))
            result = analyzer(changed, name=str(field.image))
        count_errors.append(len(result.cells) - len(field.wbc_boxes))
        for name, said in match_truth(result.cells, field, scale):
            confusion[(name, said)] += 1
            for table in (per_type, single) if len(field.wbc_boxes) == 1 else (per_type,):
                table[name].update(cells=1, found=int(said != "missed"), right=int(said == name))

    def summary(table: dict[str, Counter]) -> EndToEndPart:
        rows = {t: TypeRow(**c, accuracy=c["right"] / c["cells"]) for t, c in table.items()
                if c["cells"]}
        cells = sum(c["cells"] for c in table.values())
        right = sum(c["right"] for c in table.values())
        return EndToEndPart(per_type=rows, cells=cells, right=right,
                            accuracy=right / cells if cells else 0.0)

    return EndToEnd(
        fields=len(fields), single_wbc_fields=summary(single),
        all_labelled_cells=summary(per_type),
        confusion={f"{t} -> {p}": n for (t, p), n in sorted(confusion.items())},
        count_error=CountError(
            mean_absolute=sum(map(abs, count_errors)) / max(len(fields), 1),
            exact_fields=sum(e == 0 for e in count_errors)))


def evaluate_bccd_test(analyzer: Analyzer, data_root: str | Path | None = None,
                       track: Track = no_progress) -> EndToEnd:
    fields = [f for f in load_fields("bccd", data_root, track).records if f.subset == "test"]
    return evaluate_end_to_end(analyzer, fields, track)
