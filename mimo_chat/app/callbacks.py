"""Event handlers of the app: convert Gradio values to predictor calls and back.

No tensor code lives here: the predictor encodes, segments and streams; :mod:`render`
draws. Every handler turns a failure into a readable chat message (or, for the API,
a ``gr.Error``) and leaves the session usable.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from mimo_chat import limits
from mimo_chat.app import storage
from mimo_chat.app.examples import example_path, example_view
from mimo_chat.app.export import export_files
from mimo_chat.app.render import Layer, color_for, highlight, legend_html, sources_html, strip_tags
from mimo_chat.app.session import Session, Turn, session_folder
from mimo_chat.app.viewer import value_text
from mimo_chat.app.volume_chat import (
    asks_whole_volume,
    measurable_names,
    measure,
    progress_text,
    run_in_background,
    stopped_text,
    volume_reply,
    write_niftis,
)
from mimo_chat.data.knowledge import load_knowledge_base
from mimo_chat.imaging import WINDOW_PRESETS, ImageLoadError
from mimo_chat.predictor import Done, MaskReady, TextDelta
from mimo_chat.volume import VolumeCancelled

logger = logging.getLogger(__name__)

GENERIC_ERROR = "Sorry, something went wrong while {action}. Please try again or load another image."
RADIOGRAPH_MODALITIES = ("XR", "CR", "DX", "DR", "RG")
NEEDS_IMAGE = "Please load an image first: upload a file or pick an example study."


class UserInputError(ValueError):
    """A problem with what the user gave us; its message is shown as it is."""


def readable_error(error: Exception, action: str) -> str:
    """The chat text for ``error``: loader and input messages verbatim, anything else generic and logged.

    The log gets the exception type and code locations only (no message, no file names), so no
    patient data from paths or DICOM headers ends up in server logs.
    """
    if isinstance(error, (ImageLoadError, UserInputError, limits.InputError)):
        return str(error)
    location = "".join(traceback.format_tb(error.__traceback__, limit=-3)).strip()
    logger.error("error while %s: %s\n%s", action, type(error).__name__, location)
    return GENERIC_ERROR.format(action=action)


def say(session: Session, text: str) -> list[dict]:
    """Add an assistant message to the session's chat; returns a copy of the chat for the Chatbot."""
    session.messages.append({"role": "assistant", "content": text})
    return session.chat()


def parse_json_list(text: str | None, width: int, name: str) -> list[list[float]]:
    """Parse ``[[...], ...]`` with ``width`` numbers per row; empty text is an empty list (see limits.parse_rows)."""
    return limits.parse_rows(text, width, name, "[[x0, y0, x1, y1]]" if width == 4 else "[[x, y, 1]]")


