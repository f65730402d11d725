"""The per-case store of a fit over many cases: every array a fit needs of a case, on disk, opened on demand.

Stage 3 fits one model on every case and stage 1 one model per class on every case that has it,
so whatever they keep per case in memory is multiplied by the case count (and, under torchrun, by
the number of processes): a real case's label crop, its sampling tables and its teachers take
~100 MB in stage 3; a 128^3 class mask in stage 1 takes 256 KB as bits, plus its band (a *binary*
store: ``classes=(1,)``, no teachers, no class counts). The store writes them once per case, as
``.npy`` files that are memory-mapped (``np.load(mmap_mode="r")``) only while a batch, an evaluation or a
mining pass works on that case and released after (unmapped pages leave the process's memory).
What stays in memory per case is its small ``meta.json``: shape, voxel counts, band size and
where the teachers lie. Layout of one case folder::

    <root>/<case>/
      labels.npy        uint8 (I, J, K)   the supervision label crop (L^ref)
      cumulative.npy    int32 (C, I*J)    per class (store order), cumulative voxel counts over the (i, j) rows
      foreground.npy    uint8 packed bits a binary store's foreground, instead of labels.npy and cumulative.npy
      band.npy          int32 (N,)        flat (C-order) indices of the band around the union foreground
      interfaces.npy    uint8 packed bits the band around every class boundary (only for mining)
      teacher_<k>.npy   uint8 (R, R, R)   stage-1 probabilities of head k on its class ROI grid, in
                                          1/255 steps (:func:`quantise_probability`); only for a
                                          teacher given in memory: one read from a file
                                          (``Teacher.file``, stage 1's ``prob/<case>.npy``) is
                                          recorded by its path relative to the case folder, not copied
      meta.json         written last: the case is complete once it exists and matches

``meta.json`` records the store's ``spec`` (classes, band radius, whether interface bits are kept,
whether the store is binary) and the writer's ``source`` (whatever identifies the inputs, e.g. file
sizes and times); a case whose meta matches both is complete and is not rewritten. Every file is written through a
temporary and renamed, so a killed writer leaves no half file and two processes writing the same
case write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from nearfix_lib.core.io import write_json, write_npy
from nearfix_lib.field.sampling import boundary_band, interface_band

STORE_VERSION = 2  # 2: the band as flat indices, teachers as uint8 and referenced by path
META = "meta.json"
PROBABILITY_LEVELS = 255
T = TypeVar("T")


def quantise_probability(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 steps of 1/255: how teachers are stored. A soft target
    within 0.002 of the model's output is all distillation needs, and a 128^3 ROI takes 2 MB instead
    of float16's 4 MB, uncompressed, so that stage 3 maps it from stage 1's file instead of a copy."""
    return np.rint(np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0) * PROBABILITY_LEVELS).astype(np.uint8)


@dataclass(frozen=True)
class StoreSpec:
    """What a case's arrays depend on besides its inputs: the sampler's classes and band radius,
    whether mining's interface bits are kept (with their radius, the same one), and whether the
    store is *binary*: only the foreground (voxels of any of ``classes``), one bit per voxel, for a
    sampler that never draws per class (stage 1's), instead of the uint8 labels and their counts."""

    classes: tuple[int, ...]
    dilation_radius: int
    interfaces: bool
    binary: bool = False

    def to_dict(self) -> dict:
        # "binary" only when set: label stores written before the flag existed keep matching their spec
        return {"version": STORE_VERSION, "classes": list(self.classes), "dilation_radius": self.dilation_radius,
                "interfaces": self.interfaces, **({"binary": True} if self.binary else {})}


