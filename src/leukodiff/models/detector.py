"""Level 1: torchvision's Faster R-CNN on a light MobileNetV1 backbone.

It finds white cells in a smear field and labels each one mononuclear or
polymorphonuclear. Only the backbone is ours; the RPN, RoI heads, box coding
and NMS are torchvision's (`torchvision.models.detection.FasterRCNN`).

    model = build_detector(DetectorSpec(), weights_dir=...)  # ImageNet backbone
    found = Analyzer.of_detector(model).detect(load_image(path))  # as `analyze` runs it

Inference (agnostic NMS, tiling, the group classifier's relabelling) is the pipeline's
alone (`pipeline.Analyzer.detect`, numpy, on torch or onnxruntime): this module only
builds the network.

Design (see `DetectorSpec`):

* Backbone: MobileNetV1-0.5 (`leukodiff.models.mobilenet`, TF-SAME padding,
  input normalisation inside) cut at stride 16 (the last two 1024-wide
  separable blocks dropped), initialised from Google's ImageNet TFLite weights,
  then a 1x1 convolution to `channels`. Its BatchNorm layers stay in eval mode:
  the converted weights fold BN into an identity-plus-bias, and batches of a
  few fields would give useless statistics.
* Native resolution: the RCNN transform neither resizes nor normalises (the
  backbone normalises). BCCD's 640x480 fields go in at 640x480; other sources
  are rescaled so that their cells have BCCD's size in pixels (a white cell is
  ~200 px across in BCCD; `pipeline.scale`).
* Anchors 64-256 px (three aspect ratios) on the single stride-16 map cover
  BCCD's white cells, 120-260 px for 90% of them and ~30 px for slivers cut by
  the image border.
* Score (`DetectorSpec.score`): a box is scored as a white cell, 1 - P(background),
  one box per proposal and one NMS (`IgnoringRoIHeads.postprocess_detections`), its
  operating threshold chosen on validation F1; detectors trained before 2026-12-06 keep
  torchvision's per-group scores and per-class NMS, after which the pipeline's
  class-agnostic NMS reports a cell once, with the group of its best-scoring box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, box_iou
from torchvision.ops import boxes as box_ops

from leukodiff.models.mobilenet import MobileNetClassifier, MobileNetV1
from leukodiff.models.tflite import load_imagenet_backbone
from leukodiff.taxonomy import DETECTOR_LABEL_OF, GROUP_OF_DETECTOR_LABEL, Group

#: Label index -> name; 0 is torchvision's background class.
CLASSES: tuple[str, ...] = ("background", str(Group.MONONUCLEAR), str(Group.POLYMORPHONUCLEAR))
LABEL_OF: dict[Group, int] = DETECTOR_LABEL_OF
GROUP_OF_LABEL: dict[int, Group] = GROUP_OF_DETECTOR_LABEL
#: How a box is scored (`DetectorSpec.score`)
SCORES = ("group", "cell")
#: The box head's class past the groups when `DetectorSpec.other_cell_class`: an annotated
#: red cell or platelet, never reported (a box's white-cell score is P(either group)).
OTHER_CELL = len(LABEL_OF) + 1
# a training label past every class: a white cell whose group is unknown (`cell_aware_loss`)
CELL_OF_NO_GROUP = OTHER_CELL + 1

# MobileNetV1 conv blocks (stem + 13 depthwise/pointwise pairs) that end at each stride.
_BLOCKS_TO_STRIDE = {8: 1 + 2 * 5, 16: 1 + 2 * 11, 32: 1 + 2 * 13}


@dataclass(frozen=True)
class DetectorSpec:
    """Everything that fixes the network's shape and its inference behaviour (in the manifest)."""

    width: float = 0.5  # MobileNetV1 width multiplier (ImageNet weights: 0.25, 0.5, 0.75)
    stride: int = 16  # feature map stride: 8, 16 or 32
    channels: int = 128  # 1x1 conv after the backbone: RPN and RoI features
    anchor_sizes: tuple[int, ...] = (64, 128, 256)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    roi_size: int = 7  # RoIAlign output side
    representation: int = 256  # width of the two-layer MLP box head
    rpn_pre_nms_train: int = 1000
    rpn_post_nms_train: int = 500
    rpn_pre_nms_test: int = 500
    rpn_post_nms_test: int = 300
    rpn_batch_per_image: int = 128
    box_batch_per_image: int = 128
    box_score_thresh: float = 0.05  # kept for AP; `score_threshold` is the operating point
    box_nms_thresh: float = 0.5
    detections_per_image: int = 20
    agnostic_nms_iou: float = 0.5  # a cell is reported once, whatever its group scores
    score_threshold: float = 0.5  # what counts as a found cell (recall/precision, counts)
    # How a box's white-cell score is read off the box head's softmax (background,
    # mononuclear, polymorphonuclear[, other cell]): "cell", one box per proposal scored
    # 1 - P(background) (less P(other cell)),
    # labelled with the likelier group, its operating threshold chosen on validation F1;
    # "group", torchvision's, one box per group scored by that group's probability, so a
    # cell whose group is uncertain (a lab it never saw) scores ~0.5 at most. "cell" won
    # leaving one lab out (issue #14, experiments/labs_detector_cell_score.py); manifests
    # written before the choice existed read as "group".
    score: str = "cell"
    min_size: int = 480  # torchvision's nominal sizes; the transform below never resizes
    max_size: int = 640
    # Group refiner: a MobileNetV1 crop classifier (mononuclear / polymorphonuclear) that
    # relabels the boxes Faster R-CNN finds, trained on many more cells than BCCD's fields
    # hold. Crops as the level-2 models cut them (square, `group_crop_scale` x the box).
    group_classifier: bool = True
    group_crop_scale: float = 2.6
    group_input_size: int = 128
    group_hidden: int = 128
    group_stain: str = "none"  # imaging.STAIN_NORMALISATIONS of the group classifier's crops
    # Per-image colour standardisation (stain/lamp differences between labs): each RGB
    # channel is shifted and scaled to the mean/std of BCCD's training fields. When True
    # the model was trained with it (it is done in the RCNN transform); `evaluate detector`
    # also tries it on BCD for a model trained without it.
    colour_standardise: bool = False
    colour_mean: tuple[float, float, float] = (0.7413, 0.7012, 0.7110)
    colour_std: tuple[float, float, float] = (0.0609, 0.1016, 0.0873)
    # contrast is reduced to the reference but raised at most this much: a region holding
    # only red cells has little spread, and stretching it makes red cells look like nuclei
    colour_max_gain: float = 1.0
    # Per-image white balance on the glass: each channel scaled so that the field's
    # brightest tenth (the glass between cells) becomes this grey level (0: off). A lab's
    # lamp and camera cast shows in its glass however crowded the field is, unlike the
    # whole-field statistics of colour_standardise, which are mostly red cells.
    glass_grey: float = 0.0
    # A fourth box-head class, "other cell", taught on the red cells and platelets a
    # training lab boxes (BCCD, BCD): what a new lab's detector mistakes for white cells
    # is red-cell clusters, which otherwise are only background among glass and debris.
    # The RPN still learns white cells only; a box is scored P(mononuclear) +
    # P(polymorphonuclear) (score "cell" only). It won leaving one lab out (issue #14,
    # experiments/labs_detector_other_cells.py); manifests written before it read False.
    other_cell_class: bool = True

    @classmethod
    def from_dict(cls, data: dict) -> DetectorSpec:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("score", "group")  # manifests written before the choice existed
        known.setdefault("other_cell_class", False)  # ... and before the other-cell class
        for key in ("anchor_sizes", "aspect_ratios", "colour_mean", "colour_std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


def standardise_colour(image: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                       max_gain: float | None = None) -> torch.Tensor:
    """Shift and scale each channel of a (3, H, W) image to the given mean and std
    (the scale capped at `max_gain`, when given)."""
    flat = image.flatten(1)
    own_mean, own_std = flat.mean(1), flat.std(1).clamp(min=1e-3)
    target_mean = torch.tensor(mean, dtype=image.dtype, device=image.device)
    target_std = torch.tensor(std, dtype=image.dtype, device=image.device)
    scale = target_std / own_std
    if max_gain is not None:
        scale = scale.clamp(max=max_gain)
    return (image - own_mean[:, None, None]) * scale[:, None, None] + target_mean[:, None, None]


GLASS_GRID = 64  # the image is sampled on a 64x64 grid to find its glass
GLASS_SHARE = 0.1  # the brightest tenth of those samples is taken for glass


def balance_on_glass(image: torch.Tensor, grey: float) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] with each channel scaled (x0.5-2) so that its glass,
    the mean colour of its brightest tenth, is `grey`. Sampled on a fixed grid with a
    fixed count so that the ONNX graph needs no data-dependent sizes."""
    grid = nn.functional.interpolate(image[None], size=(GLASS_GRID, GLASS_GRID),
                                     mode="bilinear", align_corners=False)[0].flatten(1)
    brightest = grid.mean(0).topk(int(GLASS_GRID * GLASS_GRID * GLASS_SHARE)).indices
    glass = grid[:, brightest].mean(1).clamp(min=1e-3)
    gain = (grey / glass).clamp(0.5, 2.0)
    return (image * gain[:, None, None]).clamp(0.0, 1.0)


class NativeResolutionTransform(GeneralizedRCNNTransform):
    """torchvision's RCNN transform without resizing or mean/std normalisation.

    Images keep their size (scaling is the caller's explicit choice) and are
    only padded to a multiple of 32 for batching; the MobileNet backbone does
    its own input normalisation. With `colour` = (mean, std), each image's colours
    are standardised to those statistics first (per image, before padding); with
    `glass_grey` > 0 each image is white-balanced on its glass (`balance_on_glass`).
    """

    def __init__(self, *args, colour: tuple[Sequence[float], Sequence[float], float] | None
                 = None, glass_grey: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.colour = colour
        self.glass_grey = glass_grey

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if self.glass_grey > 0:
            image = balance_on_glass(image, self.glass_grey)
        if self.colour is None:
            return image
        return standardise_colour(image, *self.colour)

    def resize(self, image, target=None):
        return image, target


def _discard_near(labels: torch.Tensor, boxes: torch.Tensor, ignore: torch.Tensor | None,
                  threshold: float) -> None:
    """Background samples overlapping an ignore box (IoU >= `threshold`, the matcher's own
    background limit) get label -1, which torchvision's samplers leave out of the loss."""
    if ignore is None or not len(ignore) or not len(boxes):
        return
    near = box_iou(boxes, ignore.to(boxes.dtype)).amax(1) >= threshold
    labels[near & (labels == 0)] = -1


def _with_labelled(target: dict, key: str, label: int) -> dict:
    """`target` with its optional boxes under `key` appended to its boxes, as `label`."""
    extra = target.get(key)
    if extra is None or not len(extra):
        return target
    return {**target, "boxes": torch.cat([target["boxes"], extra.to(target["boxes"].dtype)]),
            "labels": torch.cat([target["labels"], target["labels"].new_full((len(extra),),
                                                                            label)])}


def _with_boxes(target: dict, *keys: str) -> dict:
    """`target` with its optional boxes under `keys` appended to its "boxes"."""
    extra = [target[k].to(target["boxes"].dtype) for k in keys
             if target.get(k) is not None and len(target[k])]
    return {**target, "boxes": torch.cat([target["boxes"], *extra])} if extra else target


class IgnoringRPN(RegionProposalNetwork):
    """torchvision's RPN, except that a target's optional "ignore" boxes (white cells whose
    group nobody knows, cells mostly cut off by a training window) and "cells" boxes are
    learnt as cells: the RPN has no groups, and a white cell is never background."""

    def assign_targets_to_anchors(self, anchors, targets):
        return super().assign_targets_to_anchors(
            anchors, [_with_boxes(t, "ignore", "cells") for t in targets])


def cell_aware_loss(class_logits: torch.Tensor, box_regression: torch.Tensor,
                    labels: list[torch.Tensor], regression_targets: list[torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """torchvision's `fastrcnn_loss`, except that a sample of label `CELL_OF_NO_GROUP` (a
    white cell whose group is unknown) is taught as a cell of either group: its loss is
    -log(P(mononuclear) + P(polymorphonuclear)), and its box is regressed by the likelier
    group's head (the box the cell score keeps). With no such sample it is torchvision's
    loss. Other cells (`OTHER_CELL`) are a class like the groups: their boxes are regressed
    too, by a row of the head that inference never reads."""
    labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
    cell = labels == CELL_OF_NO_GROUP
    groups = slice(1, 1 + len(LABEL_OF))
    log_p = torch.log_softmax(class_logits, -1)
    grouped = -log_p[~cell].gather(1, labels[~cell, None]).sum()
    ungrouped = -torch.logsumexp(log_p[cell, groups], 1).sum()
    classifier = (grouped + ungrouped) / max(1, labels.numel())
    head = torch.where(cell, class_logits[:, groups].argmax(1) + 1, labels)
    positive = torch.where(labels > 0)[0]
    box_regression = box_regression.reshape(class_logits.shape[0], -1, 4)
    box = nn.functional.smooth_l1_loss(box_regression[positive, head[positive]],
                                       regression_targets[positive], beta=1 / 9,
                                       reduction="sum") / max(1, labels.numel())
    return {"loss_classifier": classifier, "loss_box_reg": box}


class IgnoringRoIHeads(RoIHeads):
    """torchvision's RoI heads, except that proposals on a target's "ignore" boxes are
    taught neither as a group nor as background, proposals on its "cells" boxes as a
    white cell of either group (`cell_aware_loss`), proposals on its "others" boxes (red
    cells, platelets) as `OTHER_CELL` when the head has that class, sampled as background
    is, and that with `cell_score` (`DetectorSpec.score == "cell"`) a box is scored as a
    white cell, whatever its group."""

    _ignore: list | tuple = ()  # per image, set only inside select_training_samples
    cell_score: bool = False
    other_cells: bool = False  # the head has the OTHER_CELL class

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """torchvision's, or with `cell_score` one box per proposal: scored as a white cell
        (1 - P(background), less P(other cell) when the head has that class), the box and
        label of the likelier group, one class-agnostic NMS."""
        if not self.cell_score:
            return super().postprocess_detections(class_logits, box_regression, proposals,
                                                  image_shapes)
        counts = [p.shape[0] for p in proposals]  # shape, not len: dynamic in the ONNX trace
        # (boxes, groups + 1, 4) even when no proposal is left (then torchvision's decode
        # keeps rank 2, and a trace of it would not gather)
        decoded = self.box_coder.decode(box_regression, proposals).reshape(
            -1, class_logits.shape[-1], 4)
        probabilities = torch.softmax(class_logits, -1)
        groups = slice(1, 1 + len(LABEL_OF))
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, p, shape in zip(decoded.split(counts), probabilities.split(counts),
                                   image_shapes, strict=True):
            labels = p[:, groups].argmax(1) + 1
            # gather, not arange indexing: the ONNX trace keeps the number of boxes dynamic
            boxes = boxes.gather(1, labels[:, None, None].expand(-1, 1, 4)).squeeze(1)
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            scores = 1 - p[:, 0]  # P(a white cell of either group) ...
            if self.other_cells:  # ... which is no other cell either
                scores = scores - p[:, OTHER_CELL]
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.nms(boxes, scores, self.nms_thresh)[: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training and targets and self.other_cells:
            targets = [_with_labelled(t, "others", OTHER_CELL) for t in targets]
        if not (self.training and targets and any(len(t.get("cells", ())) for t in targets)):
            return super().forward(features, proposals, image_shapes, targets)
        targets = [_with_labelled(t, "cells", CELL_OF_NO_GROUP) for t in targets]
        proposals, _, labels, regression_targets = self.select_training_samples(proposals,
                                                                                targets)
        features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(features)
        return [], cell_aware_loss(class_logits, box_regression, labels, regression_targets)

    def select_training_samples(self, proposals, targets):
        self._ignore = [t.get("ignore") for t in targets] if targets else []
        try:
            return super().select_training_samples(proposals, targets)
        finally:
            self._ignore = ()

    def subsample(self, labels):
        """torchvision's, with other cells drawn from the background's share: they are
        hard negatives, not positives crowding out the white cells' quarter."""
        if self.other_cells:
            labels = [torch.where(x == OTHER_CELL, 0, x) for x in labels]
        return super().subsample(labels)

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        for per_image, boxes, ignore in zip(labels, proposals, self._ignore, strict=False):
            _discard_near(per_image, boxes, ignore, self.proposal_matcher.low_threshold)
        return matched, labels


class MobileNetFeatures(nn.Module):
    """MobileNetV1 cut at `stride`, then a 1x1 conv + ReLU to `channels` (FasterRCNN backbone)."""

    def __init__(self, width: float = 0.5, stride: int = 16, channels: int = 128) -> None:
        super().__init__()
        if stride not in _BLOCKS_TO_STRIDE:
            raise ValueError(f"stride must be one of {sorted(_BLOCKS_TO_STRIDE)}, got {stride}")
        self.mobilenet = MobileNetV1(width, relu6=True)
        self.mobilenet.layers = self.mobilenet.layers[: _BLOCKS_TO_STRIDE[stride]]
        del self.mobilenet.pool
        last = self.mobilenet.layers[-1]
        self.reduce = nn.Sequential(nn.Conv2d(last.conv.out_channels, channels, 1),
                                    nn.ReLU(inplace=True))
        self.out_channels = channels
        self.frozen_blocks = 0

    def load_imagenet(self, weights_dir: str | Path | None = None) -> None:
        """ImageNet weights for the kept blocks (the file holds the whole network)."""
        full = MobileNetV1(self.mobilenet.width, relu6=True)
        load_imagenet_backbone(full, weights_dir)
        kept = {k: v for k, v in full.state_dict().items() if k in self.mobilenet.state_dict()}
        self.mobilenet.load_state_dict(kept)

    def freeze_blocks(self, count: int) -> None:
        """Stop training the first `count` conv blocks (their early filters are generic)."""
        self.frozen_blocks = count
        for index, block in enumerate(self.mobilenet.layers):
            block.requires_grad_(index >= count)

    def train(self, mode: bool = True) -> MobileNetFeatures:
        super().train(mode)
        for module in self.mobilenet.modules():  # BN: folded ImageNet statistics, never updated
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last: ~20% faster depthwise/pointwise convolutions on CPU
        x = x.contiguous(memory_format=torch.channels_last)
        return self.reduce(self.mobilenet.feature_map(x)).contiguous()


def build_detector(
    spec: DetectorSpec | None = None,
    *,
    pretrained: bool = True,
    weights_dir: str | Path | None = None,
    frozen_blocks: int = 3,
) -> FasterRCNN:
    """The level-1 Faster R-CNN; `pretrained` fills the backbone with the ImageNet weights.

    `frozen_blocks` first conv blocks of MobileNet are not trained (3: the stem
    and the first depthwise/pointwise pair, at stride 2).
    """
    spec = spec or DetectorSpec()
    backbone = MobileNetFeatures(spec.width, spec.stride, spec.channels)
    if pretrained:
        backbone.load_imagenet(weights_dir)
    backbone.freeze_blocks(frozen_blocks)
    backbone.to(memory_format=torch.channels_last)
    anchors = AnchorGenerator(sizes=(tuple(spec.anchor_sizes),),
                              aspect_ratios=(tuple(spec.aspect_ratios),))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=spec.roi_size,
                                  sampling_ratio=2)
    box_head = TwoMLPHead(spec.channels * spec.roi_size**2, spec.representation)
    model = FasterRCNN(
        backbone,
        min_size=spec.min_size,
        max_size=spec.max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=spec.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=spec.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=spec.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=spec.rpn_post_nms_test,
        rpn_batch_size_per_image=spec.rpn_batch_per_image,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(spec.representation,
                                        len(CLASSES) + spec.other_cell_class),
        box_score_thresh=spec.box_score_thresh,
        box_nms_thresh=spec.box_nms_thresh,
        box_detections_per_img=spec.detections_per_image,
        box_batch_size_per_image=spec.box_batch_per_image,
    )
    # Same modules and settings, with "ignore" boxes honoured in training (no new weights).
    model.rpn.__class__ = IgnoringRPN
    model.roi_heads.__class__ = IgnoringRoIHeads
    if spec.score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {spec.score!r}")
    model.roi_heads.cell_score = spec.score == "cell"
    if spec.other_cell_class and spec.score != "cell":
        raise ValueError("other_cell_class needs score 'cell': torchvision's per-group "
                         "scores would report other cells as a third group")
    model.roi_heads.other_cells = spec.other_cell_class
    if spec.group_classifier:
        classifier = MobileNetClassifier(2, width=spec.width, hidden=spec.group_hidden)
        if pretrained:
            load_imagenet_backbone(classifier.backbone, weights_dir)
        classifier.unfreeze_backbone(train_batchnorm=False)
        model.group_classifier = classifier  # a submodule: saved in the same state dict
    colour = ((spec.colour_mean, spec.colour_std, spec.colour_max_gain)
              if spec.colour_standardise else None)
    model.transform = NativeResolutionTransform(spec.min_size, spec.max_size,
                                                [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], colour=colour,
                                                glass_grey=spec.glass_grey)
    model.spec = spec  # type: ignore[attr-defined]
    return model


def parameter_count(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


__all__ = [
    "CLASSES",
    "GROUP_OF_LABEL",
    "LABEL_OF",
    "SCORES",
    "DetectorSpec",
    "MobileNetFeatures",
    "NativeResolutionTransform",
    "balance_on_glass",
    "build_detector",
    "parameter_count",
    "standardise_colour",
]
