"""Display windows: map physical values (HU, MR signal, raw grey levels) to 8-bit grey levels.

A window is ``(width, level)``: values from ``level - width / 2`` to ``level + width / 2``
map linearly onto 0..255 and everything outside is clipped. Windowing is a display
transform only; a Study's pixels stay in physical units.
"""

from __future__ import annotations

import numpy as np

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 50.0),
    "pancreas": (300.0, 50.0),
    "liver": (150.0, 60.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
"""CT presets, name -> (width, level) in Hounsfield units."""

AUTO = "auto"
AUTO_PERCENTILES = (1.0, 99.0)
"""The automatic window spans these percentiles of the image (MR, radiographs, photos)."""

Window = str | tuple[float, float]


def default_window(modality: str) -> str:
    """The window a study opens with: the abdomen preset for CT, the automatic window otherwise."""
    return "abdomen" if modality.upper() == "CT" else AUTO


def auto_window(values: np.ndarray, max_samples: int = 1_000_000) -> tuple[float, float]:
    """``(width, level)`` spanning the 1st..99th percentile of the finite values.

    Large arrays (volumes) are subsampled with a regular stride to at most ``max_samples``
    values, so the window is the same for every slice of a volume and cheap to compute.
    """
    values = np.asarray(values)
    if values.size > max_samples:  # strided view per axis: no copy of a (possibly non-contiguous) volume
        step = int(np.ceil((values.size / max_samples) ** (1 / values.ndim)))
        values = values[(slice(None, None, step),) * values.ndim]
    flat = values.reshape(-1)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 1.0, 0.0
    low, high = np.percentile(flat, AUTO_PERCENTILES)
    if high <= low:  # flat image: a window one unit wide around its value
        return 1.0, float(low)
    return float(high - low), float((high + low) / 2)


def resolve_window(window: Window, values: np.ndarray | None = None) -> tuple[float, float]:
    """Turn a preset name, ``"auto"`` (needs ``values``) or ``(width, level)`` into ``(width, level)``."""
    if isinstance(window, str):
        name = window.strip().lower()
        if name == AUTO:
            if values is None:
                raise ValueError("The automatic window needs the image values.")
            return auto_window(values)
        if name not in WINDOW_PRESETS:
            known = ", ".join([*WINDOW_PRESETS, AUTO])
            raise ValueError(f"Unknown window {window!r}; use one of {known} or a (width, level) pair.")
        return WINDOW_PRESETS[name]
    try:
        width, level = (float(part) for part in window)
    except (TypeError, ValueError):
        raise ValueError(f"A window is a preset name or a (width, level) pair, not {window!r}.") from None
    if not np.isfinite(width) or not np.isfinite(level) or width <= 0:
        raise ValueError(f"A window needs a positive width and a finite level, got ({width}, {level}).")
    return width, level


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """Window ``values`` (any shape, physical units) to uint8 of the same shape.

    ``window``: a name from WINDOW_PRESETS, ``"auto"`` (percentiles of ``values``) or ``(width, level)``.
    NaN maps to 0.
    """
    width, level = resolve_window(window, values)
    lower = level - width / 2.0
    scaled = (np.asarray(values, dtype=np.float32) - np.float32(lower)) * np.float32(255.0 / width)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    scaled = np.nan_to_num(scaled, nan=0.0)
    return np.rint(scaled).astype(np.uint8)
