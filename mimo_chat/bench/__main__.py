"""``python -m mimo_chat.bench NAME [ARGS...]``: run the benchmark module ``mimo_chat.bench.NAME``."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("io", "segment", "chat", "volume", "load")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m mimo_chat.bench {{{','.join(BENCHMARKS)}}} [--json] [ARGS...]")
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(f"mimo_chat.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
