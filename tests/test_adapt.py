"""`leukodiff adapt`: a lab's reviewed cells fine-tune the level-2 models, safely."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from leukodiff.data.sources import load_cells, read_class_folders
from leukodiff.models.io import load_classifier, read_checked, sha256_of, shipped
from leukodiff.pipeline.analyzer import Analyzer
from leukodiff.taxonomy import CellType
from leukodiff.training.adapt import (
    AdaptConfig,
    AdaptError,
    AdaptInterrupted,
    AdaptRefused,
    adapt,
    case_of,
)

QUICK = AdaptConfig(epochs=1, replay_per_class=6, batch_size=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lab_folder(tmp_path_factory, shared_data):
    """A lab's reviewed cells as `export-training` writes them: CELLS/TYPE/CASE-...png,
    4 cases of 4 lymphocytes and 3 monocytes each (PBC images standing in)."""
    root = tmp_path_factory.mktemp("lab") / "cells"
    cells = load_cells("pbc", shared_data).records
    for name, per_case in (("lymphocyte", 4), ("monocyte", 3)):
        chosen = sorted((c for c in cells if str(c.cell_type) == name),
                        key=lambda c: c.image.name)[:4 * per_case]
        (root / name).mkdir(parents=True)
        for i, cell in enumerate(chosen):
            shutil.copy(cell.image, root / name / f"case{i % 4}-field1-cell{i}.jpg")
    return root


def _lab_cells(root):
    return read_class_folders(root, source="mylab",
                              group_key=lambda p: case_of(p.name)).records


@pytest.fixture
def one_validation_case(monkeypatch):
    """Let the lab's 4 cases choose the epoch on one (a real lab needs 2 or more)."""
    import leukodiff.training.adapt as adapt_module

    monkeypatch.setattr(adapt_module, "MIN_VALIDATION_GROUPS", 1)


@pytest.fixture(scope="module")
def quick_set(lab_folder, shared_data, tmp_path_factory):
    """The lab's cells adapted with QUICK, the epoch chosen on one validation case: the
    folder and the results, read (never written) by the tests that need this one run."""
    import leukodiff.training.adapt as adapt_module

    out = tmp_path_factory.mktemp("quick") / "set"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapt_module, "MIN_VALIDATION_GROUPS", 1)
        results = adapt([str(lab_folder)], out, QUICK, cells=_lab_cells(lab_folder),
                        data_root=shared_data)
    return out, results


def test_adapt_writes_a_new_model_set_with_before_and_after(quick_set, lab_folder,
                                                             shared_data):
    shipped_hash = sha256_of(shipped("mononuclear"))
    folder, results = quick_set
    assert results["polymorphonuclear"] == {"skipped": "no reviewed cells of this group"}
    mono = results["mononuclear"]
    held = mono["cells"]["held_out"]
    assert sum(held.values()) == mono["after"]["n"] == mono["before"]["n"] > 0
    parts = (mono["cells"][p] for p in ("learnt", "validation", "held_out"))
    assert sum(sum(part.values()) for part in parts) == 28
    assert mono["cells"]["validation"] and 0 <= mono["cells"]["best_epoch"] <= QUICK.epochs
    assert mono["cells"]["held_out_groups"] >= 1 and sum(mono["cells"]["replay"].values()) > 0
    _, manifest = load_classifier(folder / "mononuclear.pt")
    assert manifest.provenance.adapted["base"]["sha256"] == shipped_hash
    assert manifest.provenance.adapted["after"] == json.loads(json.dumps(mono["after"]))
    assert manifest.input == read_checked("mononuclear")[1].input
    assert (folder / "mononuclear.onnx").exists()
    assert sha256_of(shipped("mononuclear")) == shipped_hash  # the base is never touched
    with Analyzer.load(mononuclear=folder / "mononuclear.pt", backend="onnx",
                       threads=1) as analyzer:
        assert analyzer.classifiers  # the adapted set runs in the shipped pipeline
    with pytest.raises(AdaptError, match="already holds"):
        adapt([str(lab_folder)], folder, QUICK, cells=_lab_cells(lab_folder),
              data_root=shared_data)


