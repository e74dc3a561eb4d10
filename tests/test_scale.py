"""Reading a frame's magnification off its red cells, and shrinking frames of large cells."""

import numpy as np
import pytest
from PIL import Image

from leukodiff.data.sources import load_fields
from leukodiff.imaging import load_image
from leukodiff.pipeline import Analyzer
from leukodiff.pipeline.boxes import box_iou
from leukodiff.pipeline.scale import (
    REFERENCE_LENGTH,
    SHRINK_ABOVE,
    cell_size_ratio,
    correlation_length,
)


@pytest.fixture(scope="module")
def bccd_train(shared_data):
    return [f for f in load_fields("bccd", shared_data).records if f.subset == "train"]


def test_reference_is_bccd_training_fields_median(bccd_train):
    lengths = [correlation_length(load_image(f.image)) for f in bccd_train]
    measured = np.median([v for v in lengths if v is not None])
    assert measured == pytest.approx(REFERENCE_LENGTH, rel=0.03)
    assert sum(v is None for v in lengths) <= 3


def test_ratio_follows_magnification(bccd_train):
    field = load_image(bccd_train[0].image)
    native = cell_size_ratio(field)
    for zoom in (2.0, 3.0):
        enlarged = field.resize((round(640 * zoom), round(480 * zoom)),
                                Image.Resampling.BILINEAR)
        assert cell_size_ratio(enlarged) == pytest.approx(zoom * native, rel=0.25)


def test_frames_without_cells_tell_nothing():
    assert cell_size_ratio(Image.new("RGB", (1200, 900), (235, 225, 230))) is None
    dots = Image.new("RGB", (1200, 900), (235, 225, 230))
    dots.paste((120, 60, 140), (500, 400, 560, 460))  # one small dark object
    assert cell_size_ratio(dots) is None


def test_a_field_at_twice_the_magnification_gives_the_same_cells(shared_data):
    """Enlarged 2x (1280x960, cells ~400 px), a field is shrunk back before detection: the
    same white cells, boxes in the large frame's pixels."""
    with Analyzer.load() as analyzer:
        for name in ("BloodImage_00001.jpg", "BloodImage_00010.jpg"):
            field = load_image(shared_data / "bccd" / "BCCD" / "JPEGImages" / name)
            native = analyzer.detect(field)
            enlarged = field.resize((1280, 960), Image.Resampling.BILINEAR)
            assert cell_size_ratio(enlarged) > SHRINK_ABOVE
            found = analyzer.detect(enlarged)
            assert len(found.boxes) == len(native.boxes) >= 1, name
            # each native box has its twin (the same cell, the box regressed from another
            # proposal: 00010's shrunk-back box is nearer the truth, IoU 0.87 vs 0.74)
            overlap = box_iou(found.boxes / 2, native.boxes)
            assert (overlap.max(0) >= 0.7).all() and (overlap.max(1) >= 0.7).all(), name


def _half_width_fully_padded(image: Image.Image) -> float | None:
    """The autocorrelation's half-width as first written: padded to twice the window,
    every lag exact (the oracle for the cheaper padding)."""
    from leukodiff.pipeline.scale import cell_mask

    mask = cell_mask(image).astype(np.float32)
    centred = mask - mask.mean()
    height, width = centred.shape
    auto = np.fft.irfft2(np.abs(np.fft.rfft2(centred, s=(2 * height, 2 * width))) ** 2,
                         s=(2 * height, 2 * width))
    auto /= auto.max()
    dy = np.fft.ifftshift(np.arange(2 * height) - height)
    dx = np.fft.ifftshift(np.arange(2 * width) - width)
    radius = np.hypot(dy[:, None], dx[None, :]).astype(np.int64).ravel()
    profile = np.bincount(radius, auto.ravel()) / np.maximum(np.bincount(radius), 1)
    after = int(np.argmax(profile < 0.5))
    return float(after - 1 + (profile[after - 1] - 0.5) / (profile[after - 1] - profile[after]))


def test_padding_to_the_lags_read_gives_the_full_computation(bccd_train, monkeypatch):
    """`_half_width` pads the FFT only as far as the lags it reads (LAG_PAD), falling back
    to the full padding when the half-width lies beyond them: the same half-width either
    way, on BCCD fields and on a large disc (crossing at ~72 px; LAG_PAD made 32)."""
    from leukodiff.pipeline import scale

    for field in bccd_train[:6]:
        image = load_image(field.image).crop((0, 0, 512, 480))
        assert scale._half_width(image) == pytest.approx(_half_width_fully_padded(image),
                                                         abs=1e-3)
    yy, xx = np.mgrid[:480, :512]
    disc = np.full((480, 512, 3), 220, dtype=np.uint8)
    disc[(yy - 240) ** 2 + (xx - 256) ** 2 < 150 ** 2] = 120
    image = Image.fromarray(disc)
    full = _half_width_fully_padded(image)
    monkeypatch.setattr(scale, "LAG_PAD", 32)
    assert full > 2 * scale.LAG_PAD
    assert scale._half_width(image) == pytest.approx(full, abs=1e-3)
