"""Layout of the app and the wiring of its events: ``build_demo(predictor) -> gr.Blocks``.

The predictor is passed in (nothing is loaded at import time). Every event has an
``api_name`` so ``gradio_client`` can drive each feature; per-user data lives in
``gr.State`` objects whose delete callback removes the session's temporary folder.
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
from pathlib import Path

import gradio as gr
from gradio_image_annotation import image_annotator

from mimo_chat.app import api
from mimo_chat.app.callbacks import Callbacks
from mimo_chat.app.examples import example_names
from mimo_chat.app.render import is_observation, legend_html
from mimo_chat.app.session import cleanup_session
from mimo_chat.imaging import WINDOW_PRESETS
from mimo_chat.predictor import LITE_CHECKPOINT

MODES = ("Point +", "Point −", "Box", "Pan")
PLANES = ("axial", "coronal", "sagittal")
QUICK_ACTIONS = ("Segment the pancreas", "What is in the box?", "Is there a tumour?")
QUICK_RADIOGRAPH = ("Segment the lungs", "Where is the heart?")  # shown instead of the CT ones for X-rays
SESSION_TTL_SECONDS = 4 * 3600
DEFAULT_CONCURRENCY = 2  # one 2-core CPU: two requests at a time, the rest wait in the queue

CSS = """
#mimo-viewer img, #mimo-editor canvas { image-rendering: pixelated; }
.mimo-legend { border-collapse: collapse; width: 100%; }
.mimo-legend td, .mimo-legend th { padding: 2px 6px; text-align: left; }
.mimo-swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px; }
.mimo-nomask, .mimo-caveat { color: #888; }
.mimo-caveat a { color: inherit; }
.mimo-sources { color: #777; font-size: 0.85em; margin-top: 4px; }
#mimo-viewer img { cursor: crosshair; }
"""

# Mouse wheel over a volume moves through slices (the hidden previous/next buttons), the value under the
# pointer is sent to /hover (debounced), and Enter in the slice number box applies it (Gradio applies on blur).
VIEWER_JS = """
() => {
  if (window.mimoViewer) return;
  window.mimoViewer = true;
  let pending = 0, wheelTimer = null, hoverTimer = null;
  const volumeShown = () => { const s = document.querySelector('#mimo-slice'); return s && s.offsetParent !== null; };
  document.addEventListener('wheel', (event) => {
    if (!event.target.closest('#mimo-viewer') || !volumeShown()) return;
    event.preventDefault();
    pending += Math.sign(event.deltaY);
    if (wheelTimer) return;
    wheelTimer = setTimeout(() => {
      const id = pending > 0 ? '#mimo-slice-previous' : '#mimo-slice-next';
      const steps = Math.min(Math.abs(pending), 5);
      pending = 0; wheelTimer = null;
      const button = document.querySelector(id);
      for (let i = 0; i < steps && button; i++) button.click();
    }, 90);
  }, { passive: false });
  document.addEventListener('mousemove', (event) => {
    const img = event.target.closest('#mimo-viewer img');
    if (!img || !img.naturalWidth) return;
    const rect = img.getBoundingClientRect();
    const scale = Math.min(rect.width / img.naturalWidth, rect.height / img.naturalHeight);
    const x = (event.clientX - rect.left - (rect.width - img.naturalWidth * scale) / 2) / scale;
    const y = (event.clientY - rect.top - (rect.height - img.naturalHeight * scale) / 2) / scale;
    clearTimeout(hoverTimer);
    hoverTimer = setTimeout(() => {
      const box = document.querySelector('#mimo-hover textarea, #mimo-hover input');
      if (!box) return;
      box.value = `${x.toFixed(1)},${y.toFixed(1)}`;
      box.dispatchEvent(new Event('input', { bubbles: true }));
    }, 120);
  });
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && event.target.closest('#mimo-slice input[type=number]')) event.target.blur();
  });
}
"""

def findings_note(card: Path = LITE_CHECKPOINT / "MODEL_CARD.md") -> str:
    """Markdown for "how reliable are lesion answers": the model card's rows about lesions, verbatim."""
    lines = card.read_text().splitlines() if card.is_file() else []
    rows = [line for line in lines if line.startswith("| `") and is_observation(line.split("|")[1])]
    header = [line for line in lines if line.startswith(("| task", "| Task"))][:1]
    table = "\n".join([*(header or ["| measured | result | target |"]), "|---|---|---|", *rows]) if rows else (
        "The model card has no measured lesion accuracy for this model.")
    return ("A lesion's presence or absence is the model's **observation** on this image, not a diagnosis. "
            "Measured on patients the model never saw (from the model card, `checkpoints/mimo-lite/MODEL_CARD.md`):"
            f"\n\n{table}")


INTRO = (
    "## MIMO Chat\nOpen a study or pick an example, click a structure (or draw a box) to segment it, "
    "and ask questions: grounded phrases are highlighted in the colour of their mask. "
    "*Research demo, not for clinical use.*"
)