def test_cells_are_grouped_by_the_case_their_file_names():
    assert case_of("2026-0042-field7-cell31.png") == "2026-0042"
    assert case_of("slideA-003.jpg") == "slideA"
    assert case_of("cell.png") == "cell.png"


def test_adapt_refuses_too_few_cells_of_a_type_and_names_them(lab_folder, tmp_path,
                                                              shared_data):
    cells = _lab_cells(lab_folder)
    few = [c for c in cells if str(c.cell_type) == "lymphocyte"] + \
        [c for c in cells if str(c.cell_type) == "monocyte"][:4]
    with pytest.raises(AdaptError, match=r"too few .*monocyte [0-4];") as refused:
        adapt(["mylab"], tmp_path / "few", QUICK, cells=few, data_root=shared_data)
    assert "lymphocyte" not in str(refused.value)  # enough of them
    # a type with none at all is learnt from the replay only, and said so
    polys = [replace(c, cell_type=CellType("neutrophil"))
             for c in {c.group_key: c for c in cells}.values()]  # one a case
    with pytest.raises(AdaptError, match=r"neutrophil [1-4];.*none of eosinophil, basophil "
                                         r"\(the replay only\)"):
        adapt(["mylab"], tmp_path / "few", QUICK, cells=[*cells, *polys],
              data_root=shared_data)
    one_case = [replace(c, group_key="case0") for c in cells]
    with pytest.raises(AdaptError, match="at least two cases"):
        adapt(["mylab"], tmp_path / "one", QUICK, cells=one_case, data_root=shared_data)
    assert not (tmp_path / "few").exists() and not (tmp_path / "one").exists()


@pytest.mark.usefixtures("one_validation_case")
def test_a_ruinous_adaptation_keeps_the_base_chosen_on_validation_cases(lab_folder,
                                                                        tmp_path,
                                                                        shared_data):
    ruinous = replace(QUICK, lr=0.5, epochs=2)  # a learning rate that wrecks the model
    results = adapt(["mylab"], tmp_path / "kept", ruinous, cells=_lab_cells(lab_folder),
                    data_root=shared_data)
    mono = results["mononuclear"]
    assert mono["cells"]["best_epoch"] == 0 and mono["after"] == mono["before"]
    history = mono["cells"]["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert max(h["val_macro_f1"] for h in history[1:]) <= history[0]["val_macro_f1"]


def test_worse_after_adaptation_writes_nothing_unless_forced(lab_folder, tmp_path,
                                                            shared_data):
    # no validation cases: the last epoch is kept, and the held-out cases judge it
    ruinous = replace(QUICK, lr=0.5, epochs=2, validation=0.0)
    with pytest.raises(AdaptRefused, match="worse") as refused:
        adapt(["mylab"], tmp_path / "bad", ruinous, cells=_lab_cells(lab_folder),
              data_root=shared_data)
    mono = refused.value.results["mononuclear"]
    assert mono["after"]["macro_f1"] < mono["before"]["macro_f1"]
    assert not (tmp_path / "bad" / "mononuclear.pt").exists()
    adapt(["mylab"], tmp_path / "forced", ruinous, cells=_lab_cells(lab_folder), force=True,
          data_root=shared_data)
    _, manifest = load_classifier(tmp_path / "forced" / "mononuclear.pt")
    assert manifest.provenance.adapted["forced"] is True


def test_adaptation_curve_and_its_results_section(tmp_path, shared_data):
    """`evaluate adaptation` mechanics on BCCD, with the shipped models standing in for
    the fold trained without BCCD (the figures mean nothing here)."""
    from leukodiff.evaluation.adaptation import AdaptationConfig, evaluate_adaptation
    from leukodiff.reports.adaptation import render_section, write_adaptation_report

    for task in ("mononuclear", "polymorphonuclear"):
        fold = tmp_path / "labs" / "without-bccd" / task
        fold.mkdir(parents=True)
        shutil.copy(shipped(task), fold / "model.pt")
        shutil.copy(shipped(task, ".json"), fold / "model.json")
    config = AdaptationConfig(labs=("bccd", "pbc"), shots=(0, 5), draws=1,
                              adapt=replace(QUICK, replay_per_class=4))
    results = evaluate_adaptation(tmp_path / "labs", tmp_path / "out", config,
                                  data_root=shared_data)
    assert "no fold models" in results.labs["pbc"].skipped
    curve = results.labs["bccd"]
    assert [(r.k, r.draw) for r in curve.runs] == [(0, 0), (5, 0)]
    assert curve.runs[0].cells == 0 and 0 < curve.runs[1].cells <= 25
    assert curve.runs[0].n == curve.test_cells > 0
    assert all(0 <= r.macro_f1 <= 1 for r in curve.runs)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "RESULTS.md").write_text("# results\n\n<!-- labs:start -->\nfolds\n"
                                     "<!-- labs:end -->\n\n## 1. Other\n")
    write_adaptation_report(results, tmp_path / "out", docs)
    text = (docs / "RESULTS.md").read_text()
    assert text.index("labs:end") < text.index("adaptation:start") < text.index("## 1. Other")
    assert "| BCCD |" in text and "k = 5" in text
    assert (docs / "figures" / "adaptation.png").stat().st_size > 1000
    assert "--layers" not in text and "fine-tuning every layer" in text
    early = replace(results, config={**results.config,
                                     "adapt": {**results.config["adapt"], "layers": "early"}})
    assert "--layers early --lr 0.0001 --docs" in render_section(early)


