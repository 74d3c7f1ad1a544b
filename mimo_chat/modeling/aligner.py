"""Multimodal input aligner: learned queries read the image, the visual prompts and the question.

Q learned queries attend (cross-attention) to one memory made of

* image tokens – the segmentation engine's image embedding (B, C, E, E) average-pooled to
  ``grid x grid`` tokens plus a fixed 2D sine-cosine position encoding;
* visual-prompt tokens – the SAM prompt encoder's sparse embeddings of the user's boxes/points
  (B, P, C), projected to the aligner width;
* question tokens – the language model's input embeddings of the question (B, T, H), projected.

A type embedding tells the three apart. The Q outputs are projected (2-layer MLP, as LLaVA) to the
LM hidden size and fill the ``<image>`` placeholder positions (see ``mimo.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_position_encoding_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2D sine-cosine encoding, (grid * grid, width), row-major (y then x)."""
    if width % 4:
        raise ValueError(f"aligner width must be a multiple of 4, got {width}")
    quarter = width // 4
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32) / quarter)  # (W/4,)
    coords = torch.arange(grid, dtype=torch.float32)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    angles_x = x.reshape(-1, 1) * frequencies  # (G*G, W/4)
    angles_y = y.reshape(-1, 1) * frequencies
    return torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1)  # (G*G, W)


class AlignerBlock(nn.Module):
    """Pre-norm block: query self-attention, cross-attention to the memory, MLP."""

    def __init__(self, *, width: int, heads: int) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(width)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(width)
        self.memory_norm = nn.LayerNorm(width)
        self.cross_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, memory_padding: torch.Tensor) -> torch.Tensor:
        """queries (B, Q, D), memory (B, M, D), memory_padding (B, M) True = ignore -> (B, Q, D)."""
        normed = self.self_norm(queries)
        queries = queries + self.self_attention(normed, normed, normed, need_weights=False)[0]
        keys = self.memory_norm(memory)
        queries = queries + self.cross_attention(
            self.cross_norm(queries), keys, keys, key_padding_mask=memory_padding, need_weights=False
        )[0]
        return queries + self.mlp(self.mlp_norm(queries))


class MultimodalAligner(nn.Module):
    """(image embedding, prompt tokens, question embeddings) -> (B, Q, lm_hidden) placeholder embeddings."""

    def __init__(
        self,
        *,
        num_queries: int,
        width: int,
        depth: int,
        heads: int,
        image_channels: int,
        prompt_channels: int,
        text_hidden: int,
        lm_hidden: int,
        grid: int,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)  # (Q, D)
        self.image_projection = nn.Linear(image_channels, width)
        self.prompt_projection = nn.Linear(prompt_channels, width)
        self.text_projection = nn.Linear(text_hidden, width)
        self.type_embeddings = nn.Parameter(torch.zeros(3, width))  # image, prompt, text
        self.register_buffer("image_positions", sincos_position_encoding_2d(grid, width), persistent=False)
        self.blocks = nn.ModuleList([AlignerBlock(width=width, heads=heads) for _ in range(depth)])
        self.output_norm = nn.LayerNorm(width)
        self.output_projection = nn.Sequential(nn.Linear(width, lm_hidden), nn.GELU(), nn.Linear(lm_hidden, lm_hidden))

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        text_embeddings: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        prompt_embeddings: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Align one image (and its prompts and question) per batch row.

        Args:
            image_embeddings: (B, C, E, E) from the segmentation engine's image encoder.
            text_embeddings: (B, T, H_lm) question token embeddings.
            text_mask: (B, T) True/1 where a real token (None = all real).
            prompt_embeddings: (B, P, C_prompt) sparse prompt embeddings, or None.
            prompt_mask: (B, P) True/1 where a real prompt token (None = all real).

        Returns:
            (B, Q, H_lm) embeddings for the ``<image>`` placeholders.
        """
        batch = image_embeddings.shape[0]
        pooled = F.adaptive_avg_pool2d(image_embeddings, self.grid)  # (B, C, G, G)
        image_tokens = self.image_projection(pooled.flatten(2).transpose(1, 2))  # (B, G*G, D)
        image_tokens = image_tokens + self.image_positions + self.type_embeddings[0]
        parts = [image_tokens]
        padding = [torch.zeros(batch, image_tokens.shape[1], dtype=torch.bool, device=image_tokens.device)]
        if prompt_embeddings is not None and prompt_embeddings.shape[1] > 0:
            parts.append(self.prompt_projection(prompt_embeddings) + self.type_embeddings[1])  # (B, P, D)
            padding.append(_padding(prompt_mask, prompt_embeddings))
        text_tokens = self.text_projection(text_embeddings) + self.type_embeddings[2]  # (B, T, D)
        parts.append(text_tokens)
        padding.append(_padding(text_mask, text_embeddings))
        memory = torch.cat(parts, dim=1)  # (B, M, D)
        memory_padding = torch.cat(padding, dim=1)  # (B, M)
        queries = self.queries.unsqueeze(0).expand(batch, -1, -1)  # (B, Q, D)
        for block in self.blocks:
            queries = block(queries, memory, memory_padding)
        return self.output_projection(self.output_norm(queries))  # (B, Q, H_lm)


def _padding(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """(B, N) True where a token must be ignored."""
    if mask is None:
        return torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return ~mask.bool()
