"""What the segmenter's prompt fine-tune trains on: structures of cached slices and the prompts drawn for them.

Everything here is in the model frame (the 256 x 256 square of :class:`SamTransform`) and draws
from one ``random.Random``, so a run's batches follow from its seed and its generator's state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from mimo_chat.boxes import mask_to_box
from mimo_chat.data.sources import SOURCE_WEIGHTS
from mimo_chat.modeling.transforms import SamTransform
from mimo_chat.train.seg_cache import unpack_mask


class Examples:
    """(slice, structure) pairs of the train cache with model-frame targets, sampled by source
    (``SOURCE_WEIGHTS``, the locator's weights; a source without masks is skipped)."""

    def __init__(self, records: list[dict], transform: SamTransform, min_fraction: float = 0.0005) -> None:
        self.items: dict[str, list[tuple[int, str]]] = {}
        self.records = records
        self.targets: dict[tuple[int, str], np.ndarray] = {}
        self.union: list[np.ndarray] = []
        for index, record in enumerate(records):
            shape = tuple(record["shape"])
            self.union.append(np.zeros((transform.image_size,) * 2, dtype=bool))
            for name, packed in record["masks"].items():
                mask = unpack_mask(packed, shape)
                if mask.mean() < min_fraction:
                    continue
                model_mask = transform.apply_mask(mask).numpy() > 0.5  # (256, 256)
                if model_mask.sum() < 4:
                    continue
                self.targets[(index, name)] = model_mask
                self.union[index] |= model_mask
                self.items.setdefault(record["source"], []).append((index, name))
        self.sources = [s for s in SOURCE_WEIGHTS if s in self.items]
        self.weights = np.array([SOURCE_WEIGHTS[s] for s in self.sources]) / sum(SOURCE_WEIGHTS[s] for s in self.sources)

    def sample(self, rng: random.Random) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(embedding (C, E, E), target (256, 256) bool, other structures on the slice (256, 256) bool)."""
        source = self.sources[int(np.searchsorted(np.cumsum(self.weights), rng.random()))]
        index, name = rng.choice(self.items[source])
        target = self.targets[(index, name)]
        return self.records[index]["embedding"], target, self.union[index] & ~target


def sample_click(region: np.ndarray, rng: random.Random, centre_probability: float = 0.5) -> tuple[float, float]:
    """A click inside ``region`` (model-frame bool): its deepest point or a random interior pixel."""
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    if rng.random() < centre_probability:
        row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
        return col + 0.5, row + 0.5
    return random_pixel(distance >= max(1.0, 0.3 * distance.max()), rng)


def random_pixel(region: np.ndarray, rng: random.Random) -> tuple[float, float]:
    """(x, y) centre of a pixel of ``region`` (model-frame bool, not empty) drawn uniformly."""
    rows, cols = np.nonzero(region)
    pick = rng.randrange(len(rows))
    return cols[pick] + 0.5, rows[pick] + 0.5


def jittered_box(mask: np.ndarray, rng: random.Random, fraction: float = 0.1, pixels: int = 5) -> list[float]:
    x0, y0, x1, y1 = mask_to_box(mask)
    span = max(x1 - x0, y1 - y0)
    limit = max(1, min(pixels, int(fraction * span) + 1))
    x0, y0 = x0 + rng.randint(-limit, limit), y0 + rng.randint(-limit, limit)
    x1, y1 = x1 + rng.randint(-limit, limit), y1 + rng.randint(-limit, limit)
    size = mask.shape[0]
    x0, y0 = min(max(x0, 0), size - 1), min(max(y0, 0), size - 1)
    return [float(x0), float(y0), float(max(min(x1, size), x0 + 1)), float(max(min(y1, size), y0 + 1))]


def extra_clicks(target: np.ndarray, others: np.ndarray, rng: random.Random) -> list[tuple[tuple[float, float], int]]:
    """Refinement clicks without a model pass: another positive inside the target, and/or a
    negative on what a leaking mask would touch (a neighbouring structure, else the ring around)."""
    clicks = []
    if rng.random() < 0.5:
        clicks.append((sample_click(target, rng, 0.0), 1))
    ring = ndimage.binary_dilation(target, iterations=rng.randint(3, 15)) & ~target
    near = ring & others
    region = near if near.sum() >= 4 and rng.random() < 0.7 else ring
    if region.sum() >= 1 and (not clicks or rng.random() < 0.6):
        clicks.append((random_pixel(region, rng), 0))
    return clicks


def crop_window(target: np.ndarray, rng: random.Random, grid: int, crop: int) -> tuple[int, int]:
    """(row, col) of a ``crop`` x ``crop`` window of the ``grid`` embedding cells around the target."""
    if crop >= grid:
        return 0, 0
    rows, cols = np.nonzero(target)
    cell = target.shape[0] / grid  # model-frame pixels per embedding cell
    centre_row, centre_col = (rows.min() + rows.max()) / 2 / cell, (cols.min() + cols.max()) / 2 / cell
    if rng.random() < 0.5:  # sometimes centre on a random pixel of the structure instead
        pick = rng.randrange(len(rows))
        centre_row, centre_col = rows[pick] / cell, cols[pick] / cell
    shift = crop // 4
    row = int(np.floor(centre_row - crop / 2 + rng.randint(-shift, shift) + 0.5))
    col = int(np.floor(centre_col - crop / 2 + rng.randint(-shift, shift) + 0.5))
    return min(max(row, 0), grid - crop), min(max(col, 0), grid - crop)


def loosened_box(mask: np.ndarray, rng: random.Random, pixels: int = 20) -> list[float]:
    """A box around ``mask`` with each side pushed out by up to ``pixels``: a box drawn carelessly,
    or the widened box the engine adds to clicks (:meth:`SegmentationPredictor._refine`)."""
    x0, y0, x1, y1 = jittered_box(mask, rng)
    size = mask.shape[0]
    x0, y0 = max(0.0, x0 - rng.randint(0, pixels)), max(0.0, y0 - rng.randint(0, pixels))
    x1, y1 = min(float(size), x1 + rng.randint(0, pixels)), min(float(size), y1 + rng.randint(0, pixels))
    return [x0, y0, x1, y1]


def located_box(mask: np.ndarray, rng: random.Random, inward: float = 0.45, outward: float = 0.25,
                close_share: float = 0.3) -> list[float]:
    """A box as the locator's heatmap gives it for a named structure: each side moved in by up to
    ``inward`` or out by up to ``outward`` of the structure's extent (a heatmap often covers part of
    an elongated organ, or spills onto a neighbour); ``close_share`` of the boxes stay within 10 %."""
    x0, y0, x1, y1 = mask_to_box(mask)
    width, height = x1 - x0, y1 - y0
    low, high = (-0.1, 0.1) if rng.random() < close_share else (-inward, outward)
    moves = [rng.uniform(low, high) for _ in range(4)]  # > 0: that side moves outward
    size = float(mask.shape[0])
    box = [x0 - moves[0] * width, y0 - moves[1] * height, x1 + moves[2] * width, y1 + moves[3] * height]
    box = [min(max(value, 0.0), size) for value in box]
    box[2], box[3] = min(max(box[2], box[0] + 3), size), min(max(box[3], box[1] + 3), size)
    box[0], box[1] = min(box[0], box[2] - 3), min(box[1], box[3] - 3)
    return box


def box_clicks(target: np.ndarray, others: np.ndarray, box: list[float], rng: random.Random) -> list[tuple[tuple[float, float], int]]:
    """Clicks added to a box: a positive inside the target and/or a negative inside the box on what
    is not the target (a neighbouring structure first), the correction a user makes to a leaking box."""
    inside = np.zeros_like(target)
    x0, y0, x1, y1 = (int(v) for v in box)
    inside[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = True
    background = inside & ~ndimage.binary_dilation(target, iterations=2)
    near = background & others
    region = near if near.sum() >= 4 and rng.random() < 0.6 else background
    clicks = []
    if region.sum() >= 1 and rng.random() < 0.75:
        clicks.append((random_pixel(region, rng), 0))
    if not clicks or rng.random() < 0.5:
        clicks.append((sample_click(target, rng), 1))
    return clicks


@dataclass
class PromptGroup:
    """Rows of a batch prompted alike (one decoder call): by a box, by clicks, or by a box with clicks."""

    rows: list[int]
    boxes: torch.Tensor | None  # (len(rows), 4) model frame
    clicks: tuple[torch.Tensor, torch.Tensor] | None  # (len(rows), K, 2) model frame, labels (len, K), -1 pads
    distilled: bool = False  # a user's box: also trained toward LiteMedSAM's own mask (see prompt_loss)


@dataclass
class PromptBatch:
    """``len(windows)`` structures, each on a ``crop`` x ``crop`` window of its embedding grid."""

    embeddings: torch.Tensor  # (B, C, crop, crop)
    windows: list[tuple[int, int]]  # (row, col) of each window, in embedding cells
    crop: int
    targets: torch.Tensor  # (B, 1, 4 crop, 4 crop) float {0, 1}, the windows of the targets
    groups: list[PromptGroup]  # non-empty groups; their rows together are every row once


def click_tensors(chosen_rows: list[list[tuple[tuple[float, float], int]]], offsets: list[tuple[int, int]]):
    """(coords (N, K, 2), labels (N, K)) of each row's clicks moved by its window offset, -1 padding."""
    width = max(len(chosen) for chosen in chosen_rows)
    coords = torch.zeros(len(chosen_rows), width, 2)
    labels = torch.full((len(chosen_rows), width), -1, dtype=torch.long)
    for k, chosen in enumerate(chosen_rows):
        for j, ((x, y), label) in enumerate(chosen):
            coords[k, j] = torch.tensor([x + offsets[k][0], y + offsets[k][1]])
            labels[k, j] = label
    return coords, labels


