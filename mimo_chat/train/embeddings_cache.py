"""Frozen image-encoder embeddings on disk, keyed by image hash: the one store of image embeddings.

    nice -n 10 python -m mimo_chat.train.embeddings_cache --data DIR [--preset lite] [--splits train,dev]
        [--limit N] [--dev-first 24] [--import-seg-cache DIR [--import-only]]

The image encoder never trains, so each image is encoded once:
``cache_dir()/embeddings/<fingerprint>/<hash[:2]>/<hash>.safetensors`` holds its
(C, E, E) float16 embedding (2 MB for LiteMedSAM's (256, 64, 64)). ``<hash>`` is
:func:`mimo_chat.data.conversations.image_hash` of the display image (a dataset record's
``image_hash``); ``<fingerprint>`` names the encoder (preset and seed), so embeddings of different
encoders never mix. MIMO and locator training read the dataset's images from here, and the
labelled slices of :mod:`mimo_chat.train.seg_cache` (prompt training, evaluation) keep only their
masks and this hash, so an image both use is encoded once. Writes are atomic (temporary file +
rename) and resumable: cached images are skipped. Images are visited round-robin over sources (a
few dev images first), so a partial cache still covers every source.

``--import-seg-cache`` copies the embeddings that seg-cache records written before the store was
shared hold inline (matched to the dataset's records by source, patient and slice).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mimo_chat import resources
from mimo_chat.data.conversations import STRUCTURES_SUFFIX, read_conversations, read_structures
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.modeling.sam import SamConfig, build_sam, load_lite_medsam_weights
from mimo_chat.modeling.transforms import SamTransform
from mimo_chat.runtime import keep_freed_memory


def encoder_fingerprint(config: MimoConfig) -> str:
    """Names the frozen encoder: LiteMedSAM weights are fixed; the tiny encoder depends on the seed."""
    return f"{config.sam}-{config.image_size}" + (f"-seed{config.seed}" if config.sam != "lite" else "")


class EmbeddingCache:
    """Read/write (C, E, E) embeddings by image hash under one encoder's folder."""

    def __init__(self, root: str | Path | None, config: MimoConfig) -> None:
        base = Path(root) if root else resources.cache_dir() / "embeddings"
        self.config = config
        self.folder = base / encoder_fingerprint(config)
        self._encoder: torch.nn.Module | None = None  # built on the first image to encode

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(C, E, E) embedding of the image with hash ``key`` (stored as float16)."""
        if key not in self:
            raise FileNotFoundError(f"no embedding {key} in {self.folder}")
        return load_file(str(self.path(key)))["embedding"].to(dtype)

    def save(self, key: str, embedding: torch.Tensor) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".partial")
        os.close(handle)
        save_file({"embedding": embedding.detach().to(torch.float16).contiguous()}, temporary)
        os.replace(temporary, target)

    def add(self, key: str, image: np.ndarray) -> bool:
        """Encode ``image`` ((H, W) or (H, W, 3) display pixels) under ``key`` unless it is cached;
        True when it was encoded."""
        if key in self:
            return False
        if self._encoder is None:
            self._encoder = build_encoder(self.config)
        transform = SamTransform(self.config.image_size)
        with torch.inference_mode():
            self.save(key, self._encoder.encode_image(transform.apply_image(image)[None])[0])  # (C, E, E)
        return True


def build_encoder(config: MimoConfig) -> torch.nn.Module:
    """The frozen image encoder of ``config`` (same seeding as ``MimoModel.from_config``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        sam = build_sam(SamConfig.preset(config.sam))
    if config.sam == "lite":
        load_lite_medsam_weights(sam)
    return sam.eval()


def images_in_order(data: Path, splits: Sequence[str], dev_first: int = 24,
                    originals_last: bool = False) -> list[tuple[str, str]]:
    """(image_hash, image path) pairs, de-duplicated: ``dev_first`` dev images, then round-robin by
    source, original slices before their augmented copies."""
    queues: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for split in splits:
        records = dataset_records(data, split)
        if not records:
            continue
        seen: set[str] = set()
        per_source: dict[str, list[tuple[bool, str, str]]] = {}
        for record in records:
            if record["image_hash"] not in seen:
                seen.add(record["image_hash"])
                per_source.setdefault(record["source"], []).append(
                            (("-aug" in record["slice_id"]) != originals_last, record["image_hash"], record["image"]))
        queues[split] = {source: [(key, image) for _, key, image in sorted(items, key=lambda item: item[0])]
                         for source, items in per_source.items()}
    ordered: list[tuple[str, str]] = []
    if "dev" in queues:
        ordered += _round_robin(queues["dev"])[:dev_first]
    for split in splits:
        ordered += _round_robin(queues.get(split, {}))
    unique, seen = [], set()
    for key, image in ordered:
        if key not in seen:
            seen.add(key)
            unique.append((key, image))
    return unique


def dataset_records(data: Path, split: str) -> list[dict]:
    """The conversation records and the structures records of one split (either file may be missing)."""
    records: list[dict] = []
    if (data / f"{split}.jsonl").exists():
        records += read_conversations(data / f"{split}.jsonl")
    if (data / f"{split}.{STRUCTURES_SUFFIX}").exists():
        records += read_structures(data / f"{split}.{STRUCTURES_SUFFIX}")
    return records


def _round_robin(per_source: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    lists = [items for _, items in sorted(per_source.items())]
    result = []
    for index in range(max((len(items) for items in lists), default=0)):
        result += [items[index] for items in lists if index < len(items)]
    return result


def fill_cache(data: str | Path, config: MimoConfig, splits: Sequence[str] = ("train", "dev"),
               root: str | Path | None = None, limit: int | None = None, dev_first: int = 24,
               progress: bool = True, originals_last: bool = False) -> int:
    """Encode every not-yet-cached image of the dataset at ``data``; return how many were encoded."""
    data = Path(data)
    cache = EmbeddingCache(root, config)
    todo = [(key, image) for key, image in images_in_order(data, splits, dev_first, originals_last)
            if key not in cache]
    todo = todo[:limit] if limit is not None else todo
    for key, image in tqdm(todo, desc="encoding images", disable=not progress):
        cache.add(key, np.asarray(Image.open(data / image)))
    return len(todo)


def import_seg_cache(seg_cache: str | Path, data: str | Path, config: MimoConfig, root: str | Path | None = None) -> int:
    """Copy the inline embeddings of seg-cache records written before the store was shared (same
    LiteMedSAM encoder, same display images) for the un-augmented slices of the dataset; return the count."""
    if config.sam != "lite":
        return 0
    cache = EmbeddingCache(root, config)
    keys: dict[tuple[str, str, str], str] = {}
    for split in ("train", "dev"):
        for record in dataset_records(Path(data), split):
            keys[(record["source"], record["patient"], record["slice_id"])] = record["image_hash"]
    from mimo_chat.train.seg_cache import read_record

    copied = 0
    for path in sorted(Path(seg_cache).glob("*/*.pt")):
        entry = read_record(path)
        key = keys.get((entry["source"], entry["patient"], entry["slice_id"]))
        if "embedding" in entry and key is not None and key not in cache:
            cache.save(key, entry["embedding"])
            copied += 1
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.train.embeddings_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder written by python -m mimo_chat.data.prepare")
    parser.add_argument("--preset", default="lite", help="MIMO preset whose image encoder to use (lite or tiny)")
    parser.add_argument("--splits", default="train,dev")
    parser.add_argument("--cache", default=None, help="cache root (default: cache_dir()/embeddings)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--dev-first", type=int, default=24)
    parser.add_argument("--originals-last", action="store_true", help="encode augmented copies first")
    parser.add_argument("--import-seg-cache", default=None, help="a seg_cache folder to copy embeddings from")
    parser.add_argument("--import-only", action="store_true")
    args = parser.parse_args(argv)
    keep_freed_memory()  # see mimo_chat/runtime.py
    config = MimoConfig.preset(args.preset)
    if args.import_seg_cache:
        print(f"imported {import_seg_cache(args.import_seg_cache, args.data, config, args.cache)} embeddings")
    if not args.import_only:
        count = fill_cache(args.data, config, args.splits.split(","), args.cache, args.limit, args.dev_first,
                           originals_last=args.originals_last)
        print(f"encoded {count} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
