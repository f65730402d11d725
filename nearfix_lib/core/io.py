"""Case discovery, NIfTI reading and writing, and the validation errors of the data contract.

Data contract: a data root holds ``segmentations/`` (required: the labels to repair), and
optionally ``images/`` (the CT) and ``ground_truth/`` (clean labels, e.g. of the phantom).
Files pair across folders by case id, which is the file name without ``.nii.gz``/``.nii`` and
without the tokens ``.img``, ``.label`` and ``.seg`` — ``1.img.nii.gz``, ``1.label.nii.gz`` and
``1.nii.img.nii.gz`` are all case ``1``.

Arrays are kept in the NIfTI voxel order exactly as nibabel returns them (axis 0, 1, 2 = voxel
i, j, k of the affine); nothing here transposes or reorients. Labels load as integers, images
as float32. Every problem is an :class:`InputError` whose message is one line naming the file
and the problem; pipelines catch it per case, record it in a :class:`SkipList` and go on.

Writes are atomic (temporary file in the target folder, then ``os.replace``) so an interrupted
run never leaves a truncated file that a resumed run would trust. Nothing here writes into a
data root unless asked to by the phantom generator, which owns the folder it creates.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.geometry import voxel_spacing

LABEL_DIR = "segmentations"
IMAGE_DIR = "images"
TRUTH_DIR = "ground_truth"
_NIFTI_SUFFIX = re.compile(r"\.nii(\.gz)?$")
_ID_TOKENS = re.compile(r"\.(img|label|seg|nii)(?=\.|$)")
AFFINE_ATOL_MM = 1e-3


class InputError(Exception):
    """A bad input file: ``str(err)`` is one line, ``<file>: <problem>``."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}")


# -- discovery ------------------------------------------------------------------------------

def case_id_from_name(name: str) -> str | None:
    """Case id of a NIfTI file name, or None when the name is not NIfTI."""
    if not _NIFTI_SUFFIX.search(name):
        return None
    stem = _NIFTI_SUFFIX.sub("", name)
    return _ID_TOKENS.sub("", stem)


@dataclass(frozen=True)
class Case:
    """The files of one case; ``image``/``truth`` are None where the data root has none."""

    case_id: str
    label: Path
    image: Path | None = None
    truth: Path | None = None


@dataclass
class Discovery:
    cases: list[Case]
    problems: list[InputError] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [c.case_id for c in self.cases]


def _case_sort_key(case_id: str):
    """Natural order: case 2 before case 10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", case_id) if t]


def _index_folder(folder: Path, problems: list[InputError]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        cid = case_id_from_name(path.name)
        if cid is None or not path.is_file():
            continue
        if cid in found:
            problems.append(InputError(path, f"duplicate case id {cid!r} (also {found[cid].name})"))
            continue
        found[cid] = path
    return found


def require_data_root(root: str | Path) -> Path:
    """``root`` as a Path, or :class:`InputError` when it is not an existing folder."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "data root does not exist")
    return root


def discover_cases(root: str | Path, require_images: bool = False) -> Discovery:
    """Pair label, image and truth files of a data root by case id.

    Unpaired files become problems and their cases are left out: an image or a truth without
    labels, and labels without an image when the root has an ``images/`` folder at all (a
    labels-only root is valid for shape-only models; ``runs.start_run`` refuses it where a class's
    model reads the CT). The cases that pair go on. A missing
    root, or one whose ``segmentations/`` holds no NIfTI file, raises :class:`InputError`.
    """
    root = require_data_root(root)
    if not (root / LABEL_DIR).is_dir():
        raise InputError(root, f"data root has no '{LABEL_DIR}/' folder")
    problems: list[InputError] = []
    labels = _index_folder(root / LABEL_DIR, problems)
    images = _index_folder(root / IMAGE_DIR, problems)
    truths = _index_folder(root / TRUTH_DIR, problems)
    for cid, path in images.items():
        if cid not in labels:
            problems.append(InputError(path, f"image without labels (no case {cid!r} in {LABEL_DIR}/)"))
    for cid, path in truths.items():
        if cid not in labels:
            problems.append(InputError(path, f"ground truth without labels (no case {cid!r} in {LABEL_DIR}/)"))
    if require_images and not (root / IMAGE_DIR).is_dir():
        raise InputError(root, f"data root has no '{IMAGE_DIR}/' folder")
    cases = []
    pair_images = (root / IMAGE_DIR).is_dir()
    for cid in sorted(labels, key=_case_sort_key):
        if pair_images and cid not in images:
            problems.append(InputError(labels[cid], f"labels without image (no case {cid!r} in {IMAGE_DIR}/)"))
            continue
        cases.append(Case(cid, labels[cid], images.get(cid), truths.get(cid)))
    if not labels:
        raise InputError(root / LABEL_DIR, f"no cases found in {root} (no .nii/.nii.gz label files)")
    return Discovery(cases, problems)


# -- reading --------------------------------------------------------------------------------

