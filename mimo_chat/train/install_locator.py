"""Put a locator trained by ``python -m mimo_chat.train.locator`` into a MIMO checkpoint folder.

    python -m mimo_chat.train.install_locator --run RUN_DIR --into checkpoints/mimo-lite [--backup DIR]

Replaces every ``locator.*`` tensor of ``model.safetensors`` with the run's weights (the image-kind
head included) and writes the run's vocabulary, image kinds and width into ``config.json``; the
other modules (aligner, LoRA, presence feedback) are kept as they are. ``--backup`` first copies
the folder's ``model.safetensors`` and ``config.json`` there (once: an existing backup is kept),
so the old and the new model can be compared on the same benchmark rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file

from mimo_chat.modeling.config import MimoConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def install_locator(run: str | Path, into: str | Path, backup: str | Path | None = None) -> MimoConfig:
    """Write the locator of ``run`` into the checkpoint folder ``into``; return its new config."""
    run, into = Path(run), Path(into)
    summary = json.loads((run / "locator.json").read_text())
    new = load_file(str(run / "locator.safetensors"))
    if not new or any(not key.startswith("locator.") for key in new):
        raise ValueError(f"{run / 'locator.safetensors'} does not hold locator.* tensors only")
    if backup is not None:
        backup = Path(backup)
        backup.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS, CONFIG):
            if not (backup / name).exists():
                shutil.copy2(into / name, backup / name)
    state = {key: value for key, value in load_file(str(into / WEIGHTS)).items() if not key.startswith("locator.")}
    state.update(new)
    config = MimoConfig.load(into / CONFIG)
    config.locator_vocabulary = tuple(summary["vocabulary"])
    config.image_kinds = tuple(summary.get("image_kinds", ()))
    config.locator_width = int(summary["width"])
    temporary = into / f"{WEIGHTS}.partial"
    save_file({key: value.contiguous() for key, value in state.items()}, str(temporary))
    temporary.replace(into / WEIGHTS)
    config.save(into / CONFIG)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_chat.train.install_locator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="folder with locator.safetensors and locator.json")
    parser.add_argument("--into", required=True, help="MIMO checkpoint folder (model.safetensors, config.json)")
    parser.add_argument("--backup", default=None, help="copy the folder's current weights and config here first")
    args = parser.parse_args(argv)
    config = install_locator(args.run, args.into, args.backup)
    print(json.dumps({"vocabulary": len(config.locator_vocabulary), "image_kinds": list(config.image_kinds)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
