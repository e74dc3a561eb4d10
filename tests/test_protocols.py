"""Evaluation protocols: statistics, tables, provenance matching, and the whole run on a subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukodiff.data.sources import load_fields
from leukodiff.data.splits import Split
from leukodiff.evaluation import kbc_matching as M
from leukodiff.evaluation import protocols as P
from leukodiff.evaluation import provenance as V
from leukodiff.evaluation.results import EvalConfig, evaluate_all
from leukodiff.reports.study import load_study, render_markdown, write_study_report


def _run(name, classes, test, y_true, y_pred):
    return P.Run(name, tuple(classes), np.array(test), np.array(y_true), np.array(y_pred))


def test_mcnemar_is_the_exact_binomial_test_on_discordant_cells():
    a = np.array([True] * 10 + [False] * 2 + [True] * 5)
    b = np.array([False] * 10 + [True] * 2 + [True] * 5)
    result = P.mcnemar(a, b)
    assert (result.a_only, result.b_only) == (10, 2)
    assert result.p == pytest.approx(0.0385742, rel=1e-4)  # 2 * P(X <= 2), X ~ B(12, 1/2)
    assert P.mcnemar(a, a).p == 1.0


def test_paper_table_averages_splits_and_classes():
    classes = ("lymphocyte", "monocyte")
    runs = {"mononuclear": [_run("s0", classes, [0, 1, 2, 3], [0, 0, 1, 1], [0, 0, 1, 1]),
                            _run("s1", classes, [0, 1, 2, 3], [0, 0, 1, 1], [0, 1, 1, 1])]}
    table = P.paper_table(runs)
    assert table["lymphocyte"].accuracy[0] == pytest.approx(87.5)
    assert table["lymphocyte"].recall == pytest.approx((75.0, np.std([100, 50], ddof=1)))
    assert table["monocyte"].precision[0] == pytest.approx((100 + 100 * 2 / 3) / 2)
    assert all(getattr(table["average"], m)[1] != getattr(table["average"], m)[1]
               for m in P.METRICS)  # the average of class means: no std


def test_two_level_answers_combine_per_cell_and_compare_with_flat():
    mono = _run("s0", ("lymphocyte", "monocyte"), [0, 3], [0, 1], [0, 0])
    poly = _run("s0", ("neutrophil", "eosinophil"), [1, 2], [1, 0], [1, 0])
    (combined,) = P.combine_levels({"mononuclear": [mono], "polymorphonuclear": [poly]})
    assert combined.classes == ("lymphocyte", "monocyte", "neutrophil", "eosinophil")
    assert combined.test.tolist() == [0, 1, 2, 3]
    assert combined.y_true.tolist() == [0, 3, 2, 1]
    assert combined.y_pred.tolist() == [0, 3, 2, 0]
    flat = _run("s0", combined.classes, [0, 1, 2, 3], [0, 3, 2, 1], [0, 0, 2, 1])
    flat.logits = np.array([[5.0, 0, 0, 0], [5, 0, 3, 4], [0, 0, 5, 0], [1, 5, 0, 0]])
    oracle = P.restrict_to_true_group(flat, P.PAPER_TASKS)
    assert oracle.y_pred.tolist() == [0, 3, 2, 1]  # the cross-group error is gone
    result = P.flat_vs_two_level([flat], [combined])
    assert result.summary.mcnemar_pooled.a_only == 1
    assert result.parameters.two_level.models == 2
    # Table 2: 1,093,218 total / 263,682 trainable for one two-class model
    assert result.parameters.two_level.total == 2 * 1_093_218
    assert result.oracle_flat_vs_two_level.mcnemar_pooled.a_only == 1
    with pytest.raises(ValueError, match="different cells"):
        P.flat_vs_two_level([_run("s0", combined.classes, [0, 1], [0, 1], [0, 1])], [combined])


def test_a_head_learns_separable_features_and_colour_helpers_keep_shapes():
    torch.manual_seed(0)
    features = torch.cat([torch.randn(40, 512) + 2, torch.randn(40, 512) - 2])
    targets = torch.tensor([0] * 40 + [1] * 40)
    head = P.train_head(features, targets, 2, P.HeadConfig(epochs=3))
    assert (P.head_logits(head, features).argmax(1) == targets).float().mean() > 0.95
    standardised = P.standardise(features)
    assert standardised.mean(0).abs().max() < 1e-4
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    normalised = P.normalise_colour(images)
    assert normalised.dtype == torch.uint8 and normalised.shape == images.shape
    channel_means = normalised.float().mean((0, 2, 3))
    assert channel_means.tolist() == pytest.approx([180, 150, 170], abs=6)
    assert P.stain_augment(images, copies=2).shape == (6, 3, 16, 16)


def test_head_run_trains_on_train_side_only():
    from leukodiff.data.records import Cell
    from leukodiff.taxonomy import CellType

    cells = [Cell(image=f"x{i}.jpg", source="t", cell_type=CellType.LYMPHOCYTE if i % 2 else
                  CellType.MONOCYTE, group_key=f"g{i}", sha256=str(i)) for i in range(20)]
    features = torch.randn(20, 512)
    run = P.head_run(features, cells, Split("s", tuple(range(14)), tuple(range(14, 20))),
                     ("lymphocyte", "monocyte"), P.HeadConfig(epochs=1))
    assert run.test.tolist() == list(range(14, 20)) and len(run.y_pred) == 6


def test_balanced_assignment_respects_capacity():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [-2.0, 0.5]])
    choice = M.balanced_assignment(scores, capacity=2)
    assert torch.bincount(choice, minlength=2).max() <= 2
    assert choice.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="do not fit"):
        M.balanced_assignment(scores, capacity=1)


def test_the_matcher_finds_the_field_of_kbc_like_copies(shared_data):
    fields = [f for f in load_fields("bccd", shared_data).records if f.wbc_boxes][:12]
    templates = M.bccd_templates(fields)
    assert len(templates.descriptors) == 108 * sum(len(f.wbc_boxes) for f in fields)
    check = V.synthetic_check(fields, templates, n=12, seed=1)
    assert check["accuracy"] >= 0.75


@pytest.mark.slow
def test_every_protocol_runs_end_to_end_on_a_subset(tmp_path, shared_data):
    study = evaluate_all(tmp_path, config=EvalConfig.quick(), data_root=shared_data)
    write_study_report(study, tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    assert render_markdown(load_study(tmp_path / "study.json")) == text
    for heading in ("## 1. The paper's protocol", "## 2. Provenance", "## 3. Grouped",
                    "## 4. Cross-source", "## 5. Flat versus two-level", "## 6. End to end"):
        assert heading in text
    assert "Quick run" in text and "99.92 ± 0.08" in text
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figures == ["confusion_kbc_random.png", "confusion_kbc_source-grouped.png",
                       "cross_source_recall.png", "flat_vs_two_level.png", "provenance.png",
                       "table3_per_class.png"]
    assert all((tmp_path / "figures" / f).stat().st_size < 200_000 for f in figures)
    sizes = study.split_sizes
    assert sizes["source-grouped"].shared_groups == 0
    assert sizes["random"].shared_groups > 0
    prov = study.provenance
    assert prov["fields_in_train_and_test_simple"] == []
    assert prov["test_simple_exact"]["patch_matcher_agrees"] == 1.0
    assert set(study.flat_vs_two_level) == {
        "KBC, random", "KBC, source-grouped", "PBC, random (5 classes)"}
    assert set(study.cross_source.variants) == set(
        ("none", "stain augmentation", "colour normalisation", "feature standardisation",
         "normalisation + standardisation"))
