"""The one error type that leaves the imaging package, and the size limits it enforces."""

from __future__ import annotations

MAX_SIDE = 8192
"""Longest accepted side of an image or volume, in pixels/voxels."""

MAX_DECODED_BYTES = 2 * 1024**3
"""Largest accepted decoded image, counted as float32 (the dtype a Study keeps)."""


class ImageLoadError(ValueError):
    """An image could not be opened. The message is written for a clinician and never quotes
    patient identifiers, file contents or third-party error text."""


def check_size(shape: tuple[int, ...], what: str = "image") -> None:
    """Raise ImageLoadError for empty, over-long or over-large shapes, before anything is decoded.

    ``shape`` counts samples (e.g. ``(rows, columns, frames, channels)``); each sample
    becomes one float32.
    """
    if len(shape) == 0 or any(int(side) <= 0 for side in shape):
        raise ImageLoadError(f"This {what} is empty: it contains no pixels.")
    longest = max(int(side) for side in shape)
    if longest > MAX_SIDE:
        raise ImageLoadError(
            f"This {what} is too large to open: one side has {longest} pixels (the limit is {MAX_SIDE})."
        )
    decoded = 4
    for side in shape:
        decoded *= int(side)
    if decoded > MAX_DECODED_BYTES:
        gigabytes = decoded / 1024**3
        raise ImageLoadError(
            f"This {what} is too large to open: it would need {gigabytes:.1f} GB of memory (limit 2 GB)."
        )
