"""``python -m mimo_chat.bench segment --json``: one JSON object with the figures issue 3 names,
measured on the real CT slice, ours and the unmodified LiteMedSAM side by side."""

from __future__ import annotations

import json

import pytest

from mimo_chat.bench.__main__ import main as bench_main

REQUIRED = ("encode_s", "decode_s", "decode_extra_s", "peak_rss_mb", "baseline_encode_s", "baseline_decode_s")


@pytest.mark.slow
@pytest.mark.parametrize("flags, dtype", [([], None), (["--fp32-decoder"], "float32")])
def test_segment_bench_prints_one_json_object(capsys, flags, dtype):
    assert bench_main(["segment", "--json", "--runs", "1", "--prompts", "3", *flags]) == 0
    report = json.loads(capsys.readouterr().out)  # exactly one object, nothing else on stdout
    for key in REQUIRED:
        assert report[key] > 0, key
    assert report["batch_prompts"] == 3 and report["runs"] == 1
    assert report["image_shape"] == [512, 512]
    assert report["decoder_dtype"] in ({"bfloat16", "float32"} if dtype is None else {dtype})
    assert report["encode_ratio"] == pytest.approx(report["encode_s"] / report["baseline_encode_s"])


def test_bench_usage_errors(capsys):
    assert bench_main(["nonsense"]) == 2
    assert "usage" in capsys.readouterr().out
