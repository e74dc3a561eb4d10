"""Level-1 detector: builds, trains on real BCCD fields, predicts on any image mode, evaluates."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukodiff.data.crops import cell_batch
from leukodiff.data.records import Box
from leukodiff.data.sources import load_fields
from leukodiff.evaluation.detector import scale_between
from leukodiff.imaging import load_image
from leukodiff.metrics.detection import OPERATING_THRESHOLDS, detection_metrics, match
from leukodiff.models.detector import (
    CELL_OF_NO_GROUP,
    OTHER_CELL,
    DetectorSpec,
    balance_on_glass,
    build_detector,
    cell_aware_loss,
    parameter_count,
    standardise_colour,
)
from leukodiff.models.files import Manifest
from leukodiff.models.io import ModelFileError, load_detector, shipped
from leukodiff.pipeline.analyzer import Analyzer, as_image
from leukodiff.pipeline.boxes import Detections
from leukodiff.pipeline.familiarity import familiarity_path
from leukodiff.taxonomy import Group
from leukodiff.training.detector import (
    Augmenter,
    DetectorConfig,
    DetectorTrainingError,
    FieldImages,
    field_target,
    has_mononuclear,
    lab_statistics,
    pbc_donors,
    prepare_fields,
    rescore_detector,
    retrain_group_classifier,
    train_detector,
    unknown_group_boxes,
)
from leukodiff.training.detector.augmentation import OTHER

LIGHT = DetectorSpec(group_classifier=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bccd(shared_data):
    return sorted(load_fields("bccd", shared_data).records, key=lambda r: r.image.name)


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return build_detector(DetectorSpec(), pretrained=False).eval()


def test_cell_score_is_one_minus_background_whatever_the_group():
    """Three proposals, box regression zero: an uncertain-group cell (0.45 / 0.45 / bg 0.1)
    scores 0.45 per group with torchvision's scoring and 0.9 as a white cell; a box mostly
    background stays low either way; an overlapping twin is suppressed once, not per group."""
    heads = build_detector(replace(LIGHT, score="cell", other_cell_class=False),
                           pretrained=False).roi_heads
    assert heads.cell_score
    proposals = [torch.tensor([[0.0, 0.0, 100.0, 100.0], [300.0, 300.0, 400.0, 400.0],
                               [2.0, 2.0, 100.0, 100.0]])]
    probabilities = torch.tensor([[0.1, 0.45, 0.45], [0.8, 0.05, 0.15], [0.2, 0.5, 0.3]])
    logits, regression = probabilities.log(), torch.zeros(3, 12)
    boxes, scores, labels = heads.postprocess_detections(logits, regression, proposals,
                                                         [(480, 640)])
    assert scores[0].tolist() == pytest.approx([0.9, 0.2])
    assert labels[0].tolist() == [1, 2]  # the likelier group (the first on a tie)
    assert boxes[0].tolist() == [[0.0, 0.0, 100.0, 100.0], [300.0, 300.0, 400.0, 400.0]]
    heads.cell_score = False  # torchvision's: one box per group and its probability
    _, group_scores, _ = heads.postprocess_detections(logits, regression, proposals,
                                                      [(480, 640)])
    assert max(group_scores[0].tolist()) == pytest.approx(0.5)
    assert DetectorSpec.from_dict({}).score == "group"  # manifests from before the choice
    assert not DetectorSpec.from_dict({}).other_cell_class  # ... and the other-cell class
    assert DetectorSpec().other_cell_class  # new detectors have it
    with pytest.raises(ValueError, match="score"):
        build_detector(replace(LIGHT, score="background"), pretrained=False)


@pytest.mark.parametrize("other_cell_class", [False, True])
def test_cell_scored_detector_exports_and_runs_any_field_on_onnxruntime(bccd, tmp_path,
                                                                        other_cell_class):
    """The shipped detector scored as a white cell: the ONNX trace keeps the number of
    proposals and boxes dynamic (a field of another size, another count), and onnxruntime
    finds what torch finds; with and without a fourth, other-cell class, scored P(either
    group) (the shipped head's other-cell row cut off, or one drawn at random added)."""
    import onnxruntime

    from leukodiff.models.export import _export

    if not shipped("detector").exists():
        pytest.skip("no shipped detector")
    model, _ = load_detector("detector")
    model.roi_heads.cell_score = True
    if model.spec.other_cell_class != other_cell_class:
        state = model.state_dict()
        model = build_detector(replace(model.spec, other_cell_class=other_cell_class),
                               pretrained=False).eval()
        torch.manual_seed(0)
        for name, extra in (("cls_score.weight", torch.randn(1, 256) * 0.05),
                            ("cls_score.bias", torch.zeros(1)),
                            ("bbox_pred.weight", torch.zeros(4, 256)),
                            ("bbox_pred.bias", torch.zeros(4))):
            key = f"roi_heads.box_predictor.{name}"
            state[key] = (torch.cat([state[key], extra]) if other_cell_class
                          else state[key][:-len(extra)])
        model.load_state_dict(state)
    path = tmp_path / "cell.onnx"
    _export(model, ([torch.rand(3, 480, 640)],), path, ["image"], ["boxes", "labels", "scores"],
            {"image": {1: "height", 2: "width"}, "boxes": {0: "cells"},
             "labels": {0: "cells"}, "scores": {0: "cells"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = [np.asarray(load_image(r.image), dtype=np.float32).transpose(2, 0, 1) / 255
              for r in bccd[:3]]
    for image in [*pixels, pixels[0][:, 64:416, 96:512]]:
        with torch.no_grad():
            expected = model([torch.from_numpy(np.ascontiguousarray(image))])[0]
        boxes, labels, scores = session.run(None, {"image": np.ascontiguousarray(image)})
        assert len(scores) == len(expected["scores"]) >= 1
        assert np.allclose(scores, expected["scores"].numpy(), atol=1e-3)
        assert (labels == expected["labels"].numpy()).all()
        assert np.allclose(boxes, expected["boxes"].numpy(), atol=0.5)


def test_a_ruined_detector_still_exports_and_finds_nothing(tmp_path):
    """No proposal survives a ruined RPN (NaN weights, as a ruinous fine-tuning leaves):
    traced so, the cell score's graph still runs on onnxruntime, finding nothing."""
    import onnxruntime

    from leukodiff.models.export import _export

    model = build_detector(LIGHT, pretrained=False).eval()
    with torch.no_grad():
        for parameter in model.rpn.parameters():
            parameter.fill_(float("nan"))
    path = tmp_path / "ruined.onnx"
    _export(model, ([torch.rand(3, 480, 640)],), path, ["image"], ["boxes", "labels", "scores"],
            {"image": {1: "height", 2: "width"}, "boxes": {0: "cells"},
             "labels": {0: "cells"}, "scores": {0: "cells"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, _, _ = session.run(None, {"image": np.random.rand(3, 480, 640).astype(np.float32)})
    assert boxes.shape == (0, 4)


def test_light_configuration(untrained):
    # the class measured in the issue: ~2.3M parameters for Faster R-CNN itself
    assert 2.0e6 < parameter_count(build_detector(LIGHT, pretrained=False)) < 2.6e6
    assert parameter_count(untrained.group_classifier) < 1.0e6
    assert untrained.rpn.anchor_generator.sizes == ((64, 128, 256),)


def test_two_training_steps_lower_the_loss_on_real_bccd_fields(bccd, shared_data):
    torch.manual_seed(0)
    model = build_detector(LIGHT)  # ImageNet backbone from the shared TFLite file
    train = [r for r in bccd if r.subset == "train" and all(b.group for b in r.wbc_boxes)]
    fields = [next(r for r in train if has_mononuclear(r)),
              next(r for r in train if not has_mononuclear(r))]
    images = [torch.from_numpy(np.asarray(load_image(r.image)).copy()).permute(2, 0, 1)
              .float().div(255) for r in fields]
    targets = [dict(zip(("boxes", "labels"), field_target(r), strict=True)) for r in fields]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(3):
        torch.manual_seed(1)  # the same anchor/RoI samples each step: only the weights change
        loss = sum(model(images, targets).values())
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[2] < losses[0]


def test_cells_of_unknown_group_are_ignored_and_test_list_is_held_out(shared_data):
    data = prepare_fields(DetectorConfig(), shared_data)
    unknown = [r for r in data.train if any(b.group is None for b in r.wbc_boxes)]
    assert unknown and not data.dropped  # kept, their unknown cells ignored
    sample = Augmenter(DetectorConfig(copy_paste=0), FieldImages(unknown))(0, 0, 1.0)[1]
    assert len(sample["ignore"]) == sum(b.group is None for b in unknown[0].wbc_boxes)
    assert (sample["labels"] > 0).all()
    assert {r.subset for r in data.train} == {"train"} and {r.subset for r in data.val} == {"val"}
    test_list = [f for f in load_fields("bccd", shared_data).records if f.subset == "test"]
    assert [r.image for r in data.test] == [f.image for f in test_list]  # the whole VOC list
    dropping = prepare_fields(DetectorConfig(unknown_group="drop"), shared_data)
    assert [r.image for r in dropping.dropped] == [r.image for r in unknown]
    assert all(b.group is not None for r in dropping.train for b in r.wbc_boxes)
    grouped = prepare_fields(DetectorConfig(validation="grouped"), shared_data)
    assert not {r.image for r in grouped.train} & {r.image for r in grouped.val}
    assert all(r.subset in ("train", "val") for r in grouped.train + grouped.val)


def test_unboxed_cells_of_train_and_val_fields_become_training_boxes(shared_data):
    data = prepare_fields(DetectorConfig(), shared_data)
    by_name = {r.image.stem: r for r in data.train + data.val + data.test}
    assert len(by_name["BloodImage_00133"].wbc_boxes) == 1  # no box in BCCD itself
    assert len(by_name["BloodImage_00242"].wbc_boxes) == 2  # one box in BCCD
    assert len(by_name["BloodImage_00228"].wbc_boxes) == 1  # val
    assert not by_name["BloodImage_00135"].wbc_boxes  # test fields stay as annotated


def test_ignore_boxes_are_cells_for_the_rpn_and_nothing_for_the_roi_heads(untrained):
    cell, unknown = torch.tensor([[20.0, 20, 120, 120]]), torch.tensor([[300.0, 200, 420, 330]])
    target = {"boxes": cell, "labels": torch.tensor([2]), "ignore": unknown}
    anchors = torch.tensor([[20.0, 20, 120, 120], [300, 200, 420, 330], [310, 210, 420, 330],
                            [500, 400, 600, 470]])
    labels, matched = untrained.rpn.assign_targets_to_anchors([anchors], [target])
    assert labels[0].tolist() == [1.0, 1.0, 1.0, 0.0]  # cell, the unknown cell twice, background
    assert matched[0][1].tolist() == unknown[0].tolist()  # regressed towards the unknown cell
    heads = untrained.roi_heads
    heads._ignore = [unknown]
    _, roi_labels = heads.assign_targets_to_proposals([anchors], [cell], [torch.tensor([2])])
    heads._ignore = ()
    assert roi_labels[0].tolist() == [2, -1, -1, 0]
    plain = {"boxes": cell, "labels": torch.tensor([2])}  # without "ignore": torchvision's own
    assert untrained.rpn.assign_targets_to_anchors([anchors], [plain])[0][0].tolist() == [
        1.0, 0.0, 0.0, 0.0]


def test_cells_of_unknown_group_can_be_taught_as_white_cells_of_either_group(shared_data):
    """unknown_group="cell": BCD's boxes reach the box head as "cells" (none of it "ignore"),
    whose loss is -log(1 - P(background)); with no such cell, torchvision's own loss."""
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    bcd = prepare_fields(DetectorConfig(sources=("bcd",), unknown_group="cell"), shared_data)
    field = next(r for r in bcd.train if r.wbc_boxes)
    sample = Augmenter(DetectorConfig(copy_paste=0, unknown_group="cell"),
                       FieldImages([field]))(0, 0, 1.0)[1]  # a 256 px tile: no window cut
    assert len(sample["cells"]) == len(field.wbc_boxes)
    assert not len(sample["ignore"]) and not len(sample["labels"])
    ignoring = Augmenter(DetectorConfig(copy_paste=0), FieldImages([field]))(0, 0, 1.0)[1]
    assert "cells" not in ignoring and len(ignoring["ignore"]) == len(field.wbc_boxes)

    torch.manual_seed(0)
    logits, regression = torch.randn(6, 3), torch.randn(6, 12)
    targets = [torch.randn(3, 4), torch.randn(3, 4)]
    grouped = [torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])]
    ours, theirs = cell_aware_loss(logits, regression, grouped, targets), fastrcnn_loss(
        logits, regression, grouped, targets)
    assert ours["loss_classifier"] == pytest.approx(float(theirs[0]))
    assert ours["loss_box_reg"] == pytest.approx(float(theirs[1]))
    one_cell = [torch.tensor([0, 1, CELL_OF_NO_GROUP]), grouped[1]]
    p = logits.softmax(-1)
    expected = (float(theirs[0]) * 6 + float(torch.log(p[2, 2])) - float(torch.log(1 - p[2, 0])))
    with_cell = cell_aware_loss(logits, regression, one_cell, targets)
    assert with_cell["loss_classifier"] == pytest.approx(expected / 6, rel=1e-5)
    # its box is regressed by the likelier group's head, the box the cell score keeps
    head = int(logits[2, 1:].argmax()) + 1
    boxes = regression.reshape(6, 3, 4)
    rows = [(1, 1), (2, head), (3, 2), (5, 1)]  # labels 0 1 cell 2 0 1: four positives
    expected_box = sum(torch.nn.functional.smooth_l1_loss(
        boxes[i, k], torch.cat(targets)[i], beta=1 / 9, reduction="sum") for i, k in rows) / 6
    assert with_cell["loss_box_reg"] == pytest.approx(float(expected_box), rel=1e-5)


def test_pig_fields_train_the_detector_and_never_select_it(pig_like_root, shared_data):
    import os

    roots = os.pathsep.join([str(shared_data), str(pig_like_root)])
    data = prepare_fields(DetectorConfig(sources=("bcd", "pig")), roots)
    pig = [r for r in data.train if r.source == "pig"]
    assert [r.image.name for r in pig] == ["100_JPG.rf.0a1b2c.jpg"]  # train photos only
    assert all(r.source == "bcd" for r in data.val + data.test)
    assert FieldImages(pig).image(0).shape == (3, 2080, 2080)  # enlarged, as its boxes are
    from leukodiff.training.familiarity import fit_familiarity

    _, report = fit_familiarity(("bcd", "pig"), roots)  # no validation part: no reference
    assert report["sources"] == ["bcd"] and report["left_out"] == ["pig"]


def test_a_white_cell_of_no_group_trains_the_box_head_towards_a_cell():
    """The same field and steps, its white cells given as "cells" or as "ignore": taught as
    cells of no group, the box head ends surer that they are cells than when it ignores
    them, and as sure as when their group is known."""
    image = torch.full((3, 240, 320), 0.85)
    corners = [(x, y) for x in (10, 120, 230) for y in (20, 140)]
    for x, y in corners:  # six dark cells
        image[:, y + 10:y + 70, x + 10:x + 70] = torch.tensor([0.35, 0.2, 0.5])[:, None, None]
    cell = torch.tensor([[x, y, x + 80, y + 80] for x, y in corners], dtype=torch.float32)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}

    def trained(target: dict) -> float:
        torch.manual_seed(0)
        model = build_detector(LIGHT, pretrained=False).train()
        heads = model.roi_heads
        optimiser = torch.optim.SGD(heads.parameters(), lr=0.2)
        for _ in range(6):
            losses = model([image], [target])
            assert all(torch.isfinite(v) for v in losses.values())
            optimiser.zero_grad()
            sum(losses.values()).backward()
            optimiser.step()
        with torch.no_grad():
            features = {"0": model.backbone(model.transform([image])[0].tensors)}
            pooled = heads.box_head(heads.box_roi_pool(features, [cell], [(240, 320)]))
            return 1 - float(heads.box_predictor(pooled)[0].softmax(-1)[:, 0].mean())

    as_cells = trained({**empty, "cells": cell})
    assert as_cells > trained({**empty, "ignore": cell}) + 0.1
    # about as much a cell as when its group is known (0.446 and 0.453 when written)
    assert as_cells == pytest.approx(trained({"boxes": cell, "labels": torch.full((6,), 2)}),
                                     abs=0.05)


def test_other_cells_are_hard_negatives_of_their_own_class_and_never_reported():
    """With the other-cell class, proposals on a red cell are taught as OTHER_CELL but drawn
    from the background's share (the white cells keep their quarter of the samples), and
    a box is scored P(either group): a box the head calls an other cell scores low as a
    white cell however sure it is that the box is no background, and is never reported."""
    spec = replace(LIGHT, other_cell_class=True)
    heads = build_detector(spec, pretrained=False).roi_heads
    white = torch.tensor([[10.0, 20, 90, 100]])
    red = torch.tensor([[x, y, x + 60, y + 60] for x in range(100, 600, 70)
                        for y in (20, 150, 300)], dtype=torch.float32)
    jitter = torch.arange(-12, 13, 4, dtype=torch.float32)
    proposals = torch.stack([b + d for b in (*white, *red) for d in jitter])  # 7 a cell
    target = {"boxes": white, "labels": torch.tensor([1]), "others": red}
    torch.manual_seed(0)
    merged = [{**target, "boxes": torch.cat([white, red]),
               "labels": torch.tensor([1] + [OTHER_CELL] * len(red))}]
    _, _, labels, _ = heads.select_training_samples([proposals], merged)
    labels = labels[0]
    assert int((labels == OTHER_CELL).sum()) > 32  # more than the positives' quarter
    assert 0 < int(((labels == 1) | (labels == 2)).sum()) <= 32
    # scored as a white cell: the head sure of "other cell" gives a low score
    logits = torch.tensor([[0.0, 4.0, 1.0, 0.0],    # a mononuclear white cell
                           [0.0, 1.0, 0.0, 5.0]])   # an other cell
    _, scores, found = heads.postprocess_detections(
        logits, torch.zeros(2, 16), [torch.tensor([[10.0, 10, 90, 90], [200, 200, 280, 280]])],
        [(480, 640)])
    # the other cell: 1 - P(background) 0.99, P(either group) 0.02, under box_score_thresh
    assert len(scores[0]) == 1 and float(scores[0][0]) > 0.9 and found[0].tolist() == [1]
    model = build_detector(spec, pretrained=False).train()  # the whole model takes "others"
    image = torch.rand(3, 480, 640)
    losses = model([image], [{**target, "others": red}])
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="score 'cell'"):
        build_detector(replace(spec, score="group"), pretrained=False)


def test_other_cells_follow_the_augmentation_and_never_become_ignore_boxes(shared_data):
    """BCCD's red cells and platelets come out as "others" when the head has that class,
    inside the field; no white cell is lost to them; a cut one is dropped, never ignored."""
    config = DetectorConfig(max_train_fields=6, copy_paste=1.0, spec=LIGHT)
    assert LIGHT.other_cell_class  # the default
    data = prepare_fields(config, shared_data)
    without_class = replace(config, spec=replace(LIGHT, other_cell_class=False))
    plain, other = (Augmenter(c, FieldImages(data.train)) for c in (without_class, config))
    for index in range(len(data.train)):
        torch.manual_seed(index)
        _, without = plain(index, 1, 0.8)
        torch.manual_seed(index)
        image, target = other(index, 1, 0.8)
        assert "others" not in without and len(target["others"]) > 0
        # the same draws: the white cells and ignore boxes are those made without them
        assert torch.equal(target["boxes"], without["boxes"])
        assert torch.equal(target["ignore"], without["ignore"])
        height, width = image.shape[-2:]
        others = target["others"]
        assert (others[:, 2] <= width).all() and (others[:, 3] <= height).all()
        assert len(others) <= sum(b.kind != "wbc" for b in data.train[index].boxes)
    # a field wider than the window, red cells all along it: cut ones go, none is ignored
    red = torch.tensor([[x, 200.0, x + 90, 290] for x in range(0, 1200, 100)])
    counts = set()
    for seed in range(10):
        torch.manual_seed(seed)
        _, kept, kept_labels = other.cut_window(torch.zeros(3, 480, 1280), red,
                                                torch.full((len(red),), OTHER))
        assert (kept_labels == OTHER).all() and (kept[:, 2] - kept[:, 0] >= 0.6 * 90).all()
        counts.add(len(kept))
    assert max(counts) < len(red)


def test_augmentation_keeps_boxes_inside_and_pastes_mononuclear_cells(shared_data):
    data = prepare_fields(DetectorConfig(max_train_fields=6), shared_data)
    augment = Augmenter(DetectorConfig(copy_paste=1.0), FieldImages(data.train))
    assert augment.donors
    torch.manual_seed(0)
    pasted = 0
    for index in range(len(data.train)):
        for rotation, scale in ((1, 0.8), (2, 1.25)):
            image, target = augment(index, rotation, scale)
            height, width = image.shape[-2:]
            assert image.dtype == torch.float32 and 0 <= float(image.min()) <= 1
            boxes = target["boxes"]
            assert len(boxes) == len(target["labels"])
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
            assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            pasted += int(len(boxes) > len(data.train[index].wbc_boxes))
            if rotation == 1 and scale < 1:  # a quarter turn of 640x480, then 0.8
                assert (height, width) == (512, 384)
    assert pasted > 0


def test_pbc_cells_of_every_type_are_boxed_coloured_and_sized_like_the_field(shared_data):
    config = DetectorConfig(pbc_paste=1.0, pbc_paste_per_type=2, copy_paste=0.0,
                            sources=("bcd",), max_train_fields=4)
    donors = pbc_donors(config, shared_data)
    assert sorted({d.cell_type for d in donors}) == [
        "basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    for donor in donors:  # PBC centres a cell of 100-250 px in 360x363 images
        _, height, width = donor.patch.shape
        assert 60 <= max(height, width) <= 300 and donor.patch.dtype == torch.uint8
    data = prepare_fields(config, shared_data)
    augment = Augmenter(config, FieldImages(data.train), donors)
    torch.manual_seed(0)
    field = augment.images.image(0)
    cells = unknown_group_boxes(data.train[0])  # BCD: every box (its type is unknown)
    image, boxes, labels = augment.paste_pbc(0, field, cells, torch.full((len(cells),), -1))
    assert len(boxes) == len(cells) + 1 and int(labels[-1]) in (1, 2)
    x0, y0, x1, y1 = (round(v) for v in boxes[-1].tolist())
    cell_size = max(b.width for b in data.train[0].wbc_boxes)  # BCD: ~100 px, PBC ~150
    assert 0.4 * cell_size <= max(x1 - x0, y1 - y0) <= 1.6 * cell_size
    for cell in cells.tolist():  # on a free spot
        assert min(x1, cell[2]) <= max(x0, cell[0]) or min(y1, cell[3]) <= max(y0, cell[1])
    outside = image.clone()
    outside[:, y0:y1, x0:x1] = field[:, y0:y1, x0:x1]
    assert torch.equal(outside, field) and not torch.equal(image, field)
    # the pasted cell takes the field's look: its colours nearer the field's than PBC's
    lab_of = lab_statistics(image[:, y0:y1, x0:x1].permute(1, 2, 0).numpy(), step=1)[0]
    field_lab = lab_statistics(field.permute(1, 2, 0).numpy())[0]
    pbc_lab = np.mean([d.lab_mean for d in donors], axis=0)
    assert abs(lab_of[2] - field_lab[2]) < abs(lab_of[2] - pbc_lab[2])  # BCD is bluer


def test_large_fields_train_as_native_windows_around_their_cells():
    augment = Augmenter(DetectorConfig(window_on_cell=1.0), FieldImages([]))
    image = torch.zeros(3, 900, 1440, dtype=torch.uint8)
    cell = torch.tensor([[1000.0, 600, 1150, 760]])
    torch.manual_seed(0)
    for _ in range(20):
        window, boxes, labels = augment.cut_window(image, cell, torch.tensor([2]))
        assert tuple(window.shape) == (3, 480, 640)
        assert labels.tolist() == [2]  # always the whole cell, somewhere in the window
        assert torch.allclose(boxes[0, 2:] - boxes[0, :2], torch.tensor([150.0, 160.0]))
    # two cells 1000 px apart: whichever is chosen, the other is out (or cut: ignored)
    pair = torch.tensor([[100.0, 100, 250, 250], [1200.0, 600, 1350, 750]])
    seen = set()
    for _ in range(20):
        _, boxes, labels = augment.cut_window(image, pair, torch.tensor([1, 2]))
        assert (labels > 0).sum() == 1 and len(boxes) == 1
        seen.add(int(labels[0]))
    assert seen == {1, 2}
    # anywhere: a cell at least 60% inside keeps its label, 25-60% is ignored (-1), less
    # is left out; cells always start at x = 0, 100, ... so windows cut them every way
    anywhere = Augmenter(DetectorConfig(window_on_cell=0.0), FieldImages([]))
    row = torch.tensor([[x, 300.0, x + 150, 450] for x in range(0, 1300, 100)])
    strip = image[:, :480]  # as tall as a window: only x cuts
    kinds = set()
    for _ in range(30):
        _, boxes, labels = anywhere.cut_window(strip, row, torch.full((len(row),), 2))
        widths = (boxes[:, 2] - boxes[:, 0]) / 150
        assert ((widths >= 0.6) == (labels == 2)).all() and (widths >= 0.25).all()
        kinds |= set(labels.tolist())
    assert kinds == {2, -1}
    small = image[:, :480, :640]  # a field of the native size is left as it is
    assert anywhere.cut_window(small, row[:3], torch.tensor([2, 2, 2]))[2].tolist() == [2] * 3


def _no_wbc_field(bccd):
    return next(r for r in bccd if not r.wbc_boxes)


def test_a_detector_in_memory_runs_the_pipelines_detection_on_any_image_mode(untrained, bccd):
    empty = _no_wbc_field(bccd)
    rgb = load_image(empty.image)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    inputs = [rgb, rgb.convert("L"), rgba, np.asarray(rgb),
              Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)]
    before = {k: v.clone() for k, v in untrained.state_dict().items()}
    with Analyzer.of_detector(untrained) as analyzer:
        assert not analyzer.classifiers  # level 1 only
        for image in inputs:
            found = analyzer.detect(analyzer.check(as_image(image)))
            assert found.boxes.shape[1] == 4 and len(found.boxes) == len(found.labels)
            assert set(found.labels.tolist()) <= {1, 2}
            assert (found.boxes[:, 2] <= rgb.width + 1e-3).all()
            assert (found.boxes[:, 3] <= rgb.height + 1e-3).all()
            assert all(isinstance(g, Group) for g in found.groups)
        with pytest.raises(ValueError, match="no level-2 model"):
            analyzer.classify(rgb, Detections.of([[0, 0, 90, 90]], [2], [0.9]))
    after = untrained.state_dict()  # trainable as it was: no BatchNorm folded into it
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cell_crops_are_square_even_for_tiny_boxes():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8))
    boxes = [Box(260, 177, 491, 376), Box(0, 0, 90, 120), Box(600, 300, 640, 480),
             Box(10, 10, 10.01, 10.01)]
    crops = cell_batch(image, boxes, 2.6, 128)
    assert crops.shape == (4, 3, 128, 128) and crops.dtype == np.float32
    assert crops.min() >= 0.0 and crops.max() <= 1.0


def test_colour_standardisation_gives_the_reference_statistics():
    image = torch.rand(3, 50, 60) * 0.3 + 0.2
    out = standardise_colour(image, (0.7, 0.6, 0.65), (0.05, 0.1, 0.08))
    assert torch.allclose(out.flatten(1).mean(1), torch.tensor([0.7, 0.6, 0.65]), atol=1e-4)
    assert torch.allclose(out.flatten(1).std(1), torch.tensor([0.05, 0.1, 0.08]), atol=1e-4)


def test_glass_white_balance_makes_a_cast_glass_grey_and_keeps_the_cells_order():
    """A pink-cast field (glass 0.72 / 0.56 / 0.64, Chula's) with a dark cell: its glass
    becomes grey 0.8, whatever share of the field the cell covers, and the cell stays
    darker than the glass."""
    for radius in (5, 20):
        image = torch.tensor([0.72, 0.56, 0.64])[:, None, None].repeat(1, 90, 120)
        yy, xx = torch.meshgrid(torch.arange(90), torch.arange(120), indexing="ij")
        cell = (yy - 45) ** 2 + (xx - 60) ** 2 < radius ** 2
        image[:, cell] = torch.tensor([0.35, 0.25, 0.45])[:, None]
        out = balance_on_glass(image, 0.8)
        assert torch.allclose(out[:, 0, 0], torch.tensor([0.8, 0.8, 0.8]), atol=1e-4)
        assert (out[:, 45, 60] < out[:, 0, 0]).all()
    dark = torch.full((3, 40, 40), 0.05)  # no glass at all: the gain stops at 2x
    assert torch.allclose(balance_on_glass(dark, 0.8), torch.full((3, 40, 40), 0.1))


def test_glass_balanced_detector_runs_alike_on_onnxruntime(bccd, tmp_path):
    """The white balance is inside the network: the ONNX graph balances a field of any
    size as torch does."""
    import onnxruntime

    from leukodiff.models.export import _export

    if not shipped("detector").exists():
        pytest.skip("no shipped detector")
    model, _ = load_detector("detector")
    model.transform.glass_grey = 0.8
    path = tmp_path / "glass.onnx"
    _export(model, ([torch.rand(3, 480, 640)],), path, ["image"], ["boxes", "labels", "scores"],
            {"image": {1: "height", 2: "width"}, "boxes": {0: "cells"},
             "labels": {0: "cells"}, "scores": {0: "cells"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = np.asarray(load_image(bccd[0].image), dtype=np.float32).transpose(2, 0, 1) / 255
    pink = pixels * np.array([1.0, 0.7, 0.8], dtype=np.float32)[:, None, None]
    for image in (pink, pixels[:, 64:416, 96:512]):
        image = np.ascontiguousarray(image)
        with torch.no_grad():
            expected = model([torch.from_numpy(image)])[0]
        boxes, labels, scores = session.run(None, {"image": image})
        assert len(scores) == len(expected["scores"])
        assert np.allclose(scores, expected["scores"].numpy(), atol=1e-3)
        assert (labels == expected["labels"].numpy()).all()
        assert np.allclose(boxes, expected["boxes"].numpy(), atol=0.5)


def test_detection_metrics_perfect_wrong_and_missing(bccd):
    with_cells = [r for r in bccd if r.subset == "test" and r.wbc_boxes]
    fields = [*with_cells[:6], _no_wbc_field(bccd)]
    label = {Group.MONONUCLEAR: 1, Group.POLYMORPHONUCLEAR: 2}

    def truth(flip: bool = False) -> list[Detections]:
        out = []
        for r in fields:
            labels = [label[b.group] for b in r.wbc_boxes]
            if flip:
                labels = [3 - x for x in labels]
            out.append(Detections.of([b.xyxy for b in r.wbc_boxes], labels,
                                     [0.9] * len(labels)))
        return out

    perfect = detection_metrics(truth(), fields)
    assert perfect["wbc"]["ap50"] == pytest.approx(1.0) and perfect["wbc"]["recall"] == 1.0
    assert perfect["matched"]["group_accuracy"] == 1.0 and perfect["wbc"]["false"] == 0
    wrong = detection_metrics(truth(flip=True), fields)
    assert wrong["wbc"]["ap50"] == pytest.approx(1.0) and wrong["matched"]["group_accuracy"] == 0
    empty = [Detections.empty() for _ in fields]
    missing = detection_metrics(empty, fields)
    assert missing["wbc"]["recall"] == 0.0 and missing["wbc"]["found"] == 0
    boxes = np.array([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    assert match(boxes, np.array([0.2, 0.9]), boxes[:1]) == [(1, 0)]


def test_unboxed_white_cells_are_ignored_not_counted_false(bccd):
    from leukodiff.data.sources.unboxed import unboxed_white_cells

    unboxed = unboxed_white_cells("bccd")
    by_name = {r.image.stem: r for r in bccd}
    assert unboxed and set(unboxed) <= set(by_name)  # the reviewed list names BCCD fields
    # every BCCD field without a white-cell box is listed: labels.csv names a cell there
    assert {n for n, r in by_name.items() if not r.wbc_boxes} <= set(unboxed)
    fields = [by_name["BloodImage_00135"], by_name["BloodImage_00041"]]
    region = unboxed["BloodImage_00135"][0]
    inside = Box(region.x0 + 5, region.y0 + 5, region.x1 - 5, region.y1 - 5)
    truth = fields[1].wbc_boxes[0]
    found = [Detections.of([inside.xyxy], [2], [0.99]),
             Detections.of([truth.xyxy], [2], [0.9])]
    official = detection_metrics(found, fields)["wbc"]
    assert official["false"] == 1 and official["ap50"] < 1.0
    fair = detection_metrics(found, fields, ignore=unboxed)["wbc"]
    assert fair["false"] == 0 and fair["ignored"] == 1 and fair["ap50"] == pytest.approx(1.0)
    assert fair["recall"] == 1.0 and fair["truth"] == 1  # an ignore region is no target
    # a nucleus-sized box inside a region is ignored too (its own area counts, not IoU) ...
    ruptured = unboxed["BloodImage_00171"][0]  # a basophil: polymorphonuclear
    nucleus = (ruptured.x0 + 40, ruptured.y0 + 40, ruptured.x0 + 100, ruptured.y0 + 100)
    one = [Detections.of([nucleus], [2], [0.99])]
    small = detection_metrics(one, [by_name["BloodImage_00171"]], ignore=unboxed)
    assert small["wbc"]["false"] == 0 and small["wbc"]["ignored"] == 1
    # ... but calling it mononuclear is a mononuclear false positive for per-group AP
    as_mono = [Detections.of([nucleus], [1], [0.99]),
               Detections.of([truth.xyxy], [2], [0.9])]
    pair = [by_name["BloodImage_00171"], fields[1]]
    groups = detection_metrics(as_mono, pair, ignore=unboxed)["groups"]["ap50"]
    assert groups["polymorphonuclear"] == pytest.approx(1.0)
    assert groups["mononuclear"] in (None, 0.0)  # no mononuclear truth: only a false call


def test_bcd_scale_from_red_cell_sizes(bccd, shared_data):
    tiles = load_fields("bcd", shared_data).records
    assert 1.6 < scale_between([r for r in bccd if r.subset == "train"], tiles) < 2.4


def test_weight_averaged_detector_is_the_mean_of_its_last_epochs_across_a_resume(
        tmp_path, shared_data):
    """`average_last`: the detector written is the mean of its weights after each of its
    last epochs; a run stopped after the first and resumed averages each epoch once."""
    config = DetectorConfig(spec=replace(LIGHT, group_classifier=False), epochs=2,
                            batch_size=2, max_train_fields=2, max_val_fields=2,
                            warmup_steps=1, mono_oversample=1, average_last=2)
    data = prepare_fields(config, shared_data)
    data = replace(data, test=data.test[:1])
    train_detector(config, tmp_path, data_root=shared_data, data=data, time_limit_minutes=0.0)
    first = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    manifest = train_detector(config, tmp_path, data_root=shared_data, data=data, resume=True)
    assert manifest["training"]["averaged_epochs"] == [1, 2]
    second = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    model, _ = load_detector(tmp_path / "detector.pt")
    written = model.state_dict()
    trained = [k for k in first if first[k].is_floating_point()
               and not torch.equal(first[k], second[k])]
    assert trained  # the epochs moved the weights
    for key in trained:
        assert torch.allclose(written[key], (first[key] + second[key]) / 2, atol=1e-6), key
    with pytest.raises(DetectorTrainingError, match="average_last"):
        DetectorConfig(epochs=2, average_last=3).check()
    # a stopped run whose average is gone is refused, not averaged anew from what is left
    again = tmp_path / "again"
    train_detector(config, again, data_root=shared_data, data=data, time_limit_minutes=0.0)
    (again / "average.pt").unlink()
    with pytest.raises(DetectorTrainingError, match=r"mean of epochs \[1\]"):
        train_detector(config, again, data_root=shared_data, data=data, resume=True)


def test_training_checkpoints_resumes_and_refuses_to_overwrite(tmp_path, shared_data):
    # scored by group (the shipped detector's first scoring): rescored at the end
    config = DetectorConfig(spec=DetectorSpec(rpn_post_nms_test=50, score="group",
                                                  other_cell_class=False), epochs=2,
                            batch_size=2,
                            max_train_fields=2, max_val_fields=2, val_every=1, warmup_steps=1,
                            group_epochs=1, group_pbc_per_type=0, group_bccd_repeat=1,
                            mono_oversample=1)
    data = prepare_fields(config, shared_data)
    data = replace(data, test=data.test[:2])
    first = train_detector(config, tmp_path, data_root=shared_data, data=data,
                           time_limit_minutes=0.0)
    assert first == {"finished": False, "epoch": 1, "best_epoch": 1}
    with pytest.raises(DetectorTrainingError, match="resume"):
        train_detector(config, tmp_path, data_root=shared_data, data=data)
    with pytest.raises(DetectorTrainingError, match="another configuration"):
        train_detector(replace(config, lr=1.0), tmp_path, data_root=shared_data, data=data,
                       resume=True)
    manifest = train_detector(config, tmp_path, data_root=shared_data, data=data, resume=True)
    assert [h["epoch"] for h in manifest["training"]["history"]] == [1, 2]
    assert manifest["training"]["operating_point"] is None  # group score: the spec's 0.5
    assert manifest["training"]["group_classifier"]["cells"]["pbc"] == 0
    assert (tmp_path / "detector.pt").stat().st_size < 15e6
    reference = familiarity_path(tmp_path / "detector.pt")  # the look reference, as
    reference.write_text('{"stand-in": true}')  # `train familiarity` writes it
    model, loaded = load_detector(tmp_path / "detector.pt")
    assert loaded.sha256 == manifest["sha256"] and model.spec.rpn_post_nms_test == 50
    with pytest.raises(DetectorTrainingError, match="finished"):
        train_detector(config, tmp_path, data_root=shared_data, data=data, resume=True)
    # fine-tuning it into a head with a class more is refused before any field is read
    other = replace(config, init_weights=str(tmp_path / "detector.pt"),
                    spec=replace(config.spec, other_cell_class=True, score="cell"))
    with pytest.raises(DetectorTrainingError, match=r"without the other-cell class.*"
                       r"--no-other-cells"):
        train_detector(other, tmp_path / "fine-tuned", data_root=shared_data)
    assert not (tmp_path / "fine-tuned").exists()

    # the group classifier alone, trained again with stain normalisation: boxes unchanged
    again = retrain_group_classifier(tmp_path / "detector.pt", tmp_path / "group",
                                     augmentation="lab", stain="reinhard",
                                     data_root=shared_data)
    assert again["architecture"]["group_stain"] == "reinhard"
    assert again["training"]["group_augmentation"] == "lab"
    assert again["training"]["group_retrained_from"]["sha256"] == manifest["sha256"]
    assert Manifest.from_dict(again).group().input.stain == "reinhard"
    assert familiarity_path(tmp_path / "group" / "detector.pt").read_text() == \
        reference.read_text()  # same training labs: same reference
    retrained, _ = load_detector(tmp_path / "group" / "detector.pt")
    assert retrained.spec.group_stain == "reinhard"
    before, after = model.state_dict(), retrained.state_dict()
    group = [k for k in before if k.startswith("group_classifier.")]
    assert all(torch.equal(before[k], after[k]) for k in before if k not in group)
    assert not all(torch.equal(before[k], after[k]) for k in group)
    with pytest.raises(DetectorTrainingError, match="already holds"):
        retrain_group_classifier(tmp_path / "detector.pt", tmp_path / "group",
                                 augmentation="lab", stain="none", data_root=shared_data)
    with pytest.raises(DetectorTrainingError, match="unknown stain"):
        retrain_group_classifier(tmp_path / "detector.pt", tmp_path / "other",
                                 augmentation="lab", stain="macenko", data_root=shared_data)

    # scored 1 - P(background): same weights, threshold the validation F1's best
    cell = rescore_detector(tmp_path / "detector.pt", tmp_path / "cell", data_root=shared_data)
    point = cell["training"]["operating_point"]
    assert cell["architecture"]["score"] == "cell" and point["score"] == "cell"
    assert cell["architecture"]["score_threshold"] == point["threshold"]
    assert point["threshold"] in OPERATING_THRESHOLDS
    assert point["val_f1"][str(point["threshold"])] == max(point["val_f1"].values())
    assert cell["training"]["rescored_from"]["sha256"] == manifest["sha256"]
    assert familiarity_path(tmp_path / "cell" / "detector.pt").read_text() == \
        reference.read_text()
    rescored, _ = load_detector(tmp_path / "cell" / "detector.pt")
    assert rescored.roi_heads.cell_score and rescored.spec.score_threshold == point["threshold"]
    assert all(torch.equal(v, rescored.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(DetectorTrainingError, match="already scored"):
        rescore_detector(tmp_path / "cell" / "detector.pt", tmp_path / "again",
                         data_root=shared_data)
    # its group classifier trained again: the operating threshold stays the chosen one
    regrouped = retrain_group_classifier(tmp_path / "cell" / "detector.pt",
                                         tmp_path / "cell-group", augmentation="basic",
                                         stain="none", data_root=shared_data)
    assert regrouped["architecture"]["score_threshold"] == point["threshold"]
    assert load_detector(tmp_path / "cell-group" / "detector.pt")[0].spec.score_threshold \
        == point["threshold"]


def test_altered_detector_file_is_refused(tmp_path):
    source = shipped("detector")
    if not source.exists():
        pytest.skip("no shipped detector")
    shutil.copy(source, tmp_path / "detector.pt")
    manifest = json.loads(source.with_suffix(".json").read_text())
    manifest["sha256"] = "0" * 64
    (tmp_path / "detector.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="sha256"):
        load_detector(tmp_path / "detector.pt")


def test_shipped_detector_on_bccd_test_fields(bccd):
    if not shipped("detector").exists():
        pytest.skip("no shipped detector")
    model, manifest = load_detector("detector")
    assert manifest.classes == ("background", "mononuclear", "polymorphonuclear")
    # a fixed subset of the VOC test list: the first 16 fields with a white-cell box and
    # every mononuclear one
    test = [r for r in bccd if r.subset == "test" and r.wbc_boxes]
    subset = test[:16] + [r for r in test[16:] if has_mononuclear(r)]
    with Analyzer.of_detector(model) as analyzer:
        found = [analyzer.detect(load_image(r.image)) for r in subset]
    metrics = detection_metrics(found, subset, score_threshold=model.spec.score_threshold)
    assert metrics["wbc"]["ap50"] >= 0.95
    assert metrics["wbc"]["recall"] >= 0.95
    assert metrics["matched"]["group_accuracy"] >= 0.9
    assert metrics["matched"]["mononuclear_recall"] >= 0.8
    # the model in memory (training validates so) counts as the shipped files on onnxruntime
    with Analyzer.load(backend="onnx", detection_threshold=0.0) as shipped_pipeline:
        onnx = [shipped_pipeline.detect(load_image(r.image)) for r in subset]
    same = detection_metrics(onnx, subset, score_threshold=model.spec.score_threshold)
    assert [same["wbc"][k] for k in ("found", "false", "truth")] == \
        [metrics["wbc"][k] for k in ("found", "false", "truth")]
    assert same["matched"]["confusion"] == metrics["matched"]["confusion"]
    assert same["wbc"]["ap50"] == pytest.approx(metrics["wbc"]["ap50"], abs=0.005)


def test_shipped_detector_on_bcd_tiles_from_another_lab(shared_data):
    """Floor on BCD's first 40 tiles at native size and colours, as `analyze` sees them,
    at the shipped operating threshold (0.95): recall 0.79, precision 1.00; all 100: 0.89,
    0.99 (the detector before the other-cell class, at its 0.85: 0.90, 0.97; 0.96, 0.97)."""
    if not shipped("detector").exists():
        pytest.skip("no shipped detector")
    model, _ = load_detector("detector")
    tiles = sorted(load_fields("bcd", shared_data).records, key=lambda r: r.image.name)[:40]
    with Analyzer.of_detector(model) as analyzer:
        found = [analyzer.detect(load_image(r.image)) for r in tiles]
    metrics = detection_metrics(found, tiles, score_threshold=model.spec.score_threshold)
    assert metrics["wbc"]["truth"] >= 35
    assert metrics["wbc"]["recall"] >= 0.75 and metrics["wbc"]["precision"] >= 0.95


def test_group_cross_validation_folds_partition_bccd_fields_by_field(shared_data):
    from leukodiff.evaluation.groups import field_folds, group_figures
    from leukodiff.training.detector import group_cells

    records = [r for r in load_fields("bccd", shared_data).records if group_cells([r])[0]]
    folds = field_folds(records, 5, seed=0)
    tested = [r.image.name for _, test in folds for r in test]
    assert sorted(tested) == sorted(r.image.name for r in records)  # each field tested once
    for train, test in folds:
        assert not {r.image.name for r in train} & {r.image.name for r in test}
        assert any(has_mononuclear(r) for r in test)  # stratified: mononuclear cells in each
    figures = group_figures([0, 0, 1, 1, 1], [0, 1, 1, 1, 0])
    assert figures.accuracy == 0.6 and figures.mononuclear_recall == 0.5
    assert figures.polymorphonuclear_recall == 2 / 3 and figures.mononuclear == 2


def test_docs_group_cv_json_reads_as_the_record_and_writes_back_the_same():
    from leukodiff.metrics.heldout import GroupCrossValidation
    from leukodiff.metrics.records import from_plain

    stored = json.loads((Path(__file__).resolve().parents[1] / "docs" / "group_cv.json")
                        .read_text())
    record = from_plain(GroupCrossValidation, stored)
    assert record.to_dict() == stored
    assert record.pooled.cells == sum(fold.cells for fold in record.folds)


def test_evaluate_detector_returns_its_record_and_writes_the_same_json(shared_data, tmp_path):
    from leukodiff.evaluation.detector import evaluate_detector
    from leukodiff.metrics.heldout import DetectorEvaluation

    results = evaluate_detector("detector", data_root=shared_data, out_dir=tmp_path,
                                max_fields=3, examples=2, scale_sweep=(1.0,))
    assert isinstance(results, DetectorEvaluation) and results.backend == "onnx"
    assert results.bccd_test["fields"] == 3 and results.ms_per_field.n == 3
    assert results.bcd is not None and results.bcd.scale == 1.0
    assert "x1" in results.bcd.sweep and len(results.bcd.per_image) == 3
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert list(written) == ["model", "backend", "model_sha256", "bccd_test",
                             "bccd_test_unboxed_ignored", "bccd_test_fields_with_a_wbc_box",
                             "ms_per_field", "bcd", "pictures"]
    assert written == json.loads(json.dumps(results.to_dict()))
    assert set(written["bcd"]["sweep"]["x1"]) == {"ap50", "recall", "precision", "found",
                                                  "false", "truth"}
    assert len(results.pictures) == 3  # 2 BCCD fields, 1 BCD tile (errors first)
    assert all((tmp_path / name).is_file() for name in results.pictures)


def test_shipped_detector_floor_on_the_whole_bccd_test_list(shared_data):
    """The home floor of issue #14 on all 72 VOC test fields through onnxruntime, counted
    as the leave-one-lab-out table counts (BCCD's reviewed unboxed white cells ignored):
    AP50 0.997, recall 1.000, precision 0.973 at the shipped operating threshold (0.95;
    the detector before the other-cell class: 0.999, 1.000, 0.959 at its 0.85). As
    annotated, AP50 0.9795: issue #14's 0.98 missed by 0.0005 (before: 0.981)."""
    from leukodiff.data.sources.unboxed import unboxed_white_cells
    from leukodiff.metrics.detection import detection_scores
    from leukodiff.training.adapt_detector import detect_fields

    test = [f for f in load_fields("bccd", shared_data).records if f.subset == "test"]
    found = detect_fields("detector", test)
    threshold = load_detector("detector")[1].score_threshold
    scores = detection_scores(found, test, threshold, unboxed_white_cells("bccd"))
    assert scores["fields"] == len(test)  # every field of the list, every boxed cell
    assert scores["truth"] == sum(len(f.wbc_boxes) for f in test)
    assert scores["ap50"] >= 0.99 and scores["recall"] >= 0.98 and scores["precision"] >= 0.94
    assert detection_scores(found, test, threshold)["ap50"] >= 0.975  # #14's home: 0.98
