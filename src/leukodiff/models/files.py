"""Model files and their manifests, without any deep-learning framework.

Every shipped or trained model is a weights file (`NAME.pt` for torch,
`NAME.onnx` for onnxruntime) with a JSON manifest beside it whose sha256 is
checked on load. This module only reads files, so inference-only installs
(onnxruntime, no torch) use it too. Every manifest is read here, into a `Manifest`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHIPPED_DIR = Path(__file__).parent / "weights"


class ModelFileError(ValueError):
    """A model file that is missing, altered or not one of ours."""


def invoked_command() -> str:
    """This process's `leukodiff ...` command line, as a manifest records it ("" when the
    model was made from Python, not the command)."""
    return shlex.join(["leukodiff", *sys.argv[1:]]) if "leukodiff" in sys.argv[0] else ""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_path(weights: Path) -> Path:
    return weights.with_suffix(".json") if weights.suffix == ".pt" else \
        weights.with_name(weights.name + ".json")


def shipped(name: str, suffix: str = ".pt") -> Path:
    """Path of a model shipped with leukodiff, e.g. `shipped("mononuclear")`."""
    return SHIPPED_DIR / f"{name}{suffix}"


def resolve(model: str | Path, suffix: str = ".pt") -> Path:
    """A model file's path: a path as given, or the shipped model of that name."""
    path = Path(model)
    return path if path.suffix == suffix or path.exists() else shipped(str(model), suffix)


@dataclass(frozen=True)
class InputGeometry:
    """How a crop classifier's input is cut from a field (level 2, the group classifier):
    a square `crop_scale` x the box side, resized to `size`, stain-normalised by `stain`."""

    size: int
    crop_scale: float
    stain: str = "none"  # imaging.STAIN_NORMALISATIONS; manifests before issue #14: none


@dataclass(frozen=True)
class Provenance:
    """Where a model file comes from, and the hash that ties the manifest to it."""

    weights: str  # the weights file's name (beside the manifest)
    sha256: str  # of the weights file: checked on every load
    command: str = ""  # the command that trained (or exported) it
    split: str = ""  # how its data was split
    torch: str = ""  # the torch version that trained it
    data: dict[str, Any] = field(default_factory=dict)  # the data sets and their origin
    source: dict[str, Any] = field(default_factory=dict)  # ONNX: the .pt it was exported from
    format: dict[str, Any] = field(default_factory=dict)  # ONNX: format, opset, exporter
    adapted: dict[str, Any] = field(default_factory=dict)  # adapted: its base and lab data


@dataclass(frozen=True)
class TrainingRecord:
    """The training run: its settings (the config's fields, as trained) with the history."""

    settings: dict[str, Any]  # everything under "training", as written
    sources: tuple[str, ...] = ()
    best_epoch: int | None = None
    minutes: float | None = None
    augmentation: str = "basic"


@dataclass(frozen=True)
class Manifest:
    """A model file's manifest (NAME.json beside NAME.pt or NAME.onnx), typed.

    `architecture` rebuilds the network (the level-2 MobileNet's width and head, or the
    detector's `DetectorSpec` fields); `input` is None for the detector, which takes whole
    fields. The JSON itself is kept as read (`to_dict`), so nothing is lost or reordered
    when a manifest is written again.
    """

    architecture: dict[str, Any]
    task: str
    classes: tuple[str, ...]
    input: InputGeometry | None
    training: TrainingRecord
    metrics: dict[str, Any]
    calibration: dict[str, Any]
    provenance: Provenance
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        given = data.get("input", {})
        geometry = (InputGeometry(int(given["size"]), float(given["crop_scale"]),
                                  str(given.get("stain", "none")))
                    if "size" in given and "crop_scale" in given else None)
        trained = dict(data.get("training", {}))
        minutes = trained.get("minutes", trained.get("train_minutes"))
        return cls(
            architecture=dict(data.get("architecture", {})),
            task=str(data.get("task", "")),
            classes=tuple(str(c) for c in data.get("classes", ())),
            input=geometry,
            training=TrainingRecord(
                settings=trained, sources=tuple(str(s) for s in trained.get("sources", ())),
                best_epoch=trained.get("best_epoch"),
                minutes=None if minutes is None else float(minutes),
                augmentation=str(trained.get("augmentation", "basic"))),
            metrics=dict(data.get("metrics", {})),
            calibration=dict(data.get("calibration", {})),
            provenance=Provenance(
                weights=str(data.get("weights", "")), sha256=str(data.get("sha256", "")),
                command=str(data.get("command", "")), split=str(data.get("split", "")),
                torch=str(data.get("torch", "")), data=dict(data.get("data", {})),
                source=dict(data.get("source", {})), format=dict(data.get("format", {})),
                adapted=dict(data.get("adapted", {}))),
            raw=copy.deepcopy(data))

    def to_dict(self) -> dict[str, Any]:
        """The manifest as its JSON holds it (a copy: change it to write a new one)."""
        return copy.deepcopy(self.raw)

    @property
    def name(self) -> str:
        """The network: "mobilenet_v1" (a crop classifier), "fasterrcnn_..." (the detector)."""
        return str(self.architecture.get("name", ""))

    @property
    def is_detector(self) -> bool:
        return self.name.startswith("fasterrcnn")

    @property
    def sha256(self) -> str:
        return self.provenance.sha256

    @property
    def threshold(self) -> float:
        """A classifier's calibrated confidence threshold (0: none calibrated)."""
        return float(self.calibration.get("threshold", 0.0))

    @property
    def views(self) -> int:
        """How many orientations of each crop a classifier's threshold was calibrated on,
        hence the number it runs on (`data.crops.orientations`; 1: calibrated before
        2026-12-07, on the crop as cut)."""
        return int(self.calibration.get("views", 1))

    @property
    def score_threshold(self) -> float:
        """The detector's operating point: what counts as a found cell."""
        return float(self.architecture["score_threshold"])

    def group(self) -> Manifest:
        """The group classifier's manifest, from the detector it is part of."""
        spec = self.architecture
        return Manifest.from_dict({
            "classes": ["mononuclear", "polymorphonuclear"],
            "input": {"size": int(spec["group_input_size"]),
                      "crop_scale": float(spec["group_crop_scale"]),
                      "stain": str(spec.get("group_stain", "none"))}})


def read_manifest(path: Path) -> Manifest:
    """A manifest file, without the weights' hash check (`read_checked` does both)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: not a model manifest")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: not a model manifest ({error!r})") from None


def read_checked(model: str | Path, suffix: str = ".pt") -> tuple[Path, Manifest]:
    """The model file and its manifest, refusing a missing or altered file."""
    path = resolve(model, suffix)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if not manifest_path(path).is_file():
        raise ModelFileError(f"{path}: its manifest {manifest_path(path).name} is missing")
    manifest = read_manifest(manifest_path(path))
    if manifest.sha256 != sha256_of(path):
        raise ModelFileError(f"{path}: sha256 does not match its manifest (file altered?)")
    return path, manifest


def onnx_paths(models: dict[str, str | Path]) -> dict[str, Path]:
    """Where the ONNX file of each role lives, given the torch models by name or path."""
    detector = resolve(models["detector"])
    return {"detector": detector.with_suffix(".onnx"),
            "group": detector.with_suffix(".group.onnx"),
            "mononuclear": resolve(models["mononuclear"]).with_suffix(".onnx"),
            "polymorphonuclear": resolve(models["polymorphonuclear"]).with_suffix(".onnx")}
