"""The one error type that leaves the imaging package, and the size checks it makes before decoding.

The limits themselves are named in :mod:`mimo_chat.limits`.
"""

from __future__ import annotations

from mimo_chat.limits import MAX_DECODED_BYTES, MAX_IMAGE_PIXELS, MAX_SIDE, MIN_IMAGE_SIDE


class ImageLoadError(ValueError):
    """An image could not be opened. The message is written for a clinician and never quotes
    patient identifiers, file contents or third-party error text."""


def check_size(shape: tuple[int, ...], what: str = "image", plane: tuple[int, int] | None = None) -> None:
    """Raise ImageLoadError for empty, over-long or over-large shapes, before anything is decoded.

    ``shape`` counts samples (e.g. ``(rows, columns, frames, channels)``); each sample becomes one
    float32. ``plane`` is (rows, columns) of one displayed image or slice: it must stay within
    ``MAX_IMAGE_PIXELS``, and a 2D image (``what`` "image") needs ``MIN_IMAGE_SIDE`` on each side.
    """
    if len(shape) == 0 or any(int(side) <= 0 for side in shape):
        raise ImageLoadError(f"This {what} is empty: it contains no pixels.")
    longest = max(int(side) for side in shape)
    if longest > MAX_SIDE:
        raise ImageLoadError(
            f"This {what} is too large to open: one side has {longest} pixels (the limit is {MAX_SIDE})."
        )
    if plane is not None:
        rows, columns = (int(side) for side in plane)
        if rows * columns > MAX_IMAGE_PIXELS:
            raise ImageLoadError(
                f"This {what} is too large to open: {columns} x {rows} pixels "
                f"(the limit is {MAX_IMAGE_PIXELS / 1e6:g} million pixels per image)."
            )
        if what == "image" and min(rows, columns) < MIN_IMAGE_SIDE:
            raise ImageLoadError(
                f"This image is too small to analyse ({columns} x {rows} pixels); it needs at least "
                f"{MIN_IMAGE_SIDE} pixels on each side."
            )
    decoded = 4
    for side in shape:
        decoded *= int(side)
    if decoded > MAX_DECODED_BYTES:
        raise ImageLoadError(
            f"This {what} is too large to open: it would need {decoded / 1024**3:.1f} GB of memory "
            f"(the limit is {MAX_DECODED_BYTES / 1024**3:.1f} GB per study)."
        )
