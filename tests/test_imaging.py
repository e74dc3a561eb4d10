import numpy as np
import pytest
from PIL import Image

from leukodiff import imaging
from leukodiff.imaging import ImageError, load_image, probe_image


def test_rgb_jpeg_loads_and_probes(make_image):
    path = make_image("cell.jpg", 64, 48)
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (64, 48))
    info = probe_image(path)
    assert (info.width, info.height) == (64, 48)
    assert len(info.sha256) == 64


def test_missing_empty_non_image_truncated_files_give_clear_errors(tmp_path, make_image):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        probe_image(tmp_path / "empty.jpg")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 100)
    with pytest.raises(ImageError, match="not an image"):
        probe_image(tmp_path / ".DS_Store")
    good = make_image("big.jpg", 400, 300).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    for check in (probe_image, load_image):
        with pytest.raises(ImageError, match="truncated"):
            check(tmp_path / "truncated.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK"])
def test_every_common_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"x.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    Image.new("RGB", (20, 10), (200, 50, 100)).convert(mode).save(path)
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (20, 10))


def test_transparent_pixels_become_white_background(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_images_are_rescaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(path)
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (16, 16, 3)
    assert pixels.min() == 0 and pixels.max() == 255
    assert len(np.unique(pixels[..., 0])) > 200  # kept the tonal range


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (120, 80, 160)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)
    assert probe_image(path).width == 20


def test_huge_images_are_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(imaging, "MAX_PIXELS", 10_000)
    with pytest.raises(ImageError, match="too large"):
        load_image(path)
