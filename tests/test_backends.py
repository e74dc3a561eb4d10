"""onnxruntime and torch backends: same cells on real fields; export; stale and missing files;
inference without torch installed."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_info, threadpool_limits

from leukodiff.data.sources import load_fields
from leukodiff.models.files import SHIPPED_DIR, sha256_of
from leukodiff.models.io import load_classifier, save_model
from leukodiff.pipeline import Analyzer
from leukodiff.pipeline.backends import BackendError, open_backend


@pytest.fixture(scope="module")
def field_images(shared_data):
    fields = sorted((f for f in load_fields("bccd", shared_data).records if f.subset == "test"),
                    key=lambda f: f.image.name)[:12]
    images = [Image.open(f.image).convert("RGB") for f in fields]
    mosaic = Image.fromarray(np.hstack([np.asarray(im) for im in images[:3]]))  # tiled
    return [*images, images[0].resize((500, 375)), images[1].crop((100, 50, 356, 306)), mosaic]


@pytest.fixture(scope="module")
def analyzers():
    with Analyzer.load(backend="torch") as torch_side, Analyzer.load(backend="onnx") as onnx_side:
        yield torch_side, onnx_side


def test_both_backends_give_the_same_cells_on_real_fields(analyzers, field_images):
    torch_side, onnx_side = analyzers
    assert (torch_side.backend.name, onnx_side.backend.name) == ("torch", "onnx")
    cells = 0
    for image in field_images:
        expected, got = torch_side(image), onnx_side(image)
        assert len(got.cells) == len(expected.cells)
        for a, b in zip(expected.cells, got.cells, strict=True):
            assert np.abs(np.subtract(a.box, b.box)).max() <= 1.0
            assert (a.group, a.label) == (b.group, b.label)
            assert b.type_confidence == pytest.approx(a.type_confidence, abs=1e-3)
        cells += len(got.cells)
    assert cells >= 15  # the comparison covered real cells, a tiled mosaic included


def test_auto_takes_onnxruntime_when_the_exported_files_are_current():
    assert open_backend("auto").name == "onnx"
    with pytest.raises(BackendError, match="unknown backend"):
        open_backend("tensorrt")


def _blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_threads_hold_numpy_too():
    """A worker of one thread must not have numpy's BLAS spread the colour conversions over
    every core (2 workers ran 1.2x one worker so; 2.1x held to one thread each)."""
    with threadpool_limits(limits=None):  # restores this process's pools afterwards
        threadpool_limits(limits=2, user_api="blas")
        assert _blas_threads() == {2}
        open_backend("onnx", threads=1)
        assert _blas_threads() == {1}


@pytest.fixture
def model_copy(tmp_path):
    """The shipped torch models and manifests, copied, without ONNX files."""
    for name in ("detector", "mononuclear", "polymorphonuclear"):
        shutil.copy(SHIPPED_DIR / f"{name}.pt", tmp_path)
        shutil.copy(SHIPPED_DIR / f"{name}.json", tmp_path)
    return {name: tmp_path / f"{name}.pt"
            for name in ("detector", "mononuclear", "polymorphonuclear")}


def test_export_writes_what_onnxruntime_runs_and_refuses_stale_files(model_copy, field_images):
    from typer.testing import CliRunner

    from leukodiff.cli import app

    with pytest.raises(BackendError, match="export onnx"):
        open_backend("onnx", model_copy)
    result = CliRunner().invoke(app, ["export", "onnx",
                                      *(f"--{k}={v}" for k, v in model_copy.items())])
    assert result.exit_code == 0, result.output
    folder = model_copy["detector"].parent
    for name in ("detector.onnx", "detector.group.onnx", "mononuclear.onnx",
                 "polymorphonuclear.onnx"):
        manifest = json.loads((folder / f"{name}.json").read_text())
        assert manifest["sha256"] == sha256_of(folder / name)
        source = folder / manifest["source"]["weights"]
        assert manifest["source"]["sha256"] == sha256_of(source)
    exported = Analyzer.load(**model_copy, backend="onnx")
    shipped = Analyzer.load(backend="onnx")
    for image in field_images[:3]:
        assert exported(image).to_dict() == shipped(image).to_dict()

    # retrain (here: perturb) a level-2 model; its old ONNX file must not be used
    network, manifest = load_classifier(model_copy["mononuclear"])
    with torch.no_grad():
        network.head[-1].bias.add_(0.5)
    save_model(network, {k: v for k, v in manifest.to_dict().items()
                         if k not in ("sha256", "weights")}, model_copy["mononuclear"])
    with pytest.raises(BackendError, match=r"another version of mononuclear\.pt"):
        open_backend("onnx", model_copy)
    fallback = open_backend("auto", model_copy)
    assert fallback.name == "torch" and "another version" in fallback.fallback_reason


# What `pip install leukodiff` (no extras) leaves out: the [torch] and [server] extras.
NOT_IN_THE_BASE_INSTALL = {
    "torch", "torchvision", "torchmetrics", "pycocotools", "onnx", "sklearn", "scipy",
    "matplotlib", "tflite", "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic",
    "jinja2", "multipart", "argon2", "itsdangerous", "psycopg",
}


def test_analyze_runs_on_onnxruntime_without_torch_installed(tmp_path, analyzers, field_images):
    """An inference-only install: torch, the server's packages and friends cannot be
    imported at all."""
    image = tmp_path / "field.png"
    field_images[0].save(image)
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] in {sorted(NOT_IN_THE_BASE_INSTALL)}:\n"
        "            raise ImportError(name + ' is not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from leukodiff.cli import app\n"
        "app(sys.argv[1:])\n"
    )
    run = subprocess.run([sys.executable, "-c", blocker, "analyze", str(image), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    got = json.loads((tmp_path / "out" / "fields" / "0001_field.json").read_text())
    expected = analyzers[0](field_images[0], name=str(image)).to_dict()
    assert [c["label"] for c in got["cells"]] == [c["label"] for c in expected["cells"]]
    assert len(got["cells"]) >= 1
    refused = subprocess.run([sys.executable, "-c", blocker, "analyze", str(image), "--out",
                              str(tmp_path / "out2"), "--backend", "torch"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "needs PyTorch" in refused.stdout
    assert "Traceback" not in refused.stdout + refused.stderr
    for command in (["train", "classifier"], ["export", "onnx"], ["params"]):
        refused = subprocess.run([sys.executable, "-c", blocker, *command],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and "leukodiff[torch]" in refused.stdout, command
