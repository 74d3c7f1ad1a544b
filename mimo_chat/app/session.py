"""Per-user state of the app, kept in a ``gr.State`` (never in module globals).

A :class:`Session` holds the loaded study, the current view (plane, slice, window),
the image context the predictor encoded for that view, the user's prompts, the
masks on screen and the conversation. Each session owns a private temporary
folder for its upload and exports; :meth:`Session.cleanup` deletes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mimo_chat.app import storage
from mimo_chat.app.render import PHRASE_COLORS, PROMPT_COLOR, Layer, compose, display_scale, same_mask
from mimo_chat.app.viewer import PLANE_AXIS, ZOOMS, Viewport, display_to_voxel, draw_orientation, value_at
from mimo_chat.boxes import mask_to_box
from mimo_chat.imaging import Study, load_study
from mimo_chat.limits import MAX_POINTS
from mimo_chat.volume import SliceEncodings, SourceGrid, source_grid

Window = str | tuple[float, float]
# The 3D masks take colours from the palette's end: a reply's phrases take them from its start,
# and both can be on screen together.
VOLUME_COLORS = tuple(reversed(PHRASE_COLORS))
HISTORY_TURNS = 3  # earlier turns of the same image the model sees: enough for "and the other one?",
# few enough that an early mistake does not steer every later answer (and the prompt stays short)


@dataclass
class Turn:
    """One question and its answer, kept for multi-turn history and the JSON export."""

    question: str
    raw_reply: str  # with grounding tags, fed back to the model as history
    reply: str  # tags stripped
    layers: list[Layer]
    boxes: list[list[float]]
    points: list[list[float]]
    plane: str | None = None  # the view the question was asked on (None for a 2D image)
    slice_index: int | None = None

    def record(self) -> dict:
        """The turn as JSON-ready data (masks are written as files by the export)."""
        return {
            "question": self.question,
            "reply": self.reply,
            "raw_reply": self.raw_reply,
            "plane": self.plane,
            "slice": self.slice_index,
            "boxes": self.boxes,
            "points": self.points,
            "phrases": [layer.record() for layer in self.layers],
        }


@dataclass
class Session:
    """Everything one user has on screen. Coordinates are display pixels of the current slice."""

    workdir: Path
    study: Study | None = None
    source_name: str = ""
    source_path: Path | None = None  # the loaded file (inside the session folder for uploads)
    grid: SourceGrid | None = None  # a NIfTI source's voxel grid, read at load: 3D masks are written on it
    plane: str = "axial"
    slice_index: int = 0
    window: Window = "auto"
    context: Any = None  # predictor context for (plane, slice, window); re-encoded when the view changes
    context_key: tuple | None = None
    points: list[list[float]] = field(default_factory=list)  # [x, y, label], label 1 = positive, 0 = negative
    boxes: list[list[float]] = field(default_factory=list)  # [x0, y0, x1, y1]
    prompt_order: list[str] = field(default_factory=list)  # "point" / "box", newest last (for undo)
    prompt_layers: list[Layer] = field(default_factory=list)  # masks from the plain segment path
    reply_layers: list[Layer] = field(default_factory=list)  # masks of the latest reply's phrases
    turns: list[Turn] = field(default_factory=list)  # the conversation about the loaded study only
    earlier: list[dict] = field(default_factory=list)  # conversations about studies opened before, for export
    cursor: list[int] | None = None  # volume voxel (i, j, k) kept when the plane changes
    zoom: int = 1
    center: tuple[float, float] | None = None  # display pixel the zoomed view is centred on
    messages: list[dict] = field(default_factory=list)  # the Chatbot's messages, {"role", "content"}
    exports: int = 0
    # a volume's axial slices, each encoded once for the study: shared by the chat on axial views and
    # the whole-volume pass, so scrolling back or asking again encodes nothing
    encodings: SliceEncodings | None = None
    volume: dict[str, Any] = field(default_factory=dict)  # structure -> StructureResult of the last whole-volume answer
    volume_files: list[Path] = field(default_factory=list)  # its NIfTI files
    new_downloads: list[Path] = field(default_factory=list)  # files the downloads box has not shown yet
    volume_cancel: Any = None  # the running pass's threading.Event (the Cancel button sets it); None when idle
    _display: tuple[tuple, np.ndarray] | None = field(default=None, repr=False)  # (view key, image) cache

    @classmethod
    def create(cls, root: str | Path, key: str | None = None) -> Session:
        """A new session with its own folder under ``root`` (named after ``key``, the browser session, if given)."""
        Path(root).mkdir(parents=True, exist_ok=True)
        folder = session_folder(root, key) if key is not None else Path(root) / storage.session_name()
        folder.mkdir(exist_ok=True)
        return cls(workdir=folder)

    # ------------------------------------------------------------------ study and view
    def load(self, path: str | Path, name: str | None = None) -> None:
        """Load a study from ``path`` (kept inside the session folder) and reset view, prompts and masks.

        Raises ``ImageLoadError`` with a readable message; the previous study stays loaded then.
        """
        study = load_study(path)
        self.archive_conversation()
        self.study = study
        self.source_name = name or Path(path).name
        self.source_path = Path(path)
        self.grid = source_grid(path, study) if study.is_volume else None  # /ask deletes its upload right after
        self.plane = "axial"
        self.cursor = [size // 2 for size in study.pixels.shape] if study.is_volume else None
        self.slice_index = self.cursor[PLANE_AXIS["axial"]] if study.is_volume else 0
        self.window = study.default_window
        self.context = None
        self.context_key = None
        self.zoom, self.center = 1, None
        self.clear_prompts()
        self.reply_layers = []
        self.stop_volume()
        if self.encodings is not None:
            self.encodings.forget()  # the old study's embeddings are large; drop them now, not at the next GC
        self.encodings = None
        self.volume, self.volume_files, self.new_downloads = {}, [], []

    def stop_volume(self) -> None:
        """Ask a running whole-volume pass to stop (its answer would be about a study no longer on screen)."""
        if self.volume_cancel is not None:
            self.volume_cancel.set()

    def archive_conversation(self) -> None:
        """Put the conversation about the current study aside (still exported) and start an empty one."""
        if self.study is not None and self.turns:
            self.earlier.append({"source": self.source_name, "modality": self.study.modality,
                                 "conversation": [turn.record() for turn in self.turns]})
        self.turns, self.messages = [], []

    @property
    def loaded(self) -> bool:
        return self.study is not None

    def num_slices(self) -> int:
        if self.study is None or not self.study.is_volume:
            return 1
        return self.study.num_slices(self.plane)

    def set_view(self, plane: str, slice_index: int, window: Window) -> bool:
        """Move to another plane/slice/window; masks and prompts belong to the old view and are cleared.

        Returns True when the displayed image changed.
        """
        if self.study is None:
            return False
        if self.study.is_volume and plane != self.plane and self.cursor is not None:
            slice_index = self.cursor[PLANE_AXIS[plane]]  # the same anatomical position in the new plane
        slice_index = int(np.clip(slice_index, 0, max(0, self.num_slices_for(plane) - 1)))
        changed_geometry = (plane, slice_index) != (self.plane, self.slice_index)
        changed = changed_geometry or window != self.window
        if changed_geometry:
            self.clear_prompts()
        if changed:
            self.reply_layers = []
            self.prompt_layers = []
        if changed_geometry and plane != self.plane:
            self.center = None  # a zoomed view of another plane starts at its middle
        self.plane, self.slice_index, self.window = plane, slice_index, window
        if self.cursor is not None:
            self.cursor[PLANE_AXIS[plane]] = slice_index
        return changed

    def step(self, delta: int) -> bool:
        """Move ``delta`` slices in the current plane (mouse wheel). Returns True when the slice changed."""
        return self.set_view(self.plane, self.slice_index + int(delta), self.window)

    def view_label(self) -> str:
        """``"axial slice 40 of 133"`` for a volume, ``""`` for a 2D image."""
        if self.study is None or not self.study.is_volume:
            return ""
        return f"{self.plane} slice {self.slice_index} of {self.num_slices()}"

    def num_slices_for(self, plane: str) -> int:
        if self.study is None or not self.study.is_volume:
            return 1
        return self.study.num_slices(plane)

    def image(self) -> np.ndarray:
        """The current display image, (H, W, 3) uint8 (square pixels for volumes; masks map back on export)."""
        if self.study is None:
            raise RuntimeError("no study loaded")
        key = self.view_key()
        if self._display is None or self._display[0] != key:
            index = self.slice_index if self.study.is_volume else None
            # volumes: square pixels, so thick-slice coronal/sagittal views are not squashed
            image = self.study.display(index, self.plane, self.window, square_pixels=self.study.is_volume)
            self._display = (key, image)
        return self._display[1]

    def view_key(self) -> tuple:
        return (id(self.study), self.plane, self.slice_index, self.window)

    def ensure_context(self, predictor) -> Any:
        """Encode the current view once; reuse the context until the view changes.

        An axial slice of a volume in the study's default window comes from the study's slice cache
        (the image the whole-volume pass encodes), so each such slice is encoded once per study.
        """
        key = self.view_key()
        if self.context is None or self.context_key != key:
            hint = self.study.kind_hint or ""
            if self.study.is_volume and self.plane != "axial":
                hint += f" {self.plane}"  # one coronal / sagittal image spans many levels
            kind = hint.strip() or None
            if self.view_in_cache(predictor):
                self.context = replace(self.slice_encodings(predictor).context(self.slice_index), image_kind=kind)
            else:
                self.context = predictor.encode(self.image(), image_kind=kind)
            self.context_key = key
        return self.context

    def slice_encodings(self, predictor) -> SliceEncodings:
        """The loaded volume's slice cache (made at first use; one per study)."""
        if self.encodings is None or self.encodings.study is not self.study:
            self.encodings = SliceEncodings(self.study, predictor.encode)
        return self.encodings

    def view_in_cache(self, predictor) -> bool:
        """Is the view on screen an image of the slice cache (axial, default window, same pixels)?"""
        if self.study is None or not self.study.is_volume or self.plane != "axial":
            return False
        cache = self.slice_encodings(predictor)
        same_shape = self.study.display_shape("axial", square_pixels=True) == self.study.display_shape("axial")
        return same_shape and self.window == cache.window

    # ------------------------------------------------------------------ prompts
    def add_point(self, x: float, y: float, positive: bool) -> None:
        height, width = self.image_shape()
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"The point ({x:.0f}, {y:.0f}) is outside the {width}x{height} image.")
        if len(self.points) >= MAX_POINTS:  # refused before it is kept: the earlier clicks stay usable
            raise ValueError(f"At most {MAX_POINTS} clicks on one image; undo or clear some first.")
        self.points.append([float(x), float(y), 1 if positive else 0])
        self.prompt_order.append("point")
        if self.cursor is not None:  # the clicked voxel becomes the position other planes open on
            voxel = display_to_voxel(self.study, self.plane, self.slice_index, x, y)
            self.cursor = [int(v) for v in voxel]

    def set_boxes(self, boxes: list[list[float]]) -> bool:
        """Replace the boxes (the box editor sends all of them). Returns True when they changed."""
        height, width = self.image_shape()
        cleaned = []
        for box in boxes:
            x0, y0, x1, y1 = (float(v) for v in box)
            x0, x1 = sorted((min(max(x0, 0), width), min(max(x1, 0), width)))
            y0, y1 = sorted((min(max(y0, 0), height), min(max(y1, 0), height)))
            if x1 - x0 >= 1 and y1 - y0 >= 1:
                cleaned.append([x0, y0, x1, y1])
        if cleaned == self.boxes:
            return False
        added = len(cleaned) - len(self.boxes)
        self.boxes = cleaned
        self.prompt_order = [kind for kind in self.prompt_order if kind != "box"] + ["box"] * len(cleaned)
        if added < 0 and not cleaned:
            self.prompt_layers = []
        return True

    def undo(self) -> None:
        """Remove the newest point or box."""
        if not self.prompt_order:
            return
        kind = self.prompt_order.pop()
        if kind == "point" and self.points:
            self.points.pop()
        elif kind == "box" and self.boxes:
            self.boxes.pop()
        if not self.points and not self.boxes:
            self.prompt_layers = []

    def clear_prompts(self) -> None:
        self.points, self.boxes, self.prompt_order, self.prompt_layers = [], [], [], []

    def has_prompts(self) -> bool:
        return bool(self.points or self.boxes)

    def prompt_arguments(self) -> dict:
        """Keyword arguments of ``MimoPredictor.stream/ask/segment`` for the current prompts."""
        return {
            "boxes": [list(b) for b in self.boxes] or None,
            "points": [[p[0], p[1]] for p in self.points] or None,
            "point_labels": [int(p[2]) for p in self.points] or None,
        }

    def set_prompt_masks(self, masks: np.ndarray, scores: np.ndarray) -> None:
        """Keep the union of the masks returned for the user's prompts, shown in the prompt colour."""
        if len(masks) == 0:
            self.prompt_layers = []
            return
        union = np.any(np.asarray(masks, dtype=bool), axis=0)
        self.prompt_layers = [Layer("your prompt", PROMPT_COLOR, union, None, float(np.max(scores)), from_prompt=True)]

    def image_shape(self) -> tuple[int, int]:
        if self.study is None:
            raise ValueError("Load an image first.")
        return tuple(self.image().shape[:2])

    # ------------------------------------------------------------------ conversation and drawing
    def chat(self) -> list[dict]:
        """A copy of the chat messages for the ``gr.Chatbot``."""
        return [dict(message) for message in self.messages]

    def set_message(self, position: int, content: str) -> None:
        """Replace the text of the assistant message at ``position`` (a long pass's progress line:
        other messages may arrive after it while it runs; a cleared chat gets it as a new message)."""
        message = {"role": "assistant", "content": content}
        if position < len(self.messages):
            self.messages[position] = message
        else:
            self.messages.append(message)

    def set_last(self, content: str) -> None:
        """Replace the text of the newest (streaming) assistant message."""
        self.messages[-1] = {"role": "assistant", "content": content}

    def view(self) -> tuple[str | None, int | None]:
        """(plane, slice) a turn is asked on: a conversation is about one image."""
        return (self.plane, self.slice_index) if self.study is not None and self.study.is_volume else (None, None)

    def history(self) -> list[tuple[str, str]]:
        """What the model is told of the conversation: the last few turns about the image on screen.

        Turns about another slice are left out, so the image opens a new conversation for the model.
        """
        here = [turn for turn in self.turns if (turn.plane, turn.slice_index) == self.view()]
        return [(turn.question, turn.raw_reply) for turn in here[-HISTORY_TURNS:]]

    def layers(self) -> list[Layer]:
        """Layers on screen; the mask of the user's prompt is left out once a reply names it (shown once).
        The 3D masks of the last whole-volume answer follow every slice and plane."""
        named = [layer for layer in self.reply_layers if layer.mask is not None]
        prompt = [layer for layer in self.prompt_layers
                  if not any(same_mask(layer.mask, other.mask) for other in named)]
        return prompt + self.reply_layers + self.volume_layers()

    def volume_layers(self) -> list[Layer]:
        """One layer per 3D mask that crosses the view on screen: its cross-section."""
        if not self.volume or self.study is None or not self.study.is_volume:
            return []
        shape = self.image_shape()
        layers = []
        for index, (name, item) in enumerate(self.volume.items()):
            mask = item.display_mask(self.study, self.slice_index, self.plane)
            if mask.shape != shape:  # thick slices are shown with square pixels: stretch the rows alike
                mask = np.asarray(Image.fromarray(mask).resize(shape[::-1], Image.Resampling.NEAREST))
            if not mask.any():
                continue
            # the name's confidence: the locator's best presence of the structure on any slice
            layers.append(Layer(name, VOLUME_COLORS[index % len(VOLUME_COLORS)], mask, mask_to_box(mask), item.score,
                                name_score=float(item.presence.max(initial=0.0)), volume=True))
        return layers

    def volume_colors(self) -> dict[str, str]:
        """Colour of each 3D mask's structure, as :meth:`volume_layers` draws it."""
        return {name: VOLUME_COLORS[index % len(VOLUME_COLORS)] for index, name in enumerate(self.volume)}

    def scale(self) -> int:
        """Screen pixels per image pixel of the whole (unzoomed) view (1 for large images)."""
        return display_scale(*self.image_shape())

    def viewport(self) -> Viewport:
        height, width = self.image_shape()
        return Viewport.make(height, width, self.zoom, self.center, self.scale())

    def set_zoom(self, zoom: int, center: tuple[float, float] | None = None) -> None:
        """Zoom to one of ``ZOOMS`` around ``center`` (display pixels; None keeps the current centre)."""
        self.zoom = int(min(ZOOMS, key=lambda z: abs(z - zoom)))
        if center is not None:
            self.center = (float(center[0]), float(center[1]))
        if self.zoom == 1:
            self.center = None

    def value_at(self, x: float, y: float) -> float | None:
        """Stored value (HU for CT) under display pixel (x, y)."""
        if self.study is None:
            return None
        return value_at(self.study, self.plane, self.slice_index, x, y)

    def render(self, include_boxes: bool = True) -> np.ndarray:
        """The visible part of the view with masks, phrase boxes, prompts and orientation letters.

        ``include_boxes=False`` for the box editor, which draws the boxes itself.
        """
        port = self.viewport()
        layers = [replace(layer, mask=None if layer.mask is None else port.crop(layer.mask),
                          box=None if layer.box is None else port.shift_box(layer.box)) for layer in self.layers()]
        points = [[x - port.x0, y - port.y0, label] for x, y, label in self.points]
        boxes = [port.shift_box(box) for box in self.boxes] if include_boxes else []
        screen = compose(port.crop(self.image()), layers, points, boxes, port.scale)
        return draw_orientation(screen, self.plane) if self.study.is_volume else screen

    def cleanup(self) -> None:
        """Delete the session's folders (results, and the upload kept outside them). Safe to call twice."""
        storage.remove_session(self.workdir)


def session_folder(root: str | Path, key: str) -> Path:
    """The folder of the browser session ``key`` (a Gradio session hash) under ``root``; its name is a
    keyed hash, so a mask link neither reveals the session hash nor leads to another session's folder."""
    return Path(root) / storage.session_name(key)


def cleanup_session(session: Session | None) -> None:
    """``gr.State`` delete callback."""
    if session is not None:
        session.cleanup()
