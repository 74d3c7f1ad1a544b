"""Does the tumour answer follow the tissue or the scanner? Checks on ``pancreas_tc`` dev crops.

    python -m mimo_chat.evaluation.scanner_check [--checkpoint lite] [--limit 160] [--out tc_check.json]

The two tumour classes of ``../shared/data/pancreas_tc`` come from two collections (MSD Task07
= tumour, NIH Pancreas-CT = no tumour), so crop size and intensity alone separate them fairly
well. Three checks, all on dev-split volumes (patients never trained on):

1. **A shortcut baseline**: logistic regression on nothing but crop height, width and a
   16-bin intensity histogram, fitted on the train-split crops. Its dev F1 is the bar to beat.
2. **Matched pairs**: each tumour crop is paired with the unused no-tumour crop closest in
   height, width, mean and standard deviation of intensity (normalised distance below
   ``--match``); on those pairs the shortcut is near chance. Reported: how often the tumour crop
   of a pair scores higher, for the model and for the baseline.
3. **Re-windowing**: the crops are abdomen-window (−150…250 HU) 8-bit images; re-mapped to a
   narrower window (−100…200 HU), the tissue stays and the intensity histogram moves. Reported:
   accuracy before and after, for both, and how many model answers flip.

The model's score is the locator's presence logit for the phrase ``tumour`` — exactly what the
language model is told at the ``<SEG>`` of "<p>tumour</p><SEG>: yes / no". The heatmap peak is
also reported: the share of peaks in the crop's central region (the pancreas; crops are centred
on it) against its border (where scanner table, field of view and padding differ).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mimo_chat.data.sources import iter_pancreas_tc
from mimo_chat.evaluation.metrics import binary_classification
from mimo_chat.evaluation.report import print_json

WINDOW = (-150.0, 250.0)  # the crops' window (../shared/data/README.md)
NARROW = (-100.0, 200.0)


def rewindow(gray: np.ndarray, window: tuple[float, float] = NARROW) -> np.ndarray:
    """8-bit abdomen-window image -> the same HU shown in ``window``."""
    hu = WINDOW[0] + gray.astype(np.float32) / 255.0 * (WINDOW[1] - WINDOW[0])
    return np.clip((hu - window[0]) / (window[1] - window[0]) * 255.0, 0, 255).astype(np.uint8)


def shortcut_features(gray: np.ndarray) -> np.ndarray:
    """Crop height, width (scaled) and a 16-bin intensity histogram."""
    histogram = np.histogram(gray, bins=16, range=(0, 256))[0] / gray.size
    return np.concatenate([[gray.shape[0] / 100.0, gray.shape[1] / 100.0], histogram])


def fit_logistic(features: np.ndarray, labels: np.ndarray, steps: int = 2000) -> tuple[np.ndarray, np.ndarray, torch.nn.Linear]:
    """Standardised logistic regression (LBFGS); returns mean, std and the fitted layer."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = torch.tensor((features - mean) / std, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    layer = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=steps)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(layer(x)[:, 0], y) + 1e-3 * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, std, layer


def logistic_scores(model, features: np.ndarray) -> np.ndarray:
    mean, std, layer = model
    with torch.no_grad():
        return layer(torch.tensor((features - mean) / std, dtype=torch.float32))[:, 0].numpy()


def f1(scores: np.ndarray, labels: np.ndarray) -> dict:
    """accuracy, precision, recall and F1 of ``scores > 0`` against 0/1 ``labels`` (tumour = positive)."""
    return binary_classification((scores > 0).tolist(), (labels == 1).tolist())


def matched_pairs(stats: np.ndarray, labels: np.ndarray, limit: float) -> list[tuple[int, int]]:
    """Greedy pairs (tumour index, no-tumour index) by normalised distance of (h, w, mean, std)."""
    z = (stats - stats.mean(0)) / (stats.std(0) + 1e-6)
    negatives = set(np.flatnonzero(labels == 0).tolist())
    pairs = []
    for index in np.flatnonzero(labels == 1):
        if not negatives:
            break
        candidates = np.array(sorted(negatives))
        distance = np.linalg.norm(z[candidates] - z[index], axis=1)
        best = int(np.argmin(distance))
        if distance[best] <= limit:
            pairs.append((int(index), int(candidates[best])))
            negatives.discard(int(candidates[best]))
    return pairs


