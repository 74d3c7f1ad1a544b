"""Fast checks of the app's drawing and per-user session state on a real DICOM slice (no model)."""

from __future__ import annotations

import numpy as np
import pytest

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
from mimo_chat.app.session import Session
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


def test_session_folder_is_private_and_removed(tmp_path):
    first, second = Session.create(tmp_path), Session.create(tmp_path)
    assert first.workdir != second.workdir and first.workdir.is_dir()
    (first.workdir / "upload.dcm").write_bytes(b"x")
    first.cleanup()
    assert not first.workdir.exists() and second.workdir.is_dir()
