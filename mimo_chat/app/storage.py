"""Where the app keeps files, which of them it serves, and when it deletes them.

One run of the app (one process) owns one folder under the storage root
(``$MIMO_CHAT_APP_STORAGE``, default ``<system temp>/mimo_chat_app``)::

    run-<pid>-<random>/
        owner.json        pid and process start time: a later start tells a dead run from a live one
        results/          served to clients (Gradio ``allowed_paths``): one folder per session, named
                          by an unguessable token, holding masks and exports of that session only
        results.uploads/  never served: the copy of the study a session opened in the viewer (its
                          exports need the source grid), in a folder of the same name as its results
        gradio/           Gradio's upload and output cache (``GRADIO_TEMP_DIR``)

Rules: an upload is read from Gradio's cache and removed from it at once (``/ask`` keeps no copy;
the viewer moves it into ``results.uploads``); a session's two folders are deleted when the session
ends; the whole run folder is deleted at exit and on SIGTERM; a run folder whose process is gone
(SIGKILL, crash, power loss) is deleted by the next start.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

STORAGE_ENV = "MIMO_CHAT_APP_STORAGE"
UPLOADS_SUFFIX = ".uploads"
_SESSION_SECRET = secrets.token_bytes(32)  # per process: session folder names cannot be derived outside it
_ORPHAN_SECONDS = 60  # a run folder without an owner file older than this was never finished

logger = logging.getLogger(__name__)


def storage_root() -> Path:
    """``$MIMO_CHAT_APP_STORAGE`` or ``<system temp>/mimo_chat_app``."""
    return Path(os.environ.get(STORAGE_ENV) or Path(tempfile.gettempdir()) / "mimo_chat_app")


def session_name(key: str | None = None) -> str:
    """Folder name of a session: a keyed hash of the browser session ``key`` (or random without one).

    Mask links carry this name, so it must neither reveal the session hash (which would let the
    holder of a link act as that session) nor be guessable from it.
    """
    if not key:
        return "s" + secrets.token_hex(16)
    return "s" + hmac.new(_SESSION_SECRET, key.encode(), hashlib.sha256).hexdigest()[:32]


def uploads_folder(results_folder: Path) -> Path:
    """The never-served twin of a session's results folder: ``<root>.uploads/<name>`` for ``<root>/<name>``."""
    results_folder = Path(results_folder)
    return results_folder.parent.with_name(results_folder.parent.name + UPLOADS_SUFFIX) / results_folder.name


def remove_session(results_folder: Path) -> None:
    """Delete a session's results and uploads. Safe to call twice."""
    shutil.rmtree(results_folder, ignore_errors=True)
    shutil.rmtree(uploads_folder(results_folder), ignore_errors=True)


def gradio_upload_folder() -> Path:
    """Gradio's upload cache (``GRADIO_TEMP_DIR`` or its default)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def discard_upload(path: str | Path | None) -> None:
    """Delete a file Gradio received, once it has been read. Files outside Gradio's cache are left alone."""
    if not path:
        return
    file = Path(path).resolve()
    cache = gradio_upload_folder()
    if not file.is_relative_to(cache) or file == cache:
        return
    file.unlink(missing_ok=True)
    if file.parent != cache:
        try:
            file.parent.rmdir()  # Gradio's per-upload folder, when nothing else is in it
        except OSError:
            pass


def take_upload(path: str | Path, results_folder: Path) -> Path:
    """Move a received upload out of Gradio's cache into the session's uploads folder (replacing the
    previous one); a file from elsewhere is copied. Returns the new path."""
    source = Path(path)
    folder = uploads_folder(results_folder) / "upload"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    target = folder / source.name
    shutil.copy2(source, target)
    discard_upload(source)
    return target


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def remove_leftovers(root: Path | None = None) -> list[Path]:
    """Delete the run folders under ``root`` whose process is gone. Returns what was deleted."""
    root = Path(root) if root is not None else storage_root()
    removed = []
    for folder in sorted(root.glob("run-*")) if root.is_dir() else []:
        owner = folder / "owner.json"
        try:
            record = json.loads(owner.read_text())
            alive = _process_alive(int(record["pid"]), float(record["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            alive = time.time() - folder.stat().st_mtime < _ORPHAN_SECONDS
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@dataclass
class RunStorage:
    """The folders of one run of the app; :meth:`create` also clears what dead runs left behind."""

    folder: Path

    @property
    def results(self) -> Path:
        return self.folder / "results"

    @property
    def uploads(self) -> Path:
        return self.folder / ("results" + UPLOADS_SUFFIX)

    @property
    def gradio(self) -> Path:
        return self.folder / "gradio"

    @classmethod
    def create(cls, root: Path | None = None) -> RunStorage:
        import psutil

        root = Path(root) if root is not None else storage_root()
        root.mkdir(parents=True, exist_ok=True)
        removed = remove_leftovers(root)
        if removed:
            logger.info("removed %d folder(s) left by earlier runs of the app", len(removed))
        folder = root / f"run-{os.getpid()}-{secrets.token_hex(4)}"
        storage = cls(folder)
        for path in (folder, storage.results, storage.uploads, storage.gradio):
            path.mkdir(mode=0o700, exist_ok=True)
        record = {"pid": os.getpid(), "started": psutil.Process().create_time()}
        (folder / "owner.json").write_text(json.dumps(record))
        return storage

    def remove(self) -> None:
        """Delete everything of this run. Safe to call twice."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def remove_at_exit(self) -> None:
        """Delete the run folder at interpreter exit and on SIGTERM (then stop like Ctrl-C would)."""
        atexit.register(self.remove)

        def on_sigterm(signum, frame) -> None:
            self.remove()
            raise KeyboardInterrupt  # Gradio's main loop closes the server; atexit removes late writes

        signal.signal(signal.SIGTERM, on_sigterm)
