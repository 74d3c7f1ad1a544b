"""The pancreas_tc scanner-versus-tissue check: re-windowing, matched pairs, the shortcut baseline."""

from __future__ import annotations

import itertools

import numpy as np

from mimo_chat.data.sources import iter_pancreas_tc
from mimo_chat.evaluation.scanner_check import (
    f1,
    fit_logistic,
    logistic_scores,
    matched_pairs,
    rewindow,
    shortcut_features,
)


def test_rewindow_maps_hounsfield_units_to_the_narrower_window() -> None:
    gray = np.array([[0, 32, 64, 223, 255]], dtype=np.uint8)  # -150, -100, -50, ~200, 250 HU
    assert rewindow(gray).tolist() == [[0, 0, 42, 254, 255]]


def test_matched_pairs_use_each_negative_once_and_respect_the_distance() -> None:
    stats = np.array([[100, 100, 50, 10], [101, 99, 51, 10], [300, 280, 90, 40], [100, 101, 50, 11]], dtype=float)
    labels = np.array([1, 0, 1, 0])
    pairs = matched_pairs(stats, labels, limit=0.5)
    assert pairs == [(0, 1)]  # the large crop has no close partner
    assert matched_pairs(stats, labels, limit=10.0) == [(0, 1), (2, 3)]


def test_size_and_histogram_alone_separate_the_two_collections(shared_data) -> None:
    """Why the check exists: the shortcut works across patients on real crops."""
    train = list(itertools.islice(iter_pancreas_tc(shared_data / "pancreas_tc", split="train"), 0, 2000, 4))
    dev = list(iter_pancreas_tc(shared_data / "pancreas_tc", split="dev"))[::3]
    labels = lambda samples: np.array([int(s.image_label["tumour"] == "yes") for s in samples])
    features = lambda samples: np.stack([shortcut_features(s.image[..., 0]) for s in samples])
    model = fit_logistic(features(train), labels(train))
    result = f1(logistic_scores(model, features(dev)), labels(dev))
    assert len(set(labels(dev))) == 2 and result["f1"] > 0.6
