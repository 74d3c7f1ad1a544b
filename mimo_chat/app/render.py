"""Drawing for the app: colour-matched mask overlays, prompts, the legend and highlighted replies.

Everything here works on plain numpy images in the display frame of the current
slice: ``(H, W, 3)`` uint8, x right, y down, origin at the top-left pixel corner.
Masks are ``(H, W)`` bool. No model code lives here.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

# Distinct, colour-blind-aware colours for grounded phrases (Trubetskoy's palette, yellow kept for prompts).
PHRASE_COLORS = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#bfef45", "#469990", "#9a6324",
)
PROMPT_COLOR = "#ffe119"  # the mask from the user's own clicks and boxes
NEGATIVE_POINT_COLOR = "#ff3030"
POSITIVE_POINT_COLOR = "#30ff60"
MASK_ALPHA = 0.45

# <p>, </p>, <SEG>, {<x0><y0><x1><y1>} and any other <TOKEN> the model may emit; a trailing "<" piece
# of a tag that is still streaming is dropped too.
_TAG = re.compile(r"\{(?:<\d+>){4}\}|</?p>|<[A-Za-z_/][A-Za-z0-9_/|]*>|<\d+>|<[^<>\s]{0,12}$")


@dataclass
class Layer:
    """One coloured thing on the image: a grounded phrase, or the mask from the user's prompts."""

    phrase: str
    color: str  # "#rrggbb"
    mask: np.ndarray | None  # (H, W) bool, or None when the model gave no mask for the phrase
    box: list[float] | None = None  # [x0, y0, x1, y1] in display pixels, x1/y1 exclusive
    score: float | None = None  # predicted quality (IoU) of the mask
    from_prompt: bool = False  # True for the mask of the user's own clicks/boxes (no phrase box drawn)
    name_score: float | None = None  # how sure the model is of the name (None: not scored)
    volume: bool = False  # a 3D mask's cross-section with the view (its NIfTI is the whole mask)

    @property
    def has_mask(self) -> bool:
        return self.mask is not None and bool(np.any(self.mask))

    @property
    def observation(self) -> bool:
        """A lesion's presence or absence: shown as the model's observation, never as a finding."""
        return is_observation(self.phrase)

    def record(self, mask_file: str | None = None) -> dict:
        """JSON-ready description (both scores with their words; ``mask_file`` names the saved PNG)."""
        return {
            "phrase": self.phrase,
            "color": self.color,
            "box": [float(v) for v in self.box] if self.box is not None else None,
            "has_mask": self.has_mask,
            "name_score": None if self.name_score is None else round(float(self.name_score), 4),
            "name": name_words(self),
            "mask_score": None if self.score is None else round(float(self.score), 4),
            "mask": mask_words(self),
            "observation": self.observation,
            "mask_png": mask_file,
        }


# Thresholds for the words beside the numbers. The name score is the locator/namer's probability that
# the name is right; below one half the name is more likely wrong than right. The mask score is the
# decoder's predicted IoU; below 0.8 the outline visibly misses parts of a typical organ.
NAME_LIKELY = 0.5
MASK_GOOD = 0.8
_LESION_WORDS = ("tumour", "tumor", "lesion", "cyst", "nodule", "mass", "metasta", "cancer", "carcinoma")


def is_observation(phrase: str) -> bool:
    """True for lesion words (tumour, lesion, cyst, nodule, mass, ...)."""
    lowered = phrase.lower()
    return any(word in lowered for word in _LESION_WORDS)


def name_words(layer: Layer) -> str:
    """"likely" / "uncertain" for the name, "your prompt" for the user's own mask, "" when not scored."""
    if layer.from_prompt:
        return "your prompt"
    if layer.name_score is None:
        return ""
    return "likely" if layer.name_score >= NAME_LIKELY else "uncertain"


def mask_words(layer: Layer) -> str:
    """"good" / "rough" for the mask, "no mask" when there is none."""
    if not layer.has_mask:
        return "no mask"
    if layer.score is None:
        return ""
    return "good" if layer.score >= MASK_GOOD else "rough"