class Callbacks:
    """Handlers bound to one predictor; every user's data arrives through ``gr.State``."""

    def __init__(self, predictor, workdir: str | Path, model_name: str = ""):
        self.predictor = predictor
        self.workdir = Path(workdir)
        self.model_name = model_name

    # ------------------------------------------------------------------ helpers
    def session(self, state: Session | None) -> Session:
        return state if state is not None else Session.create(self.workdir)

    def view_outputs(self, session: Session) -> tuple:
        """(state, viewer image, box editor value, legend html)."""
        if not session.loaded:
            return session, None, None, legend_html([])
        port = session.viewport()
        boxes = []
        for box in session.boxes:
            (x0, y0), (x1, y1) = port.to_screen(box[0], box[1]), port.to_screen(box[2], box[3])
            boxes.append({"xmin": round(x0), "ymin": round(y0), "xmax": round(x1), "ymax": round(y1),
                          "color": (255, 225, 25), "label": "box"})
        editor = {"image": session.render(include_boxes=False), "boxes": boxes}
        return session, session.render(), editor, legend_html(session.layers())

    def load_outputs(self, session: Session) -> tuple:
        """View outputs + plane, slice slider, window, width, level, study info, upload box (emptied), chat."""
        study = session.study
        volume = study.is_volume
        slider = gr.Slider(minimum=0, maximum=max(session.num_slices() - 1, 1), value=session.slice_index,
                           step=1, visible=volume)
        window_name = session.window if isinstance(session.window, str) else "custom"
        width, level = WINDOW_PRESETS.get(window_name, (None, None)) if isinstance(session.window, str) else session.window
        details = ", ".join(f"{k}: {v}" for k, v in study.descriptors.items())
        notes = "".join(f"\n- {note}" for note in study.notes)
        info = f"**{session.source_name}** — {details}{notes}"
        height, width_px = session.image_shape()
        earlier = (f" The conversation about {len(session.earlier)} earlier stud{'y' if len(session.earlier) == 1 else 'ies'}"
                   " is kept for export; this one starts fresh.") if session.earlier else ""
        where = f", opened on {session.view_label()}" if volume else ""
        say(session, f"Loaded **{session.source_name}** ({study.modality}, {width_px}×{height} pixels"
                     f"{', volume' if volume else ''}{where}). Click a structure, draw a box, or ask a question.{earlier}")
        return (*self.view_outputs(session), gr.Radio(value=session.plane, visible=volume), slider,
                gr.Dropdown(value=window_name), width, level, info, None, session.chat())

    def segment_prompts(self, session: Session) -> None:
        """Run the plain segmentation path for the current clicks and boxes."""
        if not session.has_prompts():
            session.prompt_layers = []
            return
        result = self.predictor.segment(session.ensure_context(self.predictor), **session.prompt_arguments())
        session.set_prompt_masks(result.masks, result.scores)

    def start(self, request: gr.Request) -> Session:
        """``demo.load``: a fresh session whose folder is named after the browser session."""
        return Session.create(self.workdir, request.session_hash if request else None)

    def end(self, request: gr.Request) -> None:
        """``demo.unload`` (tab closed): delete the session's folder at once (its state goes an hour later)."""
        if request is not None and request.session_hash:
            storage.remove_session(session_folder(self.workdir, request.session_hash))

    # ------------------------------------------------------------------ study and view
    def load_upload(self, file_path: str | None, state: Session | None) -> tuple:
        session = self.session(state)
        if not file_path:
            return (session, *[gr.skip()] * 10, session.chat())
        try:
            source = Path(file_path)
            if not source.is_file() or source.stat().st_size == 0:
                raise ImageLoadError("The uploaded file is empty.")
            target = storage.take_upload(source, session.workdir)  # out of Gradio's served cache
            session.load(target, name=source.name)
            return self.load_outputs(session)
        except Exception as error:  # noqa: BLE001 - shown to the user as a message
            return (session, *[gr.skip()] * 10, say(session, readable_error(error, "opening the file")))

    def load_example(self, name: str | None, state: Session | None) -> tuple:
        session = self.session(state)
        if not name:
            return (session, *[gr.skip()] * 10, session.chat())
        try:
            session.load(example_path(name), name=name)
            plane, index, window = example_view(name, session.study)
            session.set_view(plane, index, window or session.window)
            return self.load_outputs(session)
        except Exception as error:  # noqa: BLE001 - shown to the user as a message
            return (session, *[gr.skip()] * 10, say(session, readable_error(error, "opening the example")))

    def quick_rows(self, state: Session | None) -> tuple:
        """Visibility of the (CT, radiograph) quick-question rows, the questions that fit the study, and of
        the Cancel button of whole-volume answers (volumes only)."""
        radiograph = state is not None and state.loaded and state.study.modality in RADIOGRAPH_MODALITIES
        volume = state is not None and state.loaded and state.study.is_volume
        return gr.Row(visible=not radiograph), gr.Row(visible=radiograph), gr.Button(visible=volume)

    def prepare(self, state: Session | None) -> Session | None:
        """Encode the current view right after it is shown, so the first token comes quickly."""
        if state is not None and state.loaded:
            try:
                state.ensure_context(self.predictor)
            except Exception as error:  # noqa: BLE001 - the next action reports it in the chat
                readable_error(error, "preparing the image")
        return state

    def change_view(self, plane: str, index: float, window: str, width: float | None, level: float | None,
                    state: Session | None) -> tuple:
        session = self.session(state)
        if not session.loaded:
            return (*self.view_outputs(session), gr.skip(), gr.skip(), gr.skip(), session.chat())
        try:
            if window == "custom":
                if not width or width <= 0 or level is None:
                    raise UserInputError("A custom window needs a width above 0 and a level.")
                chosen: Any = (float(width), float(level))
            else:
                chosen = window
                width, level = WINDOW_PRESETS.get(window, (width, level))
            before = session.view()
            session.set_view(plane or "axial", int(index or 0), chosen)
            self.note_new_image(session, before)
            slider = gr.Slider(maximum=max(session.num_slices() - 1, 1), value=session.slice_index)
            return (*self.view_outputs(session), slider, width, level, session.chat())
        except Exception as error:  # noqa: BLE001 - shown to the user as a message
            return (session, *[gr.skip()] * 6, say(session, readable_error(error, "changing the view")))

    def step(self, delta: int, state: Session | None) -> tuple:
        """Mouse wheel over the image: ``delta`` slices on (view outputs, slider, chat)."""
        session = self.session(state)
        if not session.loaded or not session.study.is_volume:
            return (session, *[gr.skip()] * 4, session.chat())
        before = session.view()
        session.step(delta)
        self.note_new_image(session, before)
        return (*self.view_outputs(session), gr.Slider(value=session.slice_index), session.chat())

    @staticmethod
    def note_new_image(session: Session, before: tuple) -> None:
        """Tell the user the conversation the model sees restarts on a new slice (one note, kept current)."""
        if session.view() == before or not session.turns:
            return
        note = (f"Now on {session.view_label()}: a new image, so the model starts a new conversation about it "
                "(the answers above were about another slice).")
        if session.messages and str(session.messages[-1]["content"]).startswith("Now on "):
            session.set_last(note)
        else:
            say(session, note)

    def zoom(self, factor: float, state: Session | None) -> tuple:
        """Zoom in (factor 2), out (0.5) or back to the whole image (0): view outputs."""
        session = self.session(state)
        if session.loaded:
            session.set_zoom(1 if factor == 0 else session.zoom * factor)
        return self.view_outputs(session)

    def hover(self, position: str | None, state: Session | None) -> str:
        """The value under the mouse: ``position`` is "x,y" in screen pixels of the viewer image."""
        session = self.session(state)
        try:
            sx, sy = (float(v) for v in str(position).split(","))
        except ValueError:
            return ""
        if not session.loaded:
            return ""
        x, y = session.viewport().to_image(sx, sy)
        text = value_text(session.study, session.value_at(x, y))
        return f"x {x:.0f}, y {y:.0f}: **{text}**" if text else ""

    # ------------------------------------------------------------------ prompts
    def click(self, mode: str, state: Session | None, event: gr.SelectData) -> tuple:
        session = self.session(state)
        if not session.loaded:
            return self.add_point(0, 0, True, session)
        x, y = session.viewport().to_image(event.index[0], event.index[1])  # screen pixels -> image pixels
        if mode == "Pan":
            session.set_zoom(session.zoom, (x, y))
            return (*self.view_outputs(session), session.chat())
        return self.add_point(x, y, mode != "Point −", session)

    def add_point(self, x: float, y: float, positive: bool, state: Session | None) -> tuple:
        session = self.session(state)
        if not session.loaded:
            return (*self.view_outputs(session), say(session, NEEDS_IMAGE))
        try:
            try:
                session.add_point(float(x), float(y), bool(positive))
            except ValueError as error:
                raise UserInputError(str(error)) from error
            self.segment_prompts(session)
            return (*self.view_outputs(session), session.chat())
        except Exception as error:  # noqa: BLE001 - shown to the user as a message
            return (*self.view_outputs(session), say(session, readable_error(error, "segmenting your click")))

    def boxes_from_editor(self, value: dict | None, state: Session | None) -> tuple:
        session = self.session(state)
        if not session.loaded or value is None:
            return (session, *[gr.skip()] * 4)
        port = session.viewport()
        boxes = [[*port.to_image(b["xmin"], b["ymin"]), *port.to_image(b["xmax"], b["ymax"])]
                 for b in value.get("boxes") or []]
        try:
            if not session.set_boxes(boxes):  # our own update of the editor comes back here: nothing to do
                return (session, *[gr.skip()] * 4)
            self.segment_prompts(session)
            return (*self.view_outputs(session), session.chat())
        except Exception as error:  # noqa: BLE001 - shown to the user as a message
            return (*self.view_outputs(session), say(session, readable_error(error, "segmenting your box")))

    def set_boxes(self, boxes_json: str, state: Session | None) -> tuple:
        session = self.session(state)
        if not session.loaded:
            return (*self.view_outputs(session), say(session, NEEDS_IMAGE))
        try:
            boxes = parse_json_list(boxes_json, 4, "boxes")
            limits.check_prompts(session.image_shape(), boxes)  # invalid boxes are errors, not dropped
            session.set_boxes(boxes)
            self.segment_prompts(session)
            return (*self.view_outputs(session), session.chat())
        except Exception as error:  # noqa: BLE001 - shown to the user as a message
            return (*self.view_outputs(session), say(session, readable_error(error, "segmenting your box")))

    def undo(self, state: Session | None) -> tuple:
        return self._edit_prompts(state, clear=False)

    def clear(self, state: Session | None) -> tuple:
        return self._edit_prompts(state, clear=True)

    def _edit_prompts(self, state: Session | None, clear: bool) -> tuple:
        session = self.session(state)
        if not session.loaded:
            return (*self.view_outputs(session), session.chat())
        try:
            if clear:
                session.clear_prompts()
                session.reply_layers = []
                session.volume, session.volume_files = {}, []
            else:
                session.undo()
                self.segment_prompts(session)
            return (*self.view_outputs(session), session.chat())
        except Exception as error:  # noqa: BLE001 - shown to the user as a message
            return (*self.view_outputs(session), say(session, readable_error(error, "updating the prompts")))

    def set_mode(self, mode: str, state: Session | None) -> tuple:
        """Show the click viewer for points, the box editor for boxes (refreshed with the current view)."""
        boxes = mode == "Box"
        session = self.session(state)
        _, image, editor, _ = self.view_outputs(session)
        return (gr.Image(value=image, visible=not boxes), gr.update(value=editor, visible=boxes))

    def export(self, state: Session | None) -> tuple:
        """(download files, zip first; chat) for "Download all"."""
        session = self.session(state)
        if not session.loaded:
            return None, say(session, "Load an image first: there is nothing to export yet.")
        try:
            files = export_files(session)
            return files, say(session, f"Exported masks ({'PNG and NIfTI' if session.study.is_volume else 'PNG'}), "
                                       "boxes and the conversation: all in **mimo_chat_export.zip**.")
        except Exception as error:  # noqa: BLE001 - shown to the user as a message
            return None, say(session, readable_error(error, "exporting"))

    # ------------------------------------------------------------------ chat
    def clear_chat(self, state: Session | None) -> tuple:
        """The chat's trash button: forget the conversation (history and reply masks), keep the image."""
        session = self.session(state)
        session.messages, session.turns, session.reply_layers = [], [], []
        session.volume, session.volume_files = {}, []
        return self.view_outputs(session)

    def respond(self, question: str | None, state: Session | None) -> Iterator[tuple]:
        """Stream one answer: (textbox, chat, viewer, box editor, legend, state) per update."""
        session = self.session(state)
        question = (question or "").strip()
        skip = gr.skip()
        if not question:
            yield (skip, session.chat(), skip, skip, skip, session)
            return
        session.messages.append({"role": "user", "content": question})
        if not session.loaded:
            yield ("", say(session, NEEDS_IMAGE), skip, skip, skip, session)
            return
        names = self.whole_volume_names(session, question)
        if names:
            yield from self.answer_volume(session, question, names)
            return
        say(session, "…")
        yield ("", session.chat(), skip, skip, skip, session)
        deadline = limits.Deadline()
        raw, layers = "", []
        try:
            context = session.ensure_context(self.predictor)
            session.reply_layers = layers
            events = deadline.bound(
                self.predictor.stream(context, question, history=session.history(), **session.prompt_arguments()))
            for event in events:
                if isinstance(event, TextDelta):
                    raw += event.text
                    session.set_last(highlight(strip_tags(raw), layers) or "…")
                    yield ("", session.chat(), skip, skip, skip, session)
                elif isinstance(event, MaskReady):
                    layers.append(Layer(event.phrase, color_for(event.index), event.mask, event.box, event.score,
                                        name_score=getattr(event, "name_score", None)))
                    session.set_last(highlight(strip_tags(raw), layers))
                    _, image, editor, legend = self.view_outputs(session)
                    yield ("", session.chat(), image, editor, legend, session)
                elif isinstance(event, Done):
                    reply = event.reply
                    layers = layers_from_reply(reply)
                    session.reply_layers = layers
                    session.turns.append(Turn(question, reply.raw_text, reply.text, layers,
                                              [list(b) for b in session.boxes], [list(p) for p in session.points],
                                              *session.view()))
                    shown = highlight(reply.text, layers) or "(empty answer)"
                    session.set_last(shown + sources_html(getattr(reply, "sources", None) or []))
                    _, image, editor, legend = self.view_outputs(session)
                    yield ("", session.chat(), image, editor, legend, session)
        except Exception as error:  # noqa: BLE001 - shown to the user as a message
            session.reply_layers = []
            session.set_last(readable_error(error, "answering"))
            _, image, editor, legend = self.view_outputs(session)
            yield ("", session.chat(), image, editor, legend, session)


    # ------------------------------------------------------------------ whole-volume answers
    def whole_volume_names(self, session: Session, question: str) -> list[str]:
        """The structures to measure over the whole study, or [] for a question about the slice on screen."""
        if not session.study.is_volume:
            return []  # a 2D image keeps today's reply, which says sizes need a whole study
        try:
            intent = self.predictor.reader.read(question, session.history(), prompted=session.has_prompts())
        except Exception as error:  # noqa: BLE001 - the slice answer below reports any real problem
            readable_error(error, "reading the question")
            return []
        if not asks_whole_volume(intent.intent, question):
            return []
        return measurable_names(intent.names, self.predictor.config.locator_vocabulary)

    def answer_volume(self, session: Session, question: str, names: list[str]) -> Iterator[tuple]:
        """Measure ``names`` over every slice, streaming progress: (textbox, chat, viewer, editor, legend, state)."""
        skip = gr.skip()
        if session.volume_cancel is not None:
            yield ("", say(session, "A whole-volume answer is still being measured: wait for it or press Cancel."),
                   skip, skip, skip, session)
            return
        study = session.study
        say(session, progress_text(names, 0, study.num_slices(), "Looking through the slices"))
        position = len(session.messages) - 1
        yield ("", session.chat(), skip, skip, skip, session)
        cancel = threading.Event()
        session.volume_cancel = cancel
        try:
            encodings = session.slice_encodings(self.predictor)
            work = measure(study, names, self.predictor, encodings, cancel, limits.Deadline(limits.VOLUME_PASS_SECONDS))
            result = yield from self._stream_progress(session, study, position, names, run_in_background(work, cancel))
            text = self._show_volume(session, question, result) if session.study is study else None
        except VolumeCancelled:
            text = stopped_text(names, encodings.encoded)
        except Exception as error:  # noqa: BLE001 - shown to the user as a message
            text = readable_error(error, "measuring the whole study")
        finally:
            if session.volume_cancel is cancel:
                session.volume_cancel = None
        if session.study is study:  # another study opened meanwhile has a new conversation: leave it alone
            session.set_message(position, text)
        _, image, editor, legend = self.view_outputs(session)
        yield ("", session.chat(), image, editor, legend, session)

    @staticmethod
    def _stream_progress(session: Session, study, position: int, names: list[str], updates: Iterator) -> Iterator[tuple]:
        """Write each progress call into the chat's progress line (while ``study`` is on screen); returns the
        pass's result."""
        skip = gr.skip()
        while True:
            try:
                done, total, message = next(updates)
            except StopIteration as stop:
                return stop.value
            if session.study is study:
                session.set_message(position, progress_text(names, done, total, message))
            yield ("", session.chat(), skip, skip, skip, session)

    def _show_volume(self, session: Session, question: str, result) -> str:
        """Keep the 3D masks, their NIfTI files and the turn in the session; returns the answer's chat text."""
        session.exports += 1
        files = write_niftis(result, session.study, session.grid, session.workdir / f"volume_{session.exports}")
        session.volume = {name: item for name, item in result.structures.items() if item.found}
        session.volume_files = files
        session.new_downloads = list(files)
        session.reply_layers = []  # the previous reply's masks were about one slice
        reply = volume_reply(result, load_knowledge_base())
        session.turns.append(Turn(question, reply.text, reply.text, [], [list(b) for b in session.boxes],
                                  [list(p) for p in session.points], *session.view()))
        return highlight(reply.text, self._volume_phrases(session)) + sources_html(reply.sources)

    @staticmethod
    def _volume_phrases(session: Session) -> list[Layer]:
        """A layer per measured structure, in its 3D mask's colour, for highlighting its name in the reply
        (its mask: the axial slice through the middle of the structure)."""
        layers = []
        for (name, item), color in zip(session.volume.items(), session.volume_colors().values()):
            middle = (item.slices[0] + item.slices[1]) // 2
            layers.append(Layer(name, color, item.display_mask(session.study, middle, "axial"), None, item.score))
        return layers

    def cancel_volume(self, state: Session | None) -> None:
        """The Cancel button: the running pass stops after its current slice and says so in the chat."""
        if state is not None:
            state.stop_volume()

    def volume_downloads(self, state: Session | None):
        """After an answer: the 3D masks' NIfTI files in the downloads box (unchanged when there are none)."""
        if state is None or not state.new_downloads:
            return gr.skip()
        files, state.new_downloads = [str(path) for path in state.new_downloads], []
        return files


def layers_from_reply(reply) -> list[Layer]:
    """One coloured layer per grounded phrase of a finished reply (mask may be None: "no mask")."""
    return [
        Layer(phrase.phrase, color_for(index), phrase.mask, phrase.box, phrase.score,
              name_score=getattr(phrase, "name_score", None))
        for index, phrase in enumerate(reply.phrases)
    ]
