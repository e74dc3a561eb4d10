"""MobileNetV1 and the paper's level-2 classifier (Cheuque et al. 2022, Table 2).

The network is built so that Google's ImageNet MobileNetV1 weights (TF-slim,
see `leukodiff.models.tflite`) drop in unchanged and so that Keras-style
parameter counts reproduce the paper's Table 2 exactly:

* Every convolution has no bias and is followed by BatchNorm (eps 1e-3,
  Keras momentum 0.99) and the activation, one Table 2 row per convolution.
* Stride-2 layers use TensorFlow "SAME" padding (more padding bottom/right);
  PyTorch's symmetric padding shifts every feature map by half a pixel and
  costs the converted 0.25/0.5 models much of their accuracy.
* The activation is ReLU6 by default. The paper's text says "ReLU", but Keras'
  `MobileNet` (which the paper used) and the TF-slim weights both use ReLU6;
  ReLU6 is what the pretrained filters expect. `relu6=False` gives plain ReLU.
* Input normalisation is part of the model: `forward` takes float RGB in
  [0, 1] (as `torchvision.transforms.functional.to_tensor` gives) and maps it
  to (pixel - 128) / 128, the range the ImageNet weights were trained on. Data
  pipelines, ONNX exports and inference code therefore never repeat it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: Pixel value that maps to 0 and pixels per unit, from the TFLite input
#: quantisation of Google's MobileNets (zero point 128, scale 1/128).
PIXEL_MEAN = 128.0
PIXEL_STD = 128.0

#: Keras' BatchNormalization defaults used by `keras.applications.MobileNet`.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch convention: 1 - Keras momentum (0.99)

#: (output channels at width 1.0, stride) of the 13 depthwise-separable pairs.
_SEPARABLE_PLAN: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)  # fmt: skip
_STEM_CHANNELS = 32
_MIN_CHANNELS = 8  # TF-slim's min_depth


def scaled_channels(channels: int, width: float) -> int:
    """Channels of a layer at width multiplier `width`, rounded as TF-slim and Keras do."""
    return max(int(channels * width), _MIN_CHANNELS)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow "SAME" along one axis; the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SamePad2d(nn.Module):
    """Zero-pads height and width as TensorFlow "SAME" does, computed from the input size.

    Needs kernel >= stride so that the padding is never negative; then no
    `max` is needed in `forward` and traced/exported graphs stay simple.
    """

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        if kernel < stride:
            raise ValueError(f"SAME padding needs kernel >= stride, got {kernel} < {stride}")
        self.kernel = kernel
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        pad_h = ((height + self.stride - 1) // self.stride - 1) * self.stride + self.kernel - height
        pad_w = ((width + self.stride - 1) // self.stride - 1) * self.stride + self.kernel - width
        return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


class InputNormalization(nn.Module):
    """Maps RGB in [0, 1] to (pixel - 128) / 128, the ImageNet weights' input range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (255.0 / PIXEL_STD) - PIXEL_MEAN / PIXEL_STD


