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


def test_lab_conversion_round_trips():
    rgb = np.random.default_rng(0).random((500, 3))
    assert np.abs(imaging.lab_to_srgb(imaging.srgb_to_lab(rgb)) - rgb).max() < 1e-9
    white = imaging.srgb_to_lab(np.ones(3))
    assert np.allclose(white, [100, 0, 0], atol=0.02)


def _smear_like(seed: int) -> np.ndarray:
    """A pale background with darker pink discs and one purple blob (a cell crop)."""
    rng = np.random.default_rng(seed)
    image = np.full((96, 96, 3), (232, 220, 226), np.float64)
    yy, xx = np.mgrid[:96, :96]
    for _ in range(12):
        cy, cx = rng.integers(0, 96, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = (205, 150, 160)
    image[(yy - 48) ** 2 + (xx - 48) ** 2 < 196] = (90, 60, 140)
    return image


def test_stain_normalisation_brings_another_lamp_and_stain_to_one_look():
    lab_a = _smear_like(0)
    # the same smear under a bluish, dimmer, flatter lamp
    lab_b = 40 + (lab_a - 40) * np.array([0.55, 0.6, 0.75])
    a = imaging.normalise_stain(lab_a.round().astype(np.uint8))
    b = imaging.normalise_stain(lab_b.round().astype(np.uint8))
    assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
    before = np.abs(lab_a - lab_b).mean()
    after = np.abs(a.astype(float) - b.astype(float)).mean()
    assert before > 40 and after < 6
    stats = imaging.srgb_to_lab(a / 255).reshape(-1, 3)
    assert np.allclose(stats.mean(0), imaging.STAIN_MEAN, atol=2.5)
    assert np.allclose(stats.std(0), imaging.STAIN_STD, rtol=0.1)


def test_stain_normalisation_none_unknown_and_flat_images():
    pixels = _smear_like(1).astype(np.uint8)
    assert imaging.normalise_stain(pixels, "none") is pixels
    with pytest.raises(ValueError, match="unknown stain normalisation 'macenko'"):
        imaging.normalise_stain(pixels, "macenko")
    flat = imaging.normalise_stain(np.full((8, 8, 3), 200, np.uint8))  # no spread: no NaN
    assert flat.dtype == np.uint8 and len(np.unique(flat.reshape(-1, 3), axis=0)) == 1


def test_pipeline_crops_are_the_training_crops_with_stain_normalisation(tmp_path):
    from leukodiff.data.crops import cell_batch, cell_input
    from leukodiff.data.records import Box, Cell

    field = np.tile(_smear_like(2), (3, 4, 1)).astype(np.uint8)
    Image.fromarray(field).save(tmp_path / "field.png")
    box = Box(120, 100, 170, 150)
    cell = Cell(tmp_path / "field.png", "test", "lymphocyte", "g", "sha", box=box)
    trained = np.asarray(cell_input(cell, 2.6, 64, "reinhard"))
    analysed = cell_batch(load_image(tmp_path / "field.png"), [box], 2.6, 64, "reinhard")[0]
    assert np.array_equal((analysed * 255).round().astype(np.uint8).transpose(1, 2, 0), trained)
    raw = np.asarray(cell_input(cell, 2.6, 64))
    assert not np.array_equal(raw, trained)


def test_fast_stain_normalisation_is_the_reinhard_formula_within_one_grey_level():
    rng = np.random.default_rng(3)
    for seed in range(4):
        pixels = np.clip(_smear_like(seed) * rng.uniform(0.6, 1.1, 3)
                         + rng.normal(0, 6, (96, 96, 3)), 0, 255).astype(np.uint8)
        lab = imaging.srgb_to_lab(pixels / 255)
        flat = lab.reshape(-1, 3)
        lab = (lab - flat.mean(0)) / flat.std(0) * imaging.STAIN_STD + imaging.STAIN_MEAN
        formula = np.round(imaging.lab_to_srgb(lab) * 255)
        assert np.abs(imaging.normalise_stain(pixels) - formula).max() <= 1


def test_annotate_outlines_each_mark_in_its_colour_and_leaves_the_image_alone():
    image = Image.new("RGB", (200, 160), (230, 220, 230))
    marks = [imaging.Mark((40, 60, 120, 140), "1 lymphocyte 0.93", (30, 90, 255)),
             imaging.Mark((10, 100, 30, 130), "truth mono", (0, 160, 0), line=1, below=True)]
    drawn = np.asarray(imaging.annotate(image, marks))
    assert tuple(drawn[100, 40]) == (30, 90, 255)  # left side of the first box
    assert tuple(drawn[100, 41]) == (30, 90, 255)  # scaled outline: 2 px on a small image
    assert tuple(drawn[115, 10]) == (0, 160, 0) and tuple(drawn[115, 11]) != (0, 160, 0)
    assert tuple(drawn[136, 9]) == (0, 160, 0)  # its tag below the box: the answer's above
    assert tuple(drawn[100, 80]) == (230, 220, 230)  # inside a box: untouched
    assert (np.asarray(image) == (230, 220, 230)).all()  # the caller's image is not drawn on


def test_lab_of_8_bit_pixels_is_the_formula_to_the_last_bit():
    """The familiarity features read CIELAB through the 256-value table: every grey level
    and random colours give exactly what the per-pixel formula gives."""
    grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    colours = np.random.default_rng(0).integers(0, 256, (5000, 3), dtype=np.uint8)
    for pixels in (grey, colours, colours.reshape(50, 100, 3)):
        assert np.array_equal(imaging.srgb8_to_lab(pixels), imaging.srgb_to_lab(pixels / 255))


def test_orientations_are_the_eight_turns_and_mirrors_of_a_crop():
    """Level 2's views (`data.crops.orientations`): 8 distinct copies of an asymmetric
    crop, the same set whichever of them one starts from (so the averaged answer is the
    same for a turned or mirrored cell); 4 views: the turns alone."""
    from leukodiff.data.crops import orientation, orientations

    crops = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    views = orientations(crops, 8)
    assert views.shape == (16, 3, 4, 4)
    assert np.array_equal(views[:2], crops)
    as_set = {views[i * 2:i * 2 + 2].tobytes() for i in range(8)}
    assert len(as_set) == 8
    for start in range(8):
        again = orientations(orientation(crops, start), 8)
        assert {again[i * 2:i * 2 + 2].tobytes() for i in range(8)} == as_set
    assert np.array_equal(orientations(crops, 4)[2:4], np.rot90(crops, 1, axes=(2, 3)))
    assert orientations(crops, 1) is crops
    for wrong in (0, 9):
        with pytest.raises(ValueError, match="1 to 8"):
            orientations(crops, wrong)