def same_mask(first: np.ndarray | None, second: np.ndarray | None, iou: float = 0.9) -> bool:
    """True when two (H, W) masks cover (nearly) the same pixels (IoU >= ``iou``)."""
    if first is None or second is None or first.shape != second.shape:
        return False
    union = np.logical_or(first, second).sum()
    return bool(union) and np.logical_and(first, second).sum() / union >= iou


def color_for(index: int) -> str:
    """Colour of the ``index``-th grounded phrase of a reply."""
    return PHRASE_COLORS[index % len(PHRASE_COLORS)]


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    value = color.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def strip_tags(text: str) -> str:
    """Reply text with the grounding tags removed: what a reader sees (``<p>liver</p><SEG>`` -> ``liver``)."""
    return re.sub(r"[ \t]{2,}", " ", _TAG.sub("", text))


def overlay(image: np.ndarray, layers: list[Layer], alpha: float = MASK_ALPHA) -> np.ndarray:
    """Blend each layer's mask in its colour over ``image`` (H, W, 3) uint8 and trace its outline."""
    out = image.astype(np.float32).copy()
    for layer in layers:
        if layer.mask is None or not layer.mask.any():
            continue
        mask = layer.mask.astype(bool)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask.shape} does not match the image {image.shape[:2]}")
        rgb = np.array(hex_to_rgb(layer.color), dtype=np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * rgb
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(image.shape[:2]) // 256))
        out[edge] = rgb
    return np.clip(out, 0, 255).astype(np.uint8)


def draw_prompts(
    image: np.ndarray,
    points: list[list[float]],
    boxes: list[list[float]],
    phrase_layers: list[Layer] = (),
) -> np.ndarray:
    """Draw the user's points ``[x, y, label]`` and boxes (yellow), and each phrase's box in its colour."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    size = max(image.shape[:2])
    width = max(1, size // 200)
    radius = max(3, size // 80)
    for layer in phrase_layers:
        if layer.box is not None and (layer.box[2] > layer.box[0]) and (layer.box[3] > layer.box[1]):
            x0, y0, x1, y1 = layer.box
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=hex_to_rgb(layer.color), width=width)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=hex_to_rgb(PROMPT_COLOR), width=width + 1)
    for x, y, label in points:
        fill = POSITIVE_POINT_COLOR if label else NEGATIVE_POINT_COLOR
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(255, 255, 255), width=1)
        if not label:  # a bar makes negative points readable without colour
            draw.line([x - radius + 2, y, x + radius - 2, y], fill=(255, 255, 255), width=max(1, width))
    return np.asarray(canvas)


def compose(
    image: np.ndarray,
    layers: list[Layer],
    points: list[list[float]] = (),
    boxes: list[list[float]] = (),
    scale: int = 1,
) -> np.ndarray:
    """The full view: masks, then phrase boxes, then the user's prompts on top.

    ``scale`` > 1 enlarges the image and masks by pixel repetition (small slices such as a
    128x128 CT stay crisp on screen); prompts and boxes are drawn at the enlarged size.
    Everything given is in image pixels; the result is ``(H * scale, W * scale, 3)``.
    """
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
        layers = [replace(layer, mask=None if layer.mask is None else layer.mask.repeat(scale, 0).repeat(scale, 1),
                          box=None if layer.box is None else [v * scale for v in layer.box]) for layer in layers]
        points = [[x * scale, y * scale, label] for x, y, label in points]
        boxes = [[v * scale for v in box] for box in boxes]
    phrase_layers = [layer for layer in layers if not layer.from_prompt]
    return draw_prompts(overlay(image, layers), list(points), list(boxes), phrase_layers)


def display_scale(height: int, width: int, target: int = 640, largest: int = 8) -> int:
    """Integer zoom that brings the longest side of a small image close to ``target`` pixels."""
    return int(min(largest, max(1, target // max(height, width, 1))))


def _words(words: str, score: float | None) -> str:
    """"likely (0.83)": the word first, the number beside it."""
    if not words:
        return "—"
    return words if score is None else f"{words} ({score:.2f})"


def legend_html(layers: list[Layer]) -> str:
    """A small table: colour swatch -> phrase -> name confidence -> mask quality, both in words and numbers."""
    if not layers:
        return "<div class='mimo-legend mimo-legend-empty'>No masks yet: click the image, draw a box or ask.</div>"
    rows = []
    for layer in layers:
        name = _words(name_words(layer), None if layer.from_prompt else layer.name_score)
        if layer.observation:
            name = f"model observation, <a href='#mimo-findings'>how reliable</a>; {name}"
        mask = mask_words(layer)
        mask_cell = "<em>no mask</em>" if mask == "no mask" else _words(mask, layer.score)
        swatch = f"<span class='mimo-swatch' style='background:{layer.color}'></span>"
        rows.append(
            f"<tr class='mimo-legend-row' data-color='{layer.color}'><td>{swatch}</td>"
            f"<td>{html.escape(layer.phrase)}</td><td class='mimo-name'>name: {name}</td>"
            f"<td class='mimo-mask'>mask: {mask_cell}</td></tr>"
        )
    header = "<tr><th></th><th>phrase</th><th>how sure of the name</th><th>predicted mask quality</th></tr>"
    return f"<table class='mimo-legend'>{header}{''.join(rows)}</table>"


def _phrase_span(phrase_text: str, layer: Layer) -> str:
    r, g, b = hex_to_rgb(layer.color)
    has_mask = layer.has_mask
    color = layer.color.lstrip("#")
    if layer.observation:  # not highlighted like a finding: a neutral dotted underline and a caveat
        style = f"border-bottom: 2px dotted {layer.color}; padding: 0 2px;"
        note = " <sup class='mimo-caveat'><a href='#mimo-findings'>model observation</a></sup>"
        css = f"mimo-phrase mimo-observation mimo-color-{color}" + ("" if has_mask else " mimo-phrase-nomask")
        return f"<span class='{css}' style='{style}'>{html.escape(phrase_text)}{note}</span>"
    style = f"background-color: rgba({r}, {g}, {b}, 0.35); border-bottom: 3px solid {layer.color}; padding: 0 2px;"
    if not has_mask:  # no colour: nothing on the image matches it (absent, or found without a reliable outline)
        style = "border-bottom: 1px dashed #888; padding: 0 2px;"
    marker = "" if has_mask else " <sup class='mimo-nomask'>(no mask)</sup>"
    css = f"mimo-phrase mimo-color-{color}" + ("" if has_mask else " mimo-phrase-nomask")
    return f"<span class='{css}' style='{style}'>{html.escape(phrase_text)}{marker}</span>"


def highlight(text: str, layers: list[Layer]) -> str:
    """HTML of ``text`` (tags already stripped) with each phrase wrapped in a span of its colour.

    Phrases are searched in reply order, each after the previous one; a phrase that is not in the
    text (the model may paraphrase) is appended as a coloured chip so no grounded phrase is hidden.
    """
    pieces: list[str] = []
    cursor = 0
    lowered = text.lower()
    missing: list[Layer] = []
    for layer in layers:
        needle = layer.phrase.strip().lower()
        start = lowered.find(needle, cursor) if needle else -1
        if start < 0:
            missing.append(layer)
            continue
        end = start + len(needle)
        pieces.append(html.escape(text[cursor:start]))
        pieces.append(_phrase_span(text[start:end], layer))
        cursor = end
    pieces.append(html.escape(text[cursor:]))
    if missing:
        pieces.append("<br>" + " ".join(_phrase_span(layer.phrase, layer) for layer in missing))
    return "".join(pieces)


def sources_html(sources: list[str]) -> str:
    """The knowledge-base entries a reply's facts come from, as a small line under the reply."""
    if not sources:
        return ""
    return "<div class='mimo-sources'>Sources: " + "; ".join(html.escape(str(s)) for s in sources) + "</div>"


def mask_png(mask: np.ndarray, path) -> None:
    """Save an (H, W) bool mask as an 8-bit PNG (255 inside, 0 outside)."""
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)