@dataclass
class Volume:
    """A 3-D array on the voxel grid of ``affine`` (voxel index i, j, k -> world mm)."""

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along axes 0, 1, 2."""
        return voxel_spacing(self.affine)


def _load_nifti(path: Path) -> nib.Nifti1Image:
    if not Path(path).is_file():
        raise InputError(path, "file not found")
    try:
        # nib.load is typed as returning the base class; a .nii/.nii.gz loads as a Nifti1Image
        # (Nifti2Image is a subclass of it)
        img = cast(nib.Nifti1Image, nib.load(str(path)))
        img.header.get_data_shape()
    except Exception as err:  # nibabel raises many types for corrupt headers
        raise InputError(path, f"unreadable NIfTI ({type(err).__name__}: {err})") from None
    return img


def _read_array(path: Path, img) -> np.ndarray:
    try:
        proxy = img.dataobj
        slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
        scaled = not (slope in (None, 1.0) and inter in (None, 0.0))
        data = np.asanyarray(proxy) if scaled else np.asanyarray(proxy.get_unscaled())
    except Exception as err:  # truncated gzip stream, short file, ...
        raise InputError(path, f"corrupt voxel data ({type(err).__name__}: {err})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3-D volume, got shape {tuple(data.shape)}")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "affine is missing, non-finite or singular")
    return data


def read_label(path: str | Path, table: ClassTable, allow_empty: bool = False) -> Volume:
    """Integer label map; fails on non-integer values, values outside the table, and empty maps unless
    ``allow_empty`` (an output such as a class repaired to nothing, not an input)."""
    path = Path(path)
    img = _load_nifti(path)
    data = _read_array(path, img)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)):
            raise InputError(path, "label map contains NaN or infinite values")
        if np.any(data != np.round(data)):
            raise InputError(path, "label map holds non-integer values (a probability map, or resampled linearly?)")
        data = np.round(data)
    values = np.unique(data)
    bad = np.setdiff1d(values, table.valid_values())
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:8])
        raise InputError(path, f"label values outside the class table: {shown} (table has {table.indices})")
    if values.size == 1 and values[0] == 0 and not allow_empty:
        raise InputError(path, "empty label map (no foreground voxel)")
    dtype = np.uint8 if table.max_index <= 255 else np.int16
    return Volume(np.ascontiguousarray(data.astype(dtype)), img.affine.copy(), img.header.copy(), path)


def read_image(path: str | Path) -> Volume:
    """CT volume as float32 (Hounsfield units when the file is scaled correctly)."""
    path = Path(path)
    img = _load_nifti(path)
    data = _read_array(path, img)
    data = np.asarray(data, dtype=np.float32)
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise InputError(path, f"image contains {n_bad} NaN or infinite voxels")
    return Volume(np.ascontiguousarray(data), img.affine.copy(), img.header.copy(), path)


def check_same_grid(ref: Volume, other: Volume) -> None:
    """Raise if ``other`` is not on ``ref``'s voxel grid (shape and affine)."""
    # volumes from read_label/read_image always have a path; one built in memory has none
    where = other.path or "<in memory>"
    ref_name = ref.path.name if ref.path else "<in memory>"
    if ref.shape != other.shape:
        raise InputError(where, f"shape {other.shape} differs from {ref_name} {ref.shape}")
    if not np.allclose(ref.affine, other.affine, atol=AFFINE_ATOL_MM):
        diff = float(np.abs(ref.affine - other.affine).max())
        raise InputError(where, f"affine differs from {ref_name} (max difference {diff:.4g})")


@dataclass
class LoadedCase:
    case_id: str
    label: Volume
    image: Volume | None = None
    truth: Volume | None = None


def load_case(case: Case, table: ClassTable, with_image: bool = True,
              with_truth: bool = True) -> LoadedCase:
    """Read and cross-validate the files of one case; raises :class:`InputError`."""
    label = read_label(case.label, table)
    image = truth = None
    if with_image and case.image is not None:
        image = read_image(case.image)
        check_same_grid(label, image)
    if with_truth and case.truth is not None:
        truth = read_label(case.truth, table)
        check_same_grid(label, truth)
    return LoadedCase(case.case_id, label, image, truth)


# -- atomic writing -------------------------------------------------------------------------

# A temporary names its writer: ``.<target name>.nftmp-<host>-<pid>-<token><suffixes>``. A
# resumed run can then tell a dead writer's leftover from a live writer's file (stage-1 class
# jobs of a SLURM array share one run folder, each writing at its own pace).
_TMP_MARK = ".nftmp-"
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.nftmp-(?P<host>\w+)-(?P<pid>\d+)-[0-9a-f]{8}(\.[^/]*)?$")
STALE_FOREIGN_TMP_S = 24 * 3600  # another host's temporary is stale after this long


def _host() -> str:
    return re.sub(r"\W", "_", socket.gethostname(), flags=re.ASCII) or "host"


