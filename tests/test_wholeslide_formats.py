"""Whole-slide formats beyond TIFF: a DICOM WSI (wsidicom) and an Aperio .svs (OpenSlide,
from openslide-bin), both built from the same synthetic BCCD slide as the TIFF one: the
same pixels, levels and microns per pixel read back, the same cells found; corrupt,
truncated and scale-less files refused with a clear message."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")

from slide_helpers import CANVAS, MPP, build_slide, write_aperio, write_dicom_wsi  # noqa: E402

from leukodiff.pipeline.boxes import box_iou  # noqa: E402
from leukodiff.pipeline.wholeslide import (  # noqa: E402
    SlideError,
    analyze_whole_slide,
    is_whole_slide,
    open_slide,
)


@pytest.fixture(scope="module")
def tiff_slide(shared_data: Path, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The TIFF slide, its pixels and its known white cells."""
    path = tmp_path_factory.mktemp("wsi") / "slide.tif"
    known = build_slide(shared_data / "bccd" / "BCCD", path, levels=2)
    return path, tifffile.imread(path), known


@pytest.fixture(scope="module")
def analyzer():
    from leukodiff.pipeline import Analyzer

    with Analyzer.load(threads=1) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def tiff_cells(tiff_slide, analyzer) -> np.ndarray:
    result = analyze_whole_slide(analyzer, tiff_slide[0])
    return np.array([c.box for c in result.field.cells], dtype=np.float32)


def same_cells(result, reference: np.ndarray, known: np.ndarray) -> None:
    boxes = np.array([c.box for c in result.field.cells], dtype=np.float32).reshape(-1, 4)
    assert len(boxes) == len(reference)
    assert (box_iou(reference, boxes).max(1) >= 0.9).all()
    assert ((box_iou(known, boxes) >= 0.5).sum(1) == 1).all()  # every known cell, once


def test_dicom_wsi_read_lazily_with_its_pixel_spacing(tiff_slide, tiff_cells, analyzer,
                                                      tmp_path):
    pytest.importorskip("wsidicom")
    _, canvas, known = tiff_slide
    folder = tmp_path / "dicom"
    write_dicom_wsi(folder, canvas, MPP)
    assert is_whole_slide(folder) and is_whole_slide(folder / "level0.dcm")
    for opened in (folder, folder / "level0.dcm"):  # the folder, or a file standing for it
        with open_slide(opened) as slide:
            assert slide.levels == [CANVAS, (CANVAS[0] // 2, CANVAS[1] // 2)]
            assert slide.mpp == pytest.approx(MPP) and slide.mpp_source == "DICOM PixelSpacing"
            assert np.array_equal(slide.read(250, 300, 890, 780), canvas[300:780, 250:890])
            assert np.array_equal(slide.read(2400, 1800, 2700, 2000), canvas[1800:, 2400:])
            assert np.array_equal(slide.thumbnail(), canvas[::2, ::2])  # the lowest level
    result = analyze_whole_slide(analyzer, folder)
    same_cells(result, tiff_cells, known)
    assert result.mpp == pytest.approx(MPP) and result.shrink == 1.0


def test_dicom_wsi_bad_files(tiff_slide, tmp_path):
    pytest.importorskip("wsidicom")
    canvas = tiff_slide[1][:600, :800]
    good = tmp_path / "good"
    write_dicom_wsi(good, canvas, MPP)
    cases = {}
    for case in ("truncated", "garbage"):
        folder = tmp_path / case
        shutil.copytree(good, folder)
        level0 = folder / "level0.dcm"
        data = level0.read_bytes()
        level0.write_bytes(data[:len(data) * 2 // 3] if case == "truncated"
                           else b"not a DICOM file" * 64)
        cases[case] = folder
    write_dicom_wsi(tmp_path / "no_spacing", canvas, None)
    for case, reason in (("truncated", "corrupt or truncated"),
                         ("garbage", "not a readable DICOM file"),
                         ("no_spacing", r"no PixelSpacing \(microns per pixel\)")):
        with pytest.raises(SlideError, match=reason):
            open_slide(cases.get(case, tmp_path / case))


def test_openslide_reads_an_aperio_slide(tiff_slide, tiff_cells, analyzer, tmp_path):
    pytest.importorskip("openslide")  # openslide-python, with the library from openslide-bin
    from leukodiff.pipeline.slidefiles import OpenSlideSlide

    path, canvas, known = tiff_slide
    svs = tmp_path / "slide.svs"
    write_aperio(svs, canvas, MPP)
    with open_slide(svs) as slide:
        assert isinstance(slide, OpenSlideSlide)
        assert slide.levels == [CANVAS, (CANVAS[0] // 4, CANVAS[1] // 4)]
        assert slide.mpp == pytest.approx(MPP, rel=1e-4)
        assert slide.mpp_source == "openslide.mpp-x"
        assert np.array_equal(slide.read(250, 300, 890, 780), canvas[300:780, 250:890])
        assert np.array_equal(slide.thumbnail(), canvas[::4, ::4])
    same_cells(analyze_whole_slide(analyzer, svs), tiff_cells, known)
    # a generic tiled TIFF (OpenSlide's generic-tiff), its scale from the resolution tags
    with OpenSlideSlide(path) as slide:
        assert slide.mpp == pytest.approx(MPP, rel=1e-4)
        assert np.array_equal(slide.read(1000, 10, 1300, 400), canvas[10:400, 1000:1300])
    data = svs.read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(SlideError, match="corrupt or truncated"):
        open_slide(truncated)
