"""`leukodiff adapt --fields`: a lab's reviewed fields fine-tune the detector, safely.

BCCD fields stand in for a lab's reviewed fields and the shipped detector for the base;
one epoch on a dozen fields: the mechanics, not the figures."""

import json
import shutil
from dataclasses import replace

import pytest

from leukodiff.data.sources import load_fields
from leukodiff.metrics.detection import best_threshold, detection_scores
from leukodiff.models.io import load_detector, sha256_of, shipped
from leukodiff.pipeline.analyzer import Analyzer
from leukodiff.pipeline.familiarity import Familiarity, familiarity_path
from leukodiff.training.adapt import AdaptRefused
from leukodiff.training.adapt_detector import (
    DetectorAdaptConfig,
    DetectorAdaptError,
    adapt_detector,
)
from leukodiff.training.detector import DetectorTrainingError

QUICK = DetectorAdaptConfig(epochs=1, min_replay=4, replay_per_field=0.5, min_fields=4,
                            group_epochs=1, group_pbc_per_type=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lab_fields(shared_data):
    """18 BCCD test fields with white cells (the base detector never trained on them)."""
    fields = sorted((f for f in load_fields("bccd", shared_data).records
                     if f.subset == "test" and f.wbc_boxes), key=lambda f: f.image.name)
    return fields[:18]


def test_adapted_detector_is_written_with_its_before_and_after(lab_fields, tmp_path,
                                                               shared_data):
    learn, held = lab_fields[:12], lab_fields[12:]
    result = adapt_detector(learn, tmp_path / "set", QUICK, held=held, force=True,
                            data_root=shared_data)
    assert result["fields"]["learn"] + result["fields"]["choose"] == 12
    assert result["fields"]["held_out"] == 6 and result["fields"]["replay"] >= 4
    for name in ("before", "after"):
        scores = result[name]
        assert scores["fields"] == 6 and scores["truth"] >= 6
        assert 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1
        assert 0 <= scores["group_accuracy"] <= 1
    _, manifest = load_detector(tmp_path / "set" / "detector.pt")
    adapted = manifest.provenance.adapted
    group = manifest.training.settings["group_classifier"]  # its epoch 0 (as it came) competed
    assert group["history"][0]["epoch"] == 0 and 0 <= group["best_epoch"] <= QUICK.group_epochs
    assert adapted["base"]["sha256"] == sha256_of(shipped("detector"))
    assert adapted["fields"] == result["fields"] and adapted["forced"] in (True, False)
    assert manifest.score_threshold == result["threshold"]
    assert sha256_of(shipped("detector")) == adapted["base"]["sha256"]  # base untouched
    # the adapted set runs through the shipped code path, its threshold with it
    with Analyzer.load(tmp_path / "set" / "detector.pt", backend="onnx") as analyzer:
        assert analyzer.detection_threshold == result["threshold"]
        assert len(analyzer(lab_fields[0].image).cells) >= 1
    # the lab's look joins the familiarity reference: its fields are no longer "unlike"
    base_look = Familiarity.load(familiarity_path(shipped("detector")))
    look = Familiarity.load(familiarity_path(tmp_path / "set" / "detector.pt"))
    assert len(look.labs) == len(base_look.labs) + 1 and look.threshold == base_look.threshold
    with pytest.raises(DetectorAdaptError, match="already holds"):
        adapt_detector(learn, tmp_path / "set", QUICK, held=held, data_root=shared_data)


def test_a_ruinous_adaptation_is_refused_and_nothing_written(lab_fields, tmp_path,
                                                             shared_data):
    ruinous = replace(QUICK, lr=1.0, frozen_blocks=0)
    with pytest.raises(AdaptRefused, match="worse on the lab's held-out fields") as refused:
        adapt_detector(lab_fields[:12], tmp_path / "bad", ruinous, held=lab_fields[12:],
                       data_root=shared_data)
    detector = refused.value.results["detector"]
    assert detector["after"]["f1"] < detector["before"]["f1"]
    assert not (tmp_path / "bad" / "detector.pt").exists()


def test_too_few_fields_and_no_held_out_part_are_refused_with_counts(lab_fields, tmp_path,
                                                                     shared_data):
    with pytest.raises(DetectorAdaptError, match="3 reviewed field"):
        adapt_detector(lab_fields[:3], tmp_path / "few", QUICK, held=lab_fields[12:],
                       data_root=shared_data)
    one_case = [replace(f, group_key="one case") for f in lab_fields]
    with pytest.raises(DetectorAdaptError, match="single case"):
        adapt_detector(one_case, tmp_path / "one", QUICK, data_root=shared_data)


def test_threshold_is_the_f1_best_on_the_fields_given(lab_fields):
    """Detections made up from the truth: every cell found at 0.9, a false cell per field
    at 0.45; any threshold above 0.45 is perfect, the one nearest 0.5 is chosen."""
    import torch

    detections = []
    for record in lab_fields:
        truth = torch.tensor([b.xyxy for b in record.wbc_boxes], dtype=torch.float32)
        false = torch.tensor([[0.0, 0.0, 30.0, 30.0]])
        boxes = torch.cat([truth, false])
        detections.append((boxes, torch.ones(len(boxes), dtype=torch.int64),
                           torch.tensor([0.9] * len(truth) + [0.45])))
    assert best_threshold(detections, lab_fields, default=0.5) == 0.5
    assert best_threshold(detections, lab_fields, default=0.8) == 0.8
    low = detection_scores(detections, lab_fields, 0.4)
    assert low["false"] == len(lab_fields) and low["recall"] == 1.0 and low["precision"] < 1



def test_f1_grid_is_detection_scores_f1_at_each_threshold(lab_fields):
    """The threshold search's matching-only F1 equals the full metrics' F1 at every
    threshold: truth cells at scores spread over the grid, shifted boxes that miss
    (IoU < 0.5), false cells, one of them inside an ignore region."""
    import numpy as np

    from leukodiff.data.records import Box
    from leukodiff.metrics.detection import OPERATING_THRESHOLDS, f1_by_threshold

    rng = np.random.default_rng(0)
    detections, ignore = [], {}
    for i, record in enumerate(lab_fields):
        truth = np.array([b.xyxy for b in record.wbc_boxes], dtype=np.float32)
        shifted = truth + np.array([60, 0, 60, 0], dtype=np.float32)  # misses its cell
        false = np.array([[0, 0, 30, 30], [300, 300, 340, 340]], dtype=np.float32)
        boxes = np.concatenate([truth, shifted, false])
        scores = rng.uniform(0.3, 1.0, len(boxes)).astype(np.float32)
        detections.append((boxes, np.ones(len(boxes), dtype=np.int64), scores))
        if i % 2:
            ignore[record.image.stem] = [Box(295, 295, 345, 345)]
    grid = f1_by_threshold(detections, lab_fields, ignore)
    assert list(grid) == list(OPERATING_THRESHOLDS)
    for t, f1 in grid.items():
        assert f1 == round(detection_scores(detections, lab_fields, t, ignore)["f1"], 4)
    assert len(set(grid.values())) > 5  # the scores spread: F1 moves with the threshold

def test_adapt_command_adapts_the_detector_from_a_voc_folder(lab_fields, tmp_path):
    """The CLI path a lab takes: reviewed fields as `export-training` writes them
    (fields/Annotations + fields/JPEGImages), base detector shipped."""
    from typer.testing import CliRunner

    from leukodiff.cli import app

    voc = tmp_path / "fields"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    bccd_voc = lab_fields[0].image.parent.parent
    for i, record in enumerate(lab_fields[:10]):
        case = f"CASE{i % 5}-field{i}"
        xml = (bccd_voc / "Annotations" / f"{record.image.stem}.xml").read_text()
        (voc / "Annotations" / f"{case}.xml").write_text(
            xml.replace(record.image.name, f"{case}.jpg"))
        shutil.copy(record.image, voc / "JPEGImages" / f"{case}.jpg")
    out = tmp_path / "cli-set"
    quick = ["--detector-epochs", "1", "--min-replay", "4", "--replay-per-field", "0.5",
             "--group-epochs", "1", "--group-pbc-per-type", "4"]  # QUICK, as a lab types it
    result = CliRunner().invoke(app, ["adapt", "--fields", str(voc), "--out", str(out),
                                      "--force", *quick])
    assert result.exit_code == 0, result.output
    assert "before -> after" in result.output and "detector.pt" in result.output
    manifest = json.loads((out / "detector.json").read_text())
    assert manifest["adapted"]["fields"]["held_out"] >= 1
    assert [h["epoch"] for h in manifest["training"]["history"]] == [1]  # the options apply
    # the same folder again: refused, the earlier set kept
    again = CliRunner().invoke(app, ["adapt", "--fields", str(voc), "--out", str(out)])
    assert again.exit_code != 0 and "already holds" in again.output
    assert json.loads((out / "detector.json").read_text()) == manifest


def test_detector_adaptation_curve_and_its_table(tmp_path, shared_data):
    """`evaluate adaptation --detector-labs`: mechanics on BCCD, the shipped detector
    standing in for the fold trained without BCCD (the figures mean nothing here); a
    detector-only run keeps the level-2 curve already in --out."""
    from leukodiff.evaluation.adaptation import AdaptationConfig, evaluate_adaptation
    from leukodiff.metrics.adaptation import AdaptationResults
    from leukodiff.metrics.records import from_plain, to_plain
    from leukodiff.reports.adaptation import render_section

    fold = tmp_path / "labs" / "without-bccd" / "detector"
    fold.mkdir(parents=True)
    for path in shipped("detector").parent.glob("detector*"):
        shutil.copy(path, fold / path.name)
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"config": {"shots": [0]}, "labs_dir": "x", "labs": {"pbc": {"skipped": "s"}}}
    (out / "adaptation.json").write_text(json.dumps(earlier))
    config = AdaptationConfig(labs=(), detector_labs=("bccd", "bcd"), detector_shots=(0, 1),
                              detector=replace(QUICK, min_fields=2))
    results = evaluate_adaptation(tmp_path / "labs", out, config, data_root=shared_data)
    assert to_plain(results.labs) == earlier["labs"]  # level 2's curve kept
    assert "no fold detector" in results.detector["bcd"].skipped
    curve = results.detector["bccd"]
    assert (curve.runs[0].k, curve.runs[0].reviewed_fields) == (0, 0)
    assert 1 <= curve.runs[1].reviewed_fields <= 5  # a cell of each type: <= 5 fields
    assert curve.test_fields == 72 and curve.runs[0].truth == curve.test_cells
    stored = json.loads((out / "adaptation.json").read_text())
    assert stored == json.loads(json.dumps(to_plain(results)))  # the record as written
    assert from_plain(AdaptationResults, stored).detector == results.detector
    text = render_section(replace(results, config={**earlier["config"], "draws": 1,
                                                   "adapt": {"epochs": 1, "lr": 0.1,
                                                             "replay_per_class": 1}}))
    assert "### The detector, taught by the same reviews" in text and "| BCCD | 72" in text


