"""SAM's two-way transformer and mask head, evaluated for N prompts on one image with fewer operations.

The modules and weights are ``segment_anything``'s own (``TwoWayTransformer``, ``MaskDecoder``);
only the order of the arithmetic changes, so outputs equal theirs up to float rounding (a test
checks ~1e-4 on a real slice). Where the time goes for N prompts, and what this changes:

- The image side (E*E = 4096 positions x C = 256 channels) dominates. Before the first
  image->token attention, every prompt sees the same image, so its projections are computed once
  (batch 1) and broadcast to the N prompts.
- After that the image side differs per prompt, and projecting 4096 positions to the attention
  dimension costs 4096*256*128 multiply-adds per projection and prompt. With only T ~ 7 tokens
  and h = 8 heads, the projections can be moved to the token side instead (re-association):
  ``softmax(q_h (W_k x + b_k)^T) (W_v x + b_v) = softmax((q_h W_k) x^T + q_h b_k) x W_v^T + b_v``
  (attention rows sum to one), and ``out_proj(concat_h A_h v_h) = sum_h A_h (v_h W_o,h^T)``:
  one (h*T x C) @ (C x 4096) product instead of a (4096 x C) @ (C x C/2) one.
- The final token->image attention only feeds the IoU token and the single-mask token, so it
  is computed for those two tokens only.
- The image side differs per prompt after the first image->token attention; it runs for up to
  ``PROMPT_GROUP`` prompts at a time (bounded memory: 4 MB per prompt and tensor), and the mask
  head prompt by prompt, 2048 positions at a time, so that its 16 x (C/8) upscaled features stay
  in the CPU cache.
- Optionally (``dtype``, e.g. bfloat16 on CPUs that multiply it natively) the products with the
  per-prompt image side and the mask head's upscaling run in a lower precision; residual sums,
  norms and softmaxes stay in the image's type.
- The 2x2-stride-2 transposed convolutions of the mask head are per-pixel linear maps: they run
  as matrix products in a channels-last, sub-pixel layout (layer norm over the last dimension),
  and the pixels are put in place once, after the hypernetwork's dot product.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_TOKENS = 2  # the IoU token and the first mask token: all that single-mask decoding reads
# prompts whose per-prompt image side runs in one batch: 16 x 4096 x 256 floats (64 MB) per tensor,
# large enough to amortise the per-call overhead, small enough to stay within a few caches' worth
# (``python -m mimo_chat.bench segment`` measures the per-prompt cost)
PROMPT_GROUP = 16


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, h*d) -> (B, h, L, d)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(1, 2)


def _head_weight(linear: nn.Linear, heads: int) -> torch.Tensor:
    """A q/k/v projection's weight (h*d, C) as (h, d, C)."""
    return linear.weight.reshape(heads, -1, linear.weight.shape[-1])


