"""The segmenter's prompt fine-tune: LiteMedSAM's point embeddings + mask decoder on cached real embeddings.

    nice -n 10 python -m mimo_chat.train.segmenter_prompts [--steps 1500] [--batch 8] [--out checkpoints/segmenter]
        [--run DIR] [--eval-every N] [--eval-slices 24] [--max-minutes M]

The TinyViT encoder stays frozen; its embeddings come with the labelled slices of
:mod:`mimo_chat.train.seg_cache` (train split only). Each training example is one structure on
one slice, prompted by

- a box (tight box, sides jittered): loss on the ground truth plus distillation toward the
  unmodified LiteMedSAM decoder, so box quality is kept;
- a box with clicks (the box loosened by up to 20 model pixels a side): a negative click inside
  the box off the target (on a neighbouring structure first) and/or a positive click inside it,
  the correction a user makes to a leaking box and the prompt of the engine's click refinement;
- clicks: one positive click inside the structure (its deepest point or a random interior
  pixel); in 40 % of the examples also a second positive click and/or a negative click on a
  neighbouring structure or the ring around the target (what a leaking mask would cover).

With ``--located`` the same training makes MIMO's grounding decoder instead: the mask decoder
alone (from ``--init``, e.g. the installed engine's weights), every row prompted by a box as the
locator's heatmap gives it for a named structure (:func:`~mimo_chat.train.prompt_sampling.located_box`:
sides moved in or out by a share of the structure's extent), no distillation. MIMO decodes the
locator's boxes with it (``MimoConfig.grounding_checkpoint``); a user's boxes and clicks keep the
engine's decoder.

Forward passes run under bf16 autocast on the CPU; master weights stay fp32.

Loss: BCE + Dice on the (256 x 256) low-res logits, MSE on the predicted IoU. :class:`SegmenterPromptTask`
is this training for :class:`mimo_chat.train.trainer.Trainer`: ``--run`` is its run folder
(``last/``, ``log.jsonl``; resumable); validation is the engine's box and click Dice on the first
``--eval-slices`` dev slices (:mod:`mimo_chat.evaluation.engine_dice`); the export is the trained
tensors only (``model.safetensors``, fp16) with ``config.json`` in ``--out``, every ``--save-every``
steps and at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from mimo_chat import resources
from mimo_chat.modeling.sam import LiteMedSam, SamConfig, build_sam, load_lite_medsam_weights, load_prompt_weights
from mimo_chat.modeling.transforms import SamTransform
from mimo_chat.segmentation import CHECKPOINT_DIR
from mimo_chat.train.prompt_sampling import Examples, PromptBatch, sample_prompts
from mimo_chat.train.seg_cache import count, default_cache, embedding_store, load_cache
from mimo_chat.train.trainer import Trainer, TrainingTask, TrainSettings, add_run_arguments


def trainable_parameters(model: LiteMedSam, located: bool = False) -> dict[str, torch.nn.Parameter]:
    """Point embeddings (negative, positive, padding) and the whole mask decoder; the decoder alone
    for the grounding decoder (``located``: box prompts only, so the point embeddings stay as they are)."""
    encoder = model.prompt_encoder
    chosen = {} if located else {
        "prompt_encoder.point_embeddings.0.weight": encoder.point_embeddings[0].weight,
        "prompt_encoder.point_embeddings.1.weight": encoder.point_embeddings[1].weight,
        "prompt_encoder.not_a_point_embed.weight": encoder.not_a_point_embed.weight,
    }
    for name, parameter in model.mask_decoder.named_parameters():
        chosen[f"mask_decoder.{name}"] = parameter
    return chosen


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


def prompt_loss(model: LiteMedSam, teacher: LiteMedSam, batch: PromptBatch, kd_weight: float = 1.0) -> dict:
    """Segmentation loss of every prompt group, IoU-head MSE, and distillation (weighted ``kd_weight``)
    of the box-only rows toward ``teacher``."""
    crop = batch.crop
    full_pe = model.prompt_encoder.get_dense_pe()[0]  # (C, E, E)
    pe_t = torch.stack([full_pe[:, row:row + crop, col:col + crop] for row, col in batch.windows])  # (B, C, crop, crop)
    logits_all, iou_all, kd_terms = [], [], []

    def run(network: LiteMedSam, rows: list[int], **prompts) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = network.embed_prompts(**prompts)
        dense = dense[..., : crop, : crop] if dense.shape[-1] != crop else dense
        return network.decode(batch.embeddings[rows], sparse, dense, image_pe=pe_t[rows])

    for group in batch.groups:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, iou = run(model, group.rows, boxes=group.boxes, points=group.clicks)
            if group.distilled:  # LiteMedSAM was trained on boxes: keep its box masks
                with torch.no_grad():
                    teacher_logits, _ = run(teacher, group.rows, boxes=group.boxes)
        if group.distilled:
            kd_terms.append(F.binary_cross_entropy_with_logits(logits.float(), torch.sigmoid(teacher_logits.float())))
        logits_all.append(logits.float())
        iou_all.append(iou.float())
    logits, iou = torch.cat(logits_all), torch.cat(iou_all)
    targets = batch.targets[[row for group in batch.groups for row in group.rows]]
    seg = segmentation_loss(logits, targets)
    iou_loss = F.mse_loss(iou[:, 0], batch_iou(logits.detach(), targets))
    kd = torch.stack(kd_terms).mean() if kd_terms else torch.zeros(())
    return {"loss": seg + iou_loss + kd_weight * kd, "seg": seg.item(), "iou": iou_loss.item(), "kd": kd.item()}


def save_weights(model: LiteMedSam, out: Path, step: int, notes: dict, located: bool = False) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().half().contiguous() for name, p in trainable_parameters(model, located).items()}
    save_file(tensors, str(out / "model.safetensors"))
    trained = "mask decoder on the locator's boxes (grounding decoder)" if located else "point embeddings + mask decoder"
    config = {"sam": model.config.to_dict(), "trained": trained, "step": step, **notes}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")


class SegmenterPromptTask(TrainingTask):
    """LiteMedSAM's prompt side against its frozen copy (the teacher), on the seg cache's train slices."""

    name = "segmenter prompts"

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        torch.set_num_threads(options.threads)  # first: the thread count is part of the numerics
        self.crops = [int(value) for value in options.crops.split(",")]
        self.teacher = load_lite_medsam_weights(build_sam(SamConfig.lite())).eval()
        self.teacher.image_encoder = torch.nn.Identity()  # embeddings are cached; drop the encoder
        self.model = copy.deepcopy(self.teacher).train()
        if options.init is not None:
            load_prompt_weights(self.model, options.init)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.parameters = trainable_parameters(self.model, options.located)
        for parameter in self.parameters.values():
            parameter.requires_grad_(True)
        self.folder = options.cache or default_cache()
        self.store = embedding_store(options.embeddings)
        self.examples = self.read_examples()
        self.dev: list[dict] | None = None  # read at the first validation
        self.rng = random.Random(options.seed)

    def read_examples(self) -> Examples:
        return Examples(load_cache(self.folder / "train", self.store), SamTransform(self.model.config.image_size))

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """Point embeddings at 20 times the decoder's rate."""
        embeddings = [p for name, p in self.parameters.items() if name.startswith("prompt_encoder.")]
        decoder = [p for name, p in self.parameters.items() if name.startswith("mask_decoder.")]
        groups = [{"params": embeddings, "lr": self.options.lr * 20}] if embeddings else []
        groups.append({"params": decoder, "lr": self.options.lr})
        return torch.optim.AdamW(groups, weight_decay=0.0)

    def learning_rate(self, base: float, step: int) -> float:
        return base * min(1.0, (step + 1) / 50)  # warm-up

    def next_batch(self, step: int, micro: int) -> PromptBatch:
        crop = self.rng.choice(self.crops)
        config = self.model.config
        grid = config.image_embedding_size
        return sample_prompts(self.examples, self.options.batch, self.rng, crop, grid, config.low_res_size // grid,
                              located=self.options.located)

    def loss(self, model: torch.nn.Module, batch: PromptBatch) -> dict:
        return prompt_loss(self.model, self.teacher, batch, self.options.kd_weight)

    def validate(self, model: torch.nn.Module) -> dict:
        """Box and click Dice of the engine with these weights on the first ``eval_slices`` dev slices."""
        from mimo_chat.evaluation.engine_dice import evaluate
        from mimo_chat.segmentation import SegmentationPredictor

        if self.dev is None:
            self.dev = load_cache(self.folder / "dev", self.store, limit=self.options.eval_slices) if self.options.eval_slices else []
        if not self.dev:
            return {}
        scores = evaluate(SegmentationPredictor(self.model), self.dev)
        return {f"dev_{kind}_dice": scores[kind]["dice"] for kind in ("box", "click") if kind in scores}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach() for name, parameter in self.parameters.items()}

    def load_trainable_state(self, path: Path) -> None:
        state = load_file(str(path))
        if set(state) != set(self.parameters):
            raise ValueError(f"{path} does not hold this fine-tune's tensors: {sorted(set(state) ^ set(self.parameters))[:5]}")
        self.model.load_state_dict(state, strict=False)

    def export(self, step: int, metrics: dict) -> None:
        prompts = ("the locator's boxes, simulated (prompt_sampling.located_box)" if self.options.located
                   else "a box, a loose box with clicks, or clicks")
        notes = {"lr": self.options.lr, "batch": self.options.batch,
                 "kd_weight": None if self.options.located else self.options.kd_weight,  # located rows are not distilled
                 "init": str(self.options.init) if self.options.init else "LiteMedSAM",
                 "train_structures": self.describe()["structures"],
                 "data": f"train split of the seg cache {self.folder.name}/ ({len(self.examples.records)} slices), "
                         "sampled by mimo_chat.data.sources.SOURCE_WEIGHTS; frozen TinyViT embeddings; "
                         f"rows prompted by {prompts}"}
        notes |= {"dev": metrics} if metrics else {}
        save_weights(self.model, self.options.out, step, notes, self.options.located)

    def refresh_data(self) -> None:
        """Re-read the train slices when the seg cache has grown since they were read."""
        if count(self.folder / "train") != len(self.examples.records):
            self.examples = self.read_examples()
            tqdm.write(str({source: len(items) for source, items in self.examples.items.items()}))

    def describe(self) -> dict:
        return {"structures": {source: len(items) for source, items in self.examples.items.items()}}


