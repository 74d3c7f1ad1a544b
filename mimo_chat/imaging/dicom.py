"""DICOM files and series (pydicom + pylibjpeg decoders).

Values: the modality LUT (RescaleSlope/Intercept, Hounsfield units for CT) is applied;
MONOCHROME1 images are inverted so that bright means dense everywhere; a radiograph opens
with its own VOI window (WindowCenter/Width) when it has one.

Geometry: ImageOrientationPatient / ImagePositionPatient / PixelSpacing give a voxel -> LPS
affine, turned into RAS, so a series or multi-frame volume behaves like a NIfTI volume.
A single slice with that geometry is turned to the radiological display orientation.

Privacy: a dataset never leaves this module; only the whitelisted descriptors are read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .dicomfile import ReadBudget, has_pixels, read_dataset
from .errors import ImageLoadError, check_size
from .privacy import IDENTIFYING_KEYWORDS, safe_descriptors
from .study import Study
from .volume import LPS_TO_RAS, check_finite, make_volume_study
from .windows import default_window

RADIOGRAPH_MODALITIES = {"CR", "DX", "RG", "XR", "PX", "IO"}


def _number(dataset, keyword: str, default: float | None = None) -> float | None:
    try:
        value = dataset.get(keyword)
        if value is None or value == "":
            return default
        if not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__"):
            value = value[0]  # multi-valued (e.g. several VOI windows): the first
        number = float(value)
        return number if np.isfinite(number) else default
    except (TypeError, ValueError, IndexError):
        return default


def _vector(dataset, keyword: str, length: int) -> np.ndarray | None:
    try:
        value = dataset.get(keyword)
        vector = np.asarray([float(item) for item in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        return None
    return vector if vector is not None and vector.shape == (length,) and np.all(np.isfinite(vector)) else None


def _functional_group(dataset, sequence: str, keyword: str, frame: int | None = None):
    """A value from the per-frame (``frame`` given) or shared functional groups of an enhanced file."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in dataset:
        per_frame = dataset.PerFrameFunctionalGroupsSequence
        if frame < len(per_frame):
            groups.append(per_frame[frame])
    if "SharedFunctionalGroupsSequence" in dataset and len(dataset.SharedFunctionalGroupsSequence):
        groups.append(dataset.SharedFunctionalGroupsSequence[0])
    for group in groups:
        if sequence in group and len(group[sequence].value) and keyword in group[sequence].value[0]:
            return group[sequence].value[0]
    return None


def modality_of(dataset) -> str:
    code = str(dataset.get("Modality", "") or "OT").upper()
    return "XR" if code in RADIOGRAPH_MODALITIES else code


def header_shape(dataset) -> tuple[int, int, int, int]:
    """(frames, rows, columns, samples) from the header, checked against the size limits before decoding."""
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise ImageLoadError("This DICOM file does not say how large its image is (missing Rows/Columns).") from None
    check_size((frames, rows, columns, samples), "DICOM image", plane=(rows, columns))
    return frames, rows, columns, samples


def _rescale(dataset, frame: int | None) -> tuple[float, float]:
    group = _functional_group(dataset, "PixelValueTransformationSequence", "RescaleSlope", frame)
    if "RescaleSlope" not in dataset and group is not None:
        return _number(group, "RescaleSlope", 1.0), _number(group, "RescaleIntercept", 0.0)
    return _number(dataset, "RescaleSlope", 1.0), _number(dataset, "RescaleIntercept", 0.0)


def decode(dataset) -> np.ndarray:
    """Pixels in physical units, float32: (F, R, C) grey or (F, R, C, 3) colour."""
    from pydicom.pixels import apply_modality_lut

    frames, rows, columns, samples = header_shape(dataset)
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        stored = dataset.pixel_array
    except BaseException as error:  # wrapped into ImageLoadError
        # Rust pixel decoders panic on some damaged data; pyo3's PanicException is a BaseException
        if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
            raise
        from pydicom.uid import AllTransferSyntaxes

        # a damaged syntax UID is file content: only a known syntax is named
        name = syntax.name if syntax in AllTransferSyntaxes else "an unknown encoding"
        raise ImageLoadError(
            f"The image data in this DICOM file could not be decoded ({name}); the file may be truncated or corrupt."
        ) from None
    stored = stored.reshape((frames, rows, columns) + ((samples,) if samples > 1 else ()))
    if samples > 1:
        return stored.astype(np.float32)
    if "ModalityLUTSequence" in dataset:
        return np.asarray(apply_modality_lut(stored, dataset), dtype=np.float32)
    pixels = stored.astype(np.float32)
    for frame in range(frames):
        slope, intercept = _rescale(dataset, frame if frames > 1 else None)
        if slope != 1.0 or intercept != 0.0:
            pixels[frame] = pixels[frame] * np.float32(slope) + np.float32(intercept)
    return pixels