def _product(small: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``small @ image``, computed in ``image``'s type (a lower-precision image side), returned in ``small``'s."""
    if small.dtype == image.dtype:
        return small @ image
    return (small.to(image.dtype) @ image).to(small.dtype)


def token_to_image(attention: nn.Module, token_q: torch.Tensor, image_k: torch.Tensor, image_v: torch.Tensor,
                   key_pe: torch.Tensor | None = None, pe_keys: torch.Tensor | None = None) -> torch.Tensor:
    """``attention(q=token_q, k=image_k + key_pe, v=image_v)`` for (N, T, C) tokens and (1 or N, P, C)
    image positions (``key_pe`` None: already in ``image_k``). With few tokens, adding the PE's
    scores costs less than adding the PE to every image position. ``pe_keys`` instead of
    ``key_pe``: (h, d, P), the PE through the key projection's weight (see ``project_pe``)."""
    heads = attention.num_heads
    q = _heads(attention.q_proj(token_q), heads)  # (N, h, T, d)
    count, _, tokens, depth = q.shape
    scale = 1.0 / math.sqrt(depth)
    if image_k.shape[0] == 1 and count > 2 and pe_keys is None:  # shared image: project it once, all prompts' tokens in one product
        k = _heads(attention.k_proj(image_k if key_pe is None else image_k + key_pe), heads)[0]  # (h, P, d)
        v = _heads(attention.v_proj(image_v), heads)[0]
        q_all = q.transpose(0, 1).reshape(heads, count * tokens, depth)  # (h, N*T, d)
        weights = torch.softmax((q_all @ k.transpose(1, 2)) * scale, dim=-1)  # (h, N*T, P)
        out = (weights @ v).reshape(heads, count, tokens, depth).transpose(0, 1)  # (N, h, T, d)
    else:  # re-associated: project the few queries into the image's channel space instead
        q_k = torch.einsum("nhtd,hdc->nhtc", q, _head_weight(attention.k_proj, heads))  # (N, h, T, C)
        bias = (q * attention.k_proj.bias.reshape(heads, depth)[None, :, None]).sum(-1)  # (N, h, T)
        q_k = q_k.reshape(count, heads * tokens, -1)
        scores = _product(q_k, image_k.transpose(1, 2))  # (N, h*T, P)
        if key_pe is not None:
            scores = scores + _product(q_k, key_pe.transpose(1, 2))
        if pe_keys is not None:
            scores = scores + (q @ pe_keys).reshape(count, heads * tokens, -1)
        weights = torch.softmax((scores + bias.reshape(count, -1, 1)) * scale, dim=-1)
        mixed = _product(weights, image_v).reshape(count, heads, tokens, -1)  # (N, h, T, C)
        out = torch.einsum("nhtc,hdc->nhtd", mixed, _head_weight(attention.v_proj, heads))
        out = out + attention.v_proj.bias.reshape(heads, 1, depth)  # attention rows sum to one
    return attention.out_proj(out.transpose(1, 2).reshape(count, tokens, heads * depth))


def image_to_token(
    attention: nn.Module, image_q: torch.Tensor, token_k: torch.Tensor, token_v: torch.Tensor, residual: torch.Tensor,
    projected_q: torch.Tensor | None = None, overwrite: bool = False,
) -> torch.Tensor:
    """``residual + attention(q=image_q, k=token_k, v=token_v)`` for (1 or N, P, C) image positions
    and residual, and (N, T, C) tokens -> (N, P, C). ``projected_q``: (1, h, P, d), the image's
    query projection when it was computed once for many prompts. ``overwrite``: the caller no
    longer needs ``residual``; without autograd it then receives the result (saves a copy)."""
    heads = attention.num_heads
    k = _heads(attention.k_proj(token_k), heads)  # (N, h, T, d)
    v = _heads(attention.v_proj(token_v), heads)
    count, _, tokens, depth = k.shape
    positions = image_q.shape[1]
    if projected_q is not None:
        scores = k @ projected_q.transpose(-1, -2)  # (N, h, T, P)
    else:  # re-associated: keys into the image's channel space
        k_q = torch.einsum("nhtd,hdc->nhtc", k, _head_weight(attention.q_proj, heads))  # (N, h, T, C)
        bias = (k * attention.q_proj.bias.reshape(heads, depth)[None, :, None]).sum(-1)  # (N, h, T)
        scores = _product(k_q.reshape(count, heads * tokens, -1), image_q.transpose(1, 2)) + bias.reshape(count, -1, 1)
        scores = scores.reshape(count, heads, tokens, positions)
    # softmax over the few tokens with positions innermost (a softmax over a last dimension of 7 is slow)
    weights = torch.softmax(scores * (1.0 / math.sqrt(depth)), dim=2).reshape(count, heads * tokens, positions)
    out_weight = attention.out_proj.weight.reshape(-1, heads, depth)  # (C, h, d)
    values = torch.einsum("nhtd,chd->nhtc", v, out_weight).reshape(count, heads * tokens, -1)  # (N, h*T, C)
    values = values + attention.out_proj.bias / heads  # each head's weights sum to one: h shares make the bias
    # in place only when the dtypes agree: under autocast (the prompt fine-tune's frozen teacher) they do
    # not, and torch.baddbmm below is the op autocast casts
    same_dtype = residual.dtype == weights.dtype == values.dtype
    if overwrite and same_dtype and residual.shape[0] == count and not torch.is_grad_enabled():
        return residual.baddbmm_(weights.transpose(1, 2), values)  # accumulate in place: no copy
    return torch.baddbmm(residual.expand(count, -1, -1), weights.transpose(1, 2), values)


def _token_side(layer: nn.Module, queries: torch.Tensor, query_pe: torch.Tensor, keys: torch.Tensor,
                keys_pe: torch.Tensor) -> torch.Tensor:
    """A ``TwoWayAttentionBlock``'s token updates: self-attention, token->image attention, MLP."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    queries = layer.norm2(queries + token_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys_pe, keys))
    return layer.norm3(queries + layer.mlp(queries))


def _image_side(layer: nn.Module, queries: torch.Tensor, query_pe: torch.Tensor, keys: torch.Tensor,
                keys_pe: torch.Tensor, projected_q: torch.Tensor | None = None, overwrite: bool = False) -> torch.Tensor:
    """A ``TwoWayAttentionBlock``'s image update: image->token attention, residual, norm."""
    attention = layer.cross_attn_image_to_token
    return layer.norm4(image_to_token(attention, keys_pe, queries + query_pe, queries, keys, projected_q, overwrite))


def project_pe(attention: nn.Module, key_pe: torch.Tensor) -> torch.Tensor:
    """(1, P, C) PE through ``attention``'s key projection weight (its bias stays with the image's
    keys) -> (h, d, P): the PE's share of the scores is then ``q @ this`` per head."""
    return F.linear(key_pe[0], attention.k_proj.weight).T.reshape(attention.num_heads, -1, key_pe.shape[1])


def _finish(transformer: nn.Module, queries: torch.Tensor, query_pe: torch.Tensor, keys: torch.Tensor,
            key_pe: torch.Tensor, first_layer: int, output_tokens: int,
            final_pe_keys: torch.Tensor | None = None, dtype: torch.dtype | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks from ``first_layer`` on and the final token->image attention (first ``output_tokens``
    tokens); ``final_pe_keys``: ``project_pe`` of the final attention, when computed once for many prompts.
    ``dtype``: the type of the products with the image side (None: ``keys``' type); the returned
    image side is in that type."""
    for index, layer in enumerate(transformer.layers[first_layer:], start=first_layer):
        if dtype is None or dtype == keys.dtype:
            keys_pe, values = keys + key_pe, keys
        else:  # read by products only: made once in their type (the residual ``keys`` stays)
            keys_pe = torch.add(keys, key_pe, out=keys.new_empty(keys.shape, dtype=dtype))
            values = keys.to(dtype)
        queries = _token_side(layer, queries, query_pe, values, keys_pe)
        keys = _image_side(layer, queries, query_pe, keys, keys_pe, overwrite=index > 0)  # the caller's keys stay
    kept = queries[:, :output_tokens]
    if dtype is not None:
        keys = keys.to(dtype)
    final = token_to_image(transformer.final_attn_token_to_image, kept + query_pe[:, :output_tokens], keys, keys,
                           key_pe if final_pe_keys is None else None, final_pe_keys)
    return transformer.norm_final_attn(kept + final), keys


def two_way_transformer(
    transformer: nn.Module, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor,
    output_tokens: int = OUTPUT_TOKENS, group: int = PROMPT_GROUP, dtype: torch.dtype | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``TwoWayTransformer.forward`` for (1 or N, C, E, E) image (+ dense prompt), its PE and (N, T, C)
    tokens. Yields, per group of prompts in order, their first ``output_tokens`` tokens (n, output_tokens, C)
    and image side (n, E*E, C). ``dtype``: the type of the products with the per-prompt image side
    (see ``_finish``).

    One image (batch 1) for many prompts: the first block's token side runs for all prompts at
    once with the image projected once; the image side, different for each prompt from the first
    image->token attention on, then runs ``group`` prompts at a time."""
    keys = image.flatten(2).transpose(1, 2)  # (1 or N, P, C)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    count = tokens.shape[0]
    if keys.shape[0] > 1:
        yield _finish(transformer, tokens, tokens, keys, key_pe, 0, output_tokens, dtype=dtype)
        return
    # one image, read again for every prompt: positions-major in memory, so that the copies and
    # sums of it run along contiguous memory (a channels-first view would make each prompt's
    # residual copy a strided transpose)
    keys, key_pe = keys.contiguous(), key_pe.contiguous()
    if count == 1:
        yield _finish(transformer, tokens, tokens, keys, key_pe, 0, output_tokens, dtype=dtype)
        return
    first = transformer.layers[0]
    keys_pe = keys + key_pe
    queries = _token_side(first, tokens, tokens, keys, keys_pe)
    attention = first.cross_attn_image_to_token
    projected_q = _heads(attention.q_proj(keys_pe), attention.num_heads)  # (1, h, P, d)
    # the final attention reads the PE for 2 tokens only: half the memory through its projection
    final_pe_keys = project_pe(transformer.final_attn_token_to_image, key_pe)
    for start in range(0, count, group):
        some = slice(start, start + group)
        prompt_keys = _image_side(first, queries[some], tokens[some], keys, keys_pe, projected_q)
        yield _finish(transformer, queries[some], tokens[some], prompt_keys, key_pe, 1, output_tokens, final_pe_keys, dtype)


def _subpixel(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2, stride-2 transposed convolution as a (C_in, 2*2*C_out) matrix (sub-pixel, then channel) and bias."""
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)
    return weight, conv.bias.repeat(4)


def upscaling_weights(decoder: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``MaskDecoder.output_upscaling`` as sub-pixel matrices in ``dtype``: (weight1, bias1, norm
    weight, norm bias, weight2, bias2), prepared once per decoder call for ``mask_logits``."""
    up1, norm, _, up2, _ = decoder.output_upscaling
    if not (isinstance(up1, nn.ConvTranspose2d) and up1.kernel_size == (2, 2) and up1.stride == (2, 2)
            and isinstance(up2, nn.ConvTranspose2d) and up2.kernel_size == (2, 2) and up2.stride == (2, 2)):
        raise ValueError("mask_logits expects SAM's two 2x2 stride-2 transposed convolutions")
    return tuple(t.to(dtype) for t in (*_subpixel(up1), norm.weight, norm.bias, *_subpixel(up2)))


def mask_logits(decoder: nn.Module, keys: torch.Tensor, hyper: torch.Tensor, size: int,
                weights: tuple[torch.Tensor, ...] | None = None, chunk: int = 2048) -> torch.Tensor:
    """``MaskDecoder``'s output upscaling + hypernetwork product: (N, E*E, C) image side and (N, C/8)
    hypernetwork outputs -> (N, 1, 4E, 4E) mask logits.

    Runs ``chunk`` image positions at a time, so that the 16 x (C/8) upscaled features of a chunk
    stay in the CPU cache between the products, the norm and the activations. ``weights``:
    ``upscaling_weights`` (default: in ``keys``' type); their type is the upscaling's compute type
    (e.g. ``torch.bfloat16`` on CPUs with native bf16 matrix products, see ``fuse_for_inference``);
    the hypernetwork product and the logits stay in ``hyper``'s type."""
    up1, norm, act1, up2, act2 = decoder.output_upscaling
    weight1, bias1, norm_weight, norm_bias, weight2, bias2 = weights or upscaling_weights(decoder, keys.dtype)
    dtype = weight1.dtype
    count, positions, _ = keys.shape
    middle, out_channels = up1.out_channels, up2.out_channels
    rows = []
    for index in range(count):
        parts = []
        for start in range(0, positions, chunk):
            hidden = torch.addmm(bias1, keys[index, start : start + chunk].to(dtype), weight1)  # (n, 4*C1): (i, j, c1)
            hidden = act1(F.layer_norm(hidden.reshape(-1, middle), (middle,), norm_weight, norm_bias, norm.eps))
            features = act2(torch.addmm(bias2, hidden, weight2))  # (n*4, 4*C2): (k, l, c2)
            parts.append(features.reshape(-1, out_channels).to(hyper.dtype) @ hyper[index])  # (n*16,)
        rows.append(torch.cat(parts))
    # (N, y, x, i, j, k, l) -> row 4y + 2i + k, column 4x + 2j + l
    logits = torch.stack(rows).reshape(count, size, size, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return logits.reshape(count, 1, size * 4, size * 4)


def decode_single_masks(
    decoder: nn.Module, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder`` in single-mask mode: (1 or N, C, E, E) image (+ dense prompt), its PE and (N, T, C)
    tokens (IoU token, mask tokens, sparse prompts) -> logits (N, 1, 4E, 4E) and predicted IoU (N, 1).
    ``dtype`` (None: the image's type): the compute type of the products with the per-prompt image
    side and of the mask head's upscaling (e.g. ``torch.bfloat16``, see ``fuse_for_inference``)."""
    size = image.shape[-1]
    weights = upscaling_weights(decoder, dtype or image.dtype)  # once for all prompts
    logits, iou = [], []
    for hidden, keys in two_way_transformer(decoder.transformer, image, image_pe, tokens, dtype=dtype):
        hyper = decoder.output_hypernetworks_mlps[0](hidden[:, 1])  # the single-mask output token
        logits.append(mask_logits(decoder, keys, hyper, size, weights))
        iou.append(decoder.iou_prediction_head(hidden[:, 0])[:, :1])
    return torch.cat(logits), torch.cat(iou)
