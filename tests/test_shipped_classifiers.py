"""Regression floors for the shipped level-2 models on their held-out test parts.

The floors sit a few points under the figures in each manifest; a change that
drops below them has made the product worse and must say why.
"""

import pytest

from leukodiff.evaluation.classifier import evaluate_classifier
from leukodiff.models.io import load_classifier, sha256_of, shipped

# model -> {source: (minimum accuracy, minimum macro-F1)} on the held-out test part
# (measured at shipping, issue #14, trained on PBC + BCCD + Chula with the "lab"
# augmentation: mononuclear PBC 0.987 / BCCD 7 of 7 / Chula 0.960; polymorphonuclear PBC
# 0.999, BCCD 0.921 with macro-F1 0.607, pulled down by the test list's single basophil
# (neutrophil/eosinophil F1 0.955/0.865), Chula 0.945. Chula is fetched, not in CI's data.)
FLOORS = {
    "mononuclear": {"pbc": (0.975, 0.975), "bccd": (0.85, 0.80)},
    "polymorphonuclear": {"pbc": (0.99, 0.99), "bccd": (0.88, 0.58)},
}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_shipped_model_matches_its_manifest(name):
    _, manifest = load_classifier(shipped(name))
    assert manifest["sha256"] == sha256_of(shipped(name))
    assert manifest["task"] == name
    assert shipped(name).stat().st_size < 8_000_000
    assert manifest["metrics"]["test"]["pbc"]["n"] > 400


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_shipped_model_keeps_its_floor_on_held_out_cells(name, shared_data):
    results = evaluate_classifier(name, ("pbc", "bccd"), "test", data_root=shared_data)
    for source, (accuracy, macro_f1) in FLOORS[name].items():
        assert results[source]["accuracy"] >= accuracy, (source, results[source]["accuracy"])
        assert results[source]["macro_f1"] >= macro_f1, (source, results[source]["macro_f1"])
