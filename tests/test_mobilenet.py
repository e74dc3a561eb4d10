"""MobileNetV1: the paper's Table 2 counts, and the TFLite -> PyTorch weight conversion."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import tflite
import torch
from PIL import Image
from rich.console import Console
from torch import nn

from leukodiff.imaging import load_image
from leukodiff.models.mobilenet import (
    MobileNetClassifier,
    MobileNetV1,
    fused_for_inference,
    keras_parameter_counts,
    layer_rows,
    parameter_table,
    tf_same_padding,
)
from leukodiff.models.tflite import (
    WEIGHT_FILES,
    WEIGHTS_ENV,
    WeightsNotFoundError,
    imagenet_mobilenet_v1,
    load_imagenet_classifier,
    pretrained_classifier,
    weights_file,
)

# --- Table 2 ----------------------------------------------------------------------------------


def paper_model() -> MobileNetClassifier:
    model = MobileNetClassifier(num_classes=2, width=0.5)
    model.freeze_backbone()
    return model


def test_table2_totals_match_the_paper() -> None:
    assert keras_parameter_counts(paper_model()) == (1_093_218, 263_682)


def test_table2_rows_match_the_paper() -> None:
    rows = layer_rows(paper_model(), input_size=128)
    counts = {row.number: row.parameters for row in rows if row.kind != "Softmax"}
    assert [counts[n] for n in ("1", "2", "3", "4", "5", "13", "25", "27", "28")] == [
        496, 208, 640, 416, 2304, 33_792, 133_120, 264_192, 262_656,
    ]  # fmt: skip
    assert rows[-1].kind == "Softmax" and rows[-1].parameters == 1026
    assert (rows[0].kernel, rows[0].input_size, rows[0].stride) == ("3x3x3x16", "128x128x3", "s2")
    pool = next(row for row in rows if row.kind == "Global Avg. Pool")
    assert pool.input_size == "4x4x512"


def test_parameter_table_prints_the_totals() -> None:
    console = Console(file=io.StringIO(), width=80)
    console.print(parameter_table(paper_model(), input_size=128))
    text = console.file.getvalue()
    assert "Total parameters" in text and "1,093,218" in text
    assert "Trainable parameters" in text and "263,682" in text
    assert "…" not in text  # nothing truncated at 80 columns


def test_unfrozen_counts_leave_out_only_batchnorm_statistics() -> None:
    total, trainable = keras_parameter_counts(MobileNetClassifier(num_classes=2))
    bn_stats = 2 * sum(
        m.num_features for m in MobileNetClassifier(2).modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert (total, trainable) == (1_093_218, 1_093_218 - bn_stats)


# --- architecture -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [(128, 3, 2, (0, 1)), (127, 3, 2, (1, 1)), (5, 3, 2, (1, 1)), (8, 1, 1, (0, 0))],
)
def test_tf_same_padding_puts_the_extra_pixel_after(
    size: int, kernel: int, stride: int, expected: tuple[int, int]
) -> None:
    assert tf_same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize("size", [128, 127, 97, 33])
def test_any_input_size_gives_ceil_halved_feature_maps(size: int) -> None:
    backbone = MobileNetV1(0.25).eval()
    with torch.no_grad():
        feature_map = backbone.feature_map(torch.rand(1, 3, size, size))
    side = size
    for _ in range(5):
        side = -(-side // 2)
    assert feature_map.shape == (1, backbone.out_features, side, side)


def test_head_on_features_equals_forward() -> None:
    model = MobileNetClassifier(num_classes=3, dropout=0.2).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (2, 512)
        torch.testing.assert_close(model.head(features), model(x))


def test_batchnorm_folded_in_gives_the_same_logits_and_leaves_the_model() -> None:
    torch.manual_seed(0)
    model = MobileNetClassifier(num_classes=3).train()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # not identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    fused = fused_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert model.training and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 27
    x = torch.rand(4, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x), atol=1e-4, rtol=1e-4)


def test_frozen_backbone_stays_frozen_in_train_mode() -> None:
    model = paper_model()
    model.train()
    batchnorms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in batchnorms]
    model(torch.rand(4, 3, 64, 64)).sum().backward()
    assert model.head.training and not any(bn.training for bn in batchnorms)
    for bn, (mean, var) in zip(batchnorms, before, strict=True):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_unfreezing_trains_convolutions_but_keeps_batchnorm_frozen() -> None:
    model = paper_model()
    model.unfreeze_backbone()
    model.train()
    bn = model.backbone.layers[0].bn
    assert model.backbone.layers[0].conv.weight.requires_grad
    assert not bn.training and not bn.weight.requires_grad
    model.unfreeze_backbone(train_batchnorm=True)
    assert bn.training and bn.weight.requires_grad


# --- ImageNet weights from TFLite -------------------------------------------------------------


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """The shared ImageNet weights; tests that need them fail loudly (not skip) when absent."""
    try:
        return weights_file(0.5).parent
    except WeightsNotFoundError as error:
        pytest.fail(f"ImageNet weights needed by this test: {error}")


def test_missing_weights_file_names_file_folder_and_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        imagenet_mobilenet_v1(0.5, weights_dir=tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, WeightsNotFoundError)
    assert WEIGHT_FILES[0.5] in message and str(tmp_path) in message and WEIGHTS_ENV in message

    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(WeightsNotFoundError, match="nowhere"):
        pretrained_classifier(2)


def test_weights_folder_from_environment(
    weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_dir))
    monkeypatch.chdir("/")
    assert weights_file(0.25) == weights_dir / WEIGHT_FILES[0.25]


@pytest.mark.parametrize(("width", "channels"), [(0.25, 256), (0.75, 768)])
def test_other_widths_load(weights_dir: Path, width: float, channels: int) -> None:
    backbone = imagenet_mobilenet_v1(width, weights_dir)
    assert backbone.out_features == channels
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, 96, 96))
    assert features.shape == (2, channels) and torch.isfinite(features).all()
    assert features.min() >= 0 and features.max() <= 6  # pooled ReLU6 outputs


def test_pretrained_classifier_is_frozen_with_imagenet_base(weights_dir: Path) -> None:
    model = pretrained_classifier(5, weights_dir=weights_dir)
    assert keras_parameter_counts(model)[1] == 512 * 512 + 512 + 512 * 5 + 5
    reference = imagenet_mobilenet_v1(0.5, weights_dir)
    first = model.backbone.layers[0].conv.weight
    assert torch.equal(first, reference.layers[0].conv.weight) and first.abs().sum() > 0


def _with_pool_size(model_bytes: bytes, size: int) -> bytes:
    """The TFLite model with its (fixed 5x5) average pool resized to `size` x `size`.

    The file's pool is sized for its native input; at another input size the
    interpreter cannot prepare it, so we patch the two int32 fields in place.
    """
    data = bytearray(model_bytes)
    model = tflite.Model.GetRootAsModel(model_bytes, 0)
    graph = model.Subgraphs(0)
    patched = 0
    for index in range(graph.OperatorsLength()):
        op = graph.Operators(index)
        code = model.OperatorCodes(op.OpcodeIndex())
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) != 1:  # AVERAGE_POOL_2D
            continue
        table = op.BuiltinOptions()
        options = tflite.Pool2DOptions()
        options.Init(table.Bytes, table.Pos)
        for slot in (10, 12):  # filter_width, filter_height vtable slots
            offset = options._tab.Offset(slot)
            assert offset, "pool filter size not stored in the flatbuffer"
            position = options._tab.Pos + offset
            data[position : position + 4] = size.to_bytes(4, "little", signed=True)
            patched += 1
    assert patched == 2
    return bytes(data)


def _tflite_outputs(model_bytes: bytes, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dequantised (logits, probabilities) of the TFLite runtime, one image at a time."""
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    with warnings.catch_warnings():  # preserve_all_tensors warns that it is for debugging
        warnings.simplefilter("ignore")
        interpreter = litert.Interpreter(
            model_content=model_bytes,
            experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            experimental_preserve_all_tensors=True,
        )
    source = interpreter.get_input_details()[0]
    output = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], [1, *images.shape[1:]])
    interpreter.allocate_tensors()
    (logits_detail,) = [  # the classifier's output, the softmax input
        d
        for d in interpreter.get_tensor_details()
        if tuple(d["shape"]) == (1, 1001) and d["index"] != output["index"]
    ]

    def dequantise(detail: dict) -> np.ndarray:
        scale, zero_point = detail["quantization"]
        values = interpreter.get_tensor(detail["index"]).astype(np.float32)
        return (values - zero_point) * scale

    logits, probabilities = [], []
    for image in images:
        interpreter.set_tensor(source["index"], image[None])
        interpreter.invoke()
        logits.append(dequantise(logits_detail))
        probabilities.append(dequantise(output))
    return np.concatenate(logits), np.concatenate(probabilities)


