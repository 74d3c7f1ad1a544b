"""Every request limit refuses its case with a readable message, at once, before the work it bounds."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile

import numpy as np
import pydicom
import pytest
from PIL import Image

from mimo_chat import limits
from mimo_chat.imaging import ImageLoadError, load_study
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.processing import MimoProcessor
from mimo_chat.resources import clean_interrupted_writes, pydicom_test_file


@pytest.fixture(scope="module")
def processor() -> MimoProcessor:
    return MimoProcessor.from_config(MimoConfig.tiny())  # the SmolLM2 tokenizer


def _ct_bytes() -> bytes:
    return pydicom_test_file("CT_small.dcm").read_bytes()


def test_question_limits_in_characters_and_tokens(processor):
    with pytest.raises(limits.InputError, match="Ask a question"):
        limits.check_question("   ")
    with pytest.raises(limits.InputError, match=r"too long \(100,000 characters; at most 2,000\)"):
        processor.check_question("x" * 100_000)
    numbers = " ".join(str(n % 10) for n in range(900))  # 1,799 characters, one token per digit and space
    with pytest.raises(limits.InputError, match=r"tokens; at most 512"):
        processor.check_question(numbers)
    processor.check_question("Where is the pancreas?")
    long_history = [("Where is the liver?", "It is the <p>liver</p><SEG>. " * 60)] * 4
    with pytest.raises(limits.InputError, match="conversation is too long.*Clear the chat"):
        processor.encode("And the spleen?", (128, 128), history=long_history)


def test_prompt_rows_json_is_refused_before_parsing():
    assert limits.parse_rows("[[1, 2, 3, 4]]", 4, "boxes", "[[x0, y0, x1, y1]]") == [[1.0, 2.0, 3.0, 4.0]]
    assert limits.parse_rows(" ", 4, "boxes", "") == []
    deep = "[" * 50_000 + "]" * 50_000  # json.loads would hit the recursion limit
    with pytest.raises(limits.InputError, match="nested deeper"):
        limits.parse_rows(deep[:16_000], 4, "boxes", "[[x0, y0, x1, y1]]")
    with pytest.raises(limits.InputError, match="JSON is too long"):
        limits.parse_rows(deep, 4, "boxes", "[[x0, y0, x1, y1]]")
    with pytest.raises(limits.PromptError, match=r"box 1 \['a', 2, 3, 4\] needs 4 numbers"):
        limits.parse_rows('[[1, 2, 3, 4], ["a", 2, 3, 4]]', 4, "boxes", "[[x0, y0, x1, y1]]")
    with pytest.raises(limits.InputError, match="must be JSON"):
        limits.parse_rows("[[1, 2", 4, "boxes", "[[x0, y0, x1, y1]]")
    with pytest.raises(limits.PromptError, match="point 0 .* needs 3 numbers"):  # brackets in a string are not depth
        limits.parse_rows('[["[[[[", 1, 1]]', 3, "points", "[[x, y, 1]]")


@pytest.mark.parametrize(("box", "message"), [
    ([float("nan"), 0, 10, 10], "box 0 .*non-finite"),
    ([5, 5, 5, 20], "box 0 .*zero area"),
    ([40, 5, 20, 20], "box 0 .*inverted"),
    ([200, 5, 300, 20], "box 0 .*outside the 128x128 image"),
])
def test_invalid_boxes_are_errors_naming_the_box(box, message, processor):
    with pytest.raises(limits.PromptError, match=message):
        limits.check_prompts((128, 128), [box])
    with pytest.raises(ValueError, match=message):  # the processor applies the same rules
        processor.visual_prompts((128, 128), boxes=[box])


def test_invalid_points_and_counts_are_errors_naming_the_prompt(processor):
    with pytest.raises(limits.PromptError, match="point 1 has label 7"):
        limits.check_prompts((128, 128), points=[[5, 5], [6, 6]], labels=[1, 7])
    with pytest.raises(limits.PromptError, match=r"point 0 \(nan, 3\) has non-finite"):
        processor.visual_prompts((128, 128), points=[[float("nan"), 3]], point_labels=[1])
    with pytest.raises(limits.PromptError, match=r"5,000 points|5000 points in one request; at most 64"):
        limits.check_prompts((128, 128), points=[[1, 1]] * 5000, labels=[1] * 5000)
    with pytest.raises(limits.PromptError, match="65 boxes in one request; at most 64"):
        limits.check_prompts((128, 128), [[0, 0, 10, 10]] * 65)
    limits.check_prompts((128, 128), [[-20, -20, 50, 50]], [[0, 0]], [0])  # partly outside: valid (clipped)


def test_deadline_stops_a_slow_stream_and_closes_it():
    closed = []

    def slow():
        try:
            for index in range(100):
                time.sleep(0.05)
                yield index
        finally:
            closed.append(True)

    deadline = limits.Deadline(0.2)
    seen = []
    with pytest.raises(limits.TimeLimitError, match=r"took longer than 0.2 s and was stopped"):
        seen.extend(deadline.bound(slow()))
    assert 1 <= len(seen) < 10 and closed == [True]


def test_decoded_pixel_budget_and_minimum_side(tmp_path):
    Image.new("L", (8000, 8000)).save(tmp_path / "huge.png")  # a small file that decodes to 64 Mpixels
    assert (tmp_path / "huge.png").stat().st_size < 200_000
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="8000 x 8000 pixels .*25 million pixels"):
        load_study(tmp_path / "huge.png")
    assert time.monotonic() - start < 2  # refused from the header
    Image.new("L", (1, 300)).save(tmp_path / "thin.png")
    with pytest.raises(ImageLoadError, match=r"too small to analyse \(1 x 300 pixels\)"):
        load_study(tmp_path / "thin.png")
    with pytest.raises(limits.InputError, match="too small"):
        limits.check_image_size((300, 4))


def test_zip_members_are_counted_and_sized_while_unpacking(tmp_path):
    bomb = tmp_path / "bomb.zip"
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("a.dcm", "w", force_zip64=True) as member:
        for _ in range(limits.MAX_MEMBER_BYTES // len(zeros) + 8):  # just over the per-file limit
            member.write(zeros)
    assert bomb.stat().st_size < 1_000_000
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="too large once unpacked"):
        load_study(bomb)
    assert time.monotonic() - start < 10
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as archive:
        for index in range(limits.MAX_ARCHIVE_MEMBERS + 1):
            archive.writestr(f"{index}.txt", b"")
    with pytest.raises(ImageLoadError, match="too many files"):
        load_study(many)


def test_damaged_dicom_headers_say_corrupt_quickly(tmp_path):
    raw = bytearray(_ct_bytes())
    dataset = pydicom.dcmread(io.BytesIO(bytes(raw)))
    offset = raw.find(b"\x18\x00\x88\x00")  # (0018,0088) SpacingBetweenSlices in explicit VR little endian
    assert offset > 0 and "SpacingBetweenSlices" in dataset
    raw[offset + 6: offset + 8] = (60_000).to_bytes(2, "little")  # its length now swallows the pixel data
    (tmp_path / "swallowed.dcm").write_bytes(bytes(raw))
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_study(tmp_path / "swallowed.dcm")
    (tmp_path / "zeros.dcm").write_bytes(bytes(50 << 20))  # 50 MB of zeros named .dcm: minutes for pydicom
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_study(tmp_path / "zeros.dcm")
    assert time.monotonic() - start < 2
    with pytest.raises(ImageLoadError, match="This DICOM file has no image data"):  # a real non-image file
        load_study(pydicom_test_file("rtplan.dcm"))


def test_descriptions_are_shown_only_through_the_privacy_filter(tmp_path):
    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    dataset.PatientName = "Okonkwo^Adaeze"
    dataset.StudyDescription = "CT ABDOMEN Okonkwo"
    dataset.SeriesDescription = "abdomen^liver 5mm"
    dataset.BodyPartExamined = "Dr Whitfield"
    dataset.save_as(tmp_path / "named.dcm")
    study = load_study(tmp_path / "named.dcm")
    shown = json.dumps(study.descriptors)
    assert "Okonkwo" not in shown and "Whitfield" not in shown and "Adaeze" not in shown
    assert "study_description" not in study.descriptors and "body_part" not in study.descriptors
    assert study.descriptors["series_description"] == "abdomen^liver 5mm"


def test_interrupted_cache_writes_are_removed_when_old(tmp_path):
    old = tmp_path / "lm" / "SmolLM2.partial-abc123"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"x" * 1000)
    fresh = tmp_path / "lm" / "Other.partial-def456"
    fresh.mkdir()
    kept = tmp_path / "lm" / "SmolLM2"
    kept.mkdir()
    stale = time.time() - 3600
    os.utime(old, (stale, stale))
    assert clean_interrupted_writes(tmp_path) == [old]
    assert not old.exists() and fresh.exists() and kept.exists()


def test_segmentation_engine_uses_the_same_rules():
    from mimo_chat.segmentation import validate_prompts

    with pytest.raises(limits.PromptError, match="point 0 of prompt 1 .*outside"):
        validate_prompts((64, 64), points=np.array([[[1, 1]], [[70, 1]]]), point_labels=[[1], [1]])
    with pytest.raises(limits.PromptError, match="point label 0 has label 7"):
        validate_prompts((64, 64), points=[[1, 1]], point_labels=[7])
    with pytest.raises(limits.PromptError, match="65 clicks on one object; at most 64"):
        validate_prompts((64, 64), points=[[1, 1]] * 65)
    prompts = validate_prompts((64, 64), points=[[[1, 1], [0, 0]]], point_labels=[[1, -1]])
    assert prompts.count == 1


def test_deflated_dicom_opens_and_a_deflate_bomb_is_refused(tmp_path):
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = pydicom.dcmread(pydicom_test_file("CT_small.dcm"))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert load_study(tmp_path / "deflated.dcm").pixels.shape == (128, 128)
    raw = (tmp_path / "deflated.dcm").read_bytes()
    handle = io.BytesIO(raw)
    read_preamble(handle, False)
    _read_file_meta_info(handle)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    body = b"".join(packer.compress(zeros) for _ in range(limits.MAX_MEMBER_BYTES // len(zeros) + 8))
    (tmp_path / "bomb.dcm").write_bytes(raw[: handle.tell()] + body + packer.flush())
    with pytest.raises(ImageLoadError, match="too large to open once unpacked"):
        load_study(tmp_path / "bomb.dcm")
