"""Regression floors for the shipped level-2 models on their held-out test parts.

The floors sit a few points under the figures in each manifest; a change that
drops below them has made the product worse and must say why.
"""

import pytest

from leukodiff.evaluation.classifier import evaluate_classifier
from leukodiff.models.io import load_classifier, sha256_of, shipped

# model -> {source: (minimum accuracy, minimum macro-F1)} on the held-out test part
# (measured at shipping, issue #14 second pass: trained on PBC + BCCD + Chula with the "lab"
# augmentation and Reinhard-normalised crops: mononuclear PBC 0.987 / BCCD 7 of 7 / Chula
# 0.880; polymorphonuclear PBC 0.997 (macro-F1 0.997), BCCD 0.825 with macro-F1 0.517:
# 10 of 20 eosinophils called neutrophils (16 of 20 before the normalisation, which won
# on labs never trained on) and the test list's single basophil; Chula 0.945. Measured
# again on each crop's eight orientations, same weights, 2026-12-07 (`leukodiff train
# calibrate`, the manifests' metrics): mononuclear PBC 0.985 / BCCD 7 of 7 / Chula 0.920;
# polymorphonuclear PBC 0.999 (macro-F1 0.999), BCCD 0.810 with macro-F1 0.495 (11 of 20
# eosinophils called neutrophils), Chula 0.945. Chula is fetched, not in CI's data.)
FLOORS = {
    "mononuclear": {"pbc": (0.975, 0.975), "bccd": (0.85, 0.80)},
    "polymorphonuclear": {"pbc": (0.99, 0.99), "bccd": (0.79, 0.49)},
}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_shipped_model_matches_its_manifest(name):
    _, manifest = load_classifier(shipped(name))
    assert manifest.sha256 == sha256_of(shipped(name))
    assert manifest.task == name
    assert shipped(name).stat().st_size < 8_000_000
    assert manifest.metrics["test"]["pbc"]["n"] > 400


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_shipped_model_keeps_its_floor_on_held_out_cells(name, shared_data):
    results = evaluate_classifier(name, ("pbc", "bccd"), "test", data_root=shared_data)
    for source, (accuracy, macro_f1) in FLOORS[name].items():
        assert results[source]["accuracy"] >= accuracy, (source, results[source]["accuracy"])
        assert results[source]["macro_f1"] >= macro_f1, (source, results[source]["macro_f1"])


def test_shipped_crop_classifiers_see_stain_normalised_crops(shared_data):
    """The group refiner and both level-2 models were trained on Reinhard-normalised crops
    (issue #14): the pipeline must cut and normalise exactly so, on either backend."""
    import numpy as np

    from leukodiff.data.crops import cell_batch, orientation
    from leukodiff.data.sources import load_fields
    from leukodiff.imaging import load_image
    from leukodiff.pipeline.analyzer import Analyzer
    from leukodiff.pipeline.classify import softmax

    field = next(f for f in load_fields("bccd", shared_data).records
                 if f.subset == "test" and len(f.wbc_boxes) == 1)
    image, boxes = load_image(field.image), field.wbc_boxes
    with Analyzer.load(backend="onnx", threads=1) as analyzer:
        for clf in (analyzer.group_refiner, *analyzer.classifiers.values()):
            assert clf.stain == "reinhard"
            said = clf(image, boxes)
            crops = cell_batch(image, boxes, clf.crop_scale, clf.input_size, "reinhard")
            raw = cell_batch(image, boxes, clf.crop_scale, clf.input_size)
            logits = clf.backend.classify(clf.role, crops)
            views = [softmax(clf.backend.classify(clf.role, orientation(crops, view)))
                     for view in range(clf.views)]
            assert np.allclose(said, np.mean(views, axis=0), atol=1e-6)
            assert not np.allclose(logits, clf.backend.classify(clf.role, raw), atol=1e-3)
