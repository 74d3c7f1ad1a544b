"""Window presets and the automatic window, on real CT and MR values."""

from __future__ import annotations

import numpy as np
import pytest

from mimo_chat.imaging import WINDOW_PRESETS, apply_window, default_window, load_study
from mimo_chat.resources import pydicom_test_file


def test_presets_are_the_documented_ones():
    assert WINDOW_PRESETS == {
        "abdomen": (400, 50),
        "pancreas": (300, 50),
        "liver": (150, 60),
        "lung": (1500, -600),
        "bone": (1800, 400),
        "brain": (80, 40),
    }
    assert default_window("CT") == "abdomen" and default_window("MR") == "auto" and default_window("XR") == "auto"


@pytest.mark.parametrize("name", sorted(WINDOW_PRESETS))
def test_preset_maps_its_range_onto_0_255(name):
    width, level = WINDOW_PRESETS[name]
    values = np.array([level - width / 2 - 50, level - width / 2, level, level + width / 2, level + width / 2 + 50])
    assert apply_window(values, name).tolist() == [0, 0, 128, 255, 255]


def test_windows_on_a_real_ct_slice():
    study = load_study(pydicom_test_file("explicit_VR-UN.dcm"))
    hu = study.pixels
    abdomen = apply_window(hu, "abdomen")
    assert abdomen.dtype == np.uint8 and abdomen.shape == hu.shape
    assert (abdomen[hu <= -150] == 0).all() and (abdomen[hu >= 250] == 255).all()
    lung = apply_window(hu, "lung")
    fat = (hu > -120) & (hu < -80)
    assert lung[fat].mean() > abdomen[fat].mean()  # the lung window shows fat brighter
    custom = apply_window(hu, (1000, 0))
    assert custom[(hu > -5) & (hu < 5)].mean() == pytest.approx(127.5, abs=2)
    np.testing.assert_array_equal(study.display(window="liver")[:, :, 1], apply_window(hu, "liver"))


def test_auto_window_spans_percentiles_of_a_real_mr():
    study = load_study(pydicom_test_file("MR_small.dcm"))
    shown = apply_window(study.pixels, "auto")
    low, high = np.percentile(study.pixels, [1, 99])
    assert (shown[study.pixels <= low] == 0).all() and (shown[study.pixels >= high] == 255).all()
    np.testing.assert_array_equal(study.display()[:, :, 0], shown)


@pytest.mark.parametrize("bad", ["soft tissue", (0, 40), (-10, 40), ("a", "b"), 3])
def test_bad_windows_are_refused(bad):
    with pytest.raises(ValueError):
        apply_window(np.zeros((4, 4)), bad)
