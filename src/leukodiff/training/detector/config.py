"""What a detector training run is: its configuration, and the error that stops it."""

from __future__ import annotations

from dataclasses import dataclass, field

from leukodiff.imaging import STAIN_NORMALISATIONS
from leukodiff.models.detector import SCORES, DetectorSpec
from leukodiff.training.cells import AUGMENTATIONS

VALIDATIONS = ("voc", "grouped")
UNKNOWN_GROUP_CHOICES = ("ignore", "drop", "cell")


class DetectorTrainingError(RuntimeError):
    """Detector training cannot start or go on."""


@dataclass(frozen=True)
class DetectorConfig:
    spec: DetectorSpec = field(default_factory=DetectorSpec)
    epochs: int = 40
    batch_size: int = 8
    lr: float = 1e-3  # AdamW; linear warm-up, then cosine to zero
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    frozen_blocks: int = 3  # MobileNet conv blocks kept at their ImageNet weights
    seed: int = 0
    # field sets to learn from: BCCD keeps its VOC lists, others are split by holdout()
    sources: tuple[str, ...] = ("bccd",)
    validation: str = "voc"  # "voc": BCCD's VOC val list; "grouped": split of train+val
    val_fraction: float = 0.2  # only for validation="grouped"
    val_every: int = 2  # epochs between validations (the last epoch is always validated)
    # WBC boxes of unknown group (BCD, the pig fields, cells a lab left unboxed): "ignore"
    # them (cells to the RPN, neither cell nor background to the box head), "drop" their
    # fields, or teach them to the box head as white cells of no group ("cell": the loss
    # is -log(1 - P(background)), the score `DetectorSpec.score="cell"` ranks boxes by)
    unknown_group: str = "ignore"
    mono_oversample: int = 5  # times a field with a mononuclear cell is drawn per epoch
    copy_paste: float = 0.5  # probability of pasting one mononuclear cell into a field
    # Down to 0.5: other labs' cameras show white cells at half BCCD's ~200 px (BCD: ~100)
    scale_range: tuple[float, float] = (0.5, 1.25)
    color_jitter: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.04)
    channel_gain: float = 0.15  # each RGB channel times 1 +- this: stain and lamp balance
    blur: float = 0.3  # probability of a Gaussian blur (sigma 0.3-1.5): focus and optics
    # Another lab's stain and camera: each stain's amount in HED space times 1 +-
    # `stain_jitter` (training.cells.StainJitter) and a gamma of exp(+- `gamma`). Off: left
    # one lab out it won Chula and lost BCCD and BCD (issue #14,
    # experiments/labs_detector_stain.py)
    stain_jitter: float = 0.0
    gamma: float = 0.0
    # probability that a window cut from a field larger than the detector's native one
    # holds a white cell (the rest are anywhere: that lab's background as negatives)
    window_on_cell: float = 0.75
    # > 0: the detector is the mean of its weights after each of its last `average_last`
    # epochs (stochastic weight averaging; Izmailov et al. 2018, and for a domain never seen
    # Cha et al. 2021, SWAD) instead of its best validated epoch: the training labs'
    # validation saturates (AP50 ~0.98-1.0) and cannot choose among epochs for a new lab.
    # Off: left out, Chula lost (experiments/labs_detector_average.py)
    average_last: int = 0
    max_train_fields: int = 0  # > 0: only this many training fields (tests, quick runs)
    max_val_fields: int = 0
    # group classifier (when spec.group_classifier): training fields' cells + PBC cells
    group_epochs: int = 8
    group_lr: float = 5e-4
    group_batch_size: int = 64
    group_pbc_per_type: int = 800  # PBC cells per type (0: no PBC)
    group_bccd_repeat: int = 5  # training fields' cells are drawn this many times per epoch
    group_augmentation: str = "basic"  # training.cells.AUGMENTATIONS
    # start from a trained detector.pt (fine-tuning); with group_epochs=0 its group
    # classifier is kept as it is
    init_weights: str = ""
    # Cells of every type from another lab: with this probability a field gets one PBC
    # cell pasted in (`pbc_donors`), coloured like the field and sized like its white
    # cells. The detection labs have almost no basophils (BCCD names 4; BCD: untyped): without
    # this a detector trained on them misses most basophils of a new lab.
    pbc_paste: float = 0.0
    pbc_paste_per_type: int = 100  # PBC cells per type to draw from
    pbc_box_detector: str = "detector"  # the detector that boxes the PBC cells

    def check(self) -> None:
        if self.validation not in VALIDATIONS:
            raise DetectorTrainingError(f"validation must be one of {VALIDATIONS}")
        if self.unknown_group not in UNKNOWN_GROUP_CHOICES:
            raise DetectorTrainingError(f"unknown_group must be one of {UNKNOWN_GROUP_CHOICES}")
        if self.epochs < 1 or self.batch_size < 1:
            raise DetectorTrainingError("epochs and batch_size must be at least 1")
        if not self.sources:
            raise DetectorTrainingError("sources must name at least one field data set")
        if self.group_augmentation not in AUGMENTATIONS:
            raise DetectorTrainingError(f"group_augmentation must be one of {AUGMENTATIONS}")
        if not 0.0 <= self.pbc_paste <= 1.0:
            raise DetectorTrainingError("pbc_paste is a probability: 0 to 1")
        if self.spec.score not in SCORES:
            raise DetectorTrainingError(f"score must be one of {', '.join(SCORES)}")
        if self.spec.other_cell_class and self.spec.score != "cell":
            raise DetectorTrainingError("the other-cell class (on by default) needs score "
                                        "'cell': train with --no-other-cells to score by "
                                        "group")
        if not 0 <= self.average_last <= self.epochs:
            raise DetectorTrainingError("average_last is a number of epochs: 0 to epochs")
        if not 0.0 <= self.spec.glass_grey <= 1.0:
            raise DetectorTrainingError("glass_grey is a grey level: 0 (off) to 1")
        if self.spec.group_stain not in STAIN_NORMALISATIONS:
            raise DetectorTrainingError(f"unknown stain normalisation {self.spec.group_stain!r}"
                                        f"; choose one of {', '.join(STAIN_NORMALISATIONS)}")

    @classmethod
    def from_dict(cls, data: dict) -> DetectorConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("spec"), dict):
            known["spec"] = DetectorSpec.from_dict(known["spec"])
        for key in ("scale_range", "color_jitter", "sources"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

