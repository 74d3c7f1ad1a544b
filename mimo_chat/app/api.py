"""Downloads (masks, NIfTI, JSON) and the one-call ``/ask`` endpoint for ``gradio_client``.

``/ask`` takes (image file, question, boxes JSON ``[[x0, y0, x1, y1], ...]``, points JSON
``[[x, y, label], ...]``) in display pixels of the image (the middle axial slice of a volume)
and returns (reply text without grounding tags, a JSON string
``{"phrases": [{"phrase", "color", "box", "score", "mask_png"}], ...}``, the overlay image).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr
import numpy as np

from mimo_chat.app.callbacks import (
    Callbacks,
    UserInputError,
    layers_from_reply,
    parse_json_list,
    readable_error,
    say,
    write_masks,
)
from mimo_chat.app.render import Layer, compose
from mimo_chat.app.session import Session
from mimo_chat.imaging import ImageLoadError, save_mask_nifti


def _layer_record(layer: Layer, mask_path: Path | None) -> dict:
    return {
        "phrase": layer.phrase,
        "color": layer.color,
        "box": [float(v) for v in layer.box] if layer.box is not None else None,
        "score": float(layer.score) if layer.score is not None else None,
        "mask_png": str(mask_path) if mask_path is not None else None,
    }


def match_source_orientation(mask_path: Path, source: Path | None) -> Path:
    """Re-orient a RAS mask NIfTI to the voxel order of a NIfTI source, so it has the source's affine.

    Other sources (DICOM series) keep the RAS grid of the loaded study, which is the same space.
    """
    if source is None or not source.name.lower().endswith((".nii", ".nii.gz")):
        return mask_path
    import nibabel as nib

    original, mask = nib.load(source), nib.load(mask_path)
    orientation = nib.orientations
    transform = orientation.ornt_transform(orientation.io_orientation(mask.affine),
                                           orientation.io_orientation(original.affine))
    reoriented = mask.as_reoriented(transform)
    if reoriented.shape != original.shape[:3] or not np.allclose(reoriented.affine, original.affine, atol=1e-3):
        return mask_path  # not the same voxel grid (e.g. a 4D source): keep the RAS mask
    image = nib.Nifti1Image(np.asarray(reoriented.dataobj, dtype=np.uint8), original.affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, mask_path)
    return mask_path


def export_files(session: Session) -> list[str]:
    """Write the masks on screen (PNG, and NIfTI on the source grid for volumes) and a JSON record."""
    session.exports += 1
    folder = session.workdir / f"export_{session.exports}"
    layers = session.layers()
    pngs = write_masks(layers, folder)
    files = [p for p in pngs if p is not None]
    index = session.slice_index if session.study.is_volume else None
    for layer, png in zip(layers, pngs):
        if png is not None and session.study.is_volume:
            nifti = save_mask_nifti(session.study, layer.mask, index, session.plane, png.with_suffix(".nii.gz"))
            files.append(match_source_orientation(nifti, session.source_path))
    record = {
        "source": session.source_name,
        "modality": session.study.modality,
        "plane": session.plane if session.study.is_volume else None,
        "slice": index,
        "window": session.window,
        "image_size": list(session.image_shape()),
        "boxes": session.boxes,
        "points": session.points,
        "masks": [_layer_record(layer, png.name if png else None) for layer, png in zip(layers, pngs)],
        "conversation": [
            {
                "question": turn.question,
                "reply": turn.reply,
                "raw_reply": turn.raw_reply,
                "boxes": turn.boxes,
                "points": turn.points,
                "phrases": [_layer_record(layer, None) | {"has_mask": layer.mask is not None} for layer in turn.layers],
            }
            for turn in session.turns
        ],
    }
    json_path = folder / "session.json"
    json_path.write_text(json.dumps(record, indent=2))
    files.append(json_path)
    return [str(path) for path in files]


def export(callbacks: Callbacks, state: Session | None) -> tuple:
    """(download files, chat) for the Export button."""
    session = callbacks.session(state)
    if not session.loaded:
        return None, say(session, "Load an image first: there is nothing to export yet.")
    try:
        files = export_files(session)
        return files, say(session, f"Exported {len(files)} file(s): masks, {'NIfTI, ' if session.study.is_volume else ''}"
                                "boxes and the conversation (JSON).")
    except Exception as error:  # noqa: BLE001 - shown to the user as a message
        return None, say(session, readable_error(error, "exporting"))


def ask(callbacks: Callbacks, file_path: str | None, question: str, boxes_json: str, points_json: str,
        state: Session | None) -> tuple:
    """The ``/ask`` endpoint: (reply text, phrases JSON, overlay image, state). Errors raise ``gr.Error``."""
    session = callbacks.session(state)
    try:
        if not file_path:
            raise UserInputError("Send an image file (PNG, JPEG, DICOM, a zipped DICOM series or NIfTI).")
        if not (question or "").strip():
            raise UserInputError("Ask a question.")
        boxes = parse_json_list(boxes_json, 4, "boxes")
        points = parse_json_list(points_json, 3, "points")
        source = Path(file_path)
        if not source.is_file() or source.stat().st_size == 0:
            raise ImageLoadError("The uploaded file is empty.")
        session.exports += 1
        folder = session.workdir / f"ask_{session.exports}"
        folder.mkdir(parents=True)
        target = folder / source.name
        shutil.copy2(source, target)
        session.load(target, name=source.name)
        session.set_boxes(boxes)
        for x, y, label in points:
            try:
                session.add_point(x, y, label > 0)
            except ValueError as error:
                raise UserInputError(str(error)) from error
        callbacks.segment_prompts(session)
        context = session.ensure_context(callbacks.predictor)
        reply = callbacks.predictor.ask(context, question.strip(), **session.prompt_arguments())
        session.reply_layers = layers_from_reply(reply)
    except Exception as error:  # noqa: BLE001 - shown to the user as a message
        raise gr.Error(readable_error(error, "answering"), print_exception=False) from None

    phrase_pngs = write_masks(session.reply_layers, folder, "mask")
    prompt_pngs = write_masks(session.prompt_layers, folder, "prompt")
    height, width = session.image_shape()
    record = {
        "phrases": [_layer_record(layer, png) for layer, png in zip(session.reply_layers, phrase_pngs)],
        "prompt": [_layer_record(layer, png) for layer, png in zip(session.prompt_layers, prompt_pngs)],
        "image_size": [height, width],
        "slice": {"plane": session.plane, "index": session.slice_index} if session.study.is_volume else None,
    }
    image = compose(session.image(), session.layers(), session.points, session.boxes)
    return reply.text, json.dumps(record), image, session