@dataclass
class Slices:
    """Decoded frames of one file or series with their geometry (LPS), before orientation."""

    pixels: np.ndarray  # (F, R, C) or (F, R, C, 3) float32
    modality: str
    orientation: np.ndarray | None  # (6,) row direction, column direction (ImageOrientationPatient)
    positions: np.ndarray | None  # (F, 3) ImagePositionPatient of each frame
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    slice_step: float | None  # SpacingBetweenSlices or SliceThickness, mm
    window: tuple[float, float] | None  # the file's VOI window (width, level)
    monochrome1: bool
    descriptors: dict


def _spacing(dataset) -> tuple[float, float] | None:
    for source in (dataset, _functional_group(dataset, "PixelMeasuresSequence", "PixelSpacing")):
        if source is None:
            continue
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            vector = _vector(source, keyword, 2)
            if vector is not None and np.all(vector > 0):
                return float(vector[0]), float(vector[1])
    return None


def _orientation(dataset) -> np.ndarray | None:
    vector = _vector(dataset, "ImageOrientationPatient", 6)
    if vector is None:
        group = _functional_group(dataset, "PlaneOrientationSequence", "ImageOrientationPatient", 0)
        vector = _vector(group, "ImageOrientationPatient", 6) if group is not None else None
    if vector is None or abs(np.linalg.norm(np.cross(vector[:3], vector[3:])) - 1) > 0.05:
        return None
    return vector


def _positions(dataset, frames: int, orientation: np.ndarray | None) -> np.ndarray | None:
    if frames == 1:
        position = _vector(dataset, "ImagePositionPatient", 3)
        return None if position is None else position[None]
    per_frame = [
        _functional_group(dataset, "PlanePositionSequence", "ImagePositionPatient", frame) for frame in range(frames)
    ]
    if all(group is not None for group in per_frame):
        positions = [_vector(group, "ImagePositionPatient", 3) for group in per_frame]
        if all(position is not None for position in positions):
            return np.stack(positions)
    offsets, origin = dataset.get("GridFrameOffsetVector"), _vector(dataset, "ImagePositionPatient", 3)
    if offsets is not None and origin is not None and orientation is not None and len(offsets) == frames:
        normal = np.cross(orientation[:3], orientation[3:])
        return origin[None] + np.asarray([float(item) for item in offsets])[:, None] * normal[None]
    return None


