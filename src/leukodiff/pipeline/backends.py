"""Where the networks run: PyTorch or onnxruntime, behind the same two calls.

    backend = open_backend("auto")           # onnxruntime when the ONNX files are there
    boxes, labels, scores = backend.detect(pixels)        # Faster R-CNN on one field
    logits = backend.classify("mononuclear", crops)       # a crop classifier on a batch

Everything else in the pipeline (NMS across groups, tiling, routing, crops,
thresholds) is numpy and shared, so both backends give the same cells. Each
backend also hands over the manifests of its four networks: the detector, the
detector's group classifier ("group"), and the two level-2 models; the
pipeline reads crop geometry and thresholds from them, never from code.

The ONNX files are written by `leukodiff export onnx` beside the torch files:
`NAME.onnx` with manifest `NAME.onnx.json`, and `DETECTOR.group.onnx` for the
detector's group classifier. Each ONNX manifest names the sha256 of the torch
file it came from; an ONNX file older than its torch file is refused.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from leukodiff.models.files import (
    Manifest,
    ModelFileError,
    onnx_paths,
    read_checked,
    resolve,
    sha256_of,
)

#: The four networks, by role.
ROLES = ("detector", "group", "mononuclear", "polymorphonuclear")
BACKENDS = ("auto", "onnx", "torch")


class BackendError(RuntimeError):
    """A backend that cannot run here (runtime not installed, files missing or stale)."""


class Backend(Protocol):
    name: str
    manifests: dict[str, Manifest]

    def detect(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Faster R-CNN on one image (3, H, W) float32 in [0, 1]: boxes, labels, scores."""

    def classify(self, role: str, crops: np.ndarray) -> np.ndarray:
        """Logits (N, classes) of a crop classifier on (N, 3, S, S) float32 in [0, 1]."""


def _source_role(role: str) -> str:
    return "detector" if role == "group" else role