@dataclass
class Teacher:
    """Stage-1 probabilities of one class of one case on its class ROI grid, and where that grid lies.

    ``from_heart`` maps whole-heart ROI-normalised coordinates to this class ROI's normalised
    coordinates (through the original voxel grid), so a training point is looked up at the
    same world position in the class model's own frame.
    """

    channel: int  # head index of the class
    prob: np.ndarray  # (R_i, R_j, R_k) uint8 (quantise_probability); memory-mapped when read from a file
    from_heart: np.ndarray  # 4x4
    file: Path | None = None  # the .npy ``prob`` was mapped from: a store records it instead of a copy

    def __post_init__(self) -> None:
        if np.asarray(self.prob).dtype != np.uint8:  # probabilities given as floats: stored in 1/255 steps
            self.prob = quantise_probability(self.prob)


@dataclass(frozen=True)
class CaseMeta:
    """What is kept in memory of a stored case (a few hundred bytes)."""

    shape: tuple[int, int, int]
    counts: dict[int, int]  # voxels per label value present
    band_size: int
    teachers: tuple[tuple[int, str, tuple[float, ...]], ...]  # (channel, file, from_heart row-major)


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(folder: str | Path, spec: StoreSpec, source: dict) -> bool:
    """Whether ``folder`` holds a case written for this ``spec`` from this ``source``."""
    meta = _read_meta(Path(folder))
    return meta is not None and meta.get("spec") == spec.to_dict() and meta.get("source") == source


def _label_crop(labels: np.ndarray) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"label maps must be 3-D, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"label maps must be integer, got {lab.dtype}")
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise ValueError("label values must lie in 0..255")
    if not 0 < lab.size < 2**31:
        raise ValueError(f"label grids need 1 to 2**31 - 1 voxels (int32 counts), got {lab.size}")
    return np.ascontiguousarray(lab, dtype=np.uint8)


_LAYOUT = frozenset({"labels.npy", "cumulative.npy", "foreground.npy", "interfaces.npy"})  # what a spec decides


