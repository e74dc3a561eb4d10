"""Level-2 training on real PBC crops: loss falls, runs resume exactly, nothing is overwritten."""


import pytest
import torch
from typer.testing import CliRunner

from leukodiff.cli import app
from leukodiff.data.records import Cell
from leukodiff.data.sources import load_cells
from leukodiff.models.io import ModelFileError, load_classifier
from leukodiff.taxonomy import CellType
from leukodiff.training.cells import (
    CameraJitter,
    CropGeometry,
    StainJitter,
    augmentation,
    load_cell_tensors,
)
from leukodiff.training.classifier import (
    ClassifierConfig,
    TrainingError,
    build_model,
    class_weights,
    draw_weights,
    train_classifier,
)
from leukodiff.training.mixstyle import MixStyle, add_mixstyle

QUICK = dict(task="mononuclear", sources=("pbc",), mode="frozen", epochs=2, max_per_class=24,
             batch_size=16)


def test_fine_tuning_steps_lower_the_loss_on_real_pbc_cells(shared_data):
    cells = [c for c in load_cells("pbc", shared_data).records
             if c.cell_type in (CellType.LYMPHOCYTE, CellType.MONOCYTE)]
    batch = cells[:16] + cells[-16:]
    images = load_cell_tensors(batch, CropGeometry()).float().div(255)
    targets = torch.tensor([0 if c.cell_type is CellType.LYMPHOCYTE else 1 for c in batch])
    torch.manual_seed(0)
    model = build_model(ClassifierConfig(mode="finetune"))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                 eps=1e-7)
    losses = []
    model.train()
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_frozen_mode_trains_only_the_head():
    model = build_model(ClassifierConfig(mode="frozen"))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head"}


class Interrupt(Exception):
    pass


def _stop_after_first_epoch(message: str) -> None:
    if message.startswith("epoch 1:"):
        raise Interrupt


def test_an_interrupted_run_resumes_to_the_same_model(tmp_path, shared_data):
    config = ClassifierConfig(**QUICK)
    whole = train_classifier(config, tmp_path / "whole", data_root=shared_data)
    with pytest.raises(Interrupt):
        train_classifier(config, tmp_path / "cut", data_root=shared_data,
                         log=_stop_after_first_epoch)
    assert not (tmp_path / "cut" / "model.pt").exists()
    resumed = train_classifier(config, tmp_path / "cut", data_root=shared_data, resume=True)
    assert [h["loss"] for h in resumed["training"]["history"]] == pytest.approx(
        [h["loss"] for h in whole["training"]["history"]])
    a, _ = load_classifier(tmp_path / "whole" / "model.pt")
    b, _ = load_classifier(tmp_path / "cut" / "model.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_runs_are_never_overwritten_and_bad_configs_are_refused(tmp_path, shared_data):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"earlier work")
    with pytest.raises(TrainingError, match="--resume"):
        train_classifier(ClassifierConfig(**QUICK), tmp_path / "run", data_root=shared_data)
    assert (tmp_path / "run" / "last.pt").read_bytes() == b"earlier work"
    with pytest.raises(TrainingError, match="nothing to resume"):
        train_classifier(ClassifierConfig(**QUICK), tmp_path / "new", resume=True)
    with pytest.raises(TrainingError, match="unknown task"):
        ClassifierConfig(task="platelets").class_names()
    with pytest.raises(TrainingError, match="two or more"):
        ClassifierConfig(task="mononuclear", classes=("neutrophil", "lymphocyte")).class_names()
    assert ClassifierConfig(task="polymorphonuclear",
                            classes=("eosinophil", "SNE")).class_names() == (
        "neutrophil", "eosinophil")
    with pytest.raises(TrainingError, match="unknown augmentation"):
        ClassifierConfig(augmentation="strong").class_names()
    with pytest.raises(TrainingError, match=r"mixstyle .* mode 'finetune'"):
        ClassifierConfig(mode="frozen", mixstyle=0.5).class_names()


def test_lab_augmentation_changes_stain_and_camera_but_not_the_cell(shared_data):
    cells = [c for c in load_cells("pbc", shared_data).records[:4]]
    images = load_cell_tensors(cells, CropGeometry(64, 2.6))
    assert torch.equal(StainJitter(0.0, 0.0)(images[0]), images[0])  # HED round trip exact
    torch.manual_seed(0)
    lab = augmentation("lab", 64)
    changed = torch.stack([lab(image) for image in images])
    assert changed.dtype == torch.uint8 and changed.shape == images.shape
    # colours move (stain amounts, white balance, gamma)
    means = (changed.float().mean((0, 2, 3)) - images.float().mean((0, 2, 3))).abs()
    assert float(means.max()) > 2
    gain = CameraJitter(gain=0.0, gamma=0.0, soften=1.0)(images[0])  # resolution only
    assert float((gain.float() - images[0].float()).abs().mean()) < 12
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmentation("strong", 64)


def test_model_files_are_checked_against_their_manifest(tmp_path, shared_data):
    manifest = train_classifier(ClassifierConfig(**{**QUICK, "epochs": 1}), tmp_path,
                                data_root=shared_data)
    assert manifest["classes"] == ["lymphocyte", "monocyte"]
    assert manifest["input"]["crop_scale"] == 2.6
    _, loaded = load_classifier(tmp_path / "model.pt")
    assert loaded.sha256 == manifest["sha256"]
    with open(tmp_path / "model.pt", "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ModelFileError, match="sha256"):
        load_classifier(tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="not found"):
        load_classifier(tmp_path / "absent.pt")


def test_cli_trains_then_evaluates_with_a_confusion_matrix_png(tmp_path, shared_data):
    runner = CliRunner()
    run = tmp_path / "cli-run"
    result = runner.invoke(app, [
        "train", "classifier", "--task", "polymorphonuclear", "--classes",
        "neutrophil,eosinophil", "--mode", "frozen", "--epochs", "1", "--max-per-class", "16",
        "--sources", "pbc", "--out", str(run), "--data-root", str(shared_data)])
    assert result.exit_code == 0, result.output
    assert (run / "model.pt").exists() and (run / "model.json").exists()
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "classifier", "--model", str(run / "model.pt"),
                                 "--sources", "bccd", "--part", "all", "--out", str(out),
                                 "--data-root", str(shared_data)])
    assert result.exit_code == 0, result.output
    assert "neutrophil" in result.output and "confusion matrix" in result.output
    assert (out / "confusion_all_all.png").stat().st_size > 1000
    result = runner.invoke(app, ["train", "classifier", "--out", str(run), "--mode", "frozen",
                                 "--data-root", str(shared_data)])
    assert result.exit_code == 1 and "--resume" in result.output
    assert "Traceback" not in result.output


