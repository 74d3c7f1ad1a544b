"""Every limit on what one request may ask of the app, and the message a user reads when it is passed.

Each limit is a named constant here and is checked before the work it bounds starts: the question
before it is tokenized and prefilled, the prompt rows before the image is loaded, the image size from
the file header before anything is decoded, archive members while they are unpacked, the time between
streamed events. The numbers are sized for the machine the app targets (2 CPU cores, 24 GB, several
users at once): no single request can hold a worker or a large share of memory for long.

Visual prompts (boxes ``[x0, y0, x1, y1]``, points ``[x, y]`` with labels, original image pixels) are
validated here too, for the app, the processor and the segmentation engine alike: an invalid value is
an error naming the prompt, never dropped or repaired silently.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

# --- the question and the language-model prompt --------------------------------------------------
MAX_QUESTION_CHARS = 2_000
"""Longest question, in characters (checked before tokenizing)."""
MAX_QUESTION_TOKENS = 512
"""Longest question, in language-model tokens."""
MAX_PROMPT_TOKENS = 2_048
"""Longest whole prompt (system text, image tokens, earlier turns, question); the answer's tokens come on
top, so with SmolLM2's 8,192-token context there is always room for the reply, and prefill stays short."""

# --- visual prompts and their JSON ----------------------------------------------------------------
MAX_PROMPTS = 64
"""Objects in one segmentation call (boxes, or groups of clicks): one batched mask-decoder call."""
MAX_BOXES = MAX_PROMPTS
"""Boxes in one request: each box is one object."""
MAX_POINTS = 64
"""Clicks in one request."""
MAX_PROMPT_JSON_CHARS = 16_384
"""Longest boxes / points JSON text (64 rows of four numbers need about 3,000)."""
MAX_JSON_DEPTH = 2
"""Nesting of the boxes / points JSON: a list of rows."""

# --- images ---------------------------------------------------------------------------------------
MIN_IMAGE_SIDE = 8
"""Shortest side, in pixels, of an image the model can look at."""
MAX_SIDE = 8_192
"""Longest side of an image or volume, in pixels / voxels."""
MAX_IMAGE_PIXELS = 25_000_000
"""Pixels of one 2D image or slice (a 5000 x 5000 radiograph); the model sees 256 x 256 anyway."""
MAX_DECODED_BYTES = 512 * 1024**2
"""Decoded samples of one study, counted as float32 (a 512 x 512 x 512 CT)."""

# --- archives and folders of DICOM files ------------------------------------------------------------
MAX_ARCHIVE_MEMBERS = 2_048
"""Files in one .zip or folder (a thin-slice CT series has about 1,000)."""
MAX_MEMBER_BYTES = 128 * 1024**2
"""Unpacked size of one file of a .zip or folder, counted while it is read."""
MAX_ARCHIVE_BYTES = 768 * 1024**2
"""Unpacked size of all files of a .zip or folder together, counted while they are read."""

MAX_DICOM_READS = 1_000_000
"""Reads the DICOM parser may make for the headers of one study: a real file needs a few hundred, a
damaged header full of empty elements one per 8 bytes (about a second per megabyte)."""

# --- time -----------------------------------------------------------------------------------------
REQUEST_SECONDS = 45.0
"""Longest time one answer may take once a worker has started it."""

VOLUME_PASS_SECONDS = 1_800.0
"""Longest time one whole-volume answer may take (it encodes every slice of the study once; the
chat's Cancel button stops it sooner). Slices cached by an earlier pass cost nothing."""


class InputError(ValueError):
    """A request the app refuses before (or instead of) doing the work; the message is for the user."""


class PromptError(InputError):
    """A box or point that cannot be used; the message names it."""


class TimeLimitError(InputError):
    """A request that ran past :data:`REQUEST_SECONDS` and was stopped."""


def check_question(question: str) -> str:
    """The question without surrounding blanks; :class:`InputError` when empty or over the character limit."""
    text = (question or "").strip()
    if not text:
        raise InputError("Ask a question.")
    if len(text) > MAX_QUESTION_CHARS:
        raise InputError(f"The question is too long ({len(text):,} characters; at most {MAX_QUESTION_CHARS:,}). "
                         "Please ask a shorter question.")
    return text


def check_token_counts(question_tokens: int, prompt_tokens: int, answer_tokens: int, context: int) -> None:
    """Raise :class:`InputError` when the question or the whole prompt (plus the answer) is too long."""
    if question_tokens > MAX_QUESTION_TOKENS:
        raise InputError(f"The question is too long ({question_tokens:,} tokens; at most {MAX_QUESTION_TOKENS:,}). "
                         "Please ask a shorter question.")
    budget = min(MAX_PROMPT_TOKENS, context - answer_tokens)
    if prompt_tokens > budget:
        raise InputError(f"This conversation is too long for the model ({prompt_tokens:,} tokens; at most "
                         f"{budget:,} before the answer). Clear the chat and ask again.")


