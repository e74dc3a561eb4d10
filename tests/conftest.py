"""Shared fixtures: the real data root, and small synthetic images built in temp dirs.

Under pytest-xdist (`make test`: `-n 2 --dist loadgroup`) each test file runs whole on
one worker (its module fixtures are built once), the files that start a local Ray
cluster share one worker, and each worker computes on one thread."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # before numpy/torch read it
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import pytest
from PIL import Image

from leukodiff.data.root import DataNotFoundError, data_root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data sets; tests that need them fail loudly (not skip) when absent."""
    try:
        return data_root()
    except DataNotFoundError as error:
        pytest.fail(f"shared data needed by this test: {error}")


def smear_like(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A small RGB image with some texture (pinkish background, a purple blob)."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), (230, 200, 210), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    blob = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (min(width, height) / 4) ** 2
    pixels[blob] = (110, 60, 150)
    noise = rng.integers(0, 20, size=pixels.shape, dtype=np.uint8)
    return Image.fromarray(pixels - noise // 2)


@pytest.fixture
def make_image(tmp_path: Path):
    """Write a synthetic image to tmp_path/name and return its path."""

    def make(name: str, width: int = 64, height: int = 48, seed: int = 0) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        smear_like(width, height, seed).save(path)
        return path

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a shared 2-core machine, two threads that wait for each other
    make these small models several times slower, not faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Test files that start a local Ray cluster (directly or through `benchmarks.run`): never
#: two at once on one machine.
RAY_FILES = {"test_slides_ray.py", "test_benchmarks.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One xdist group per test file (`--dist loadgroup` keeps a file on one worker), and
    one for the files that start Ray."""
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_FILES else
                                                str(item.path.relative_to(item.config.rootpath))))


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_xdist_worker():
    """Two workers on two cores: a second torch thread in each would only wait."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    yield


@pytest.fixture
def pig_like_root(tmp_path, shared_data) -> Path:
    """A data root holding a pig-shaped YOLO set (`data.sources.pig`): two 416x416 photos
    of one white cell each (made from a BCD tile), Roboflow's names, a train and a test
    folder, no valid folder."""
    from leukodiff.data.sources import load_fields
    from leukodiff.imaging import load_image

    tile = load_image(load_fields("bcd", shared_data).records[0].image)
    for folder, number in (("train", "100"), ("test", "7")):
        (tmp_path / "pig" / folder / "images").mkdir(parents=True)
        (tmp_path / "pig" / folder / "labels").mkdir()
        tile.resize((416, 416)).save(tmp_path / "pig" / folder / "images" /
                                     f"{number}_JPG.rf.0a1b2c.jpg")
        (tmp_path / "pig" / folder / "labels" / f"{number}_JPG.rf.0a1b2c.txt").write_text(
            "0 0.5 0.5 0.05 0.0625\n")
    return tmp_path
