"""The ``mimo-chat`` command: one entry point for the app, chat, evaluation, benchmarks, data and training."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "app": ("mimo_chat.app.launch", "run the Gradio app"),
    "chat": ("mimo_chat.chat", "ask one question about an image from the terminal"),
    "evaluate": ("mimo_chat.evaluate", "score a model on a benchmark directory"),
    "volume": ("mimo_chat.volume.__main__", "3D masks, volumes in mL and NIfTI for a whole CT / MR volume"),
    "bench": ("mimo_chat.bench.__main__", "speed and memory benchmarks (io, segment, chat)"),
    "make-bench": ("mimo_chat.data.make_bench", "build a benchmark in the shared schema"),
    "prepare-data": ("mimo_chat.data.prepare", "fetch registry data and build training conversations"),
    "train-locator": ("mimo_chat.train.locator", "pre-train the locator on cached image embeddings"),
    "train": ("mimo_chat.train.__main__", "train the MIMO model from a config"),
    "scanner-check": ("mimo_chat.evaluation.scanner_check", "tumour answers: shortcut baseline, matched pairs"),
    "engine-dice": ("mimo_chat.evaluation.engine_dice", "the segmentation engine's box, click and correction Dice"),
    "outline-check": ("mimo_chat.evaluation.outline_check", "is the predicted IoU a fair judge of an outline?"),
    "name-check": ("mimo_chat.evaluation.name_check", "how often a box's name is right, per modality and tier"),
    "showcase": ("mimo_chat.evaluation.showcase", "the README's before / after questions asked again on dev images"),
    "screenshot": ("mimo_chat.app.screenshot", "the README screenshot from the real app"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        print("usage: mimo-chat COMMAND [ARGS...]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<14} {help_text}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
