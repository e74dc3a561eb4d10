"""The "images unlike the training labs" warning: synthetic references and the shipped one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from leukodiff.data.sources import load_cells, load_fields
from leukodiff.imaging import load_image
from leukodiff.models.files import ModelFileError, shipped
from leukodiff.pipeline import Analyzer
from leukodiff.pipeline.familiarity import (
    FEATURES,
    Familiarity,
    familiarity_path,
    image_features,
)
from leukodiff.reports.run import analyze_to_folder


def test_fit_scores_and_threshold_on_synthetic_labs(tmp_path):
    rng = np.random.default_rng(0)
    dims = len(FEATURES)
    lab_a = rng.normal(0, 2, size=(200, dims))
    lab_b = rng.normal(30, 2, size=(200, dims))
    held = [rng.normal(0, 2, size=(100, dims)), rng.normal(30, 2, size=(100, dims))]
    reference = Familiarity.fit({"a": lab_a, "b": lab_b}, held, false_alarm=0.05)
    scores = reference.scores(np.concatenate(held))
    assert 0.02 <= (scores > reference.threshold).mean() <= 0.08  # the asked-for false alarms
    far = np.full((1, dims), 15.0)  # between the labs: like neither
    assert reference.scores(far)[0] > 3 * reference.threshold
    missing = lab_a[:1].copy()
    missing[0, -1] = np.nan  # an unmeasurable red-cell size is no evidence either way
    assert reference.scores(missing)[0] <= reference.scores(lab_a[:1])[0] + 1e-9
    path = reference.save(tmp_path / "x.familiarity.json", {"fitted": {"sources": ["a"]}})
    again = Familiarity.load(path)
    assert again.threshold == reference.threshold
    np.testing.assert_allclose(again.scores(far), reference.scores(far))
    data = json.loads(path.read_text())
    data["features"] = data["features"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="refit"):
        Familiarity.load(path)
    with pytest.raises(ValueError, match="at least 2"):
        Familiarity.fit({"a": lab_a[:1]}, held)


def test_familiarity_lives_beside_its_detector(tmp_path):
    assert familiarity_path(tmp_path / "detector.pt") == tmp_path / "detector.familiarity.json"
    assert familiarity_path(shipped("detector")).is_file()
    for name in ("detector.pt", "detector.json"):  # a detector with a broken reference
        shutil.copy(shipped("detector").with_name(name), tmp_path / name)
    (tmp_path / "detector.familiarity.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="train familiarity"):
        Analyzer.load(tmp_path / "detector.pt", backend="torch")
    (tmp_path / "detector.familiarity.json").unlink()  # none: no look check, no error
    with Analyzer.load(tmp_path / "detector.pt", backend="torch") as analyzer:
        assert analyzer.familiarity is None


@pytest.fixture(scope="module")
def reference():
    return Familiarity.load(familiarity_path(shipped("detector")))


def test_shipped_reference_knows_bccd_and_flags_other_labs(reference, shared_data):
    """The shipped detector learnt BCCD, BCD and Chula: BCCD's test fields and BCD's tiles
    are familiar (3 of 72 and 3 of 20 test parts flagged when fitted); PBC's images
    (Barcelona: another lab, camera and crop) and a BCCD field under a blue lamp are not."""
    bccd = [f for f in load_fields("bccd", shared_data).records if f.subset == "test"]
    flagged = sum(reference.score(load_image(f.image)) > reference.threshold for f in bccd)
    assert flagged <= 5
    bcd = load_fields("bcd", shared_data).records[::10]
    assert sum(reference.score(load_image(f.image)) > reference.threshold for f in bcd) <= 1
    pbc = sorted(load_cells("pbc", shared_data).records, key=lambda c: c.image.name)[::800]
    assert all(reference.score(load_image(c.image)) > reference.threshold for c in pbc)
    field = np.asarray(load_image(bccd[0].image), dtype=np.float32)
    blue = Image.fromarray((field * np.array([0.75, 0.9, 1.0])).astype(np.uint8))
    assert reference.score(blue) > reference.threshold
    assert np.isfinite(image_features(blue)).all()


def test_analyze_warns_on_images_unlike_the_training_labs(tmp_path, shared_data):
    pbc = sorted(load_cells("pbc", shared_data).records, key=lambda c: c.image.name)[:2]
    bccd = [f for f in load_fields("bccd", shared_data).records if f.subset == "test"][:1]
    with Analyzer.load() as analyzer:
        plain = analyzer(pbc[0].image)  # per-field calls measure nothing unless asked
        assert plain.familiarity is None and not plain.unlike_training
        run = analyze_to_folder(analyzer, [f.image for f in pbc + bccd], tmp_path / "out")
    flags = [r.unlike_training for r in run.results]
    assert flags == [True, True, False]
    assert all(r.familiarity is not None for r in run.results)
    assert run.differential.unlike_training == 2
    assert "2 of 3 field(s) look unlike" in run.differential.warning
    assert "review every cell" in (tmp_path / "out" / "report.html").read_text()
    saved = json.loads((tmp_path / "out" / "differential.json").read_text())
    assert saved["unlike_training"] == 2 and "review every cell" in saved["warning"]
    field = json.loads(sorted((tmp_path / "out" / "fields").glob("*.json"))[0].read_text())
    assert field["unlike_training"] is True and field["familiarity"] > 0
