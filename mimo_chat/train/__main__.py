"""Train MIMO: ``python -m mimo_chat.train --config configs/mimo-lite.yaml``.

    python -m mimo_chat.train --config CONFIG [--output DIR] [--max-steps N] [--max-minutes M]
        [--export DIR] [--no-progress]
    accelerate launch -m mimo_chat.train --config CONFIG      # several GPUs

Resumes from ``OUTPUT/last/`` when it exists. Before the first run, build the data with
``python -m mimo_chat.data.prepare`` and cache the frozen encoder's embeddings with
``python -m mimo_chat.train.embeddings_cache --data DIR`` (or set ``encode_missing: true``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from mimo_chat.runtime import keep_freed_memory
from mimo_chat.train.config import load_train_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML or JSON training config (see configs/)")
    parser.add_argument("--output", default=None, help="run folder (overrides the config)")
    parser.add_argument("--data", default=None, help="dataset folder (overrides the config)")
    parser.add_argument("--export", default=None, help="write the final trained weights here")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this many minutes")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    keep_freed_memory()  # see mimo_chat/runtime.py
    config = load_train_config(args.config)
    overrides = {key: value for key, value in (("output", args.output), ("data", args.data), ("export", args.export),
                                                ("max_minutes", args.max_minutes)) if value is not None}
    config = dataclasses.replace(config, **overrides)
    from mimo_chat.train.mimo_task import build_trainer  # heavy imports after argument parsing

    result = build_trainer(config, progress=not args.no_progress).run(max_steps=args.max_steps)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
