"""``python -m mimo_chat.bench chat [--json]``: streaming speed of MIMO chat with the image already encoded.

Protocol (both measured in the same run, same inputs, same thread count):

* **ours** – ``MimoPredictor.stream`` at the app's default precision (``--quantize auto``: weight-only
  int8 language-model linears on a CPU) for "Segment the pancreas.": our decode loop with a KV cache,
  last-position logits, argmax, LoRA merged; each ``<SEG>`` is decoded to a mask the moment it is
  produced. The reply starts with the forced prefix ``The <p>pancreas</p><SEG>`` (decoded step by
  step like generated tokens) so that a mask is produced even when no trained MIMO weights exist.
* **fp32** / **int8w** / **int8** (``fp32_`` / ``int8w_`` / ``int8_`` keys) – ours again with float32,
  weight-only int8 or dynamic int8 LM linears (``GroundingLanguageModel.quantize``); the one equal to
  the default precision is not repeated.
* **baseline** (LISA style) – float32 HF ``generate()`` on the same prompt + prefix (greedy, the same number
  of new tokens), then a second full forward pass to collect the ``<SEG>`` hidden states and decode
  the mask.

Keys: ``ttft_s`` (request to first token), ``tokens_per_s`` (decode rate after the first token,
not counting the time spent decoding masks in between),
``seg_to_mask_s`` (``<SEG>`` token produced -> mask at the original resolution; for the baseline
the ``<SEG>`` position is reached at its first token), ``end_to_end_s`` (request -> reply and all
masks), the same with ``baseline_``, and ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch

from mimo_chat import resources
from mimo_chat.predictor import QUANTIZE_CHOICES, MaskReady, MimoContext, MimoPredictor, default_quantization
from mimo_chat.runtime import keep_freed_memory

QUESTION = "Segment the pancreas."
PREFIX = "The <p>pancreas</p><SEG>"


def bench_image() -> tuple[np.ndarray, str]:
    """A real abdominal CT slice: NIH Pancreas-CT from ../shared/data when present, else pydicom's CT."""
    shared = resources.shared_data_dir()
    cases = sorted((shared / "nih_pancreas").glob("*.npz")) if shared else []
    if cases:
        with np.load(cases[0]) as case:
            images = case["image"]
            return np.ascontiguousarray(images[len(images) // 2]), f"{cases[0].name} (NIH Pancreas-CT)"
    import pydicom

    pixels = pydicom.dcmread(resources.pydicom_test_file("CT_small.dcm")).pixel_array.astype(np.float32)
    gray = (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1.0) * 255
    return gray.astype(np.uint8), "pydicom CT_small.dcm"


def _rates(start: float, token_times: list[float], seg_times: list[float], mask_times: list[float], end: float) -> dict:
    seg_delays = [mask - seg for seg, mask in zip(seg_times, mask_times, strict=False)]
    # decode rate: time between the first and last token, minus mask decoding done in between
    inside = [mask - seg for seg, mask in zip(seg_times, mask_times, strict=False) if mask < token_times[-1]]
    decode_time = token_times[-1] - token_times[0] - sum(inside)
    return {
        "ttft_s": token_times[0] - start,
        "tokens_per_s": (len(token_times) - 1) / decode_time if decode_time > 0 else float("nan"),
        "seg_to_mask_s": float(np.mean(seg_delays)) if seg_delays else float("nan"),
        "end_to_end_s": end - start,
        "tokens": len(token_times),
        "masks": len(mask_times),
    }


def run_ours(predictor: MimoPredictor, ctx: MimoContext, max_new_tokens: int) -> dict:
    token_times: list[float] = []
    seg_times: list[float] = []
    mask_times: list[float] = []
    seg_id = predictor.model.seg_token_id

    def on_token(token_id: int) -> None:
        token_times.append(time.perf_counter())
        if token_id == seg_id:
            seg_times.append(token_times[-1])

    start = time.perf_counter()
    for event in predictor.stream(
        ctx, QUESTION, max_new_tokens=max_new_tokens, reply_prefix=PREFIX, on_token=on_token
    ):
        if isinstance(event, MaskReady):
            mask_times.append(time.perf_counter())
    return _rates(start, token_times, seg_times, mask_times, time.perf_counter())


class _TimingStreamer:
    """``generate(streamer=...)`` hook recording when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.numel():
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_baseline(predictor: MimoPredictor, ctx: MimoContext, new_tokens: int) -> dict:
    model, processor = predictor.model, predictor.processor
    start = time.perf_counter()
    inputs = processor.encode(QUESTION, ctx.original_size)
    prefix = torch.tensor([processor.reply_prefix_ids(PREFIX)])
    input_ids = torch.cat([inputs.input_ids, prefix], dim=1)
    prompts = model.embed_visual_prompts()
    embeds = model.embed_inputs(input_ids, ctx.image.embedding, inputs.question_ids, None, prompts)
    streamer = _TimingStreamer()
    generated = model.language_model.causal_lm().generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(input_ids.shape, dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=processor.stop_token_ids[0],
    )
    full_ids = torch.cat([input_ids, generated[:, -new_tokens:]], dim=1)
    output = model(full_ids, ctx.image.embedding, inputs.question_ids, prompt_embeddings=prompts)
    masks = processor.transform.postprocess_logits(output.low_res_masks.float(), ctx.original_size) > 0
    masks.numpy()
    end = time.perf_counter()
    seg_times = streamer.times[:1] * output.low_res_masks.shape[0]  # the prefix <SEG> is reached at token 1
    return _rates(start, streamer.times, seg_times, [end] * len(seg_times), end)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.bench chat", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--model", default="lite", help="lite | tiny | a folder written by save_pretrained")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--quantized", choices=["also", "no"], default="also",
        help="also measure ours at the other precisions (keys fp32_, int8w_, int8_)",
    )
    parser.add_argument("--quantize", default="auto", choices=QUANTIZE_CHOICES,
                        help="precision of 'ours', as in the app: auto = int8 weights on a CPU")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    args = parser.parse_args(argv)
    keep_freed_memory()  # see mimo_chat/runtime.py
    torch.set_num_threads(args.threads)
    predictor = MimoPredictor.from_pretrained(args.model)  # float32: the baseline's model
    image, source = bench_image()
    ctx = predictor.encode(image)
    default = default_quantization(args.quantize, args.model, "cpu")
    variants = {None: predictor}
    for mode in {default} | ({None, "int8-weights", "int8"} if args.quantized == "also" else set()):
        if mode is not None:
            variants[mode] = MimoPredictor(copy.deepcopy(predictor.model), predictor.processor)
            variants[mode].model.language_model.quantize(mode)
    prefixes = {None: "fp32_", "int8-weights": "int8w_", "int8": "int8_"}
    runners = {"": lambda: run_ours(variants[default], ctx, args.max_new_tokens)}
    if not args.no_baseline:
        runners["baseline_"] = lambda: run_baseline(predictor, ctx, args.max_new_tokens)
    for mode, variant in variants.items():
        if mode != default and (args.quantized == "also"):
            runners[prefixes[mode]] = lambda variant=variant: run_ours(variant, ctx, args.max_new_tokens)
    for prefix, run in runners.items():  # warm-up: allocations, the prompt-prefix cache
        if prefix != "baseline_":
            run()
    # interleaved rounds, so that the shared CPU's changing load hits every variant alike
    rounds = [{prefix: run() for prefix, run in runners.items()} for _ in range(args.repeats)]
    result: dict = {}
    for prefix in runners:
        for key in rounds[0][prefix]:
            result[prefix + key] = float(np.median([r[prefix][key] for r in rounds]))
    result.update({
        "model": args.model,
        "precision": default or "float32",
        "trained_weights": predictor.trained,
        "threads": args.threads,
        "repeats": args.repeats,
        "image": source,
        "load_average_1min": round(os.getloadavg()[0], 2),
    })
    if "baseline_" in runners:
        for prefix in [p for p in runners if p != "baseline_"]:
            result[f"{prefix}ttft_speedup"] = result["baseline_ttft_s"] / result[f"{prefix}ttft_s"]
            result[f"{prefix}tokens_per_s_speedup"] = result[f"{prefix}tokens_per_s"] / result["baseline_tokens_per_s"]
            result[f"{prefix}seg_to_mask_speedup"] = result["baseline_seg_to_mask_s"] / result[f"{prefix}seg_to_mask_s"]
            result[f"{prefix}end_to_end_speedup"] = result["baseline_end_to_end_s"] / result[f"{prefix}end_to_end_s"]
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
