"""Model files and their manifests, without any deep-learning framework.

Every shipped or trained model is a weights file (`NAME.pt` for torch,
`NAME.onnx` for onnxruntime) with a JSON manifest beside it whose sha256 is
checked on load. This module only reads files, so inference-only installs
(onnxruntime, no torch) use it too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SHIPPED_DIR = Path(__file__).parent / "weights"


class ModelFileError(ValueError):
    """A model file that is missing, altered or not one of ours."""


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


def read_checked(model: str | Path, suffix: str = ".pt") -> tuple[Path, dict[str, Any]]:
    """The model file and its manifest, refusing a missing or altered file."""
    path = resolve(model, suffix)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if not manifest_path(path).is_file():
        raise ModelFileError(f"{path}: its manifest {manifest_path(path).name} is missing")
    try:
        manifest = json.loads(manifest_path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{manifest_path(path)}: unreadable manifest ({error})") from None
    if manifest.get("sha256") != sha256_of(path):
        raise ModelFileError(f"{path}: sha256 does not match its manifest (file altered?)")
    return path, manifest


def group_manifest(detector_manifest: dict[str, Any]) -> dict[str, Any]:
    """The group classifier's manifest, from the detector it is part of."""
    spec = detector_manifest["architecture"]
    return {"classes": ["mononuclear", "polymorphonuclear"],
            "input": {"size": int(spec["group_input_size"]),
                      "crop_scale": float(spec["group_crop_scale"]),
                      "stain": str(spec.get("group_stain", "none"))}}


def onnx_paths(models: dict[str, str | Path]) -> dict[str, Path]:
    """Where the ONNX file of each role lives, given the torch models by name or path."""
    detector = resolve(models["detector"])
    return {"detector": detector.with_suffix(".onnx"),
            "group": detector.with_suffix(".group.onnx"),
            "mononuclear": resolve(models["mononuclear"]).with_suffix(".onnx"),
            "polymorphonuclear": resolve(models["polymorphonuclear"]).with_suffix(".onnx")}