def _inversion_sum(dataset, pixels: np.ndarray) -> float:
    """MONOCHROME1 values v become ``sum - v``: the lowest plus highest value the header allows
    (after rescaling), so every slice of a series is inverted the same way."""
    bits = int(_number(dataset, "BitsStored", 0) or 0)
    if not 1 <= bits <= 32:
        return float(pixels.min() + pixels.max())
    signed = int(_number(dataset, "PixelRepresentation", 0) or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = _rescale(dataset, 0 if "PerFrameFunctionalGroupsSequence" in dataset else None)
    return float((low + high) * slope + 2 * intercept)


def _voi_window(dataset, inversion: float | None) -> tuple[float, float] | None:
    width, level = _number(dataset, "WindowWidth"), _number(dataset, "WindowCenter")
    if width is None or level is None or width <= 0:
        return None
    return width, (inversion - level if inversion is not None else level)


def _identifiers(dataset) -> tuple[str, ...]:
    """The header's identifying values, only to keep them out of the descriptions that are shown."""
    from pydicom.multival import MultiValue

    values = []
    for keyword in IDENTIFYING_KEYWORDS:
        try:
            value = dataset.get(keyword)
        except Exception:  # noqa: BLE001 - a damaged value cannot leak either
            value = None
        if value not in (None, ""):
            values.extend(str(item) for item in (value if isinstance(value, MultiValue) else [value]))
    return tuple(values)


def read_slices(dataset) -> Slices:
    """Decode one dataset (single or multi-frame) into Slices."""
    if not has_pixels(dataset):
        raise ImageLoadError("This DICOM file has no image data.")
    pixels = decode(dataset)
    if pixels.size == 0:
        raise ImageLoadError("This DICOM file's image is empty.")
    check_finite(pixels)
    modality = modality_of(dataset)
    monochrome1 = str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    inversion = _inversion_sum(dataset, pixels) if monochrome1 and pixels.ndim == 3 else None
    if inversion is not None:
        pixels = np.float32(inversion) - pixels
    window = _voi_window(dataset, inversion) if modality == "XR" and pixels.ndim == 3 else None
    orientation = _orientation(dataset)
    step = _number(dataset, "SpacingBetweenSlices") or _number(dataset, "SliceThickness")
    return Slices(
        pixels=pixels,
        modality=modality,
        orientation=orientation,
        positions=_positions(dataset, pixels.shape[0], orientation),
        pixel_spacing=_spacing(dataset),
        slice_step=abs(step) if step else None,
        window=window,
        monochrome1=monochrome1,
        descriptors={
            "body_part": dataset.get("BodyPartExamined"),
            "study_description": dataset.get("StudyDescription"),
            "series_description": dataset.get("SeriesDescription"),
            "identifiers": _identifiers(dataset),
        },
    )


def _study_2d(slices: Slices, notes: list[str]) -> Study:
    pixels = slices.pixels[0]
    spacing = slices.pixel_spacing or (1.0, 1.0)
    if slices.pixel_spacing is None:
        notes.append("The file does not record the pixel spacing; sizes are in pixels.")
    window = slices.window or default_window(slices.modality)
    return Study(
        pixels=np.ascontiguousarray(pixels),
        modality=slices.modality,
        spacing=spacing,
        descriptors=safe_descriptors(slices.modality, pixels.shape[:2], spacing, **slices.descriptors),
        notes=notes,
        is_volume=False,
        default_window=window,
    )


def _affine(
    orientation: np.ndarray,
    positions: np.ndarray,
    pixel_spacing: tuple[float, float] | None,
    slice_step: float | None,
    notes: list[str],
) -> np.ndarray:
    """voxel (column, row, slice) -> RAS mm, from frame positions already sorted along the slice normal."""
    row_spacing, column_spacing = pixel_spacing or (1.0, 1.0)
    normal = np.cross(orientation[:3], orientation[3:])
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)  # follows gantry tilt too
        gaps = np.diff(positions @ normal)
        if np.ptp(gaps) > 0.1 * abs(np.mean(gaps)) + 1e-3:
            notes.append("The slices are not evenly spaced; distances along the stack are approximate.")
    else:
        step = normal * (slice_step or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * column_spacing
    lps[:3, 1] = orientation[3:] * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return LPS_TO_RAS @ lps


def slices_to_study(slices: Slices, notes: list[str]) -> Study:
    """Order frames along the slice normal and build a volume (or a 2D study for one frame)."""
    frames = slices.pixels.shape[0]
    if slices.pixels.ndim == 4:  # colour: one image
        if frames > 1:
            notes.append(f"This is a colour sequence of {frames} frames; showing the first.")
        return _study_2d(slices, notes)
    if frames == 1 and (slices.modality == "XR" or slices.orientation is None):
        return _study_2d(slices, notes)  # a projection image, or no geometry: shown as stored
    # no orientation: frames shown as stored (rows down, columns right, frames stacked)
    orientation = slices.orientation if slices.orientation is not None else np.array([1.0, 0, 0, 0, 1, 0])
    normal = np.cross(orientation[:3], orientation[3:])
    positions = slices.positions
    if positions is None:
        if frames > 1:
            notes.append("The file does not record where each frame lies; frames are shown in stored order.")
        positions = np.arange(frames)[:, None] * normal[None] * (slices.slice_step or 1.0)
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    if frames > 1 and np.min(np.diff(positions @ normal)) < 1e-4:
        raise ImageLoadError(
            "This series has several images at the same position (e.g. several echoes or time points); "
            "open one of them on its own."
        )
    volume = np.transpose(slices.pixels[order], (2, 1, 0))  # (F, R, C) -> (C, R, F)
    affine = _affine(orientation, positions, slices.pixel_spacing, slices.slice_step, notes)
    window = slices.window or default_window(slices.modality)
    study = make_volume_study(volume, affine, notes, modality=slices.modality, **slices.descriptors)
    study.default_window = window
    if frames > 1:
        return study
    # one slice: show it in radiological orientation along the plane it was acquired in
    import nibabel as nib

    plane = ("sagittal", "coronal", "axial")[int(nib.orientations.io_orientation(affine)[2, 0])]
    pixels = np.ascontiguousarray(study.slice(0, plane))
    spacing = study.slice_spacing(plane)
    return Study(
        pixels=pixels,
        modality=slices.modality,
        spacing=spacing,
        descriptors=safe_descriptors(slices.modality, pixels.shape, spacing, **slices.descriptors),
        notes=notes,
        is_volume=False,
        default_window=window,
    )


def load_dicom_file(source, force: bool = False) -> Study:
    """One DICOM file: a 2D image, or a volume when it is multi-frame grey."""
    return slices_to_study(read_slices(read_dataset(source, force, ReadBudget())), [])


def _series_key(dataset) -> str:
    return str(dataset.get("SeriesInstanceUID", "")) or "unknown"


def load_dicom_series(members: Sequence[tuple[str, Callable[[], bytes]]]) -> Study:
    """A series given as (name, read_bytes) pairs (files of a folder or members of a zip).

    Members that are not DICOM images (DICOMDIR, reports, text files) are skipped. When
    several series are present, the one with the most images is shown, with a note.
    """
    datasets = []
    budget = ReadBudget()
    for name, read_bytes in members:
        lower = name.lower()
        if lower.endswith("dicomdir"):
            continue
        try:
            data = read_bytes()
        except OSError:
            continue
        preamble = data[128:132] == b"DICM"
        if not preamble and not lower.endswith((".dcm", ".dicom", ".ima")):
            continue
        try:
            dataset = read_dataset(data, force=not preamble, budget=budget)
        except ImageLoadError:
            if budget.left < 0:
                raise
            continue
        if has_pixels(dataset) and "Rows" in dataset:
            datasets.append(dataset)
    if not datasets:
        raise ImageLoadError("No DICOM images were found in this folder or archive.")
    groups: dict[str, list] = {}
    for dataset in datasets:
        groups.setdefault(_series_key(dataset), []).append(dataset)
    notes: list[str] = []
    series = max(groups.values(), key=len)
    if len(groups) > 1:
        notes.append(
            f"This folder holds {len(groups)} image series; showing the one with the most images ({len(series)})."
        )
    if len(series) == 1:
        return slices_to_study(read_slices(series[0]), notes)
    return slices_to_study(_merge(series), notes)


def _merge(series: list) -> Slices:
    """Check that the files of one series agree, then stack their (single) frames."""
    shapes = {header_shape(dataset) for dataset in series}
    if len(shapes) > 1:
        raise ImageLoadError("The images in this series have different sizes, so they cannot be stacked into a volume.")
    frames, rows, columns, samples = shapes.pop()
    if frames > 1:
        raise ImageLoadError("This series mixes several multi-frame files; open each file on its own.")
    check_size((len(series), rows, columns, samples), "series", plane=(rows, columns))
    parts = [read_slices(dataset) for dataset in series]
    orientations = [part.orientation for part in parts]
    if any(orientation is None for orientation in orientations) or any(part.positions is None for part in parts):
        raise ImageLoadError("The images in this series do not record their position, so they cannot be ordered.")
    if any(not np.allclose(orientation, orientations[0], atol=1e-3) for orientation in orientations):
        raise ImageLoadError("The images in this series have different orientations, so they cannot be stacked.")
    first = parts[0]
    pixels = np.concatenate([part.pixels for part in parts])
    return Slices(
        pixels=pixels,
        modality=first.modality,
        orientation=first.orientation,
        positions=np.concatenate([part.positions for part in parts]),
        pixel_spacing=first.pixel_spacing,
        slice_step=first.slice_step,
        window=first.window,
        monochrome1=first.monochrome1,
        descriptors=first.descriptors,
    )