class TorchBackend:
    """The trained torch models as they are (the reference; needs torch + torchvision).

    `TorchBackend.load` reads the model files; `TorchBackend.of_detector` takes a detector
    in memory (training validates with it), so both run the one detection path."""

    name = "torch"

    def __init__(self, detector, manifests: dict[str, Manifest],
                 networks: dict[str, object]) -> None:
        import torch

        self._torch = torch
        self.detector, self.manifests, self.networks = detector, manifests, networks

    @classmethod
    def load(cls, models: dict[str, str | Path], threads: int | None = None) -> TorchBackend:
        """The four networks from their files, BatchNorm folded for inference."""
        try:
            import torch
        except ImportError:
            raise BackendError("the torch backend needs PyTorch: pip install "
                               "'leukodiff[torch]', or export ONNX files and use onnxruntime"
                               ) from None
        from leukodiff.models.io import load_classifier, load_detector

        if threads:
            torch.set_num_threads(threads)
        detector, detector_manifest = load_detector(models["detector"])
        networks = {"group": getattr(detector, "group_classifier", None)}
        manifests = {"detector": detector_manifest, "group": detector_manifest.group()}
        for role in ("mononuclear", "polymorphonuclear"):
            networks[role], manifests[role] = load_classifier(models[role])
        if networks["group"] is None:
            del networks["group"], manifests["group"]
        for network in (detector, *networks.values()):
            _fold_batchnorm(network.eval())
        for network in networks.values():
            network.to(memory_format=torch.channels_last)
        return cls(detector, manifests, networks)

    @classmethod
    def of_detector(cls, detector, *, group: bool = True) -> TorchBackend:
        """Level 1 only, on a torch detector in memory with its `spec` (as
        `models.detector.build_detector` makes it), on whatever device it is on. Its group
        classifier relabels the boxes unless `group` is False (e.g. before it is trained).
        Nothing in the network is changed (no BatchNorm folding): training goes on after."""
        manifest = Manifest.from_dict({"architecture": detector.spec.to_dict()})
        manifests, networks = {"detector": manifest}, {}
        if group and detector.spec.group_classifier:
            networks["group"] = detector.group_classifier
            manifests["group"] = manifest.group()
        return cls(detector, manifests, networks)

    def _device(self):
        return next(self.detector.parameters()).device

    def detect(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        torch = self._torch
        self.detector.eval()
        with torch.inference_mode():
            out = self.detector([torch.from_numpy(pixels).to(self._device())])[0]
        return tuple(out[key].cpu().numpy() for key in ("boxes", "labels", "scores"))

    def classify(self, role: str, crops: np.ndarray) -> np.ndarray:
        torch = self._torch
        network = self.networks[role].eval()
        batch = torch.from_numpy(crops).to(self._device()).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode():
            return network(batch).cpu().numpy()


def _fold_batchnorm(network) -> None:
    """Fold each MobileNet block's BatchNorm into its convolution, for inference only
    (measured: a fifth of the torch backend's time went to batch_norm; onnxruntime fuses
    them itself)."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from leukodiff.models.mobilenet import ConvBlock

    for block in network.modules():
        if isinstance(block, ConvBlock) and isinstance(block.bn, nn.BatchNorm2d):
            block.conv = fuse_conv_bn_eval(block.conv, block.bn)
            block.bn = nn.Identity()


class OnnxBackend:
    """The exported ONNX files on onnxruntime (fast CPU inference; no torch needed)."""

    name = "onnx"

    def __init__(self, models: dict[str, str | Path], threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise BackendError("the onnx backend needs onnxruntime: pip install onnxruntime"
                               ) from None
        paths = onnx_paths(models)
        self.manifests: dict[str, Manifest] = {}
        self.sessions = {}
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        # Idle pool threads spinning for work steal the core that the numpy/PIL glue and
        # the other model's session need (measured: 44 -> 29 ms per field on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source_sha256 = {}  # the detector file is the source of two ONNX files: hash it once
        for role, path in paths.items():
            if role == "group" and not path.exists():
                continue  # a detector without a group classifier
            try:
                path, manifest = read_checked(path, ".onnx")
            except ModelFileError as error:
                raise BackendError(f"{error}; run `leukodiff export onnx`") from None
            source = resolve(models[_source_role(role)])
            if source not in source_sha256:
                source_sha256[source] = sha256_of(source) if source.is_file() else None
            _refuse_stale(path, manifest, source, source_sha256[source])
            self.manifests[role] = manifest
            self.sessions[role] = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"])

    def detect(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes, labels, scores = self.sessions["detector"].run(None, {"image": pixels})
        return boxes, labels, scores

    def classify(self, role: str, crops: np.ndarray) -> np.ndarray:
        return self.sessions[role].run(None, {"images": crops})[0]


def _refuse_stale(onnx_path: Path, manifest: Manifest, torch_path: Path,
                  torch_sha256: str | None) -> None:
    """An ONNX file must come from the torch file beside it, when that file is there."""
    if torch_sha256 is not None and manifest.provenance.source.get("sha256") != torch_sha256:
        raise BackendError(f"{onnx_path} was exported from another version of {torch_path.name}"
                           "; run `leukodiff export onnx` again")


def limit_numpy_threads(threads: int) -> None:
    """numpy's BLAS in this process held to `threads` (threadpoolctl). The pipeline's
    colour conversions are large matrix products; left alone, OpenBLAS spreads each over
    every core, so worker processes of one thread each fight for the cores (measured, 200
    fields: 2 workers 1.2x one worker; limited, 2.1x). OpenMP pools (torch's) are left
    alone: a process that measures on one thread may train on all of them next."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def open_backend(kind: str = "auto", models: dict[str, str | Path] | None = None,
                 threads: int | None = None) -> Backend:
    """The backend asked for; "auto" takes onnxruntime when it and the ONNX files are
    there and current, torch otherwise. `threads`: the networks' threads, and numpy's."""
    models = {"detector": "detector", "mononuclear": "mononuclear",
              "polymorphonuclear": "polymorphonuclear", **(models or {})}
    if threads:
        limit_numpy_threads(threads)
    if kind == "onnx":
        return OnnxBackend(models, threads)
    if kind == "torch":
        return TorchBackend.load(models, threads)
    if kind != "auto":
        raise BackendError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            return OnnxBackend(models, threads)
        except BackendError as onnx_error:
            if importlib.util.find_spec("torch") is None:
                raise
            reason = str(onnx_error)
    else:
        reason = "onnxruntime is not installed"
    backend = TorchBackend.load(models, threads)
    backend.fallback_reason = reason  # why auto did not take onnxruntime
    return backend
