"""Leave one lab out: the folds train on the other labs only, measure through onnxruntime,
resume, and write their section first in RESULTS.md."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from leukodiff.evaluation.labs import FoldMismatchError, LabsConfig, evaluate_labs
from leukodiff.metrics.labs import (
    Fires,
    LabDetection,
    LabEndToEnd,
    LabRun,
    LabsResults,
    LabTyping,
    TrainedOn,
)
from leukodiff.metrics.records import to_plain
from leukodiff.reports.labs import END, START, insert_section, render_section, write_labs_report
from leukodiff.reports.study import keep_marked_sections

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_quick_folds_train_without_the_held_out_lab_and_resume(tmp_path, shared_data):
    """PBC held out: level 2 learns BCCD alone (Chula is not in ../shared); BCD held out:
    the detector learns BCCD alone. Each is measured on the held-out lab through the
    exported ONNX models; the shipped models are also measured on BCD, which they never
    saw. Run again, nothing is retrained."""
    evaluate_labs(tmp_path, LabsConfig.quick(("pbc",)), data_root=shared_data)
    config = LabsConfig.quick(("bcd",))  # one lab at a time builds one table
    results = evaluate_labs(tmp_path, config, data_root=shared_data)
    assert results.labs_present == {"bccd": True, "pbc": True, "chula": False, "bcd": True}
    pbc, bcd = results.folds["pbc"], results.folds["bcd"]
    assert pbc.trained_on == TrainedOn(level2=["bccd"], detector=None)
    assert bcd.trained_on == TrainedOn(level2=None, detector=["bccd"])
    assert pbc.detector is None and bcd.level2 is None
    assert pbc.level2.n == 12 and 0 <= pbc.level2.macro_f1 <= 1
    assert sum(map(sum, pbc.level2.confusion)) == 12
    assert bcd.fields == 12 and 0 <= bcd.detector.recall <= 1
    assert bcd.unlike_training is not None  # the fold's own familiarity reference
    stored = json.loads((tmp_path / "labs.json").read_text())
    assert "detector" not in stored["folds"]["pbc"] and "level2" not in stored["folds"]["bcd"]
    for model in ("mononuclear/model.onnx", "polymorphonuclear/model.onnx"):
        assert (tmp_path / "without-pbc" / model).is_file()
    assert (tmp_path / "without-bcd" / "detector" / "detector.familiarity.json").is_file()
    # scored as a white cell, its operating threshold the training lab's validation F1's best
    detector = json.loads((tmp_path / "without-bcd" / "detector" / "detector.json").read_text())
    point = detector["training"]["operating_point"]
    assert detector["architecture"]["score"] == point["score"] == "cell"
    assert detector["architecture"]["score_threshold"] == point["threshold"]
    trained = json.loads((tmp_path / "without-pbc" / "mononuclear" / "model.json").read_text())
    assert trained["training"]["sources"] == ["bccd"]
    # the shipped models learnt BCCD, PBC, BCD and Chula: no lab here is new to them
    assert results.shipped == {}
    stamp = (tmp_path / "without-pbc" / "mononuclear" / "model.pt").stat().st_mtime_ns
    again = evaluate_labs(tmp_path, LabsConfig.quick(("pbc",)), data_root=shared_data)
    assert (tmp_path / "without-pbc" / "mononuclear" / "model.pt").stat().st_mtime_ns == stamp
    assert again.folds["pbc"].level2 == pbc.level2 and "bcd" in again.folds
    with pytest.raises(FoldMismatchError, match="other settings \\(epochs\\)"):
        evaluate_labs(tmp_path, replace(LabsConfig.quick(("pbc",)), classifier_epochs=2),
                      data_root=shared_data)
    # the same fold again with another seed: trained in seed-1/, the first kept as it was
    repeated = evaluate_labs(tmp_path, replace(LabsConfig.quick(("pbc",)), repeat_seeds=(1,)),
                             data_root=shared_data)
    assert (tmp_path / "without-pbc" / "mononuclear" / "model.pt").stat().st_mtime_ns == stamp
    assert repeated.folds["pbc"].level2 == pbc.level2 and "bcd" in repeated.folds
    assert set(repeated.repeats) == {"1"} and set(repeated.repeats["1"]) == {"pbc"}
    assert repeated.repeats["1"]["pbc"].level2.n == 12
    seed1 = json.loads((tmp_path / "seed-1" / "without-pbc" / "mononuclear" / "model.json")
                       .read_text())
    assert seed1["training"]["seed"] == 1
    with pytest.raises(ValueError, match="must differ"):
        replace(LabsConfig.quick(("pbc",)), repeat_seeds=(0,))
    written = write_labs_report(repeated, tmp_path, tmp_path / "docs")
    assert (tmp_path / "docs" / "figures" / "labs.png") in written
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "| PBC | left out of training |" in text and "| BCD | shipped models" not in text
    assert "From one seed to the next" in text and "| PBC | 0, 1 | - |" in text


def test_section_goes_first_and_survives_a_rewrite(tmp_path):
    results = LabsResults(config=LabsConfig().__dict__ | {"labs": ["chula"]},
                          labs_present={"chula": True}, shipped={}, folds={"chula": LabRun(
        detector=LabDetection(precision=0.5, recall=0.9, ap50=0.8, truth=10, found=9,
                              false=9, group_accuracy=None, exact_count=0.4, count_mae=1.0,
                              extra_cells_per_field=1.0),
        level2=LabTyping(n=10, accuracy=0.6, macro_f1=0.55, min_recall=0.1,
                         recall={"monocyte": 0.1, "basophil": 0.9}, confusion=[], classes=[],
                         unidentified_share=0.0),
        end_to_end=LabEndToEnd(cells=10, right=5, share=0.5, per_type={}, said={}),
        unlike_training=0.75,
        warning_on_training_labs={"bccd": Fires(fields=72, unfamiliar=2)})})
    section = render_section(results)
    assert section.startswith(START) and section.rstrip().endswith(END)
    assert "| Chula | left out of training | 0.500 | 0.900 | 0.800 | 40.0% | 60.0% | 0.550 " \
           "| 0.10 (monocyte) | 5/10 (50.0%) | 75.0% | BCCD 2/72 |" in section
    path = tmp_path / "RESULTS.md"
    path.write_text("# results\n\n## 1. Table 3\n\nold text\n")
    insert_section(path, section)
    insert_section(path, section)  # replaced, not added twice
    text = path.read_text()
    assert text.startswith("# results\n\n" + START) and text.count(START) == 1
    assert text.index(END) < text.index("## 1. Table 3")
    rewritten = keep_marked_sections(text, "# results\n\n## 1. Table 3\n\nnew text\n")
    assert rewritten.count(START) == 1 and rewritten.index(END) < rewritten.index("new text")
    assert keep_marked_sections("# old\n", "# new\n\nbody\n") == "# new\n\nbody\n"
    # a later section goes after the first of its anchors the file has
    later = "<!-- later:start -->\nlater\n<!-- later:end -->\n"
    insert_section(path, later, "later", after=("notes", "labs"))
    text = path.read_text()
    assert text.index(END) < text.index("later:start") < text.index("## 1. Table 3")
    notes = path.read_text().replace("## 1. Table 3", "<!-- notes:start -->\nnotes\n"
                                     "<!-- notes:end -->\n\n## 1. Table 3")
    path.write_text(notes)
    insert_section(path, later, "later", after=("notes", "labs"))
    text = path.read_text()
    assert text.count("later:start") == 1
    assert text.index("notes:end") < text.index("later:start") < text.index("## 1. Table 3")


def test_spread_over_seeds_shows_each_seed_and_the_mean():
    def run(precision: float, macro_f1: float) -> LabRun:
        return LabRun(
            detector=LabDetection(precision=precision, recall=0.9, ap50=0.8, truth=10,
                                  found=9, false=9, group_accuracy=None, exact_count=0.5,
                                  count_mae=1.0, extra_cells_per_field=1.0),
            level2=LabTyping(n=10, accuracy=0.6, macro_f1=macro_f1, min_recall=0.1,
                             recall={"monocyte": 0.1}, confusion=[], classes=[],
                             unidentified_share=0.0))

    config = LabsConfig().__dict__ | {"labs": ["chula", "bcd"], "seed": 0}
    results = LabsResults(config=config, labs_present={"chula": True, "bcd": True},
                          shipped={}, folds={"chula": run(0.2, 0.7), "bcd": run(0.9, 0.5)},
                          repeats={"2": {"chula": run(0.6, 0.8)}, "1": {"chula": run(0.4, 0.9)}})
    section = render_section(results)
    assert "| Chula | 0, 1, 2 | 0.200 / 0.400 / 0.600 (mean 0.400) | 0.900 / 0.900 / 0.900 " \
           "(mean 0.900) |" in section
    assert "0.700 / 0.900 / 0.800 (mean 0.800)" in section
    assert "| BCD | 0" not in section  # one seed: no spread row
    assert render_section(replace(results, repeats={})).count("From one seed") == 0


def test_the_shipped_models_labs_come_from_their_manifests():
    """What `evaluate labs` measures the shipped models on: the labs none of their
    manifests names (none of these four, since the three-lab detector)."""
    from leukodiff.evaluation.labs import LABS, _shipped_sources

    assert _shipped_sources() == {"bccd", "bcd", "chula", "pbc"}
    assert not set(LABS) - _shipped_sources()


def test_a_table_made_before_the_other_cell_class_is_not_merged_into_one_with_it(tmp_path):
    """labs.json files written before `other_cells` existed ran without the class: a run
    with it starts its own table, one with `--no-other-cells` keeps their folds, and each
    section's command line says which recipe it measured."""
    old = LabRun(skipped="data absent")
    config = {k: v for k, v in LabsConfig().__dict__.items() if k != "other_cells"}
    before = LabsResults(config=config | {"labs": ["pbc"]}, labs_present={"pbc": True},
                         shipped={}, folds={"pbc": old})
    (tmp_path / "labs.json").write_text(json.dumps(to_plain(before)))
    assert "--no-other-cells" in render_section(before)
    kept = evaluate_labs(tmp_path, LabsConfig(labs=(), other_cells=False))
    assert kept.folds == {"pbc": old}
    fresh = evaluate_labs(tmp_path, LabsConfig(labs=()))
    assert fresh.folds == {}
    section = render_section(replace(fresh, folds={"pbc": old}))
    assert "--no-other-cells" not in section and "`--other-cells`" in section
