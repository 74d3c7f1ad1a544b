"""PNG / JPEG / TIFF / BMP ingestion, made in the test from a real CT slice (pydicom-data)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mimo_chat.imaging import ImageLoadError, load_study
from mimo_chat.resources import pydicom_test_file


@pytest.fixture(scope="module")
def ct_slice() -> np.ndarray:
    """A real 512x512 abdominal CT slice in HU (radiological orientation), float32."""
    return load_study(pydicom_test_file("explicit_VR-UN.dcm")).pixels


@pytest.fixture(scope="module")
def ct_display(ct_slice) -> np.ndarray:
    """The same slice, abdomen-windowed, as 8-bit grey: what a screenshot would hold."""
    return load_study(pydicom_test_file("explicit_VR-UN.dcm")).display()[:, :, 0]


def test_png_8_bit_grey_opens_unchanged(ct_display, tmp_path):
    Image.fromarray(ct_display).save(tmp_path / "slice.png")
    study = load_study(tmp_path / "slice.png")
    assert not study.is_volume and study.modality == "OT"
    np.testing.assert_array_equal(study.pixels, ct_display.astype(np.float32))
    np.testing.assert_array_equal(study.display()[:, :, 0], ct_display)  # identity window for 8-bit


def test_png_16_bit_keeps_values_and_uses_the_automatic_window(ct_slice, tmp_path):
    stored = (ct_slice + 1024).clip(0, 65535).astype(np.uint16)
    Image.fromarray(stored).save(tmp_path / "slice16.png")
    study = load_study(tmp_path / "slice16.png")
    np.testing.assert_array_equal(study.pixels, stored.astype(np.float32))
    assert study.default_window == "auto"
    low, high = np.percentile(stored, [1, 99])
    assert study.window_values() == pytest.approx((high - low, (high + low) / 2))


def test_tiff_16_bit_and_bmp(ct_slice, ct_display, tmp_path):
    stored = (ct_slice + 1024).clip(0, 65535).astype(np.uint16)
    Image.fromarray(stored).save(tmp_path / "slice.tif")
    np.testing.assert_array_equal(load_study(tmp_path / "slice.tif").pixels, stored.astype(np.float32))
    Image.fromarray(ct_display).save(tmp_path / "slice.bmp")
    np.testing.assert_array_equal(load_study(tmp_path / "slice.bmp").pixels, ct_display.astype(np.float32))


def test_rgb_png_stays_colour_and_grey_rgb_becomes_grey(ct_display, tmp_path):
    overlay = np.repeat(ct_display[:, :, None], 3, axis=2)
    overlay[100:200, 150:300, 1] = 255  # a green annotation
    Image.fromarray(overlay).save(tmp_path / "overlay.png")
    colour = load_study(tmp_path / "overlay.png")
    assert colour.pixels.shape == (512, 512, 3)
    np.testing.assert_array_equal(colour.display(), overlay)
    Image.fromarray(np.repeat(ct_display[:, :, None], 3, axis=2)).save(tmp_path / "grey_rgb.png")
    grey = load_study(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(grey.pixels, ct_display.astype(np.float32))


def test_exif_rotated_jpeg_is_turned_upright(ct_display, tmp_path):
    upright = ct_display[:, 64:448]  # 512 x 384: not square, so a rotation changes the shape
    stored = np.rot90(upright, 1)  # what the camera wrote: rotated 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    study = load_study(tmp_path / "photo.jpg")
    assert study.pixels.shape == upright.shape
    assert np.abs(study.pixels - upright).mean() < 3  # JPEG is lossy
    assert any("EXIF" in note for note in study.notes)


def test_truncated_and_oversized_images(ct_display, tmp_path):
    Image.fromarray(ct_display).save(tmp_path / "slice.png")
    data = (tmp_path / "slice.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_study(tmp_path / "cut.png")
    Image.new("L", (8200, 4)).save(tmp_path / "wide.png")
    with pytest.raises(ImageLoadError, match="too large"):
        load_study(tmp_path / "wide.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_study(tmp_path / "empty.png")
    (tmp_path / "notes.txt").write_text("Patient has pain.")
    with pytest.raises(ImageLoadError, match="not supported"):
        load_study(tmp_path / "notes.txt")
