"""Teacher-forced validation metrics of MIMO training, computed inside the loop (cheap, no generation).

The full benchmark evaluation is ``python -m mimo_chat.evaluate``; these numbers only track
training: answer-token accuracy, mask IoU of every ``<SEG>`` against its target, and for
``observe`` records whether the yes/no answer is predicted correctly (the first word after the
first ``<SEG>``: answers are grounded first, ``<p>pancreas</p><SEG>: yes, ...``).
Records come from dev-split patients only, and metrics are also reported per source.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

IGNORE_INDEX = -100


def evaluate_batch_metrics(batch, output, tokenizer) -> list[dict]:
    """One row per record of ``batch``: source, task, token accuracy, mask IoUs, first-token correctness."""
    predicted = output.logits[:, :-1].argmax(-1)  # (B, L-1) prediction of token t+1
    targets = batch.labels[:, 1:]  # (B, L-1)
    rows = []
    for row, record in enumerate(batch.records):
        supervised = targets[row] != IGNORE_INDEX
        correct = (predicted[row] == targets[row]) & supervised
        segs = output.seg_index[output.seg_index[:, 0] == row, 1].tolist() if output.seg_index.numel() else []
        # positions in ``targets`` are shifted by one: targets[p] is token p + 1; the answer word is
        # two tokens after <SEG> (":" then " yes" / " no")
        answer = segs[0] + 1 if segs else None
        usable = answer is not None and answer < supervised.shape[0] and bool(supervised[answer])
        rows.append({"source": record["source"], "task": record["task"], "ious": [],
                     "token_accuracy": float(correct.sum() / supervised.sum().clamp(min=1)),
                     "first_token_correct": bool(correct[answer]) if usable else None})
    if output.low_res_masks is not None and output.low_res_masks.shape[0] == batch.target_masks.shape[0]:
        masks = output.low_res_masks[:, 0] > 0  # (N, S, S)
        targets_bool = batch.target_masks > 0.5
        intersection = (masks & targets_bool).flatten(1).sum(1).float()
        union = (masks | targets_bool).flatten(1).sum(1).float()
        ious = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        for (row, _), iou in zip(output.seg_index.tolist(), ious.tolist()):
            rows[row]["ious"].append(iou)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Means over all rows and per source: ``dev_mask_iou``, ``dev_token_accuracy``, ``dev_observe_accuracy``."""
    def means(selected: list[dict]) -> dict:
        ious = [iou for row in selected for iou in row["ious"]]
        observe = [row["first_token_correct"] for row in selected
                   if row["task"] == "observe" and row["first_token_correct"] is not None]
        result = {"n": len(selected), "token_accuracy": float(np.mean([r["token_accuracy"] for r in selected]))}
        if ious:
            result["mask_iou"] = float(np.mean(ious))
            result["masks"] = len(ious)
        if observe:
            result["observe_accuracy"] = float(np.mean(observe))
            result["observe_n"] = len(observe)
        return result

    if not rows:
        return {}
    by_source = defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    overall = means(rows)
    return {**{f"dev_{k}": v for k, v in overall.items()},
            "dev_by_source": {source: means(selected) for source, selected in sorted(by_source.items())}}
