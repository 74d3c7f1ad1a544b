"""Augmentations that move an image and everything that points into it together.

One :class:`Augmentation` (scale, shift, small rotation, window and noise jitter, JPEG
re-compression) is applied to the image, its masks (nearest neighbour), its prompt boxes
(the bounding box of the four transformed corners) and its points. There is deliberately
**no flip of any kind**: left and right matter in anatomy ("left kidney"), and a flipped
image would teach the model wrong sides. :class:`AugmentationConfig` has no flip option.

Coordinate frame: image pixels, x right, y down, origin at the top-left corner of the
top-left pixel; pixel (row r, col c) covers [c, c+1) x [r, r+1); boxes are
``[x0, y0, x1, y1]`` with x1/y1 exclusive.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage


@dataclass(frozen=True)
class AugmentationConfig:
    """Ranges of the random augmentation (saved with the training config)."""

    scale: tuple[float, float] = (0.85, 1.15)
    shift_fraction: float = 0.08  # of the image size, each axis
    rotation_degrees: float = 10.0  # small: anatomy has a canonical orientation
    contrast: tuple[float, float] = (0.85, 1.2)  # window width jitter on the display image
    brightness: float = 15.0  # window level jitter, grey levels
    noise_sigma: tuple[float, float] = (0.0, 4.0)  # grey levels
    jpeg_probability: float = 0.3
    jpeg_quality: tuple[int, int] = (60, 95)


@dataclass(frozen=True)
class Augmentation:
    """One drawn set of parameters. ``matrix`` maps input (x, y) to output (x, y) about the centre."""

    scale: float
    rotation_degrees: float
    shift: tuple[float, float]  # (dx, dy) pixels
    contrast: float
    brightness: float
    noise_sigma: float
    jpeg_quality: int | None
    noise_seed: int

    @classmethod
    def draw(cls, rng: np.random.Generator, size: tuple[int, int], config: AugmentationConfig) -> Augmentation:
        height, width = size
        return cls(
            scale=float(rng.uniform(*config.scale)),
            rotation_degrees=float(rng.uniform(-config.rotation_degrees, config.rotation_degrees)),
            shift=(float(rng.uniform(-1, 1) * config.shift_fraction * width),
                   float(rng.uniform(-1, 1) * config.shift_fraction * height)),
            contrast=float(rng.uniform(*config.contrast)),
            brightness=float(rng.uniform(-config.brightness, config.brightness)),
            noise_sigma=float(rng.uniform(*config.noise_sigma)),
            jpeg_quality=int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
            if rng.random() < config.jpeg_probability else None,
            noise_seed=int(rng.integers(0, 2**31 - 1)),
        )

    def linear(self) -> np.ndarray:
        """2x2 matrix acting on (x, y): rotation then isotropic scale. Determinant > 0 (never a flip)."""
        angle = math.radians(self.rotation_degrees)
        cos, sin = math.cos(angle), math.sin(angle)
        return self.scale * np.array([[cos, -sin], [sin, cos]])

    def map_points(self, points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(N, 2) continuous (x, y) in the input image -> (N, 2) in the output image."""
        height, width = size
        centre = np.array([width / 2.0, height / 2.0])
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return (points - centre) @ self.linear().T + centre + np.asarray(self.shift)

    def map_box(self, box: Sequence[float], size: tuple[int, int]) -> list[float]:
        """A box -> the bounding box of its four transformed corners, clipped to the image."""
        height, width = size
        x0, y0, x1, y1 = (float(v) for v in box)
        corners = self.map_points(np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]), size)
        low, high = corners.min(axis=0), corners.max(axis=0)
        return [float(np.clip(low[0], 0, width)), float(np.clip(low[1], 0, height)),
                float(np.clip(high[0], 0, width)), float(np.clip(high[1], 0, height))]

    def _warp(self, array: np.ndarray, order: int) -> np.ndarray:
        """Resample a (H, W) array: output pixel centres pulled back through the inverse map."""
        height, width = array.shape
        inverse = np.linalg.inv(self.linear())
        centre = np.array([width / 2.0, height / 2.0])
        # index i has centre i + 0.5: in = A^-1 (out + 0.5 - c - t) + c - 0.5
        offset_xy = inverse @ (0.5 - centre - np.asarray(self.shift)) + centre - 0.5
        swap = np.array([[0, 1], [1, 0]])
        return ndimage.affine_transform(array, swap @ inverse @ swap, offset=swap @ offset_xy,
                                        order=order, mode="constant", cval=0.0, prefilter=False)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, 3) uint8 display image -> the same shape, geometry and intensity jittered."""
        gray = image if image.ndim == 2 else image[..., 0]
        warped = self._warp(gray.astype(np.float32), order=1)
        values = (warped - 128.0) * self.contrast + 128.0 + self.brightness
        if self.noise_sigma > 0:
            values += np.random.default_rng(self.noise_seed).normal(0.0, self.noise_sigma, values.shape)
        result = np.clip(np.round(values), 0, 255).astype(np.uint8)
        if self.jpeg_quality is not None:
            buffer = io.BytesIO()
            Image.fromarray(result).save(buffer, format="JPEG", quality=self.jpeg_quality)
            result = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))
        return result if image.ndim == 2 else np.repeat(result[..., None], 3, axis=2)

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) bool -> (H, W) bool, nearest neighbour."""
        return self._warp(mask.astype(np.uint8), order=0).astype(bool)


@dataclass
class AugmentedSample:
    image: np.ndarray
    masks: list[np.ndarray]
    boxes: list[list[float]]  # prompt boxes, transformed
    points: list[list[float]]  # prompt points, transformed


def augment_sample(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    rng: np.random.Generator,
    config: AugmentationConfig = AugmentationConfig(),
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[Sequence[float]] = (),
) -> tuple[AugmentedSample, Augmentation]:
    """Draw one augmentation and apply it to the image, its masks, prompt boxes and points."""
    size = image.shape[:2]
    augmentation = Augmentation.draw(rng, size, config)
    moved_points = augmentation.map_points(np.asarray(points, dtype=np.float64), size) if len(points) else []
    sample = AugmentedSample(
        image=augmentation.apply_image(image),
        masks=[augmentation.apply_mask(mask) for mask in masks],
        boxes=[augmentation.map_box(box, size) for box in boxes],
        points=[[float(x), float(y)] for x, y in moved_points],
    )
    return sample, augmentation
