"""``python -m mimo_chat.bench load [--json] [--sessions 8 32] [--requests 2] [--model tiny|lite] [--url URL]``

N concurrent ``gradio_client`` sessions, each with its own image (a real CT slice resized to a
height no other session uses), call ``/ask`` with a box on loopback. Reported per N: p50 / p95
latency, errors (a clean "queue is full" counted apart), a cross-talk check (every answer's image
size, masks and overlay belong to the session's own image, and no two sessions share a results
folder) and the server's memory before / after. The baseline, measured first in the same run, is
one session alone. Without ``--url`` the app is started in a subprocess (``--model``, default
``lite``) and stopped at the end. Bounded: every level has a time limit (``--timeout``); requests
still running then count as errors.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

QUEUE_FULL = "queue is full"


@dataclass
class SessionResult:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    queue_full: int = 0
    cross_talk: list[str] = field(default_factory=list)
    folders: set[str] = field(default_factory=set)


def session_images(count: int, folder: Path) -> list[Path]:
    """``count`` PNGs of CT_small's slice, each resized to its own height (64, 68, ... pixels) x 112."""
    from PIL import Image

    from mimo_chat.imaging import load_study
    from mimo_chat.resources import pydicom_test_file

    slice_image = Image.fromarray(load_study(pydicom_test_file("CT_small.dcm")).display())
    paths = []
    for index in range(count):
        path = folder / f"session_{index}.png"
        slice_image.resize((112, 64 + 4 * index)).save(path)
        paths.append(path)
    return paths


def _check(result: tuple, height: int, width: int) -> tuple[list[str], str | None]:
    """Cross-talk findings of one ``/ask`` answer for an image of (height, width); and its results folder."""
    from PIL import Image

    _, phrases_json, overlay = result
    record = json.loads(phrases_json)
    problems, folder = [], None
    if record["image_size"] != [height, width]:
        problems.append(f"image_size {record['image_size']} != {[height, width]}")
    for item in record["phrases"] + record["prompt"]:
        if item["mask_png"]:
            folder = str(Path(item["mask_png"]).parent.parent)
            shape = np.asarray(Image.open(item["mask_png"])).shape
            if shape != (height, width):
                problems.append(f"mask {shape} for a {height}x{width} image")
    if np.asarray(Image.open(overlay)).shape[:2] != (height, width):
        problems.append("overlay of another size")
    return problems, folder


def run_session(url: str, image: Path, requests: int, result: SessionResult, deadline: float) -> None:
    """One client session: ``requests`` sequential ``/ask`` calls about ``image``, recorded in ``result``."""
    from gradio_client import Client, handle_file
    from PIL import Image

    width, height = Image.open(image).size
    box = json.dumps([[width * 0.25, height * 0.25, width * 0.75, height * 0.75]])
    try:
        client = Client(url, verbose=False)
    except Exception as error:  # noqa: BLE001 - counted, the run goes on
        result.errors.append(f"connect: {type(error).__name__}")
        return
    for _ in range(requests):
        if time.monotonic() > deadline:
            result.errors.append("not started before the level's time limit")
            continue
        start = time.monotonic()
        try:
            answer = client.predict(handle_file(str(image)), "What is in the box?", box, "[]", api_name="/ask")
        except Exception as error:  # noqa: BLE001 - counted, the run goes on
            if QUEUE_FULL in str(error).lower():
                result.queue_full += 1
            else:
                result.errors.append(f"{type(error).__name__}: {str(error)[:120]}")
            continue
        result.latencies.append(time.monotonic() - start)
        problems, folder = _check(answer, height, width)
        result.cross_talk += problems
        if folder:
            result.folders.add(folder)


