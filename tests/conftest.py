"""Shared fixtures: small hand-built volumes with asymmetric shapes and non-identity affines.

Also the session's CPU thread count, pinned before anything imports torch (see ``TEST_THREADS``).
"""

import os

# How many threads a reduction is split over decides its float rounding, so a comparison of two
# float results (DDP vs one process, a resumed fit vs an uninterrupted one, a notebook's numbers)
# must not take the count from the machine (torch's default: one per core) or from whatever
# OMP_NUM_THREADS the caller has set: the suite would pass on one machine and fail on another.
# Every process of the session runs this many: the test process (torch.set_num_threads below) and
# every child, which inherits these variables (papermill kernels, spawned gloo ranks and benchmark
# runs, the subprocesses of the kill/resume and viewer tests). They are set here, before torch is
# imported, so that its OpenMP runtime starts with them, and they replace any the caller set.
# One thread, not two, although CI machines have 2 cores: the tensors here are small, `make test`
# runs two such test processes (pytest-xdist), the 2-rank and 2-job tests start more, and OpenMP threads that
# wait for a core are very slow when anything else runs. Measured on a 2-core machine shared with
# other jobs: the whole suite 252 s on 1 thread vs 626 s on 2; the held-out latent fit of
# test_unified 10-11 s vs 84-250 s. One thread is also the count every machine can run the same way.
# NEARFIX_TEST_THREADS chooses another count on purpose (e.g. to check that no verdict depends on it).
TEST_THREADS = int(os.environ.get("NEARFIX_TEST_THREADS", "1"))
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
os.environ.update({name: str(TEST_THREADS) for name in _THREAD_VARIABLES})

from threadpoolctl import threadpool_limits  # noqa: E402

# numpy (and its BLAS) is already loaded by pytest's plugins before this file, having read the
# variables before they were set: threadpoolctl sets the loaded BLAS/OpenMP pools directly
threadpool_limits(TEST_THREADS)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(TEST_THREADS)

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


def xvfb_run(screen: str) -> list[str]:
    """``xvfb-run -a`` on ``screen`` ("WxHxD"), searching for a free display from a number of this
    pytest worker's own: ``-a`` takes the first display without a lock file, and two workers
    starting Xvfb at the same moment would take the same one and one would fail."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ... under pytest-xdist
    first = 99 + 100 * int(worker.removeprefix("gw") or 0)
    return ["xvfb-run", "-a", "-n", str(first), "-s", f"-screen 0 {screen}"]


def require_ts_chest():
    if not (TS_CHEST / "ct.nii.gz").is_file():
        pytest.skip(f"real CT not available ({TS_CHEST} is absent; it lives beside the project, "
                    "not in a clone)")
    return TS_CHEST
