"""``python -m mimo_chat.volume INPUT --structures liver,spleen --out DIR [--json]``: 3D masks, volumes, NIfTI.

INPUT is anything ``load_study`` opens as a volume (NIfTI, NRRD, a DICOM series folder or .zip).
Each found structure is written to ``DIR/<structure>.nii.gz`` on the input's grid; ``--json``
prints one object: ``{"structures": {name: {"nifti", "volume_ml", "slices", "extent_mm", "score"}},
"seconds", "slices_total"}`` (a structure not found has ``"nifti": null, "volume_ml": 0``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mimo_chat.imaging import ImageLoadError, load_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.volume", description=__doc__.splitlines()[0])
    parser.add_argument("input", help="NIfTI / NRRD volume, DICOM series folder or .zip")
    parser.add_argument("--structures", required=True, help="comma-separated names, e.g. liver,spleen,kidneys")
    parser.add_argument("--out", type=Path, required=True, help="folder for <structure>.nii.gz")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--model", default="lite", help="lite | a folder written by save_pretrained")
    parser.add_argument("--window", default=None, help="window preset (abdomen, ...), 'auto' or W,L (default: the study's)")
    parser.add_argument("--no-walk", action="store_true",
                        help="the 2D answer: the locator's mask on each slice, no slice-to-slice propagation")
    parser.add_argument("--device", default="cpu")
    return parser


def _window(value: str | None):
    if value is None or "," not in value:
        return value
    width, level = (float(part) for part in value.split(","))
    return width, level


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from mimo_chat.predictor import MimoPredictor
    from mimo_chat.runtime import keep_freed_memory
    from mimo_chat.volume import SliceEncodings, save_niftis, segment_volume, source_grid

    args = build_parser().parse_args(argv)
    structures = [name.strip() for name in args.structures.split(",") if name.strip()]
    try:
        study = load_study(args.input)
        if not study.is_volume:
            raise ImageLoadError("This is a 2D image; a whole-volume answer needs a NIfTI, NRRD or DICOM series.")
    except (ImageLoadError, ValueError) as error:
        print(f"Cannot open {args.input}: {error}", file=sys.stderr)
        return 2
    keep_freed_memory()
    predictor = MimoPredictor.from_pretrained(args.model, device=args.device)
    for note in [*study.notes, *predictor.notes]:
        print(f"note: {note}", file=sys.stderr)
    encodings = SliceEncodings(study, predictor.encode, window=_window(args.window))
    with tqdm(total=len(encodings), desc="slices", unit="slice", file=sys.stderr) as bar:
        def progress(done: int, total: int, message: str) -> None:
            bar.set_description(message)
            bar.n = done
            bar.refresh()

        try:
            result = segment_volume(study, structures, predictor, encodings=encodings, walk=not args.no_walk,
                                    progress=progress)
        except ValueError as error:
            print(f"Cannot answer: {error}", file=sys.stderr)
            return 2
    save_niftis(result, study, args.out, source_grid(args.input, study))
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    for name, item in result.structures.items():
        if item.found:
            print(f"{name}: {item.volume_ml:.1f} mL, slices {item.slices[0]}-{item.slices[1]}, "
                  f"extent {' x '.join(f'{v:.0f}' for v in item.extent_mm)} mm, score {item.score:.2f} -> {item.nifti}")
        else:
            print(f"{name}: not found (best presence {item.score:.2f})")
    print(f"{result.slices_total} slices in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