class ConvBlock(nn.Module):
    """Convolution (no bias) -> BatchNorm -> ReLU6/ReLU: one row of the paper's Table 2.

    `kind` is "conv" (full 3x3), "dw" (depthwise 3x3) or "pw" (pointwise 1x1).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kind: str, stride: int, relu6: bool
    ) -> None:
        super().__init__()
        if kind not in ("conv", "dw", "pw"):
            raise ValueError(f"unknown convolution kind {kind!r}")
        kernel = 1 if kind == "pw" else 3
        groups = in_channels if kind == "dw" else 1
        self.kind = kind
        self.stride = stride
        # Stride 1 with an odd kernel: SAME padding is symmetric, so a static pad is exact.
        self.pad = SamePad2d(kernel, stride) if stride > 1 else None
        padding = 0 if stride > 1 else kernel // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act: nn.Module = nn.ReLU6(inplace=True) if relu6 else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return self.act(self.bn(self.conv(x)))


def fused_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with each conv block's BatchNorm folded into its
    convolution (torch's `fuse_conv_bn_eval`): the same outputs, ~30% less CPU time, as the
    ONNX export does it. The model itself is left as it was; one with no BatchNorm left
    (already fused) is returned as it is, in eval mode."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model.eval()
    fused = copy.deepcopy(model).eval()
    for block in fused.modules():
        if isinstance(block, ConvBlock) and isinstance(block.bn, nn.BatchNorm2d):
            block.conv = fuse_conv_bn_eval(block.conv, block.bn)
            block.bn = nn.Identity()
    return fused


class MobileNetV1(nn.Module):
    """MobileNetV1 feature extractor: 27 conv blocks and global average pooling.

    Takes float RGB in [0, 1], shape (N, 3, H, W), any H and W; returns pooled
    features of shape (N, `out_features`).
    """

    def __init__(self, width: float = 0.5, relu6: bool = True) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")
        self.width = width
        self.input_norm = InputNormalization()
        channels = scaled_channels(_STEM_CHANNELS, width)
        blocks: list[ConvBlock] = [ConvBlock(3, channels, "conv", 2, relu6)]
        for base_channels, stride in _SEPARABLE_PLAN:
            out_channels = scaled_channels(base_channels, width)
            blocks.append(ConvBlock(channels, channels, "dw", stride, relu6))
            blocks.append(ConvBlock(channels, out_channels, "pw", 1, relu6))
            channels = out_channels
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = channels

    def blocks(self) -> Iterator[ConvBlock]:
        """The 27 conv blocks in graph order (the order of the TFLite file, too)."""
        for block in self.layers:
            assert isinstance(block, ConvBlock)
            yield block

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last conv block's output before pooling, (N, out_features, ceil(H/32), ceil(W/32))."""
        return self.layers(self.input_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x)).flatten(1)


