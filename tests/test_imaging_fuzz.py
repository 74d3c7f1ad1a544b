"""Property tests: truncated, corrupted and random bytes given to load_study only ever raise ImageLoadError."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mimo_chat.imaging import ImageLoadError, Study, load_study
from mimo_chat.resources import pydicom_test_file

SUFFIXES = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".nii.gz", ".nrrd", ".zip", ""]
MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"II*\x00",
    b"BM",
    b"\x00" * 128 + b"DICM",
    b"NRRD0004\n",
    b"PK\x03\x04",
    b"\x1f\x8b\x08\x00",
]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _real_files() -> dict[str, bytes]:
    """Small real files of every supported kind (bytes, keyed by file name)."""
    ct = load_study(pydicom_test_file("CT_small.dcm"))
    display = ct.display()[:, :, 0]
    files = {
        "CT_small.dcm": pydicom_test_file("CT_small.dcm").read_bytes(),
        "MR_small_RLE.dcm": pydicom_test_file("MR_small_RLE.dcm").read_bytes(),
        "MR_small_jpeg_ls_lossless.dcm": pydicom_test_file("MR_small_jpeg_ls_lossless.dcm").read_bytes(),
        "emri_small_jpeg_2k_lossless.dcm": pydicom_test_file("emri_small_jpeg_2k_lossless.dcm").read_bytes(),
    }
    for suffix, options in [(".png", {}), (".jpg", {"quality": 90}), (".tif", {}), (".bmp", {})]:
        buffer = io.BytesIO()
        Image.fromarray(display).save(buffer, format=Image.registered_extensions()[suffix], **options)
        files["slice" + suffix] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray((ct.pixels + 1024).astype(np.uint16)).save(buffer, format="PNG")
    files["slice16.png"] = buffer.getvalue()
    volume = nib.Nifti1Image(np.stack([ct.pixels.astype(np.int16)] * 3, axis=-1), np.eye(4))
    files["volume.nii"] = volume.to_bytes()
    files["volume.nii.gz"] = _gzip(volume.to_bytes())
    header = b"NRRD0004\ntype: int16\ndimension: 3\nsizes: 128 128 3\nspace: left-posterior-superior\n"
    header += b"space directions: (1,0,0) (0,1,0) (0,0,5)\nspace origin: (0,0,0)\nendian: little\nencoding: raw\n\n"
    files["volume.nrrd"] = header + np.stack([ct.pixels.astype(np.int16)] * 3, axis=0).tobytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("a.dcm", files["CT_small.dcm"])
    files["series.zip"] = buffer.getvalue()
    return files


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1)


REAL = _real_files()


def _load_bytes(data: bytes, name: str) -> Study | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            study = load_study(path)
        except ImageLoadError as error:
            assert str(error) and "Traceback" not in str(error)
            return None
    assert isinstance(study, Study)
    assert study.pixels.dtype == np.float32 and np.isfinite(study.pixels).all()
    return study


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_files_load(name):
    assert _load_bytes(REAL[name], name) is not None


@FUZZ
@given(name=st.sampled_from(sorted(REAL)), fraction=st.floats(0.0, 0.999))
def test_truncated_files_raise_only_image_load_error(name, fraction):
    data = REAL[name]
    _load_bytes(data[: int(len(data) * fraction)], name)


@FUZZ
@given(name=st.sampled_from(sorted(REAL)), data=st.data())
def test_corrupted_files_raise_only_image_load_error(name, data):
    payload = bytearray(REAL[name])
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    study = _load_bytes(bytes(payload), name)
    if study is not None:
        study.display()  # whatever loads must also display


@FUZZ
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=2048), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_raise_only_image_load_error(magic, body, suffix):
    _load_bytes(magic + body, "upload" + suffix)