class TumourScorer:
    """The locator's presence logit for "tumour" and its heatmap peak, from a MIMO predictor."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        model = predictor.model
        ids = predictor.processor.tokenizer("tumour", add_special_tokens=False).input_ids
        self.phrase = model.phrase_embeddings([ids])

    @torch.inference_mode()
    def __call__(self, gray: np.ndarray) -> tuple[float, tuple[float, float]]:
        """(presence logit, peak (x, y) as fractions of the crop's width and height)."""
        model = self.predictor.model
        context = self.predictor.encode(np.repeat(gray[..., None], 3, axis=2))
        features = model.locator.image_features(context.image.embedding)
        heatmap = model.locator(features, torch.zeros(1, dtype=torch.long), self.phrase)[0]
        grid = heatmap.shape[-1]
        peak = int(heatmap.flatten().argmax())
        y, x = divmod(peak, grid)
        height, width = context.image.input_size  # the crop's extent in the model frame
        scale = grid / model.sam.config.image_size
        return float(heatmap.max()), ((x + 0.5) / (width * scale), (y + 0.5) / (height * scale))


def run(checkpoint: str, limit: int, rewindow_limit: int, match: float, seed: int) -> dict:
    from mimo_chat.predictor import MimoPredictor

    rng = np.random.default_rng(seed)
    train = [(s.image[..., 0], s.image_label["tumour"] == "yes") for s in iter_pancreas_tc(split="train")]
    dev_all = [(s.image[..., 0], s.image_label["tumour"] == "yes", s.patient) for s in iter_pancreas_tc(split="dev")]
    positives = [i for i, item in enumerate(dev_all) if item[1]]
    negatives = [i for i, item in enumerate(dev_all) if not item[1]]
    half = limit // 2
    chosen = sorted(rng.choice(positives, min(half, len(positives)), replace=False).tolist()
                    + rng.choice(negatives, min(limit - half, len(negatives)), replace=False).tolist())
    dev = [dev_all[i] for i in chosen]
    labels = np.array([int(item[1]) for item in dev])
    baseline = fit_logistic(np.stack([shortcut_features(g) for g, _ in train]), np.array([int(t) for _, t in train]))
    base_scores = logistic_scores(baseline, np.stack([shortcut_features(g) for g, _, _ in dev]))
    predictor = MimoPredictor.from_pretrained(checkpoint)
    scorer = TumourScorer(predictor)
    scores, peaks = [], []
    for gray, _, _ in tqdm(dev, desc="scoring crops"):
        score, peak = scorer(gray)
        scores.append(score)
        peaks.append(peak)
    scores = np.array(scores)
    stats = np.array([[g.shape[0], g.shape[1], g.mean(), g.std()] for g, _, _ in dev], dtype=np.float64)
    pairs = matched_pairs(stats, labels, match)

    def pair_accuracy(values: np.ndarray) -> float | None:
        return float(np.mean([values[a] > values[b] for a, b in pairs])) if pairs else None

    peaks_array = np.array(peaks)
    central = (np.abs(peaks_array - 0.5) <= 0.3).all(axis=1)
    sub = rng.choice(len(dev), min(rewindow_limit, len(dev)), replace=False)
    rewound = np.array([scorer(rewindow(dev[i][0]))[0] for i in tqdm(sub, desc="re-windowed crops")])
    base_rewound = logistic_scores(baseline, np.stack([shortcut_features(rewindow(dev[i][0])) for i in sub]))
    return {
        "checkpoint": checkpoint, "dev_crops": len(dev), "dev_patients": len({item[2] for item in dev}),
        "train_crops_for_baseline": len(train),
        "model": f1(scores, labels), "shortcut_baseline": f1(base_scores, labels),
        "matched_pairs": {"n": len(pairs), "max_distance": match,
                          "model_tumour_scores_higher": pair_accuracy(scores),
                          "baseline_tumour_scores_higher": pair_accuracy(base_scores)},
        "rewindowed": {"n": len(sub), "window_hu": list(NARROW),
                       "model_accuracy_before": f1(scores[sub], labels[sub])["accuracy"],
                       "model_accuracy_after": f1(rewound, labels[sub])["accuracy"],
                       "model_answers_flipped": float(np.mean((rewound > 0) != (scores[sub] > 0))),
                       "baseline_accuracy_before": f1(base_scores[sub], labels[sub])["accuracy"],
                       "baseline_accuracy_after": f1(base_rewound, labels[sub])["accuracy"]},
        "heatmap_peaks": {"central_share": float(central.mean()),
                          "central_share_tumour_crops": float(central[labels == 1].mean()) if labels.any() else None,
                          "note": "central = within 30% of the crop's centre on both axes"},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="lite")
    parser.add_argument("--limit", type=int, default=160, help="dev crops scored (half tumour, half not)")
    parser.add_argument("--rewindow", type=int, default=40, help="crops scored again after re-windowing")
    parser.add_argument("--match", type=float, default=0.5, help="largest normalised distance of a matched pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    print_json(run(args.checkpoint, args.limit, args.rewindow, args.match, args.seed), args.out)


if __name__ == "__main__":
    main()
