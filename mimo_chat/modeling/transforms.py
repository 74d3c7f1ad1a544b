"""LiteMedSAM preprocessing as one transform for images and everything that points into them.

Original frame: pixels of the caller's 2D image (H, W), x right, y down, origin at the top-left
pixel corner; boxes XYXY with x1/y1 exclusive. Model frame: the square ``image_size`` canvas
(256 for LiteMedSAM) in which the image, resized so its longest side is ``image_size``, sits at
the top-left (size ``input_size = (h, w)``) and is zero-padded at the bottom and right.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

Coordinates = TypeVar("Coordinates", np.ndarray, torch.Tensor)


class SamTransform:
    """Longest side -> ``image_size``, min-max to [0, 1], pad bottom/right to a square."""

    def __init__(self, image_size: int = 256) -> None:
        self.image_size = image_size

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the resized image inside the model frame for an (H, W) original."""
        height, width = original_size
        scale = self.image_size / max(height, width)
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def _scale(self, original_size: tuple[int, int]) -> tuple[float, float]:
        """(sx, sy): model-frame pixels per original pixel along x and y."""
        height, width = self.input_size(original_size)
        return width / original_size[1], height / original_size[0]

    def apply_image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W) or (H, W, 3) image of any numeric dtype -> (3, S, S) float32 in [0, 1]."""
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"Expected an (H, W) or (H, W, 3) image, got shape {array.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
        height, width = self.input_size(array.shape[:2])
        resized = F.interpolate(tensor[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        low, high = resized.min(), resized.max()
        resized = (resized - low) / torch.clamp(high - low, min=1e-8)  # (1, 3, h, w)
        padded = F.pad(resized, (0, self.image_size - width, 0, self.image_size - height))
        return padded[0]  # (3, S, S)

    def apply_points(self, points: Coordinates, original_size: tuple[int, int]) -> Coordinates:
        """(..., 2) [x, y] original pixels -> model frame."""
        sx, sy = self._scale(original_size)
        return points * _like(points, [sx, sy])

    def apply_boxes(self, boxes: Coordinates, original_size: tuple[int, int]) -> Coordinates:
        """(..., 4) XYXY original pixels -> model frame."""
        sx, sy = self._scale(original_size)
        return boxes * _like(boxes, [sx, sy, sx, sy])

    def unapply_points(self, points: Coordinates, original_size: tuple[int, int]) -> Coordinates:
        """(..., 2) model frame -> original pixels."""
        sx, sy = self._scale(original_size)
        return points / _like(points, [sx, sy])

    def unapply_boxes(self, boxes: Coordinates, original_size: tuple[int, int]) -> Coordinates:
        """(..., 4) model frame -> original pixels."""
        sx, sy = self._scale(original_size)
        return boxes / _like(boxes, [sx, sy, sx, sy])

    def apply_mask(self, mask: np.ndarray | torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(H, W) mask -> (size, size) float mask in the model frame (nearest), zero padding.

        ``size`` defaults to ``image_size``; pass the decoder's low-res side (4E) to build a
        ``mask_input``.
        """
        size = size or self.image_size
        tensor = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
        height, width = self.input_size(tuple(tensor.shape[-2:]))
        height = max(1, round(height * size / self.image_size))
        width = max(1, round(width * size / self.image_size))
        resized = F.interpolate(tensor[None, None], size=(height, width), mode="nearest-exact")
        return F.pad(resized, (0, size - width, 0, size - height))[0, 0]  # (size, size)

    def postprocess_logits(self, logits: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """(N, 1, L, L) model-frame logits (any L, e.g. 4E) -> (N, 1, H, W) logits at the original size."""
        height, width = self.input_size(original_size)
        upscaled = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        cropped = upscaled[..., :height, :width]
        return F.interpolate(cropped, size=tuple(original_size), mode="bilinear", align_corners=False)


def _like(values: Coordinates, factors: list[float]) -> Coordinates:
    if isinstance(values, torch.Tensor):
        return torch.tensor(factors, dtype=values.dtype if values.is_floating_point() else torch.float32,
                            device=values.device)
    return np.asarray(factors, dtype=np.float64)