def _json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, counted without parsing it (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_rows(text: str | None, width: int, name: str, example: str) -> list[list[float]]:
    """Parse ``[[...], ...]`` with ``width`` finite numbers per row (empty text = no rows).

    Length and nesting are checked on the text before ``json.loads`` runs, so a deeply nested or huge
    value is refused at once. ``example`` shows the expected form in the message.
    """
    import json

    if text is None or not str(text).strip():
        return []
    text = str(text)
    if len(text) > MAX_PROMPT_JSON_CHARS:
        raise InputError(f"The {name} JSON is too long ({len(text):,} characters; at most {MAX_PROMPT_JSON_CHARS:,}).")
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise InputError(f"The {name} must be a list of rows like {example}; nested deeper than that is not accepted.")
    try:
        rows = json.loads(text)
    except ValueError:
        raise InputError(f"The {name} must be JSON like {example}.") from None
    if not isinstance(rows, list) or any(not isinstance(row, list) for row in rows):
        raise InputError(f"The {name} must be a list of rows like {example}.")
    singular = {"boxes": "box", "points": "point"}.get(name, name)
    parsed = []
    for index, row in enumerate(rows):
        if len(row) != width or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in row):
            raise PromptError(f"{singular} {index} {row!r} needs {width} numbers, like {example}.")
        parsed.append([float(v) for v in row])
    return parsed


def check_counts(boxes: Sequence | None, points: Sequence | None) -> None:
    """At most :data:`MAX_BOXES` boxes and :data:`MAX_POINTS` points in one request."""
    if boxes is not None and len(boxes) > MAX_BOXES:
        raise PromptError(f"{len(boxes)} boxes in one request; at most {MAX_BOXES} (box {MAX_BOXES} is the first extra).")
    if points is not None and len(points) > MAX_POINTS:
        raise PromptError(f"{len(points)} points in one request; at most {MAX_POINTS} "
                          f"(point {MAX_POINTS} is the first extra).")


def check_box(box: Sequence[float], size: tuple[int, int], name: str) -> None:
    """A box ``[x0, y0, x1, y1]`` (x1/y1 exclusive) must be finite, have an area and overlap the image.

    A box partly outside the image is valid (callers clip it). ``name`` ("box 2") starts the message.
    """
    height, width = size
    values = [float(v) for v in box]
    shown = "[" + ", ".join(f"{v:g}" for v in values) + "]"
    if len(values) != 4:
        raise PromptError(f"{name} {shown} needs four numbers [x0, y0, x1, y1].")
    x0, y0, x1, y1 = values
    if not all(math.isfinite(v) for v in values):
        raise PromptError(f"{name} {shown} has non-finite coordinates (NaN or infinity).")
    if x1 <= x0 or y1 <= y0:
        raise PromptError(f"{name} {shown} is empty or inverted: it needs x0 < x1 and y0 < y1 (zero area).")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise PromptError(f"{name} {shown} lies outside the {width}x{height} image.")


def check_label(label: object, name: str, padding: bool = False) -> None:
    """A point label is 1 (inside the structure) or 0 (outside); ``padding`` also allows -1 (unused slot)."""
    allowed = (-1, 0, 1) if padding else (0, 1)
    if isinstance(label, bool) or not isinstance(label, numbers.Real) or label not in allowed:
        raise PromptError(f"{name} has label {label!r}; use 1 (inside the structure) or 0 (outside)"
                          + (" or -1 (padding)." if padding else "."))


def check_point(point: Sequence[float], label: float | None, size: tuple[int, int], name: str,
                padding: bool = False) -> None:
    """A point ``[x, y]`` must be finite and inside the image; its label 1 (inside) or 0 (outside).

    ``padding``: label -1 marks an unused slot (the engine's (N, K) form) and is not checked further.
    """
    height, width = size
    if label is not None:
        check_label(label, name, padding)
    if label == -1:
        return
    x, y = (float(v) for v in point)
    if not (math.isfinite(x) and math.isfinite(y)):
        raise PromptError(f"{name} ({x:g}, {y:g}) has non-finite coordinates (NaN or infinity).")
    if not (0 <= x < width and 0 <= y < height):
        raise PromptError(f"{name} ({x:g}, {y:g}) is outside the {width}x{height} image.")


def check_prompts(size: tuple[int, int], boxes: Sequence | None = None, points: Sequence | None = None,
                  labels: Sequence | None = None) -> None:
    """Counts and values of one request's boxes (N, 4) and points (K, 2) with labels (K,) (one object)."""
    boxes = [] if boxes is None else boxes
    points = [] if points is None else points
    check_counts(boxes, points)
    for index, box in enumerate(boxes):
        check_box(box, size, f"box {index}")
    if labels is not None and len(labels) != len(points):
        raise PromptError(f"{len(points)} points but {len(labels)} point labels.")
    for index, point in enumerate(points):
        check_point(point, None if labels is None else labels[index], size, f"point {index}")


def check_image_size(size: tuple[int, int]) -> None:
    """An image the model is asked about needs at least :data:`MIN_IMAGE_SIDE` pixels on each side."""
    height, width = (int(v) for v in size)
    if min(height, width) < MIN_IMAGE_SIDE:
        raise InputError(f"This image is too small to analyse ({width}x{height} pixels); it needs at least "
                         f"{MIN_IMAGE_SIDE} pixels on each side.")


Event = TypeVar("Event")


class Deadline:
    """The time budget of one request, started when the worker begins it."""

    def __init__(self, seconds: float = REQUEST_SECONDS) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        """Raise :class:`TimeLimitError` once the budget is spent."""
        if time.monotonic() > self.end:
            raise TimeLimitError(f"This request took longer than {self.seconds:g} s and was stopped. "
                                 "Please try again with a shorter question or fewer prompts.")

    def bound(self, events: Iterator[Event]) -> Iterator[Event]:
        """Pass ``events`` on, checking the budget before the first and as each arrives; the source
        generator is closed when the budget is spent (or the consumer stops)."""
        try:
            self.check()
            for event in events:
                self.check()
                yield event
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
