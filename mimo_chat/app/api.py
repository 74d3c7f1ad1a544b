"""The one-call ``/ask`` endpoint for ``gradio_client``.

``/ask`` takes (image file, question, boxes JSON ``[[x0, y0, x1, y1], ...]``, points JSON
``[[x, y, label], ...]``) in display pixels of the image (the middle axial slice of a volume)
and returns (reply text without grounding tags, a JSON string
``{"phrases": [{"phrase", "color", "box", "score", "mask_png"}], ...}``, the overlay image).

On a volume upload, a question about the whole study ("How big is the liver?") is answered by the
whole-volume pass instead (see ``volume_chat``): the JSON then carries ``"volume"``, the
``python -m mimo_chat.volume --json`` object with each structure's mL, slices and NIfTI path.

Every limit of :mod:`mimo_chat.limits` is checked before the work it bounds, the answer runs
within the request's time budget, the upload is deleted from Gradio's cache as soon as it has been
read, and only the latest answer's masks of a session are kept (in its served results folder).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import gradio as gr

from mimo_chat import limits
from mimo_chat.app import storage
from mimo_chat.app.callbacks import Callbacks, layers_from_reply, readable_error
from mimo_chat.app.export import write_masks
from mimo_chat.app.render import Layer, compose
from mimo_chat.app.session import Session
from mimo_chat.app.volume_chat import measure, volume_reply, write_niftis
from mimo_chat.data.knowledge import load_knowledge_base
from mimo_chat.imaging import ImageLoadError
from mimo_chat.predictor import Done
from mimo_chat.volume import VolumeResult

BOX_EXAMPLE = "[[x0, y0, x1, y1]]"
POINT_EXAMPLE = "[[x, y, 1]]"


def _layer_record(layer: Layer, mask_path: Path | None) -> dict:
    return {
        "phrase": layer.phrase,
        "color": layer.color,
        "box": [float(v) for v in layer.box] if layer.box is not None else None,
        "score": float(layer.score) if layer.score is not None else None,
        "mask_png": str(mask_path) if mask_path is not None else None,
    }


def _check_question(callbacks: Callbacks, question: str | None) -> str:
    """Character limit, then token limits with the model's own tokenizer (nothing encoded yet)."""
    question = limits.check_question(question)
    processor = getattr(callbacks.predictor, "processor", None)
    if processor is not None and hasattr(processor, "check_question"):
        processor.check_question(question)
    return question


def _load(session: Session, file_path: str | None, deadline: limits.Deadline) -> tuple[int, int]:
    """Open the upload into the session (then delete Gradio's copy); returns the image's (H, W)."""
    if not file_path:
        raise limits.InputError("Send an image file (PNG, JPEG, DICOM, a zipped DICOM series or NIfTI).")
    source = Path(file_path)
    try:
        if not source.exists():  # Gradio keeps one copy of identical uploads; another request read and removed it
            raise limits.InputError("This upload is no longer on the server: an identical file sent at the same "
                                    "moment was already read and removed. Please send it again.")
        if not source.is_file() or source.stat().st_size == 0:
            raise ImageLoadError("The uploaded file is empty.")
        session.load(source, name=source.name)
    finally:
        storage.discard_upload(source)
    deadline.check()
    size = session.image_shape()
    limits.check_image_size(size)
    return size


def _answer(callbacks: Callbacks, session: Session, file_path: str | None, question: str | None,
            boxes_json: str | None, points_json: str | None, deadline: limits.Deadline):
    """Validate everything that can be validated before any work, then load, segment and answer."""
    question = _check_question(callbacks, question)
    boxes = limits.parse_rows(boxes_json, 4, "boxes", BOX_EXAMPLE)
    rows = limits.parse_rows(points_json, 3, "points", POINT_EXAMPLE)
    limits.check_counts(boxes, rows)
    for index, (_, _, label) in enumerate(rows):
        limits.check_label(label, f"point {index}")
    size = _load(session, file_path, deadline)
    points, labels = [row[:2] for row in rows], [int(row[2]) for row in rows]
    limits.check_prompts(size, boxes, points, labels)
    session.set_boxes(boxes)
    for (x, y), label in zip(points, labels):
        session.add_point(x, y, label == 1)
    callbacks.segment_prompts(session)
    deadline.check()
    names = callbacks.whole_volume_names(session, question)
    if names:  # the whole study, not the middle slice: bounded by the longer whole-volume limit
        work = measure(session.study, names, callbacks.predictor, session.slice_encodings(callbacks.predictor),
                       threading.Event(), limits.Deadline(limits.VOLUME_PASS_SECONDS))
        return work(lambda done, total, message: None)
    context = session.ensure_context(callbacks.predictor)
    events = callbacks.predictor.stream(context, question, **session.prompt_arguments())
    for event in deadline.bound(events):
        if isinstance(event, Done):
            return event.reply
    raise RuntimeError("the answer ended without its final event")


def _results_folder(session: Session) -> Path:
    """A fresh folder for this answer's masks; the session's earlier ``/ask`` results are deleted."""
    for old in session.workdir.glob("ask_*"):
        shutil.rmtree(old, ignore_errors=True)
    session.exports += 1
    folder = session.workdir / f"ask_{session.exports}"
    folder.mkdir(parents=True)
    return folder


def ask(callbacks: Callbacks, file_path: str | None, question: str, boxes_json: str, points_json: str,
        state: Session | None) -> tuple:
    """The ``/ask`` endpoint: (reply text, phrases JSON, overlay image, state). Errors raise ``gr.Error``."""
    deadline = limits.Deadline()
    session = callbacks.session(state)
    try:
        reply = _answer(callbacks, session, file_path, question, boxes_json, points_json, deadline)
    except Exception as error:  # noqa: BLE001 - shown to the user as a message
        raise gr.Error(readable_error(error, "answering"), print_exception=False) from None
    finally:
        storage.discard_upload(file_path)

    folder = _results_folder(session)
    volume = None
    if isinstance(reply, VolumeResult):
        write_niftis(reply, session.study, session.grid, folder)
        session.volume = {name: item for name, item in reply.structures.items() if item.found}
        session.reply_layers, volume, text = [], reply.to_json(), volume_reply(reply, load_knowledge_base()).text
        phrases = session.volume_layers()  # the 3D masks' cross-sections with the middle axial slice
    else:
        session.reply_layers = phrases = layers_from_reply(reply)
        text = reply.text
    phrase_pngs = write_masks(phrases, folder, "mask")
    prompt_pngs = write_masks(session.prompt_layers, folder, "prompt")
    height, width = session.image_shape()
    record = {
        "phrases": [_layer_record(layer, png) for layer, png in zip(phrases, phrase_pngs)],
        "prompt": [_layer_record(layer, png) for layer, png in zip(session.prompt_layers, prompt_pngs)],
        "image_size": [height, width],
        "slice": {"plane": session.plane, "index": session.slice_index} if session.study.is_volume else None,
        "volume": volume,  # a whole-volume answer: the CLI's --json object (volume_ml, slices, nifti, ...)
    }
    image = compose(session.image(), session.layers(), session.points, session.boxes)
    return text, json.dumps(record), image, session
