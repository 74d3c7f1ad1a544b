"""One image encoding per slice of a study, made on first use and kept for the session.

The image encoder is the expensive step (``python -m mimo_chat.bench segment``); the locator and
the mask decoder reuse its embedding as often as they like. The app keeps one
:class:`SliceEncodings` per opened study in the user's session state, so scrolling back, asking
about another structure or running the whole-volume pass again encodes nothing twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from mimo_chat.imaging import Study


class SliceEncodings:
    """Lazily encoded display slices of one study, plane and window.

    ``encode`` maps an (H, W, 3) uint8 display slice to a context (``MimoPredictor.encode`` or
    ``SegmentationPredictor.encode``). ``encoded`` counts the encoder calls made so far.
    Thread-safe: a cancelled pass and a new one may overlap in the app.
    """

    def __init__(
        self, study: Study, encode: Callable[[np.ndarray], Any], plane: str = "axial", window=None
    ) -> None:
        if not study.is_volume:
            raise ValueError("SliceEncodings needs a volume (a NIfTI, NRRD or DICOM series), not a 2D image.")
        self.study = study
        self.plane = plane
        self.window = study.default_window if window is None else window
        self.window_values = study.window_values(self.window)  # fixed once: every slice is shown alike
        self._encode = encode
        self._contexts: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.encoded = 0

    def __len__(self) -> int:
        return self.study.num_slices(self.plane)

    def __contains__(self, index: int) -> bool:
        return index in self._contexts

    def image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 display slice ``index`` in this cache's window."""
        return self.study.display(index, self.plane, self.window_values)

    def context(self, index: int) -> Any:
        """The encoded context of slice ``index``: encoded on the first call, kept afterwards."""
        index = int(index)
        with self._lock:
            if index not in self._contexts:
                self._contexts[index] = self._encode(self.image(index))
                self.encoded += 1
            return self._contexts[index]

    def forget(self) -> None:
        """Drop every kept encoding (e.g. when the user opens another study)."""
        with self._lock:
            self._contexts.clear()
