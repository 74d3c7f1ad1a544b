"""Where is the named structure? A phrase-conditioned heatmap over the frozen image embedding.

The grounding LM closes each phrase with ``<SEG>``. The locator turns that phrase into a query
vector and scores every cell of the (E, E) image-embedding grid against it (a dynamic 1x1
convolution over adapted image features, as CondInst / MaskFormer mask embeddings do):

    features = adapter(image embedding ++ x, y coordinates)    (B, W, E, E)
    query    = mlp(mean input embedding of the phrase tokens
                   + gate * proj(<SEG> hidden state))          (N, W + 1)
    heatmap  = <features, query[:W]> / sqrt(W) + query[W]      (N, E, E) logits

The heatmap's largest logit says whether the structure is on the image at all (``presence``);
its thresholded extent gives a box, and the box goes to the SAM mask decoder as an ordinary box
prompt, the prompt LiteMedSAM was trained on. Coordinates are part of the input because side
matters in anatomy (left and right kidney look alike).

The phrase embedding uses the LM's frozen input-embedding table, so the locator can be trained
without running the LM (``python -m mimo_chat.train.locator``), on cached image embeddings.
The ``<SEG>`` hidden-state term is gated by a scalar that starts at zero; full training may open it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

PRESENCE_THRESHOLD = 0.0  # presence logit above which a structure counts as shown
MASK_THRESHOLD = 0.0  # heatmap logit above which a cell belongs to the structure


def coordinate_channels(batch: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B, 2, S, S) x and y in [-1, 1] (x to the image's right, y down)."""
    line = torch.linspace(-1.0, 1.0, size, device=device, dtype=dtype)
    y, x = torch.meshgrid(line, line, indexing="ij")
    return torch.stack([x, y]).unsqueeze(0).expand(batch, -1, -1, -1)


class StructureLocator(nn.Module):
    """Phrase (+ ``<SEG>`` state) -> heatmap logits over the image-embedding grid."""

    def __init__(self, *, image_channels: int, text_hidden: int, width: int = 128, num_image_kinds: int = 0) -> None:
        super().__init__()
        self.width = width
        self.num_image_kinds = num_image_kinds
        self.adapter = nn.Sequential(
            nn.Conv2d(image_channels + 2, width, 1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.GroupNorm(8, width),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4),
        )
        self.phrase_mlp = nn.Sequential(
            nn.LayerNorm(text_hidden), nn.Linear(text_hidden, width * 2), nn.GELU(), nn.Linear(width * 2, width + 1)
        )
        self.seg_proj = nn.Sequential(nn.LayerNorm(text_hidden), nn.Linear(text_hidden, width + 1))
        self.seg_gate = nn.Parameter(torch.zeros(()))
        # What kind of image this is (modality and body region, ``MimoConfig.image_kinds``): it
        # decides which names may be said about it at all, so it reads the whole image, not a cell.
        self.kind_head = (
            nn.Sequential(nn.LayerNorm(2 * width), nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, num_image_kinds))
            if num_image_kinds else None
        )

    def image_features(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C, E, E) -> (B, W, E, E)."""
        batch, _, size, _ = image_embeddings.shape
        coords = coordinate_channels(batch, size, image_embeddings.device, image_embeddings.dtype)
        return self.adapter(torch.cat([image_embeddings, coords], dim=1))

    def image_kind_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, W, E, E) image features -> (B, K) logits over ``MimoConfig.image_kinds``
        (mean and max of every channel over the grid, then a small MLP)."""
        if self.kind_head is None:
            raise ValueError("This locator has no image-kind head (built with num_image_kinds=0).")
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.kind_head(pooled)

    def queries(self, phrase_embeddings: torch.Tensor, seg_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H) phrase embeddings [+ (N, H) ``<SEG>`` hidden states] -> (N, W + 1)."""
        query = self.phrase_mlp(phrase_embeddings)
        if seg_hidden_states is not None:
            query = query + self.seg_gate * self.seg_proj(seg_hidden_states.to(query.dtype))
        return query

    def forward(
        self,
        features: torch.Tensor,
        batch_index: torch.Tensor,
        phrase_embeddings: torch.Tensor,
        seg_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Heatmap logits (N, E, E) for N phrases on the rows ``batch_index`` (N,) of ``features``."""
        query = self.queries(phrase_embeddings, seg_hidden_states)
        height, width_cells = features.shape[-2:]
        flat = features.flatten(2)  # (B, W, E*E)
        # one product per image (not a copy of its features per phrase): phrases grouped by row
        logits = flat.new_zeros(query.shape[0], height * width_cells)
        for row in batch_index.unique().tolist():
            chosen = batch_index == row
            logits[chosen] = query[chosen, : self.width] @ flat[row]
        logits = logits.reshape(-1, height, width_cells) / math.sqrt(self.width)
        return logits + query[:, self.width :, None]


def phrase_embeddings(embed, phrases: list[list[int]], hidden: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, H) mean input embedding of each phrase's token ids (zeros for an empty phrase);
    ``embed``: (1, L) ids -> (1, L, H), the language model's input embedding."""
    rows = [embed(torch.tensor([ids], device=device))[0].mean(0) if ids else torch.zeros(hidden, device=device)
            for ids in phrases]
    return torch.stack(rows) if rows else torch.zeros(0, hidden, device=device)


def presence_logits(heatmaps: torch.Tensor) -> torch.Tensor:
    """(N, E, E) heatmap logits -> (N,) presence logits: the largest cell."""
    return heatmaps.flatten(1).amax(dim=1)