def _temporary_name(path: Path) -> Path:
    suffix = "".join(path.suffixes)
    token = os.urandom(4).hex()
    return path.parent / f".{path.name}{_TMP_MARK}{_host()}-{os.getpid()}-{token}{suffix}"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    The temporary is created like ``open(path, "w")`` would create the target, so the result
    gets the permissions the user's umask allows (a cluster group can read it); its name keeps
    the suffixes (``.nii.gz``, ``.npz``) so writers that infer the format from the name behave,
    and names the writing host and process so :func:`remove_stale_temporaries` can clean up
    after a killed writer. On failure the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _writer_alive(host: str, pid: int, mtime: float) -> bool:
    if host != _host():  # no way to ask another node: trust it for a day
        return time.time() - mtime < STALE_FOREIGN_TMP_S
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds that pid
        pass
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries that killed writers left anywhere under ``folder``; return them.

    A temporary belongs to a dead writer when its process no longer runs on this host (or, for
    another host, when it is older than ``STALE_FOREIGN_TMP_S``). Live writers' files stay.
    """
    removed = []
    for path in sorted(Path(folder).rglob(f".*{_TMP_MARK}*")):
        match = _TMP_NAME.match(path.name)
        if not match or not path.is_file():
            continue
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        if not _writer_alive(match["host"], int(match["pid"]), mtime):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray,
                header: nib.Nifti1Header | None = None, dtype=None) -> Path:
    """Write ``array`` on the grid of ``affine`` (never an identity placeholder) atomically.

    Integer arrays are written unscaled in the smallest fitting dtype (uint8 for label maps);
    the source ``header`` (units, descriptions, intent) is kept when given.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"write_nifti expects a 3-D array, got {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if dtype is None:
        if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
            dtype = np.uint8 if array.size == 0 or (array.min() >= 0 and array.max() <= 255) else np.int16
        else:
            dtype = np.float32
    hdr = header.copy() if header is not None else nib.Nifti1Header()
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine, hdr)
    img.set_data_dtype(dtype)
    if np.issubdtype(np.dtype(dtype), np.integer):
        img.header.set_slope_inter(1.0, 0.0)  # labels are stored unscaled
    img.set_qform(affine, code=int(hdr["qform_code"]) or 1)
    img.set_sform(affine, code=int(hdr["sform_code"]) or 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        # mypy lets **arrays fill savez_compressed's allow_pickle: bool; the keys here are array names
        np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    return Path(path)


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    """``array`` as an uncompressed ``.npy``, what ``np.load(mmap_mode="r")`` maps (never pickled)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


# -- the machine ------------------------------------------------------------------------------

# glibc's mallopt parameter for the size from which blocks are mapped on their own (malloc.h)
_M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 1 << 20


def return_large_blocks() -> bool:
    """Make this process give every freed block of 1 MB or more back to the system at once.

    glibc maps large blocks on their own, but after one is freed it raises that threshold to the
    block's size (up to 32 MB) and serves such blocks from its heap from then on, where what a case
    leaves behind is fragmented and kept. A per-case stage then grows with the cases it has done:
    a stage-1 repair process of the scale phantom held ~10 MB more after each of its first cases,
    and its peak rose with them (1.61 to 1.66 GB over five cases); with the threshold fixed at 1 MB
    it stayed at 1.50 GB. A run's processes call this (``start_run``, the workers of
    :mod:`~nearfix_lib.stages.shards`). Returns whether the C library took it (glibc only).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: its allocator, its policy
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))


def threads_per_worker(workers: int) -> int:
    """CPU threads for each of ``workers`` processes: the cores this process may use, shared out,
    and never more than ``OMP_NUM_THREADS`` when it is set (a job's or a test's own limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // max(1, workers))
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(limit)) if limit.isdigit() and int(limit) > 0 else threads


# -- the list of skipped cases ----------------------------------------------------------------

@dataclass
class SkipList:
    """Cases (or files) a stage skipped, with the one-line reason; written as CSV in the run."""

    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, case, message)

    def add(self, stage: str, case_id: str, error: Exception | str) -> None:
        self.entries.append((stage, case_id, str(error)))

    def extend_problems(self, stage: str, problems: list[InputError]) -> None:
        for p in problems:
            self.add(stage, case_id_from_name(Path(p.path).name) or "-", p)

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def read(cls, path: str | Path) -> SkipList:
        """The rows of a ``skipped.csv`` (empty when there is none yet)."""
        path = Path(path)
        if not path.is_file():
            return cls()
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [tuple(r) for r in csv.reader(fh)][1:]
        return cls(cast(list[tuple[str, str, str]], rows))  # three columns, as write() writes them

    def write(self, path: str | Path, replace: Iterable[str] = ()) -> Path:
        """Merge with rows already in ``path`` from other stages, then rewrite atomically.

        A stage this list has rows for replaces that stage's rows in the file; so does every stage
        named in ``replace`` (a stage whose cases all went through this time leaves no old row).
        """
        path = Path(path)
        rows = SkipList.read(path).entries
        stages = {e[0] for e in self.entries} | set(replace)
        rows = [r for r in rows if r[0] not in stages] + list(self.entries)
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(["stage", "case", "problem"])
                writer.writerows(rows)
        return path