def settings_of(options: argparse.Namespace, progress: bool = True) -> TrainSettings:
    """Export and checkpoint together every ``save_every`` steps; bf16 autocast keeps it on the CPU."""
    run = options.run or resources.cache_dir() / "runs" / "segmenter-prompts"
    return TrainSettings(output=run, total_steps=options.steps, max_minutes=options.max_minutes, max_grad_norm=1.0,
                         log_every=20, eval_every=options.eval_every, export_every=options.save_every,
                         checkpoint_every=options.save_every, progress=progress, cpu=True)


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    Trainer(SegmenterPromptTask(options), settings_of(options)).run()


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.train.segmenter_prompts",
                                     description=__doc__.splitlines()[0])
    add_run_arguments(parser, threads=1)
    parser.add_argument("--cache", type=Path, default=None, help="seg cache folder (default: cache_dir()/seg_cache)")
    parser.add_argument("--embeddings", type=Path, default=None, help="embedding store root (default: cache_dir()/embeddings)")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="where the trained prompt weights go")
    parser.add_argument("--run", type=Path, default=None,
                        help="run folder, resumed when it has last/ (default: cache_dir()/runs/segmenter-prompts)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5, help="decoder lr; point embeddings get 20x")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=0, help="steps between dev validations (0: at the end)")
    parser.add_argument("--eval-slices", type=int, default=24, help="dev slices per validation (0: none)")
    parser.add_argument("--kd-weight", type=float, default=1.0,
                        help="weight of the box-only rows' distillation toward the unmodified LiteMedSAM decoder")
    parser.add_argument("--located", action="store_true",
                        help="train MIMO's grounding decoder: the mask decoder alone, every row prompted by a box "
                             "as the locator's heatmap gives it (no distillation); export it with --out checkpoints/grounding")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these prompt weights (e.g. checkpoints/segmenter) instead of LiteMedSAM's")
    parser.add_argument("--crops", default="32,64",
                        help="embedding-grid crop sizes (cells per side), one picked at random per step; 64 = full")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