class MobileNetClassifier(nn.Module):
    """The paper's level-2 classifier: MobileNetV1 base, then FC `hidden` + ReLU, then logits.

    `forward` returns logits; softmax belongs to the loss or to inference.
    `head` works on its own on cached `features`, which is how training with a
    frozen base (the paper's setting) avoids recomputing the base every epoch.
    """

    def __init__(
        self,
        num_classes: int,
        width: float = 0.5,
        hidden: int = 512,
        dropout: float = 0.0,
        relu6: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1 or hidden < 1:
            raise ValueError(f"need num_classes >= 1 and hidden >= 1, got {num_classes}, {hidden}")
        self.num_classes = num_classes
        self.backbone = MobileNetV1(width, relu6=relu6)
        # Dropout is always present (p=0 is a no-op) so state-dict keys do not depend on it.
        self.head = nn.Sequential(
            nn.Linear(self.backbone.out_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self._backbone_bn_frozen = False

    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter is trained."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def freeze_backbone(self) -> None:
        """Stop training the base: no gradients, and BatchNorm kept in eval mode by `train()`."""
        self.backbone.requires_grad_(False)
        self._backbone_bn_frozen = True
        self._freeze_bn_modes()

    def unfreeze_backbone(self, train_batchnorm: bool = False) -> None:
        """Train the base's convolutions again (fine-tuning).

        BatchNorm stays frozen unless `train_batchnorm`: weights converted from
        TFLite have BN folded into an identity-plus-bias, so batch statistics
        would change the function the pretrained filters compute; Keras also
        recommends inference-mode BN when fine-tuning on small data sets.
        """
        self.backbone.requires_grad_(True)
        self._backbone_bn_frozen = not train_batchnorm
        for module in self.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.requires_grad_(train_batchnorm)
                module.train(self.training)
        self._freeze_bn_modes()

    def _freeze_bn_modes(self) -> None:
        if self._backbone_bn_frozen:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()

    def train(self, mode: bool = True) -> MobileNetClassifier:
        """As `nn.Module.train`, but a frozen backbone's BatchNorm stays in eval mode."""
        super().train(mode)
        self._freeze_bn_modes()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, backbone.out_features), the input of `head`."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# --- Keras-style parameter counts (Table 2) ---------------------------------------------------


def _bn_statistics(module: nn.Module) -> int:
    """BatchNorm moving mean and variance: Keras counts them as non-trainable parameters."""
    count = 0
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
            assert bn.running_mean is not None and bn.running_var is not None
            count += bn.running_mean.numel() + bn.running_var.numel()
    return count


def keras_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters as Keras' `model.summary()` counts them.

    Total includes BatchNorm moving statistics; trainable follows each
    parameter's current `requires_grad`. The paper's 2-class, width-0.5
    classifier with a frozen base gives (1_093_218, 263_682).
    """
    parameters = list(model.parameters())
    total = sum(p.numel() for p in parameters) + _bn_statistics(model)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return total, trainable


@dataclass(frozen=True)
class LayerRow:
    """One row of Table 2."""

    number: str
    part: str
    kind: str
    stride: str
    kernel: str
    input_size: str
    parameters: int | None


_KIND_NAMES = {"conv": "Conv. 2D", "dw": "Conv. dw", "pw": "Conv. pw"}


def _shape(*dims: int) -> str:
    return "x".join(str(d) for d in dims)


def layer_rows(model: MobileNetClassifier | MobileNetV1, input_size: int = 128) -> list[LayerRow]:
    """Table 2 row by row; feature map sizes follow from SAME padding (ceil(size / stride))."""
    backbone = model.backbone if isinstance(model, MobileNetClassifier) else model
    rows: list[LayerRow] = []
    size, channels = input_size, 3
    for number, block in enumerate(backbone.blocks(), start=1):
        conv = block.conv
        k = conv.kernel_size[0]
        kernel = (
            _shape(k, k, conv.in_channels)
            if block.kind == "dw"
            else _shape(k, k, conv.in_channels, conv.out_channels)
        )
        rows.append(
            LayerRow(
                str(number),
                "MobileNet base" if number == 1 else "",
                _KIND_NAMES[block.kind],
                f"s{block.stride}",
                kernel,
                _shape(size, size, channels),
                keras_parameter_counts(block)[0],
            )
        )
        size, channels = -(-size // block.stride), conv.out_channels
    rows.append(
        LayerRow("-", "Dense", "Global Avg. Pool", "s1", f"Pool {_shape(size, size)}",
                 _shape(size, size, channels), None)
    )  # fmt: skip
    if isinstance(model, MobileNetClassifier):
        linears = [m for m in model.head if isinstance(m, nn.Linear)]
        for index, linear in enumerate(linears):
            last = index == len(linears) - 1  # the paper lists the output layer as "Softmax"
            rows.append(
                LayerRow(
                    "-" if last else str(len(backbone.layers) + 1 + index),
                    "",
                    "Softmax" if last else "FC",
                    "-",
                    _shape(linear.in_features, linear.out_features),
                    str(linear.in_features),
                    keras_parameter_counts(linear)[0],
                )
            )
    return rows


def parameter_table(model: MobileNetClassifier | MobileNetV1, input_size: int = 128) -> Table:
    """The paper's Table 2 for `model`: layers, strides, kernels, input sizes, Keras counts.

    Trainable counts follow `requires_grad`: call `freeze_backbone()` first to
    get the paper's transfer-learning figure (263,682 for 2 classes).
    """
    backbone = model.backbone if isinstance(model, MobileNetClassifier) else model
    table = Table(
        title=f"MobileNetV1 (width {backbone.width:g}), {input_size}x{input_size} input",
        caption="Keras counting: BatchNorm moving mean/variance are non-trainable parameters.",
    )
    # Short headers and unwrapped cells: the whole table fits an 80-column terminal.
    table.add_column("Layer", justify="right", no_wrap=True)
    table.add_column("Type", no_wrap=True)
    table.add_column("Stride", no_wrap=True)
    table.add_column("Kernel", no_wrap=True)
    table.add_column("Input", no_wrap=True)
    table.add_column("Params", justify="right", no_wrap=True)
    for row in layer_rows(model, input_size):
        if row.part and row.number != "1":  # the paper groups base and dense layers
            table.add_section()
        count = "-" if row.parameters is None else f"{row.parameters:,}"
        table.add_row(row.number, row.kind, row.stride, row.kernel, row.input_size, count)
    total, trainable = keras_parameter_counts(model)
    table.add_section()
    table.add_row("", "Total parameters", "", "", "", f"{total:,}", style="bold")
    table.add_row("", "Trainable parameters", "", "", "", f"{trainable:,}", style="bold")
    return table