def sample_prompts(examples: Examples, batch: int, rng: random.Random, crop: int, grid: int, scale: int,
                   box_share: float = 0.3, box_click_share: float = 0.25, located: bool = False) -> PromptBatch:
    """``batch`` structures and their prompts; ``grid`` embedding cells per side, ``scale`` low-res pixels per cell.

    A row is prompted by a box (``box_share``), a box with clicks (``box_click_share``) or clicks alone;
    with ``located`` every row is prompted by a :func:`located_box` instead (the grounding decoder).
    Cropping the embedding (and, in :func:`prompt_loss`, its positional encoding) keeps prompt
    coordinates absolute and makes the decoder ~(grid / crop)^2 times cheaper; targets are cropped alike.
    """
    embeddings, windows, targets_np, others_np, offsets = [], [], [], [], []
    for _ in range(batch):
        embedding, target, others = examples.sample(rng)
        row, col = crop_window(target, rng, grid, crop)
        window = (slice(row * scale, (row + crop) * scale), slice(col * scale, (col + crop) * scale))
        if target[window].sum() < 4:
            row, col = crop_window(target, rng, grid, crop)
            window = (slice(row * scale, (row + crop) * scale), slice(col * scale, (col + crop) * scale))
        embeddings.append(embedding[:, row:row + crop, col:col + crop].float())
        windows.append((row, col))
        targets_np.append(target[window])
        others_np.append(others[window])
        offsets.append((col * scale, row * scale))
    kinds: dict[str, list[int]] = {"box": [], "box+clicks": [], "clicks": [], "located": []}
    for i in range(batch):
        draw = rng.random()
        if located:
            if targets_np[i].sum() >= 4:
                kinds["located"].append(i)
        elif targets_np[i].sum() >= 4 and draw < box_share + box_click_share:
            kinds["box" if draw < box_share else "box+clicks"].append(i)
        elif targets_np[i].sum() >= 1:
            kinds["clicks"].append(i)

    def shifted(box: list[float], i: int) -> list[float]:
        return [v + offsets[i][k % 2] for k, v in enumerate(box)]

    groups = []
    if kinds["box"]:
        rows = kinds["box"]
        groups.append(PromptGroup(rows, torch.tensor([shifted(jittered_box(targets_np[i], rng), i) for i in rows]), None,
                                  distilled=True))
    if kinds["located"]:
        rows = kinds["located"]
        groups.append(PromptGroup(rows, torch.tensor([shifted(located_box(targets_np[i], rng), i) for i in rows]), None))
    if kinds["box+clicks"]:
        rows, boxes, chosen = kinds["box+clicks"], [], []
        for i in rows:
            box = loosened_box(targets_np[i], rng)
            boxes.append(shifted(box, i))
            chosen.append(box_clicks(targets_np[i], others_np[i], box, rng))
        groups.append(PromptGroup(rows, torch.tensor(boxes), click_tensors(chosen, [offsets[i] for i in rows])))
    if kinds["clicks"]:
        rows, chosen = kinds["clicks"], []
        for i in rows:
            clicks = [(sample_click(targets_np[i], rng), 1)]
            if rng.random() < 0.4:
                clicks += extra_clicks(targets_np[i], others_np[i], rng)
            chosen.append(clicks)
        groups.append(PromptGroup(rows, None, click_tensors(chosen, [offsets[i] for i in rows])))
    targets = torch.from_numpy(np.stack(targets_np)).float()[:, None]  # (B, 1, 4 crop, 4 crop)
    return PromptBatch(torch.stack(embeddings), windows, crop, targets, groups)