def locator_loss(heatmaps: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`heatmap_loss` on the rows whose target is ``known`` (N,) bool; the other rows are
    present structures without a mask (image-level labels): only their presence logit is
    supervised. Returns the terms and their weighted sum ``loss``."""
    losses = heatmap_loss(heatmaps[known], targets[known]) if bool(known.any()) else {}
    unknown = ~known
    if bool(unknown.any()):
        mil = F.binary_cross_entropy_with_logits(presence_logits(heatmaps[unknown]), heatmaps.new_ones(int(unknown.sum())))
        share = float(unknown.float().mean())
        losses["presence"] = losses.get("presence", mil * 0) * (1 - share) + mil * share
    zero = heatmaps.sum() * 0
    losses["loss"] = losses.get("bce", zero) + losses.get("dice", zero) + 0.5 * losses.get("presence", zero)
    return losses


def heatmap_loss(heatmaps: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Losses for N heatmaps against (N, E, E) target fractions in [0, 1] (all zero = absent).

    Per-cell BCE (positives weighted up: structures are small), soft Dice on present
    structures, and BCE of the presence logit.
    """
    present = (targets.flatten(1).amax(dim=1) > 0.5).float()
    positive_share = targets.mean().clamp(min=1e-3)
    weight = 1 + targets * (0.5 / positive_share).clamp(max=20.0)
    bce = F.binary_cross_entropy_with_logits(heatmaps, targets, weight=weight)
    probabilities = heatmaps.sigmoid().flatten(1)
    flat = targets.flatten(1)
    dice_each = 1 - (2 * (probabilities * flat).sum(1) + 1) / (probabilities.sum(1) + flat.sum(1) + 1)
    dice = (dice_each * present).sum() / present.sum().clamp(min=1)
    presence = F.binary_cross_entropy_with_logits(presence_logits(heatmaps), present)
    return {"bce": bce, "dice": dice, "presence": presence}


def heatmap_box(heatmap: np.ndarray, cell: float, threshold: float = MASK_THRESHOLD) -> list[float] | None:
    """Box ``[x0, y0, x1, y1]`` (in units of ``cell`` per grid cell) around the heatmap's regions
    above ``threshold`` whose own peak reaches half the highest peak's height above the threshold
    (weak stray blobs do not widen the box); None when no cell is above ``threshold``."""
    above = heatmap > threshold
    if not above.any():
        return None
    labels, count = ndimage.label(above)
    peaks = np.asarray(ndimage.maximum(heatmap, labels, index=np.arange(1, count + 1)))
    strong = np.flatnonzero(peaks - threshold >= 0.5 * (peaks.max() - threshold)) + 1
    ys, xs = np.nonzero(np.isin(labels, strong))
    return [xs.min() * cell, ys.min() * cell, (xs.max() + 1) * cell, (ys.max() + 1) * cell]


def phrase_spans(token_ids: list[int], start_id: int, end_id: int, seg_id: int) -> list[tuple[int, list[int]]]:
    """For each ``<SEG>`` in ``token_ids``: (its position, the token ids of the phrase it closes).

    The phrase is what lies between the last ``<p>`` and the ``</p>`` right before the ``<SEG>``;
    a ``<SEG>`` without one gets an empty phrase."""
    spans, start = [], None
    for position, token in enumerate(token_ids):
        if token == start_id:
            start = position
        elif token == seg_id:
            closed = start is not None and position > 0 and token_ids[position - 1] == end_id
            spans.append((position, list(token_ids[start + 1 : position - 1]) if closed else []))
            start = None
    return spans


def region_cells(grid: int, image_size: int, boxes: torch.Tensor | None = None,
                 points: tuple[torch.Tensor, torch.Tensor] | None = None, radius: int = 1) -> torch.Tensor:
    """(grid, grid) float mask of the cells a user prompt covers (model-frame boxes (N, 4) and
    positive points ((1, K, 2), (1, K))); all zeros without a prompt."""
    cells = torch.zeros(grid, grid)
    cell = image_size / grid
    if boxes is not None:
        for x0, y0, x1, y1 in boxes.tolist():
            cx0, cy0 = int(max(0, x0 // cell)), int(max(0, y0 // cell))
            cx1, cy1 = int(min(grid, -(-x1 // cell))), int(min(grid, -(-y1 // cell)))
            cells[cy0 : max(cy1, cy0 + 1), cx0 : max(cx1, cx0 + 1)] = 1
    if points is not None:
        coords, labels = points
        for (x, y), label in zip(coords[0].tolist(), labels[0].tolist(), strict=True):
            if label == 1:
                cx, cy = int(min(grid - 1, max(0, x // cell))), int(min(grid - 1, max(0, y // cell)))
                cells[max(0, cy - radius) : cy + radius + 1, max(0, cx - radius) : cx + radius + 1] = 1
    return cells


def heatmap_fit(probabilities: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Soft Dice (the locator's training objective) of N regions and V heatmaps: ``probabilities``
    (V, E, E) heatmap probabilities, ``fractions`` (N, E, E) share of each cell a region covers.
    Returns (N, V) in [0, 1]: how well each name's heatmap agrees with each region."""
    heat = probabilities.flatten(1)
    regions = fractions.flatten(1).to(heat.dtype)
    overlap = regions @ heat.T  # (N, V)
    return 2 * overlap / (regions.sum(1, keepdim=True) + heat.sum(1)[None] + 1e-6)


def target_fractions(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, S, S) binary masks in the model frame -> (N, grid, grid) share of each cell covered."""
    return F.adaptive_avg_pool2d(masks.float().unsqueeze(1), grid).squeeze(1)
