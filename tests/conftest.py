"""Shared fixtures: small hand-built volumes with asymmetric shapes and non-identity affines."""

from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
TS_CHEST = SHARED_DATA / "ts_chest"


def lps_affine(spacing=(0.8, 1.1, 2.5), origin=(71.5, 120.25, -40.0)) -> np.ndarray:
    """A scanner-like LPS affine (negative x/y), anisotropic, with an origin: never identity."""
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = origin
    return aff


@pytest.fixture
def affine() -> np.ndarray:
    return lps_affine()


@pytest.fixture
def small_labels() -> np.ndarray:
    """A 10-class-compatible map on an asymmetric (23, 17, 11) grid: LA block, LAA, LV."""
    lab = np.zeros((23, 17, 11), dtype=np.uint8)
    lab[3:12, 2:9, 1:6] = 2  # LA
    lab[12:15, 4:7, 2:4] = 8  # LAA touching LA
    lab[14:20, 10:15, 5:10] = 3  # LV
    return lab


def require_ts_chest():
    if not (TS_CHEST / "ct.nii.gz").is_file():
        pytest.skip(f"real CT not available ({TS_CHEST} is absent; it lives beside the project, "
                    "not in a clone)")
    return TS_CHEST
