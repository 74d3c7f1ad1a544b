"""Inference-only int8 for the language model's linear layers (CPU decoding is memory-bound).

Two modes, both applied in place after LoRA is merged:

* ``"int8"`` – dynamic quantization (``torch.ao``): int8 weights per output channel AND int8
  activations quantized on the fly; fastest on CPUs with VNNI, greedy text can drift.
* ``"int8-weights"`` – weight-only int8 (per output channel) with bfloat16 activations
  (``torch._weight_int8pack_mm``); about half the weight bytes of bfloat16, text nearly identical
  to float32.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

MODES = ("int8", "int8-weights")


class Int8WeightOnlyLinear(nn.Module):
    """``nn.Linear`` replacement holding int8 weights (N, K) and per-row bfloat16 scales (N,)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (N, K)
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # (N,)
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N) in the dtype of ``x``."""
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)  # (M, N)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def _replace_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, Int8WeightOnlyLinear(child))
        else:
            _replace_linears(child)


def quantize_linears(module: nn.Module, mode: str) -> None:
    """Quantize every ``nn.Linear`` under ``module`` in place (see the module docstring)."""
    if mode == "int8-weights":
        _replace_linears(module)
    elif mode == "int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    else:
        raise ValueError(f"Unknown quantization {mode!r}; expected one of {MODES}")