def test_calibrate_measures_a_trained_model_again_as_the_pipeline_types_cells(tmp_path,
                                                                             shared_data):
    """`train calibrate`: the threshold calibrated on the run's own val part with every
    orientation of each crop (`data.crops.LEVEL2_VIEWS`), same weights (sha256 kept),
    written beside an ONNX export; the source and its manifest untouched."""
    import json

    from leukodiff.data.crops import LEVEL2_VIEWS

    run = tmp_path / "run"
    trained = train_classifier(ClassifierConfig(**{**QUICK, "epochs": 1}), run,
                               data_root=shared_data)
    assert trained["calibration"]["views"] == LEVEL2_VIEWS
    before = (run / "model.json").read_text()
    out = tmp_path / "calibrated"
    result = CliRunner().invoke(app, ["train", "calibrate", "--model", str(run / "model.pt"),
                                      "--out", str(out), "--data-root", str(shared_data)])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "model.json").read_text())
    assert written["sha256"] == trained["sha256"] == written["recalibrated_from"]["sha256"]
    assert written["calibration"]["views"] == LEVEL2_VIEWS
    assert written["calibration"]["validation_cells"] == trained["calibration"][
        "validation_cells"]
    assert written["metrics"]["test"]["all"]["n"] == trained["metrics"]["test"]["all"]["n"]
    assert (out / "model.onnx").stat().st_size > 100_000
    load_classifier(out / "model.pt")
    assert (run / "model.json").read_text() == before
    again = CliRunner().invoke(app, ["train", "calibrate", "--model", str(run / "model.pt"),
                                     "--out", str(run), "--data-root", str(shared_data)])
    assert again.exit_code == 1 and "another --out" in again.output
    assert "Traceback" not in again.output
    # a run whose data changed since (its split cannot be rebuilt), and an adapted model
    # (calibrated on a lab's own cells), are refused
    for name, change in (("changed", lambda m: m["training"]["cells"]["val"].update(
            lymphocyte=m["training"]["cells"]["val"]["lymphocyte"] + 1)),
                         ("adapted", lambda m: m.update(adapted={"base": {}}))):
        copy = tmp_path / name
        copy.mkdir()
        (copy / "model.pt").write_bytes((run / "model.pt").read_bytes())
        altered = json.loads((run / "model.json").read_text())
        change(altered)
        (copy / "model.json").write_text(json.dumps(altered))
        refused = CliRunner().invoke(app, ["train", "calibrate", "--model",
                                           str(copy / "model.pt"), "--out",
                                           str(tmp_path / f"{name}-out"),
                                           "--data-root", str(shared_data)])
        assert refused.exit_code == 1, refused.output
        assert ("could not be rebuilt" if name == "changed" else "leukodiff adapt") in \
            " ".join(refused.output.split())
        assert not (tmp_path / f"{name}-out" / "model.pt").exists()


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="neither a data set"):
        train_classifier(ClassifierConfig(sources=("nowhere",)), tmp_path / "x")


