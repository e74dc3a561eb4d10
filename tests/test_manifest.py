"""Model manifests: read and checked in one place (`models.files`), typed, without torch,
and the JSON on disk kept as it is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from leukodiff.models.files import (
    SHIPPED_DIR,
    InputGeometry,
    Manifest,
    ModelFileError,
    manifest_path,
    read_checked,
    read_manifest,
    sha256_of,
)

SHIPPED = sorted([*SHIPPED_DIR.glob("*.pt"), *SHIPPED_DIR.glob("*.onnx")])


@pytest.mark.parametrize("weights", SHIPPED, ids=lambda p: p.name)
def test_shipped_manifests_read_back_as_written_and_check_their_files(weights):
    path, manifest = read_checked(weights, weights.suffix)
    text = manifest_path(path).read_text()
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text  # same keys, same order
    assert manifest.sha256 == sha256_of(path) and manifest.provenance.weights == path.name
    if path.suffix == ".onnx":  # exported from the torch file beside it
        source = SHIPPED_DIR / manifest.provenance.source["weights"]
        assert manifest.provenance.source["sha256"] == sha256_of(source)


def test_the_fields_are_typed():
    _, mono = read_checked("mononuclear")
    assert mono.name == "mobilenet_v1" and not mono.is_detector
    assert mono.task == "mononuclear" and mono.classes == ("lymphocyte", "monocyte")
    assert mono.input == InputGeometry(size=128, crop_scale=2.6, stain="reinhard")
    assert 0.5 < mono.threshold < 1 and mono.threshold == mono.calibration["threshold"]
    assert "pbc" in mono.training.sources and mono.training.best_epoch >= 1
    assert mono.training.settings["epochs"] >= mono.training.best_epoch
    assert mono.metrics["test"]["all"]["n"] > 0
    # trained, then its threshold calibrated again on eight views of each crop (same weights)
    assert mono.provenance.command.startswith("leukodiff train calibrate")
    assert mono.raw["recalibrated_from"]["command"].startswith("leukodiff train classifier")
    assert mono.raw["recalibrated_from"]["sha256"] == mono.sha256
    assert mono.calibration["views"] == 8

    _, detector = read_checked("detector")
    assert detector.is_detector and detector.input is None
    assert detector.score_threshold == detector.architecture["score_threshold"]
    assert detector.training.minutes > 0  # the detector writes train_minutes
    group = detector.group()
    assert group.classes == ("mononuclear", "polymorphonuclear")
    assert group.input == InputGeometry(int(detector.architecture["group_input_size"]),
                                        float(detector.architecture["group_crop_scale"]),
                                        detector.architecture["group_stain"])


def test_a_manifest_written_before_stain_normalisation_reads_as_none():
    old = Manifest.from_dict({"classes": ["lymphocyte", "monocyte"],
                              "input": {"size": 128, "crop_scale": 2.6}})
    assert old.input.stain == "none" and old.threshold == 0.0 and old.sha256 == ""
    assert old.views == 1  # calibrated before level 2 ran on eight orientations: runs on one


def test_altered_or_unreadable_files_are_refused(tmp_path):
    weights = tmp_path / "mononuclear.pt"
    shutil.copy(SHIPPED_DIR / "mononuclear.pt", weights)
    shutil.copy(SHIPPED_DIR / "mononuclear.json", tmp_path / "mononuclear.json")
    assert read_checked(weights)[1].task == "mononuclear"
    with weights.open("ab") as file:
        file.write(b"\0")
    with pytest.raises(ModelFileError, match="sha256 does not match"):
        read_checked(weights)
    (tmp_path / "mononuclear.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="unreadable manifest"):
        read_manifest(tmp_path / "mononuclear.json")
    (tmp_path / "mononuclear.json").write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="not a model manifest"):
        read_manifest(tmp_path / "mononuclear.json")
    (tmp_path / "mononuclear.json").write_text('{"input": {"size": "big", "crop_scale": 2}}')
    with pytest.raises(ModelFileError, match="not a model manifest"):
        read_manifest(tmp_path / "mononuclear.json")


def test_manifests_are_read_without_torch():
    code = ("import sys\n"
            "from leukodiff.models.files import read_checked\n"
            "manifest = read_checked('mononuclear', '.onnx')[1]\n"
            "assert manifest.input.size == 128\n"
            "assert 'torch' not in sys.modules, 'models.files imported torch'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