def test_adapt_command_prints_before_and_after_and_names_the_new_files(lab_folder, tmp_path):
    from typer.testing import CliRunner

    from leukodiff.cli import app

    out = tmp_path / "cli-set"
    result = CliRunner().invoke(app, ["adapt", "--cells", str(lab_folder), "--out", str(out),
                                      "--epochs", "1", "--replay-per-class", "4"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert "before -> after" in said and "macro-F1" in said and "lymphocyte" in said
    assert (out / "mononuclear.onnx").exists() and not (out / "polymorphonuclear.pt").exists()
    _, manifest = load_classifier(out / "mononuclear.pt")
    assert manifest.provenance.adapted["lab"] == [str(lab_folder)]
    assert manifest.provenance.adapted["cells"]["held_out_groups"] >= 1
    refused = CliRunner().invoke(app, ["adapt", "--out", str(out)])
    assert refused.exit_code == 1 and "--station" in refused.output
    nothing = CliRunner().invoke(app, ["adapt", "--cells", str(lab_folder), "--out",
                                       str(out), "--resume"])
    assert nothing.exit_code == 1 and "nothing to resume" in nothing.output


@pytest.mark.usefixtures("one_validation_case")
def test_unidentified_threshold_recalibrated_on_the_lab_only_with_enough_cells(
        quick_set, lab_folder, tmp_path, shared_data, monkeypatch):
    """28 reviewed cells leave a handful to validate on: the base model's threshold is
    kept. Allowed to recalibrate on them, the adapted manifest carries the lab's own, and
    the pipeline uses it."""
    import leukodiff.training.adapt as adapt_module

    _, kept = load_classifier(quick_set[0] / "mononuclear.pt")  # the same run as "kept"
    _, base = load_classifier("mononuclear")
    assert kept.provenance.adapted["recalibrated"] is False
    assert kept.calibration == base.calibration
    monkeypatch.setattr(adapt_module, "MIN_CALIBRATION_CELLS", 1)
    adapt([str(lab_folder)], tmp_path / "lab", QUICK, cells=_lab_cells(lab_folder),
          data_root=shared_data)
    _, lab = load_classifier(tmp_path / "lab" / "mononuclear.pt")
    assert lab.provenance.adapted["recalibrated"] is True
    assert lab.calibration["on"].startswith("the lab's validation cases")
    assert 0 <= lab.threshold <= 1
    assert lab.calibration["validation_cells"] == sum(lab.provenance.adapted["cells"]["validation"]
                                                         .values())
    with Analyzer.load(mononuclear=tmp_path / "lab" / "mononuclear.pt",
                       backend="onnx") as analyzer:
        from leukodiff.taxonomy import Group

        assert analyzer.classifiers[Group.MONONUCLEAR].threshold == pytest.approx(
            lab.threshold)


def test_an_interrupted_adaptation_resumes_to_the_same_models(lab_folder, tmp_path,
                                                              shared_data):
    """Stopped by its time limit after epoch 1 of 2 (as a crash or Ctrl-C would leave it,
    checkpointed in OUT/.adapting), then resumed: the very weights and figures of a run
    never stopped; a stopped run is not restarted over, a finished one not overwritten."""
    config = replace(QUICK, epochs=2, validation=0.0)  # the last epoch kept: it is trained
    cells = _lab_cells(lab_folder)
    whole = adapt(["mylab"], tmp_path / "whole", config, cells=cells, data_root=shared_data)
    cut = tmp_path / "cut"
    with pytest.raises(AdaptInterrupted, match="after epoch 1 of 2"):
        adapt(["mylab"], cut, config, cells=cells, data_root=shared_data,
              time_limit_minutes=0)
    assert (cut / ".adapting" / "mononuclear" / "last.pt").exists()
    assert not (cut / "mononuclear.pt").exists()
    with pytest.raises(AdaptError, match="interrupted adaptation; pass --resume"):
        adapt(["mylab"], cut, config, cells=cells, data_root=shared_data)
    with pytest.raises(AdaptError, match="another configuration"):
        adapt(["mylab"], cut, replace(config, lr=1e-3), cells=cells, data_root=shared_data,
              resume=True)
    resumed = adapt(["mylab"], cut, config, cells=cells, data_root=shared_data, resume=True)
    assert resumed["mononuclear"]["cells"] == whole["mononuclear"]["cells"]
    assert resumed["mononuclear"]["after"] == whole["mononuclear"]["after"]
    once, _ = load_classifier(tmp_path / "whole" / "mononuclear.pt")
    twice, _ = load_classifier(cut / "mononuclear.pt")
    base, _ = load_classifier("mononuclear")
    assert all(torch.equal(a, b) for a, b in zip(once.state_dict().values(),
                                                 twice.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(once.state_dict().values(),
                                                     base.state_dict().values(), strict=True))
    assert not (cut / ".adapting").exists()
    with pytest.raises(AdaptError, match="already holds adapted models"):
        adapt(["mylab"], cut, config, cells=cells, data_root=shared_data, resume=True)


def test_one_validation_case_is_too_few_to_choose_on(lab_folder, tmp_path, shared_data):
    """4 cases: 1 held out, 3 to learn from, of which a quarter would be a single case to
    choose the epoch on; all 3 are learnt from instead and the last epoch is kept."""
    results = adapt(["mylab"], tmp_path / "all", QUICK, cells=_lab_cells(lab_folder),
                    data_root=shared_data)
    mono = results["mononuclear"]["cells"]
    assert mono["validation"] == {} and mono["best_epoch"] == QUICK.epochs
    assert sum(mono["learnt"].values()) + sum(mono["held_out"].values()) == 28


@pytest.mark.parametrize("layers", ["early", "head"])
def test_only_the_chosen_layers_learn_the_lab(layers, lab_folder, tmp_path, shared_data):
    from leukodiff.training.adapt import EARLY_BLOCKS

    # no validation cases: the last epoch is kept, so the chosen layers have moved
    config = replace(QUICK, layers=layers, lr=1e-3, validation=0)
    adapt(["mylab"], tmp_path / layers, config, cells=_lab_cells(lab_folder),
          data_root=shared_data, force=True)
    base = load_classifier("mononuclear")[0].state_dict()
    adapted = load_classifier(tmp_path / layers / "mononuclear.pt")[0].state_dict()
    changed = {name for name, value in adapted.items() if not torch.equal(value, base[name])}
    assert changed
    if layers == "head":
        assert all(name.startswith("head.") for name in changed)
    else:
        early = tuple(f"backbone.layers.{i}." for i in range(EARLY_BLOCKS))
        assert all(name.startswith(early) for name in changed)
        assert not any("running_" in name for name in changed)  # BN statistics kept


def test_unknown_layers_to_adapt_are_refused():
    with pytest.raises(AdaptError, match="early"):
        AdaptConfig(layers="middle")