def run_level(url: str, images: list[Path], requests: int, timeout: float) -> dict:
    """All sessions at once; the figures of one level."""
    results = [SessionResult() for _ in images]
    deadline = time.monotonic() + timeout
    threads = [threading.Thread(target=run_session, args=(url, image, requests, result, deadline), daemon=True)
               for image, result in zip(images, results)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
    unfinished = sum(thread.is_alive() for thread in threads)
    latencies = [t for result in results for t in result.latencies]
    errors = [e for result in results for e in result.errors] + ["still running at the time limit"] * unfinished
    shared = [a for i, a in enumerate(results) for b in results[i + 1:] if a.folders & b.folders]
    cross_talk = [p for result in results for p in result.cross_talk] + ["shared results folder"] * len(shared)
    return {
        "sessions": len(images),
        "requests": len(images) * requests,
        "answered": len(latencies),
        "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "p95_s": float(np.percentile(latencies, 95)) if latencies else None,
        "wall_s": time.monotonic() - start,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "queue_full": sum(result.queue_full for result in results),
        "cross_talk": len(cross_talk),
        "cross_talk_examples": cross_talk[:5],
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, storage: Path, startup_timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """The app in a subprocess on 127.0.0.1; returns (process, url) once it answers."""
    port = _free_port()
    command = [sys.executable, "-c", "import sys; from mimo_chat.app.launch import main; sys.exit(main(sys.argv[1:]))",
               "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, MIMO_CHAT_APP_STORAGE=str(storage))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + startup_timeout
    while time.monotonic() < end and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, f"http://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the app did not start within {startup_timeout:.0f} s")


def server_memory_mb(pid: int | None) -> float | None:
    import psutil

    if pid is None:
        return None
    return psutil.Process(pid).memory_info().rss / 1024**2


def run(url: str, levels: list[int], requests: int, timeout: float, pid: int | None = None) -> dict:
    """Baseline (one session) then each level; ``pid``: the server process, for its memory."""
    with tempfile.TemporaryDirectory(prefix="mimo_bench_load_") as folder:
        images = session_images(max(levels), Path(folder))
        run_level(url, images[:1], 1, timeout)  # warm-up: first-request costs are not the baseline's
        baseline = run_level(url, images[:1], requests, timeout)
        report = {"url": url, "requests_per_session": requests, "baseline_one_session": baseline, "levels": []}
        for count in levels:
            before = server_memory_mb(pid)
            level = run_level(url, images[:count], requests, timeout)
            level["server_memory_mb"] = {"before": before, "after": server_memory_mb(pid)}
            report["levels"].append(level)
    report["zero_errors_and_cross_talk"] = all(lv["errors"] == 0 and lv["cross_talk"] == 0 for lv in report["levels"])
    return report


def _print(report: dict) -> None:
    base = report["baseline_one_session"]
    print(f"baseline (1 session): p50 {base['p50_s']:.2f} s, p95 {base['p95_s']:.2f} s")
    print(f"{'sessions':>8} {'answered':>9} {'p50 s':>7} {'p95 s':>7} {'errors':>7} {'queue full':>10} "
          f"{'cross-talk':>10} {'memory MB before/after':>24}")
    for level in report["levels"]:
        memory = level["server_memory_mb"]
        shown = f"{memory['before']:.0f} / {memory['after']:.0f}" if memory["before"] is not None else "n/a"
        p50 = f"{level['p50_s']:.2f}" if level["p50_s"] is not None else "-"
        p95 = f"{level['p95_s']:.2f}" if level["p95_s"] is not None else "-"
        print(f"{level['sessions']:>8} {level['answered']:>4}/{level['requests']:<4} {p50:>7} {p95:>7} "
              f"{level['errors']:>7} {level['queue_full']:>10} {level['cross_talk']:>10} {shown:>24}")
        for example in level["error_examples"] + level["cross_talk_examples"]:
            print(f"    {example}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.bench load", description=__doc__.split("\n\n")[1])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sessions", type=int, nargs="+", default=[8, 32], help="concurrent sessions per level")
    parser.add_argument("--requests", type=int, default=2, help="/ask calls per session")
    parser.add_argument("--model", default="lite", help="model of the app started here (ignored with --url)")
    parser.add_argument("--url", default=None, help="an app already running (its memory is not measured)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each level may take")
    args = parser.parse_args(argv)
    if args.url:
        report = run(args.url, args.sessions, args.requests, args.timeout)
    else:
        with tempfile.TemporaryDirectory(prefix="mimo_bench_storage_") as storage:
            process, url = start_server(args.model, Path(storage))
            try:
                report = run(url, args.sessions, args.requests, args.timeout, pid=process.pid)
            finally:
                process.terminate()
                process.wait(timeout=60)
            report["model"] = args.model
    print(json.dumps(report, indent=2)) if args.json else _print(report)
    return 0 if report["zero_errors_and_cross_talk"] else 1