def test_an_interrupted_detector_adaptation_resumes_from_its_last_epoch(lab_fields, tmp_path,
                                                                        shared_data):
    """Stopped by its time limit after epoch 1 of 2 (as a crash or Ctrl-C would leave it),
    the adaptation is not restarted over by a plain run, and `resume` goes on from epoch 2
    (the engine makes a resumed run bit-identical, tests/test_engine.py) to a written
    detector, its checkpoints removed."""
    from leukodiff.training.adapt import AdaptInterrupted

    two = replace(QUICK, epochs=2, group_epochs=0)
    out = tmp_path / "set"
    learn, held = lab_fields[:12], lab_fields[12:]
    with pytest.raises(AdaptInterrupted, match="after epoch 1 of 2"):
        adapt_detector(learn, out, two, held=held, force=True, data_root=shared_data,
                       time_limit_minutes=0)
    assert (out / ".adapting" / "detector" / "last.pt").exists()
    assert not (out / "detector.pt").exists()
    with pytest.raises(DetectorAdaptError, match="pass --resume"):
        adapt_detector(learn, out, two, held=held, force=True, data_root=shared_data)
    with pytest.raises(DetectorTrainingError, match="differs in: fields"):
        # other reviewed fields: going on would mix two adaptations
        adapt_detector(learn[1:], out, two, held=held, force=True, data_root=shared_data,
                       resume=True)
    result = adapt_detector(learn, out, two, held=held, force=True, data_root=shared_data,
                            resume=True)
    assert result["written"] == str(out / "detector.pt")
    _, manifest = load_detector(out / "detector.pt")
    assert [h["epoch"] for h in manifest.training.settings["history"]] == [1, 2]
    assert not (out / ".adapting").exists()
    with pytest.raises(DetectorAdaptError, match="already holds"):
        adapt_detector(learn, out, two, held=held, force=True, data_root=shared_data,
                       resume=True)