@pytest.fixture(scope="module")
def smear_crops(shared_data: Path) -> list[Image.Image]:
    """One real PBC cell image per class."""
    folder = shared_data / "pbc"
    kinds = ("lymphocyte", "neutrophil", "eosinophil", "monocyte", "basophil")
    return [load_image(min((folder / kind).glob("*.jpg"))) for kind in kinds]


@pytest.mark.parametrize(("width", "size"), [(0.5, 160), (0.5, 128), (0.25, 128), (0.75, 192)])
def test_converted_network_matches_tflite_runtime(
    weights_dir: Path, smear_crops: list[Image.Image], width: float, size: int
) -> None:
    images = np.stack([np.asarray(im.resize((size, size), Image.BILINEAR)) for im in smear_crops])
    model_bytes = weights_file(width, weights_dir).read_bytes()
    native_size = int(WEIGHT_FILES[width].split("_")[3])  # mobilenet_v1_{width}_{size}_quant
    if size != native_size:
        model_bytes = _with_pool_size(model_bytes, -(-size // 32))
    tfl_logits, tfl_probs = _tflite_outputs(model_bytes, images)

    model = load_imagenet_classifier(width, weights_dir)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        logits = model(x)
    probs = logits.softmax(1).numpy()
    logits = logits.numpy()

    # The TFLite network is 8-bit, so only closeness can be asked for. Measured
    # on these 5 images: logit cosine >= 0.9989, max |prob diff| <= 0.046 (on 40
    # PBC images: cosine >= 0.997, |prob diff| <= 0.081). The mistakes this
    # guards against give cosine <= 0.96 (symmetric padding 0.89-0.93, BGR
    # input 0.93-0.95, ReLU instead of ReLU6 0.94-0.96).
    cosine = (logits * tfl_logits).sum(1) / (
        np.linalg.norm(logits, axis=1) * np.linalg.norm(tfl_logits, axis=1)
    )
    assert cosine.min() > 0.99, cosine
    assert np.abs(probs - tfl_probs).max() < 0.1
    # These are not ImageNet pictures: top classes are near-ties at 0.1-0.3, so
    # ask for TFLite's top-1 among PyTorch's top 3, and for most top-1s to agree.
    top3 = np.argsort(-logits, axis=1)[:, :3]
    tfl_top1 = tfl_probs.argmax(1)
    assert all(label in row for label, row in zip(tfl_top1, top3, strict=True))
    assert (tfl_top1 == logits.argmax(1)).mean() >= 0.6
