"""ImageNet weights for `MobileNetV1`, read from Google's quantised TFLite MobileNets.

No machine here reaches a model hub, so the ImageNet-pretrained base of the
paper's classifier comes from the TFLite files described in
`shared/weights/README.md` (TF-slim, uint8, per-tensor quantisation). They
are parsed with the `tflite` flatbuffer schema package and numpy; TensorFlow
is not needed.

The converted backbone reproduces the TFLite network up to its 8-bit
rounding. BatchNorm is folded into each convolution's bias in those files, so
each `BatchNorm2d` becomes an exact identity-plus-bias (weight 1, running mean
0, running variance 1 - eps). The converted base therefore has no BatchNorm
statistics of its own: keep it frozen, as the paper does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tflite
import torch
from torch import nn

from leukodiff.models.mobilenet import MobileNetClassifier, MobileNetV1

WEIGHTS_ENV = "LEUKODIFF_WEIGHTS"

#: Google's file for each width multiplier (the resolution in the name is the
#: one it was trained at; the weights work at any input size).
WEIGHT_FILES: dict[float, str] = {
    0.25: "mobilenet_v1_0.25_128_quant.tflite",
    0.5: "mobilenet_v1_0.5_160_quant.tflite",
    0.75: "mobilenet_v1_0.75_192_quant.tflite",
    1.0: "mobilenet_v1_1.0_224_quant.tflite",
}

IMAGENET_CLASSES = 1001  # index 0 is "background"

_CONV_OPS = {tflite.BuiltinOperator.CONV_2D: "conv", tflite.BuiltinOperator.DEPTHWISE_CONV_2D: "dw"}
_NUMPY_TYPES = {
    tflite.TensorType.FLOAT32: np.float32,
    tflite.TensorType.INT32: np.int32,
    tflite.TensorType.UINT8: np.uint8,
    tflite.TensorType.INT8: np.int8,
}


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained weights file is missing; the message says where it was looked for."""


def _search_path(weights_dir: Path | str | None) -> tuple[list[Path], str]:
    """Folders to look in and how they were chosen, in the order of `leukodiff.data.root`."""
    if weights_dir is not None:
        return [Path(weights_dir)], "given explicitly"
    if env := os.environ.get(WEIGHTS_ENV):
        return [Path(env).expanduser()], f"from ${WEIGHTS_ENV}"
    checkout = Path(__file__).resolve().parents[3]  # src/leukodiff/models/tflite.py -> checkout
    folders = [Path.cwd().parent / "shared" / "weights", checkout.parent / "shared" / "weights"]
    return folders, "default, beside the checkout"


def weights_file(width: float, weights_dir: Path | str | None = None) -> Path:
    """Path of the TFLite file for `width`, or `WeightsNotFoundError` naming what is missing.

    Looks in `weights_dir` if given, else `$LEUKODIFF_WEIGHTS`, else
    `../shared/weights` from the working directory or beside the checkout.
    """
    if width not in WEIGHT_FILES:
        known = ", ".join(f"{w:g}" for w in WEIGHT_FILES)
        raise ValueError(f"no ImageNet MobileNetV1 weights for width {width:g} (known: {known})")
    name = WEIGHT_FILES[width]
    folders, how = _search_path(weights_dir)
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    looked_in = ", ".join(dict.fromkeys(str(folder.resolve()) for folder in folders))
    raise WeightsNotFoundError(
        f"ImageNet weights file {name} not found ({how}): looked in {looked_in}. "
        f"Put the file there, or point {WEIGHTS_ENV}=DIR (or weights_dir) at the folder holding it "
        "(the files are public in github.com/google-coral/test_data)."
    )


# --- reading the flatbuffer ------------------------------------------------------------------


@dataclass(frozen=True)
class TFLiteConv:
    """One convolution of a TFLite graph, dequantised and in PyTorch layout."""

    kind: str  # "conv" or "dw"
    name: str
    weight: np.ndarray  # (out, in/groups, kh, kw), float32
    bias: np.ndarray  # (out,), float32
    stride: int
    same_padding: bool
    activation: int  # tflite.ActivationFunctionType


def _dequantise(model: tflite.Model, tensor: tflite.Tensor) -> np.ndarray:
    """Real values of a constant tensor: (q - zero_point) * scale, per tensor or per channel."""
    dtype = _NUMPY_TYPES.get(tensor.Type())
    if dtype is None:
        raise ValueError(f"unsupported TFLite tensor type {tensor.Type()} ({tensor.Name()!r})")
    raw = model.Buffers(tensor.Buffer()).DataAsNumpy()
    values = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(tensor.ShapeAsNumpy())
    quant = tensor.Quantization()
    if dtype is np.float32 or quant is None or quant.ScaleLength() == 0:
        return values.astype(np.float32)
    scale = quant.ScaleAsNumpy().astype(np.float64)
    zero_point = quant.ZeroPointAsNumpy().astype(np.float64)
    if scale.size > 1:  # per-channel: broadcast along the quantised dimension
        shape = [1] * values.ndim
        shape[quant.QuantizedDimension()] = scale.size
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return ((values.astype(np.float64) - zero_point) * scale).astype(np.float32)


