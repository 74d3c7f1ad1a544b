"""Evaluate a model on a benchmark in the format of ``../shared/benchmarks/SCHEMA.md``.

    python -m mimo_chat.evaluate --bench DIR --out report.json [--tasks text_seg,observe] [--limit N]
        [--checkpoint PATH] [--model lite|tiny|engine|litemedsam] [--no-cache] [--no-plots]
    python -m mimo_chat.evaluate --compare a.json b.json [...]
    python -m mimo_chat.evaluate --compare a.json b.json --paired
    python -m mimo_chat.evaluate --chat-regression [--out replies.json] [--kinds ...]

The model is driven through ``mimo_chat.predictor.MimoPredictor`` — the same calls the app
makes. ``--model engine`` evaluates the bare ``SegmentationPredictor`` (with the project's
prompt weights when present) and ``--model litemedsam`` the unmodified LiteMedSAM, both on the
visual-prompt tasks (``box_seg``, ``point_seg``) only. Predictions are cached in
``<report>.predictions.jsonl`` (keyed by row id and model fingerprint) so an interrupted
run resumes. ``report.md`` and plots are written next to ``report.json``. ``--paired`` re-scores
two reports' cached predictions row by row: B - A with bootstrap intervals over patients
(``mimo_chat/evaluation/paired.py``). ``--chat-regression`` runs the dev chat regression set and
prints its per-kind table (``mimo_chat/evaluation/chat_regression.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mimo_chat.evaluation import plots
from mimo_chat.evaluation.report import compare, markdown
from mimo_chat.evaluation.runner import (
    TASKS,
    ChatDriver,
    Driver,
    EngineDriver,
    PredictionCache,
    load_manifest,
    run,
)
from mimo_chat.evaluation.scoring import aggregate, score_row
from mimo_chat.runtime import keep_freed_memory

ENGINE_MODELS = ("engine", "litemedsam")


def model_fingerprint(model: str, checkpoint: str | None) -> str:
    """Identifies the weights answering: preset name, or checkpoint path with the sizes and times of its
    files (documentation such as the model card excluded: editing it does not change the model)."""
    if checkpoint is None:
        return f"{model}"
    path = Path(checkpoint).resolve()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    digest = hashlib.sha1()
    for file in files:
        if file.is_file() and file.suffix.lower() not in (".md", ".txt"):
            stat = file.stat()
            digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{model}:{path.name}:{digest.hexdigest()[:12]}"


def engine_checkpoint(model: str, checkpoint: str | None) -> str | None:
    """Prompt-weight folder of the segmentation engine: none for the unmodified ``litemedsam``."""
    from mimo_chat.segmentation import CHECKPOINT_DIR

    if model == "litemedsam":
        return None
    path = Path(checkpoint) if checkpoint else Path(CHECKPOINT_DIR)
    return str(path) if (path / "model.safetensors").is_file() else None


def load_driver(model: str, checkpoint: str | None, quantize: str = "auto") -> Driver:
    """A driver for ``--model``/``--checkpoint`` (imports the predictors lazily)."""
    if model in ENGINE_MODELS:
        from mimo_chat.segmentation import SegmentationPredictor

        # the unmodified LiteMedSAM keeps a float32 decoder (the bench's baseline does too)
        predictor = SegmentationPredictor.from_pretrained(checkpoint=engine_checkpoint(model, checkpoint),
                                                          bf16_decoder=False if model == "litemedsam" else None)
        return EngineDriver(predictor)
    from mimo_chat.predictor import MimoPredictor, default_quantization

    source = checkpoint or model
    return ChatDriver(MimoPredictor.from_pretrained(source, quantize=default_quantization(quantize, source, "cpu")))


def evaluate(driver: Driver, bench: str | Path, out: str | Path, *, tasks: Sequence[str] | None = None,
             limit: int | None = None, fingerprint: str = "model", use_cache: bool = True,
             make_plots: bool = True, progress: bool = True, cached_only: bool = False) -> dict:
    """Run, score and write ``out`` (report.json), ``report.md`` and plots; return the report.

    ``cached_only`` scores only the rows already answered in the prediction cache (an interrupted
    run) without asking the model; the report says so under ``"cached_only"``."""
    bench, out = Path(bench), Path(out)
    wanted = [t for t in (tasks or TASKS) if t in driver.tasks]
    rows = load_manifest(bench, wanted, limit)
    cache = PredictionCache(out.with_suffix(".predictions.jsonl"), fingerprint) if use_cache or cached_only else None
    if cached_only:
        rows = [row for row in rows if cache.get(row["id"]) is not None]
    predictions = run(driver, bench, rows, cache, progress)
    scores = [score_row(row, predictions.get(row["id"]), bench) for row in rows]
    report = aggregate(rows, scores)
    report.update(model=fingerprint, bench=str(bench))
    if cached_only:
        report["cached_only"] = True
    skipped = sorted(set(tasks or TASKS) - set(driver.tasks))
    if skipped:
        report["skipped_tasks"] = skipped
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    figures = plots.write_plots(report, bench, rows, predictions, scores, out.parent, out.stem) if make_plots else []
    out.with_suffix(".md").write_text(markdown(report, [str(f) for f in figures]))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if "--chat-regression" in arguments:
        from mimo_chat.evaluation import chat_regression

        arguments.remove("--chat-regression")
        return chat_regression.main(arguments)
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--bench", help="benchmark folder with manifest.jsonl")
    parser.add_argument("--out", help="report.json to write")
    parser.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--limit", type=int, default=None, help="only N rows, spread evenly over the manifest (after --tasks)")
    parser.add_argument("--checkpoint", default=None, help="model folder (default: the embedded lite model)")
    parser.add_argument("--model", default="lite", choices=("lite", "tiny", *ENGINE_MODELS),
                        help="engine = bare SegmentationPredictor (box_seg/point_seg only) with its prompt "
                             "weights; litemedsam = the unmodified LiteMedSAM")
    parser.add_argument("--quantize", default="auto", choices=("auto", "none", "int8-weights", "int8"),
                        help="language-model precision, as in the app: auto = int8 weights on a CPU")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the prediction cache")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--fingerprint", default=None,
                        help="read/write the prediction cache under this model fingerprint (as in a report's "
                             "\"model\"), e.g. with --cached-only after the checkpoint folder changed")
    parser.add_argument("--cached-only", action="store_true",
                        help="score only the rows already in the prediction cache (an interrupted run); no model")
    parser.add_argument("--compare", nargs="+", metavar="REPORT", help="print a side-by-side table and exit")
    parser.add_argument("--paired", action="store_true",
                        help="with --compare A B: per-row differences B - A on the shared rows, with bootstrap "
                             "intervals over patients (needs both reports' cached predictions)")
    parser.add_argument("--chat-regression", action="store_true",
                        help="run the dev chat regression set instead (options: see mimo_chat.evaluation.chat_regression)")
    args = parser.parse_args(arguments)
    keep_freed_memory()  # see mimo_chat/runtime.py
    if args.compare:
        missing = [path for path in args.compare if not Path(path).is_file()]
        if missing:
            parser.error(f"--compare: no report at {', '.join(missing)}")
        if not args.paired:
            print(compare(args.compare))
            return 0
        if len(args.compare) != 2:
            parser.error("--paired compares exactly two reports: --compare A B --paired")
        from mimo_chat.evaluation.paired import PairedError, paired_table

        try:
            print(paired_table(*args.compare))
        except PairedError as error:
            parser.error(f"--paired: {error}")
        return 0
    if args.paired:
        parser.error("--paired goes with --compare A B")
    if not args.bench or not args.out:
        parser.error("--bench and --out are required (unless --compare)")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    if tasks and set(tasks) - set(TASKS):
        parser.error(f"unknown tasks {sorted(set(tasks) - set(TASKS))}; choose from {TASKS}")
    checkpoint = engine_checkpoint(args.model, args.checkpoint) if args.model in ENGINE_MODELS else args.checkpoint
    if checkpoint is None and args.model == "lite":  # the embedded default: its files identify it
        from mimo_chat.predictor import LITE_CHECKPOINT

        checkpoint = str(LITE_CHECKPOINT) if (LITE_CHECKPOINT / "model.safetensors").is_file() else None
    fingerprint = model_fingerprint(args.model, checkpoint)
    if args.model not in ENGINE_MODELS:
        fingerprint += f":quantize={args.quantize}"
    fingerprint = args.fingerprint or fingerprint
    driver = (EngineDriver(None) if args.model in ENGINE_MODELS else ChatDriver(None)) if args.cached_only else \
        load_driver(args.model, args.checkpoint, args.quantize)
    report = evaluate(driver, args.bench, args.out, tasks=tasks, limit=args.limit, fingerprint=fingerprint,
                      use_cache=not args.no_cache, make_plots=not args.no_plots, progress=sys.stderr.isatty(),
                      cached_only=args.cached_only)
    for task, values in report["tasks"].items():
        shown = ", ".join(f"{k}={v:.3f}" for k, v in values.items() if isinstance(v, float))
        print(f"{task:<11} n={values['n']:<5} {shown}")
    print(f"latency median {report['latency_s']['median']:.3f}s p95 {report['latency_s']['p95']:.3f}s; "
          f"unparseable {report['unparseable']}, empty masks {report['empty_masks']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