def _maybe_gpu(function):
    """Wrap with ``spaces.GPU`` on Hugging Face ZeroGPU Spaces; unchanged everywhere else."""
    if importlib.util.find_spec("spaces") is None:
        return function
    try:
        import spaces
    except Exception:  # noqa: BLE001 - a broken or foreign 'spaces' package: run on CPU
        return function
    return spaces.GPU(function)


def build_demo(
    predictor,
    *,
    workdir: str | Path | None = None,
    model_name: str = "",
    concurrency_limit: int = DEFAULT_CONCURRENCY,
) -> gr.Blocks:
    """The MIMO Chat app around ``predictor`` (a ``MimoPredictor``), queued, not launched.

    workdir: folder for per-session temporary folders (a new temporary folder when None);
    pass it to ``launch(allowed_paths=[workdir])`` so ``/ask``'s ``mask_png`` paths can be downloaded.
    """
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mimo_chat_app_"))
    callbacks = Callbacks(predictor, workdir, model_name)
    respond = _maybe_gpu(callbacks.respond)
    ask = _maybe_gpu(functools.partial(api.ask, callbacks))

    with gr.Blocks(title="MIMO Chat", delete_cache=(1800, 3600)) as demo:
        state = gr.State(None, time_to_live=SESSION_TTL_SECONDS, delete_callback=cleanup_session)
        api_state = gr.State(None, time_to_live=SESSION_TTL_SECONDS, delete_callback=cleanup_session)
        gr.Markdown(INTRO + (f"\n\nModel: **{model_name}**" if model_name else ""))
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Row():
                    upload = gr.File(label="Open a study: PNG, JPEG, DICOM file, zipped DICOM series, NIfTI",
                                     file_count="single", height=110, elem_id="mimo-upload")
                    example = gr.Dropdown(example_names(), value=None, label="…or an example study",
                                          elem_id="mimo-example")
                mode = gr.Radio(list(MODES), value=MODES[0], elem_id="mimo-mode",
                                label="Tool: click to add a point, draw a box, or Pan (click where to centre a zoomed view)")
                viewer = gr.Image(type="numpy", format="png", interactive=False, height=620, show_label=False,
                                  elem_id="mimo-viewer", placeholder="Open a study to start")
                editor = image_annotator(None, label_list=["box"], label_colors=[(255, 225, 25)],
                                         disable_edit_boxes=True, use_default_label=True, image_type="numpy",
                                         sources=None, show_clear_button=False, show_download_button=False,
                                         height=620, visible=False, show_label=False, elem_id="mimo-editor")
                with gr.Row():
                    undo = gr.Button("Undo prompt", size="sm", elem_id="mimo-undo")
                    clear = gr.Button("Clear prompts and masks", size="sm", elem_id="mimo-clear")
                    zoom_in = gr.Button("Zoom +", size="sm", elem_id="mimo-zoom-in")
                    zoom_out = gr.Button("Zoom −", size="sm", elem_id="mimo-zoom-out")
                    zoom_fit = gr.Button("Whole image", size="sm", elem_id="mimo-zoom-fit")
                hover_value = gr.Markdown(elem_id="mimo-hover-value")
                with gr.Row():
                    plane = gr.Radio(list(PLANES), value="axial", label="Plane", visible=False)
                    slider = gr.Slider(0, 1, value=0, step=1, label="Slice", visible=False, elem_id="mimo-slice")
                with gr.Row():
                    window = gr.Dropdown(["auto", *WINDOW_PRESETS, "custom"], value="auto", label="Window (CT)")
                    width = gr.Number(label="Width", value=None)
                    level = gr.Number(label="Level")
                info = gr.Markdown(elem_id="mimo-info")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(height=500, show_label=False, elem_id="mimo-chat", group_consecutive_messages=False,
                                     placeholder="Answers appear here, with grounded phrases in their mask colour.")
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the image…", show_label=False, scale=5,
                                          elem_id="mimo-question", submit_btn=False)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="mimo-send")
                    cancel = gr.Button("Cancel", variant="stop", scale=1, min_width=80, visible=False,
                                       elem_id="mimo-cancel")  # stops a whole-volume answer
                with gr.Row() as quick_ct:
                    quick = [gr.Button(text, size="sm") for text in QUICK_ACTIONS]
                with gr.Row(visible=False) as quick_xray:
                    quick += [gr.Button(text, size="sm") for text in QUICK_RADIOGRAPH]
                legend = gr.HTML(legend_html([]), elem_id="mimo-legend")
                with gr.Accordion("How reliable are lesion answers? (model card)", open=False, elem_id="mimo-findings"):
                    gr.Markdown(findings_note())
                export = gr.Button("Download all (masks PNG/NIfTI, boxes, conversation) as one zip", size="sm",
                                   elem_id="mimo-export")
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False)

        # API-only inputs and outputs (hidden): one-call /ask, points and boxes by coordinates.
        with gr.Column(visible=False):
            api_file = gr.File(label="image")
            api_question = gr.Textbox(label="question")
            api_boxes = gr.Textbox(label="boxes JSON [[x0, y0, x1, y1], ...]", value="[]")
            api_points = gr.Textbox(label="points JSON [[x, y, label], ...]", value="[]")
            api_reply = gr.Textbox(label="reply")
            api_phrases = gr.Textbox(label="phrases JSON")
            api_overlay = gr.Image(type="numpy", format="png", label="overlay")
            api_x = gr.Number(label="x")
            api_y = gr.Number(label="y")
            api_positive = gr.Checkbox(value=True, label="positive")
            api_ask = gr.Button("ask")
            api_point = gr.Button("add point")
            api_box = gr.Button("set boxes")
        # in the page but hidden: the viewer script clicks / fills them (mouse wheel, value under the pointer)
        slice_previous = gr.Button("previous slice", elem_id="mimo-slice-previous", visible="hidden")
        slice_next = gr.Button("next slice", elem_id="mimo-slice-next", visible="hidden")
        hover = gr.Textbox(elem_id="mimo-hover", label="pointer x,y (screen pixels)", visible="hidden")

        demo.load(callbacks.start, None, state, api_name="start_session")
        demo.load(None, js=VIEWER_JS)
        demo.unload(callbacks.end)
        view = [state, viewer, editor, legend]
        loaded = [*view, plane, slider, window, width, level, info, upload, chatbot]
        answer = [question, chatbot, viewer, editor, legend, state]

        upload.upload(callbacks.load_upload, [upload, state], loaded, api_name="load_study").then(
            callbacks.quick_rows, state, [quick_ct, quick_xray, cancel], api_visibility="private").then(
            callbacks.prepare, state, state, api_name="prepare_upload", show_progress="hidden")
        example.select(callbacks.load_example, [example, state], loaded, api_name="load_example").then(
            callbacks.quick_rows, state, [quick_ct, quick_xray, cancel], api_visibility="private").then(
            callbacks.prepare, state, state, api_name="prepare_example", show_progress="hidden")
        view_inputs = [plane, slider, window, width, level, state]
        view_outputs = [*view, slider, width, level, chatbot]
        plane.input(callbacks.change_view, view_inputs, view_outputs, api_name="set_plane")
        slider.release(callbacks.change_view, view_inputs, view_outputs, api_name="set_slice").then(
            callbacks.prepare, state, state, api_name="prepare_slice", show_progress="hidden")
        step_outputs = [*view, slider, chatbot]
        slice_previous.click(functools.partial(callbacks.step, -1), state, step_outputs, api_name="previous_slice",
                             show_progress="hidden", trigger_mode="always_last")
        slice_next.click(functools.partial(callbacks.step, 1), state, step_outputs, api_name="next_slice",
                         show_progress="hidden", trigger_mode="always_last")
        hover.change(callbacks.hover, [hover, state], hover_value, api_name="value_at", show_progress="hidden",
                    trigger_mode="always_last", concurrency_limit=None)
        for button, factor in ((zoom_in, 2.0), (zoom_out, 0.5), (zoom_fit, 0.0)):
            button.click(functools.partial(callbacks.zoom, factor), state, view,
                         api_name={2.0: "zoom_in", 0.5: "zoom_out", 0.0: "zoom_whole"}[factor])
        window.input(callbacks.change_view, view_inputs, view_outputs, api_name="set_window")
        gr.on([width.submit, level.submit], callbacks.change_view, view_inputs, view_outputs, api_name="set_custom_window")

        mode.change(callbacks.set_mode, [mode, state], [viewer, editor], api_name="set_mode")
        viewer.select(callbacks.click, [mode, state], [*view, chatbot], api_name="click",
                      api_visibility="undocumented")  # needs a browser click; /add_point is the API twin
        editor.change(callbacks.boxes_from_editor, [editor, state], [*view, chatbot], api_name="draw_boxes",
                      show_progress="hidden")
        api_point.click(callbacks.add_point, [api_x, api_y, api_positive, state], [*view, chatbot],
                        api_name="add_point")
        api_box.click(callbacks.set_boxes, [api_boxes, state], [*view, chatbot], api_name="set_boxes")
        undo.click(callbacks.undo, state, [*view, chatbot], api_name="undo")
        clear.click(callbacks.clear, state, [*view, chatbot], api_name="clear")

        # a whole-volume answer names its NIfTI files in the downloads box once it is done
        gr.on([question.submit, send.click], respond, [question, state], answer, api_name="chat").then(
            callbacks.volume_downloads, state, downloads, api_visibility="private", show_progress="hidden")
        for text, button in zip(QUICK_ACTIONS + QUICK_RADIOGRAPH, quick):
            name = "quick_" + "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
            button.click(functools.partial(respond, text), state, answer, api_name=name)
        # not queued behind the answer it stops: it only sets the pass's threading.Event
        cancel.click(callbacks.cancel_volume, state, None, api_name="cancel_volume", concurrency_limit=None,
                     show_progress="hidden")
        chatbot.clear(callbacks.clear_chat, state, view, api_name="clear_chat")
        export.click(callbacks.export, state, [downloads, chatbot], api_name="export")
        api_ask.click(ask, [api_file, api_question, api_boxes, api_points, api_state],
                      [api_reply, api_phrases, api_overlay, api_state], api_name="ask")

    demo.queue(default_concurrency_limit=concurrency_limit, max_size=64)
    return demo
