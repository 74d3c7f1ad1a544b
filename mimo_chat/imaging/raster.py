"""PNG, JPEG, TIFF and BMP images (8- or 16-bit, grey or colour) with EXIF orientation applied."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ImageLoadError, check_size
from .privacy import safe_descriptors
from .study import Study

_GREY_MODES = {"1", "L", "LA", "La"}
_INTEGER_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _to_array(image) -> tuple[np.ndarray, bool]:
    """Pixel array and whether it came from 8-bit samples. Grey -> (H, W); colour -> (H, W, 3)."""
    mode = image.mode
    if mode in _GREY_MODES:
        return np.asarray(image.convert("L"), dtype=np.float32), True
    if mode in _INTEGER_MODES:
        return np.asarray(image, dtype=np.float32), False
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]):
        return np.ascontiguousarray(rgb[:, :, 0]), True  # a grey image saved as colour
    return rgb, True


def load_raster(path: Path) -> Study:
    """Open a PNG/JPEG/TIFF/BMP file as a 2D Study (row 0 at the top after EXIF rotation).

    8-bit images open with the identity window (a screenshot is already windowed);
    16-bit and floating-point images open with the automatic window.
    """
    from PIL import Image, ImageOps

    notes: list[str] = []
    try:
        with Image.open(path) as image:
            width, height = image.size  # from the header; nothing decoded yet
            check_size((height, width, len(image.getbands())), "image", plane=(height, width))
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                notes.append(f"This file holds {frames} images; showing the first.")
            image.load()
            orientation = image.getexif().get(0x0112, 1)
            upright = ImageOps.exif_transpose(image)
            if orientation not in (None, 1):
                notes.append("The image was rotated upright using its EXIF orientation tag.")
            pixels, eight_bit = _to_array(upright)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError:
        raise ImageLoadError("This image is too large to open safely.") from None
    except Exception:  # noqa: BLE001 - wrapped into ImageLoadError
        raise ImageLoadError("This image file is truncated or corrupt and could not be decoded.") from None
    if pixels.size == 0:
        raise ImageLoadError("This image is empty: it contains no pixels.")
    if not np.isfinite(pixels).all():
        raise ImageLoadError("This image contains invalid values (NaN or infinity) and cannot be shown reliably.")
    window = (255.0, 127.5) if eight_bit else "auto"
    size = pixels.shape[:2]
    return Study(
        pixels=pixels,
        modality="OT",
        spacing=(1.0, 1.0),
        descriptors=safe_descriptors("OT", size, None),
        notes=notes,
        is_volume=False,
        default_window=window,
    )
