"""How often is the name given to a box right, per modality and per how sure the namer is? (dev patients)

    python -m mimo_chat.evaluation.name_check --bench DIR [--checkpoint DIR] [--limit N]

For every ``box_name`` row of a benchmark (``python -m mimo_chat.data.make_bench``), the box is
segmented by the engine and its mask named as the chat does (``MimoPredictor.evidence``: the
best-fitting vocabulary name allowed on that kind of image and its fit). Printed per modality and
tier -- sure (fit >= ``SURE_NAME``), guess (``MIN_NAME`` <= fit < ``SURE_NAME``: "This looks like
the ..., but I am not sure"), none -- how many rows fall in it and how often the best name is the
target. This is the check behind ``mimo_chat.evidence.policy.GUESSES_WITHHELD``: a modality whose
guesses are mostly wrong gets no guesses.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from mimo_chat.evidence.policy import MIN_NAME, SURE_NAME

TIERS = ("sure", "guess", "none")


def tier_of(fit: float) -> str:
    return "sure" if fit >= SURE_NAME else "guess" if fit >= MIN_NAME else "none"


def named_boxes(predictor, bench: Path, rows: Sequence[dict]) -> list[tuple[str, str, float, bool]]:
    """(modality, tier, fit, best name is the target) of every ``box_name`` row."""
    from mimo_chat.data.names import same_structure
    from mimo_chat.evaluation.runner import load_image

    results = []
    for row in tqdm(rows, desc="boxes named", unit="row"):
        ctx = predictor.encode(load_image(bench, row["image"]))
        prompted = predictor.segment(ctx, boxes=[list(map(float, row["prompt"]["box"]))])
        named = predictor.evidence(ctx, prompted, None).prompted[0]
        right = named.best is not None and same_structure(named.best, row["target_name"])
        results.append((row["modality"], tier_of(named.name_score), named.name_score, right))
    return results


def report(results: Sequence[tuple[str, str, float, bool]]) -> str:
    cells: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for modality, tier, _, right in results:
        cells[(modality, tier)].append(right)
    lines = [f"{len(results)} boxes named; best name right, per modality and tier (rows)",
             "modality   " + "".join(f"{tier:>16}" for tier in TIERS)]
    for modality in sorted({key[0] for key in cells}):
        row = "".join(
            f"{sum(cells[(modality, tier)]) / len(cells[(modality, tier)]):>11.2f} ({len(cells[(modality, tier)]):>2})"
            if cells[(modality, tier)] else f"{'-':>16}" for tier in TIERS)
        lines.append(f"{modality:<11}{row}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.evaluation.name_check", description=__doc__.split("\n")[0])
    parser.add_argument("--bench", required=True, type=Path, help="benchmark folder with box_name rows")
    parser.add_argument("--checkpoint", default="lite", help="model folder (default: the embedded lite model)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many rows, spread over the manifest")
    args = parser.parse_args(argv)
    import torch

    from mimo_chat.evaluation.runner import load_manifest
    from mimo_chat.predictor import MimoPredictor, default_quantization

    rows = load_manifest(args.bench, tasks=["box_name"], limit=args.limit)
    if not rows:
        parser.error(f"no box_name rows in {args.bench}")
    predictor = MimoPredictor.from_pretrained(args.checkpoint, quantize=default_quantization("auto", args.checkpoint, "cpu"))
    with torch.inference_mode():
        print(report(named_boxes(predictor, args.bench, rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
