"""``python -m mimo_chat.chat IMAGE "question"``: ask one grounded question from the terminal.

    python -m mimo_chat.chat ct.nii.gz "Segment the pancreas." --slice 40 --window abdomen --out masks/
    python -m mimo_chat.chat slice.png "What is the structure in the box?" --box 100 120 180 200

The reply streams to stdout; each grounded mask is written as ``<n>_<phrase>.png`` (and, for a
volume, ``<n>_<phrase>.nii.gz`` aligned to the source volume). Phrases without a mask are listed as
"no mask". Boxes and points are pixels of the displayed 2D slice.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mimo_chat.grounding import describe_phrase
from mimo_chat.imaging import ImageLoadError, load_study, save_mask_nifti
from mimo_chat.predictor import QUANTIZE_CHOICES, Done, MaskReady, MimoPredictor, TextDelta, default_quantization


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.chat", description=__doc__.splitlines()[0])
    parser.add_argument("image", help="PNG/JPEG/DICOM file or series folder, NIfTI, NRRD")
    parser.add_argument("question")
    parser.add_argument("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"))
    parser.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), help="foreground click")
    parser.add_argument("--negative-point", nargs=2, type=float, action="append", metavar=("X", "Y"))
    parser.add_argument("--model", default="lite", help="lite | tiny | a folder written by save_pretrained")
    parser.add_argument("--out", type=Path, default=None, help="folder for the mask files")
    parser.add_argument("--slice", type=int, default=None, help="slice index of a volume (default: middle)")
    parser.add_argument("--plane", default="axial", choices=["axial", "coronal", "sagittal"])
    parser.add_argument("--window", default=None, help="window preset (abdomen, lung, ...), 'auto' or W,L")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--prefix", default=None, help='force the start of the reply, e.g. "<p>liver</p><SEG>"')
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto",
                        help="language-model precision: auto = int8 weights on a CPU, float32 on a GPU")
    parser.add_argument("--device", default="cpu")
    return parser


def _window(value: str | None):
    if value is None or "," not in value:
        return value
    width, level = (float(part) for part in value.split(","))
    return width, level


def _file_stem(index: int, phrase: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_") or "mask"
    return f"{index:02d}_{name}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        study = load_study(args.image)
        image = study.display(args.slice, args.plane, _window(args.window))  # (H, W, 3) uint8
    except (ImageLoadError, FileNotFoundError, ValueError) as error:
        print(f"Cannot open {args.image}: {error}", file=sys.stderr)
        return 2
    points = [*(args.point or []), *(args.negative_point or [])]
    labels = [1] * len(args.point or []) + [0] * len(args.negative_point or [])
    quantize = default_quantization(args.quantize, args.model, args.device)
    predictor = MimoPredictor.from_pretrained(args.model, device=args.device, quantize=quantize)
    for note in [*study.notes, *predictor.notes]:
        print(f"note: {note}", file=sys.stderr)
    context = predictor.encode(image)
    reply = None
    try:
        for event in predictor.stream(
            context,
            args.question,
            boxes=args.box,
            points=points or None,
            point_labels=labels or None,
            max_new_tokens=args.max_new_tokens,
            reply_prefix=args.prefix,
        ):
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
            elif isinstance(event, MaskReady):
                print(f" [mask {event.index}: {event.phrase or '(unnamed)'}]", end="", flush=True)
            elif isinstance(event, Done):
                reply = event.reply
    except ValueError as error:
        print(f"\nCannot answer: {error}", file=sys.stderr)
        return 2
    print()
    for phrase in reply.phrases:
        print(f"  - {describe_phrase(phrase)}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for index, phrase in enumerate(reply.phrases):
            if phrase.mask is None:
                continue
            stem = args.out / _file_stem(index, phrase.phrase)
            Image.fromarray(phrase.mask.astype(np.uint8) * 255).save(stem.with_suffix(".png"))
            written = [stem.with_suffix(".png")]
            if study.is_volume:
                written.append(save_mask_nifti(study, phrase.mask, args.slice, args.plane, f"{stem}.nii.gz"))
            print(f"  wrote {', '.join(str(path) for path in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