def test_confidence_calibration_keeps_the_target_accuracy():
    import numpy as np

    from leukodiff.metrics.classification import calibrate_confidence

    # 8 confident right answers, then 2 unsure wrong ones: flag the unsure ones
    probs = np.array([[0.99, 0.01]] * 8 + [[0.6, 0.4], [0.55, 0.45]])
    targets = [0] * 8 + [1, 1]
    result = calibrate_confidence(probs, targets, target_accuracy=0.99)
    assert result["threshold"] == 0.99 and result["validation_coverage"] == 0.8
    all_right = calibrate_confidence(probs, [0] * 10)
    assert all_right["threshold"] == 0.55 and all_right["validation_coverage"] == 1.0


def test_mixstyle_swaps_style_not_content_and_only_while_training():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 4, 3)
    layer.register_forward_hook(MixStyle(p=1.0))
    x = torch.rand(2, 3, 20, 20)
    x[1] = 0.7 + 0.2 * x[1]  # another "lab": brighter, flatter
    with torch.no_grad():
        plain = torch.nn.functional.conv2d(x, layer.weight, layer.bias)
        layer.eval()
        assert torch.equal(layer(x), plain)
        layer.train()
        mixed = [layer(x) for _ in range(8)]
    means, stds = plain.mean((2, 3)), plain.std((2, 3))
    low, high = means.min(0).values - 1e-4, means.max(0).values + 1e-4
    swapped = 0
    for out in mixed:
        # each image keeps its content (the same map up to a per-channel scale and shift) ...
        content = (out - out.mean((2, 3), keepdim=True)) / out.std((2, 3), keepdim=True)
        own = (plain - means[..., None, None]) / stds[..., None, None]
        assert torch.allclose(content, own, atol=1e-3)
        # ... and takes a style between the two images' own
        assert ((out.mean((2, 3)) >= low) & (out.mean((2, 3)) <= high)).all()
        swapped += not torch.allclose(out, plain, atol=1e-4)
    assert swapped  # a batch of two is mixed whenever the draw pairs the two images


def test_mixstyle_leaves_the_network_and_its_inference_unchanged():
    model = build_model(ClassifierConfig(task="mononuclear", mixstyle=0.5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(3, 3, 128, 128)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        handles = add_mixstyle(model, 1.0)
        assert len(handles) == 3
        assert torch.equal(model(x), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_balance_by_source_makes_a_sources_look_say_nothing_of_the_type(tmp_path):
    made = {"bccd": {"neutrophil": 6, "eosinophil": 2},
            "chula": {"neutrophil": 2, "eosinophil": 2, "basophil": 2}}
    cells = [Cell(tmp_path / f"{source}-{kind}-{i}.jpg", source, CellType(kind), f"{source}{i}",
                  f"{source}{kind}{i}")
             for source, kinds in made.items() for kind, n in kinds.items() for i in range(n)]
    targets = torch.tensor([("neutrophil", "eosinophil", "basophil").index(str(c.cell_type))
                            for c in cells])
    assert draw_weights(cells, 0.0, by_source=False) is None  # every cell alike
    for exponent in (0.0, 0.5):
        draws = draw_weights(cells, exponent, by_source=True)
        mass = {}
        for cell, weight in zip(cells, draws.tolist(), strict=True):
            key = cell.source, str(cell.cell_type)
            mass[key] = mass.get(key, 0.0) + weight
        for source, kinds in made.items():
            shares = [mass[source, kind] for kind in kinds]
            # each source keeps its share of the draws, spread evenly over its types
            assert sum(shares) == pytest.approx(sum(kinds.values()) ** (1 - exponent))
            assert shares == pytest.approx([shares[0]] * len(shares))
    draws = draw_weights(cells, 0.0, by_source=True)  # drawn: N 4 + 2, E 4 + 2, B 2
    assert class_weights(targets, 3, draws).tolist() == pytest.approx([14 / 18, 14 / 18, 14 / 6])
    assert class_weights(targets, 3).tolist() == pytest.approx([14 / 24, 14 / 12, 14 / 6])
