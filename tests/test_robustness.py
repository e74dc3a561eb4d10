"""The robustness evaluation: deterministic changes of real fields, measured on the shipped
pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest

from leukodiff.data.sources import load_fields
from leukodiff.evaluation.pipeline import evaluate_end_to_end
from leukodiff.evaluation.robustness import PERTURBATIONS, evaluate_robustness
from leukodiff.imaging import load_image
from leukodiff.metrics.heldout import Robustness
from leukodiff.metrics.records import from_plain
from leukodiff.pipeline import Analyzer

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def analyzer():
    with Analyzer.load() as loaded:
        yield loaded


def test_each_change_is_real_and_repeatable(shared_data):
    field = load_image(shared_data / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00007.jpg")
    for perturbation in PERTURBATIONS:
        changed, scale = perturbation(field)
        again, _ = perturbation(field)
        assert changed.mode == "RGB", perturbation.name
        assert changed.size == (round(640 * scale), round(480 * scale)), perturbation.name
        assert np.array_equal(np.asarray(changed), np.asarray(again)), perturbation.name
        if perturbation.name != "none" and scale == 1.0:
            assert not np.array_equal(np.asarray(changed), np.asarray(field)), perturbation.name


def test_unchanged_row_is_the_end_to_end_figure(analyzer, shared_data):
    chosen = (PERTURBATIONS[0], PERTURBATIONS[2], PERTURBATIONS[-1])  # none, JPEG 10, zoom
    results = evaluate_robustness(analyzer, shared_data, perturbations=chosen,
                                  max_fields=5, max_cells=24)
    fields = sorted((f for f in load_fields("bccd", shared_data).records
                     if f.subset == "test"), key=lambda f: f.image.name)[:5]
    reference = evaluate_end_to_end(analyzer, fields).single_wbc_fields
    none, jpeg, zoom = results.rows
    assert none.bccd_end_to_end.right_type == reference.right
    assert none.bccd_end_to_end.single_wbc_cells == reference.cells >= 4
    for row in (none, jpeg):
        assert {g: m.n for g, m in row.pbc.items()} == {
            "mononuclear": 24, "polymorphonuclear": 24}
    assert none.pbc["polymorphonuclear"].accuracy >= 0.9
    assert zoom.pbc == {}  # a whole-cell image is resized to the input: nothing to test
    assert zoom.bccd_end_to_end.found >= 4  # the enlarged cells are still matched
    # the JSON of `evaluate robustness --out`: docs/robustness.json's keys, row by row
    written = json.loads(json.dumps(results.to_dict()))
    assert written["rows"][0]["bccd_end_to_end"]["right_type"] == reference.right
    assert written["rows"][2]["pbc"] == {}


def test_docs_robustness_json_reads_as_the_record_and_writes_back_the_same():
    stored = json.loads((DOCS / "robustness.json").read_text())
    assert from_plain(Robustness, stored).to_dict() == stored