def read_convolutions(path: Path) -> list[TFLiteConv]:
    """All convolutions of a TFLite file in graph order, dequantised, PyTorch layout."""
    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    convs: list[TFLiteConv] = []
    for index in range(graph.OperatorsLength()):
        op = graph.Operators(index)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = _CONV_OPS.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
        if kind is None:
            continue
        weight_tensor = graph.Tensors(op.Inputs(1))
        weight = _dequantise(model, weight_tensor)
        bias = _dequantise(model, graph.Tensors(op.Inputs(2)))
        table = op.BuiltinOptions()
        options = tflite.Conv2DOptions() if kind == "conv" else tflite.DepthwiseConv2DOptions()
        options.Init(table.Bytes, table.Pos)
        # TFLite: conv (out, kh, kw, in), depthwise (1, kh, kw, ch); PyTorch: (out, in, kh, kw).
        weight = weight.transpose(0, 3, 1, 2) if kind == "conv" else weight.transpose(3, 0, 1, 2)
        if options.StrideH() != options.StrideW():
            raise ValueError(f"{path.name}: unequal strides in {weight_tensor.Name()!r}")
        convs.append(
            TFLiteConv(
                kind=kind,
                name=weight_tensor.Name().decode(),
                weight=np.ascontiguousarray(weight),
                bias=bias,
                stride=options.StrideH(),
                same_padding=options.Padding() == tflite.Padding.SAME,
                activation=options.FusedActivationFunction(),
            )
        )
    return convs


# --- loading into PyTorch --------------------------------------------------------------------


def _expected_kind(block_kind: str) -> str:
    return "dw" if block_kind == "dw" else "conv"  # TFLite stores 1x1 pointwise as CONV_2D


def _load(backbone: MobileNetV1, path: Path) -> TFLiteConv:
    """Copy the backbone's 27 convolutions from `path`; return the classifier convolution."""
    convs = read_convolutions(path)
    blocks = list(backbone.blocks())
    if len(convs) != len(blocks) + 1:
        raise ValueError(
            f"{path.name}: {len(convs)} convolutions, expected {len(blocks)} + 1 classifier"
        )
    relu6 = tflite.ActivationFunctionType.RELU6
    for number, (block, conv) in enumerate(zip(blocks, convs, strict=False), start=1):
        mismatch = (
            conv.kind != _expected_kind(block.kind)
            or conv.stride != block.stride
            or not conv.same_padding
            or conv.weight.shape != tuple(block.conv.weight.shape)
        )
        if mismatch:
            raise ValueError(
                f"{path.name}: convolution {number} ({conv.name}) is {conv.kind} "
                f"{conv.weight.shape} stride {conv.stride}; the backbone expects "
                f"{block.kind} {tuple(block.conv.weight.shape)} stride {block.stride} "
                "(wrong width?)"
            )
        if conv.activation != relu6 and isinstance(block.act, nn.ReLU6):
            raise ValueError(f"{path.name}: convolution {number} is not followed by ReLU6")
        bn = block.bn
        with torch.no_grad():
            block.conv.weight.copy_(torch.from_numpy(conv.weight))
            # BN as identity plus the folded bias: (x - 0) / sqrt((1 - eps) + eps) * 1 + bias.
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(conv.bias))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    return convs[-1]


def load_imagenet_backbone(backbone: MobileNetV1, weights_dir: Path | str | None = None) -> None:
    """Fill `backbone` in place with the ImageNet weights for its width."""
    _load(backbone, weights_file(backbone.width, weights_dir))


def imagenet_mobilenet_v1(width: float = 0.5, weights_dir: Path | str | None = None) -> MobileNetV1:
    """A `MobileNetV1` (ReLU6) with ImageNet weights, in eval mode."""
    backbone = MobileNetV1(width, relu6=True)
    load_imagenet_backbone(backbone, weights_dir)
    return backbone.eval()


class ImageNetMobileNetV1(nn.Module):
    """The full ImageNet network: backbone and its 1001-way classifier (index 0: background).

    Returns logits; used to check the conversion against the TFLite runtime.
    """

    def __init__(self, width: float = 0.5) -> None:
        super().__init__()
        self.backbone = MobileNetV1(width, relu6=True)
        self.classifier = nn.Linear(self.backbone.out_features, IMAGENET_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def load_imagenet_classifier(
    width: float = 0.5, weights_dir: Path | str | None = None
) -> ImageNetMobileNetV1:
    """The converted ImageNet MobileNetV1 with its classifier (a 1x1 conv in TFLite), eval mode."""
    model = ImageNetMobileNetV1(width)
    logits = _load(model.backbone, weights_file(width, weights_dir))
    expected = (IMAGENET_CLASSES, model.backbone.out_features, 1, 1)
    if logits.kind != "conv" or logits.weight.shape != expected:
        raise ValueError(f"classifier {logits.name}: shape {logits.weight.shape}, not {expected}")
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(logits.weight.reshape(expected[:2])))
        model.classifier.bias.copy_(torch.from_numpy(logits.bias))
    return model.eval()


def pretrained_classifier(
    num_classes: int,
    width: float = 0.5,
    hidden: int = 512,
    dropout: float = 0.0,
    weights_dir: Path | str | None = None,
    freeze: bool = True,
) -> MobileNetClassifier:
    """The paper's transfer-learning classifier: ImageNet base (frozen by default), new head."""
    model = MobileNetClassifier(num_classes, width=width, hidden=hidden, dropout=dropout)
    load_imagenet_backbone(model.backbone, weights_dir)
    if freeze:
        model.freeze_backbone()
    return model
