"""Training the level-1 detector (Faster R-CNN, MobileNetV1-0.5) on smear fields.

    config = DetectorConfig(epochs=40, sources=("bccd", "bcd", "chula"))
    manifest = train_detector(config, Path("runs/detector"))

Data: the fields of `sources` (BCCD by default), each white-cell box labelled with
its group (mononuclear / polymorphonuclear) where the source says it (`Box.group`;
BCCD via `labels.csv`). BCCD's VOC `test` list is never read here except for the
final report; model selection uses the VOC `val` list (or, with
`validation="grouped"`, a grouped split of train+val). Other sources are split by
`data.splits.holdout` (grouped by slide or field): their train parts train, their
val parts join the selection, their test parts are only reported. Fields larger
than the detector's native field (Chula's 1440x900) are trained on as windows of
that size, mostly around a white cell, sometimes anywhere (red cells, debris and
stain from that lab as background).

Boxes whose group is unknown (a field whose labels name both groups, or fewer
labels than boxes: 9 boxes in 5 of 205 VOC train fields; every BCD box) are not
guessed: they are "ignore" boxes (`DetectorConfig.unknown_group="ignore"`): the
class-agnostic RPN learns them as cells, the RoI heads neither as a group nor as
background (`models.detector.IgnoringRPN`, `IgnoringRoIHeads`), while the field's
other cells train as usual. `unknown_group="drop"` leaves such fields out instead;
`unknown_group="cell"` teaches them to the RoI heads as a white cell of either group
(`models.detector.cell_aware_loss`; measured leave one lab out and not kept). The
white cells a source leaves unboxed altogether (reviewed lists of BCCD and Chula,
`data.sources.unboxed`) join the training and validation fields as such boxes.
The pig fields (`sources` "pig", `data.sources.pig`: read enlarged 5x, white-cell boxes
of no group) train only: a seeded draw of 200 photos, no validation or test part.

Balance (BCCD's train list has ~36 mononuclear vs ~170 polymorphonuclear
boxes): fields holding a mononuclear cell are drawn `mono_oversample` times
per epoch, and with probability `copy_paste` a mononuclear cell cut from
another training field (elliptical, feathered mask) is pasted into the field.

Cells of every type (`pbc_paste`): the field sets hold almost no basophils and few
eosinophils or monocytes, so with probability `pbc_paste` a PBC cell of any of the
five types is pasted too (`pbc_donors`: boxed by the shipped detector), its colours
moved from PBC's to the field's (CIELAB statistics of the whole image) and its size
to the field's own white cells.

Augmentation (torchvision.transforms.v2 with tv_tensors.BoundingBoxes):
flips, 90-degree rotations (one per batch, so batches need no padding),
scale jitter (one factor per batch; enlarged fields are cropped back to their
size) and colour jitter.

Group classifier (`DetectorSpec.group_classifier`, on by default): Faster
R-CNN's RoI head learns the groups poorly from BCCD's ~36 mononuclear training
cells (63-96% group accuracy on the VOC test list over five runs), so after the detector's
epochs a MobileNetV1-0.5 crop classifier is fine-tuned on the training fields'
cells (drawn `group_bccd_repeat` times) plus `group_pbc_per_type` PBC cells of
each type, cropped as the level-2 models crop them; the pipeline relabels every box
the detector finds with it (`Analyzer.detect`). It is selected on the val fields' cells.

The modules, in the order they build on each other: `config` (DetectorConfig),
`fields` (the fields of a run, split, decoded, drawn per epoch), `augmentation`
(windows, copy-paste, PBC cells, flips, scale, colour), `validation` (the figures
the epochs are chosen on and the manifest reports), `groups` (the group
classifier's phase) and `loop` (`train_detector`, `retrain_group_classifier`), all
on `training.engine`. The names callers use are imported here.
"""

from leukodiff.training.detector.augmentation import (
    Augmenter,
    PastedCell,
    lab_statistics,
    pbc_donors,
)
from leukodiff.training.detector.config import (
    VALIDATIONS,
    DetectorConfig,
    DetectorTrainingError,
)
from leukodiff.training.detector.fields import (
    DetectorData,
    FieldImages,
    epoch_order,
    field_target,
    has_mononuclear,
    has_unknown_group,
    prepare_fields,
    unknown_group_boxes,
)
from leukodiff.training.detector.groups import (
    group_cells,
    group_metrics,
    restart_group_classifier,
    train_group_classifier,
)
from leukodiff.training.detector.loop import (
    detector_step,
    field_batch_loss,
    rescore_detector,
    retrain_group_classifier,
    train_detector,
)
from leukodiff.training.detector.validation import (
    final_metrics,
    operating_threshold,
    test_key,
    validate,
)

__all__ = [
    "VALIDATIONS",
    "Augmenter",
    "DetectorConfig",
    "DetectorData",
    "DetectorTrainingError",
    "FieldImages",
    "PastedCell",
    "detector_step",
    "epoch_order",
    "field_batch_loss",
    "field_target",
    "final_metrics",
    "group_cells",
    "group_metrics",
    "has_mononuclear",
    "has_unknown_group",
    "lab_statistics",
    "operating_threshold",
    "pbc_donors",
    "prepare_fields",
    "rescore_detector",
    "restart_group_classifier",
    "retrain_group_classifier",
    "test_key",
    "train_detector",
    "train_group_classifier",
    "unknown_group_boxes",
    "validate",
]