def _cumulative(lab: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """int32 (C, I*J): per class, cumulative voxel counts over the (i, j) rows of ``lab``."""
    rows = lab.reshape(-1, lab.shape[2])
    cumulative = np.zeros((len(classes), rows.shape[0]), dtype=np.int32)
    for k, c in enumerate(classes):
        cumulative[k] = np.cumsum(np.count_nonzero(rows == c, axis=1), dtype=np.int64)
    return cumulative


def write_case(folder: str | Path, labels: np.ndarray, spec: StoreSpec, teachers: Sequence[Teacher] = (),
               source: dict | None = None) -> None:
    """Write one case (see the module's layout), ``meta.json`` last: until it is replaced, an older meta
    names another source (or none is there), so a case cut short by a kill is rewritten next time."""
    folder = Path(folder)
    lab = _label_crop(labels)
    foreground = np.isin(lab, spec.classes)
    if spec.binary:
        arrays = {"foreground.npy": np.packbits(foreground, axis=None)}
    else:
        arrays = {"labels.npy": lab, "cumulative.npy": _cumulative(lab, spec.classes)}
    if spec.interfaces:
        arrays["interfaces.npy"] = np.packbits(interface_band(lab, spec.dilation_radius), axis=None)
    for name, array in arrays.items():
        write_npy(folder / name, array)
    for name in _LAYOUT.difference(arrays):  # left by a case written under another spec
        (folder / name).unlink(missing_ok=True)
    band = np.flatnonzero(boundary_band(foreground, spec.dilation_radius)).astype(np.int32)
    write_npy(folder / "band.npy", band)
    records = []
    for t in teachers:
        if t.file is not None:  # already on disk as the store reads it: referenced, not copied
            name = os.path.relpath(Path(t.file).resolve(), folder.resolve())
        else:
            name = f"teacher_{int(t.channel)}.npy"
            write_npy(folder / name, t.prob.reshape(t.prob.shape[-3:]))
        records.append({"channel": int(t.channel), "file": name,
                        "from_heart": np.asarray(t.from_heart, dtype=np.float64).tolist()})
    values, counts = np.unique(lab, return_counts=True)
    write_json(folder / META, {"spec": spec.to_dict(), "source": source or {}, "shape": list(lab.shape),
                               "counts": {str(int(v)): int(n) for v, n in zip(values, counts)},
                               "band_size": int(len(band)), "teachers": records})


def content_source(labels: np.ndarray, teachers: Sequence[Teacher] = ()) -> dict:
    """A ``source`` for arrays given in memory: a digest of their bytes (a rerun on the same arrays reuses the case)."""
    h = hashlib.sha1(_label_crop(labels).tobytes())
    h.update(repr(np.shape(labels)).encode())
    for t in teachers:
        h.update(repr((int(t.channel), np.asarray(t.from_heart, dtype=np.float64).tolist())).encode())
        h.update(np.ascontiguousarray(t.prob).tobytes())
    return {"sha1": h.hexdigest()}


def rank_rotation(cases: Sequence[T]) -> list[T]:
    """``cases`` in the order this process writes them: under torchrun (``RANK`` of ``WORLD_SIZE`` in
    the environment, before the process group exists) process r starts at the r-th K-th and wraps
    around, so K processes that each write every missing case build a store in parallel and find
    the rest done (two that meet on a case write the same bytes, each file through a temporary and
    a rename). Without torchrun: ``cases`` as they are."""
    rank, world = int(os.environ.get("RANK", "0")), max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    start = len(cases) * rank // world
    return list(cases[start:]) + list(cases[:start])


class CaseStore:
    """The stored cases of one fit, in order (index i = latent i); arrays are opened per call.

    Each accessor maps its file anew and returns the mapping: hold it while working on the case
    and drop it after, so that only the cases at hand are mapped.
    """

    def __init__(self, root: str | Path, case_ids: Sequence[str], spec: StoreSpec):
        self.root = Path(root)
        self.case_ids = [str(c) for c in case_ids]
        self.spec = spec
        self._meta: list[CaseMeta] = []
        for cid in self.case_ids:
            meta = _read_meta(self.root / cid)
            if meta is None or meta.get("spec") != spec.to_dict():
                raise ValueError(f"{self.root / cid}: no complete store of this case for {spec}")
            self._meta.append(CaseMeta(
                tuple(int(s) for s in meta["shape"]),  # type: ignore[arg-type]
                {int(v): int(n) for v, n in meta["counts"].items()}, int(meta["band_size"]),
                tuple((int(t["channel"]), str(t["file"]), tuple(float(x) for row in t["from_heart"] for x in row))
                      for t in meta["teachers"])))

    @property
    def classes(self) -> tuple[int, ...]:
        return self.spec.classes

    @property
    def dilation_radius(self) -> int:
        return self.spec.dilation_radius

    def __len__(self) -> int:
        return len(self.case_ids)

    def folder(self, case: int) -> Path:
        return self.root / self.case_ids[case]

    # -- what stays in memory ---------------------------------------------------------------
    def shape(self, case: int) -> tuple[int, int, int]:
        return self._meta[case].shape

    def histogram(self, case: int) -> np.ndarray:
        """Voxels per label value 0..255 (int64)."""
        out = np.zeros(256, dtype=np.int64)
        for v, n in self._meta[case].counts.items():
            out[v] = n
        return out

    def present(self, case: int, c: int) -> bool:
        return self._meta[case].counts.get(int(c), 0) > 0

    def band_size(self, case: int) -> int:
        return self._meta[case].band_size

    def teacher_channels(self, case: int) -> list[int]:
        return [channel for channel, _, _ in self._meta[case].teachers]

    def nbytes(self) -> int:
        """Bytes of every stored case's files (what a fit would otherwise hold in memory)."""
        return sum(p.stat().st_size for i in range(len(self)) for p in self.folder(i).iterdir() if p.is_file())

    # -- what is mapped on demand -----------------------------------------------------------
    def _open(self, case: int, name: str) -> np.ndarray:
        return np.load(self.folder(case) / name, mmap_mode="r", allow_pickle=False)

    def _unpack(self, case: int, name: str) -> np.ndarray:
        """A packed-bit file of the case as bool (I, J, K)."""
        shape = self.shape(case)
        return np.unpackbits(self._open(case, name), count=int(np.prod(shape))).reshape(shape).view(bool)

    def _require(self, binary: bool, what: str) -> None:
        if self.spec.binary != binary:
            raise ValueError(f"{self.root}: a {'binary' if self.spec.binary else 'label'} store has no {what}")

    def labels(self, case: int) -> np.ndarray:
        """The label crop, uint8 (I, J, K) (a label store's)."""
        self._require(False, "labels")
        return self._open(case, "labels.npy")

    def cumulative(self, case: int) -> np.ndarray:
        """int32 (C, I*J): row k counts the voxels of ``classes[k]`` in the (i, j) rows up to each one."""
        self._require(False, "class counts")
        return self._open(case, "cumulative.npy")

    def foreground(self, case: int) -> np.ndarray:
        """A binary store's foreground, bool (I, J, K), decoded in memory: for one case at a time."""
        self._require(True, "foreground bits")
        return self._unpack(case, "foreground.npy")

    def foreground_at(self, case: int, cells: np.ndarray) -> np.ndarray:
        """A binary store's foreground at integer (i, j, k) ``cells`` (N, 3), bool (N,), read straight
        from the mapped bits: only the bytes of the cells are touched, nothing of the volume is decoded
        (``np.packbits`` order: voxel f in C order is bit ``7 - f % 8`` of byte ``f // 8``)."""
        self._require(True, "foreground bits")
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
        flat = np.ravel_multi_index((cells[:, 0], cells[:, 1], cells[:, 2]), self.shape(case))
        return ((self._open(case, "foreground.npy")[flat >> 3] >> (7 - (flat & 7))) & 1).astype(bool)

    def band(self, case: int) -> np.ndarray:
        """int32 (band_size,): flat (C-order) indices of the band voxels."""
        return self._open(case, "band.npy")

    def band_at(self, case: int, rows: np.ndarray) -> np.ndarray:
        """int64 (len(rows), 3): (i, j, k) of the band voxels at positions ``rows`` of the band (0 to
        ``band_size - 1``), read from the mapped flat indices (a third of the bytes of (i, j, k) rows)."""
        flat = self.band(case)[np.asarray(rows, dtype=np.int64)]
        return np.stack(np.unravel_index(flat.astype(np.int64), self.shape(case)), axis=1)

    def interfaces(self, case: int) -> np.ndarray:
        """The class-boundary band, bool (I, J, K) (decoded from the packed bits)."""
        if not self.spec.interfaces:
            raise ValueError(f"{self.root}: stored without interface bits (mining off)")
        return self._unpack(case, "interfaces.npy")

    def teachers(self, case: int) -> list[Teacher]:
        return [Teacher(channel, self._open(case, name), np.asarray(affine, dtype=np.float64).reshape(4, 4))
                for channel, name, affine in self._meta[case].teachers]


def write_store(root: str | Path, label_maps: Sequence[np.ndarray], spec: StoreSpec,
                teachers: Sequence[Sequence[Teacher]] | None = None,
                case_ids: Sequence[str] | None = None) -> CaseStore:
    """A store of label maps (and teachers) given in memory, one case at a time (new cases, tests,
    benchmarks); a case already stored from the same arrays is kept as it is."""
    ids = [str(c) for c in case_ids] if case_ids is not None else [str(i) for i in range(len(label_maps))]
    if len(ids) != len(label_maps):
        raise ValueError(f"{len(ids)} case ids for {len(label_maps)} label maps")
    for i, (cid, lab) in enumerate(zip(ids, label_maps)):
        own = list(teachers[i]) if teachers is not None else []
        source = content_source(lab, own)
        if not is_complete(Path(root) / cid, spec, source):
            write_case(Path(root) / cid, lab, spec, own, source)
    return CaseStore(root, ids, spec)


class MinedVoxels:
    """The voxels of each case that stage 3's last mining pass decoded wrong, on disk.

    A mining pass lists, per case, a few percent of its interface band; at a thousand real cases
    that is gigabytes, which in memory every rank would hold and every checkpoint would copy. Here
    each pass is a folder ``<root>/pass_<epoch>/`` of ``<case id>.npy`` files (int32 flat C-order
    indices into the case's label crop, ascending) and a ``counts.npy`` written last, which marks
    the pass complete. In memory: the current pass's epoch and one count per case; a batch maps
    the file of the case it draws from. A checkpoint holds the epoch of the pass (:meth:`state`),
    so a resumed fit reads the very voxels the interrupted one drew from. Passes no checkpoint can
    refer to any more are removed (:meth:`checkpointed`).
    """

    def __init__(self, root: str | Path, case_ids: Sequence[str]):
        self.root = Path(root)
        self.case_ids = [str(c) for c in case_ids]
        self.n_cases = len(self.case_ids)
        self.epoch: int | None = None  # the pass the sampler draws from (None: no pass yet)
        self._counts = np.zeros(self.n_cases, dtype=np.int64)

    def _folder(self, epoch: int) -> Path:
        return self.root / f"pass_{int(epoch)}"

    def write_pass(self, epoch: int, flat_indices: Iterable[np.ndarray]) -> None:
        """Write pass ``epoch`` from each case's flat indices (in case order, consumed one at a time)
        and make it the current one."""
        folder = self._folder(epoch)
        counts = np.zeros(self.n_cases, dtype=np.int64)
        for case, flat in enumerate(flat_indices):
            flat = np.asarray(flat, dtype=np.int32).ravel()
            write_npy(folder / f"{self.case_ids[case]}.npy", flat)
            counts[case] = len(flat)
        write_npy(folder / "counts.npy", counts)
        self.epoch, self._counts = int(epoch), counts

    def count(self, case: int) -> int:
        return int(self._counts[case])

    def flat(self, case: int) -> np.ndarray:
        """Case ``case``'s mined voxels as flat indices (mapped, not read; empty before a pass)."""
        if self.epoch is None or not self._counts[case]:
            return np.zeros(0, dtype=np.int32)
        return np.load(self._folder(self.epoch) / f"{self.case_ids[case]}.npy", mmap_mode="r")

    def state(self) -> dict:
        return {"mined_pass": self.epoch}

    def load_state(self, state: dict) -> None:
        """Return to the pass a checkpoint drew from (none: before the first pass)."""
        epoch = state.get("mined_pass")
        if epoch is None:
            self.epoch, self._counts = None, np.zeros(self.n_cases, dtype=np.int64)
            return
        counts_file = self._folder(epoch) / "counts.npy"
        if not counts_file.is_file():
            raise FileNotFoundError(f"{counts_file}: the mined voxels this checkpoint drew from are missing "
                                    "(the mining folder was removed or moved apart from its checkpoints)")
        counts = np.load(counts_file)
        if len(counts) != self.n_cases:
            raise ValueError(f"{counts_file}: mined voxels of {len(counts)} cases, not {self.n_cases}")
        self.epoch, self._counts = int(epoch), counts

    def checkpointed(self) -> None:
        """The checkpoint a resume starts from now holds :meth:`state`: the passes before it go. (A
        newer pass may be another rank's, already mining the next epoch; one left by a run killed
        between a pass and its checkpoint is written again when the resumed fit gets there.)"""
        if self.epoch is None:
            return
        for folder in self.root.glob("pass_*"):
            epoch = folder.name.removeprefix("pass_")
            if epoch.isdigit() and int(epoch) < self.epoch:
                shutil.rmtree(folder, ignore_errors=True)
