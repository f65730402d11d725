"""A deterministic synthetic cardiac CT: clean labels, a CT-like image and realistic label noise.

Why it exists: the repair pipeline needs a test oracle (clean truth next to what an automatic
segmenter would have produced) and a demo data set that needs no download. Every case is
generated from ``(seed, index)`` alone, so a test, a notebook and a batch run see the same
anatomy.

The anatomy (:mod:`~nearfix_lib.phantom.anatomy`), the CT (:mod:`~nearfix_lib.phantom.image`) and the
label noise (:mod:`~nearfix_lib.phantom.noise`) each live in their own module; this one draws a
case from them and writes data sets.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nearfix_lib.core.classes import CARDIAC, ClassTable
from nearfix_lib.core.config import PhantomParams
from nearfix_lib.core.io import IMAGE_DIR, LABEL_DIR, TRUTH_DIR, case_id_from_name, write_json, write_nifti
from nearfix_lib.phantom.anatomy import _Anatomy, _Grid, _paint, _place, check_table
from nearfix_lib.phantom.image import _ct_image
from nearfix_lib.phantom.noise import add_noise

META_NAME = "phantom.json"


@dataclass
class PhantomCase:
    """One generated case; ``noisy`` is what the simulated automatic segmenter produced."""

    case_id: str
    image: np.ndarray  # float32 HU
    truth: np.ndarray  # uint8 clean labels
    noisy: np.ndarray  # uint8 noisy labels
    affine: np.ndarray  # 4x4 float64, voxel (i, j, k, 1) -> world mm
    noise_log: list[str]


# -- cases and data sets --------------------------------------------------------------------

def make_case(index: int, params: PhantomParams, table: ClassTable = CARDIAC) -> PhantomCase:
    """Case ``index`` (id ``index + 1``); depends only on ``params`` and the index.

    The anatomy, the image noise and the label noise draw from separate child seeds, so
    changing the noise parameters never changes the anatomy or the image.
    """
    check_table(table)
    anatomy_seed, image_seed, noise_seed = np.random.SeedSequence([params.seed, index]).spawn(3)
    rng = np.random.default_rng(anatomy_seed)
    placement = _place(params, rng)
    spacing = params.spacing
    cor_radius_min = 0.51 * float(np.linalg.norm(spacing)) / placement.scale
    anatomy = _Anatomy.sample(rng, cor_radius_min, params.anatomy)
    grid = _Grid(params.shape, placement.vox_to_canon)
    truth = _paint(anatomy.masks(grid), table)
    image = _ct_image(truth, grid, anatomy, spacing, table, np.random.default_rng(image_seed), params.image)
    noisy, log = add_noise(truth, spacing, params.noise, noise_seed, table)
    return PhantomCase(str(index + 1), image, truth, noisy, placement.affine, log)


def case_paths(root: str | Path, case_id: str) -> tuple[Path, Path, Path]:
    """(image, noisy labels, clean labels) file of a case in a phantom data root."""
    root = Path(root)
    return (root / IMAGE_DIR / f"{case_id}.img.nii.gz",
            root / LABEL_DIR / f"{case_id}.label.nii.gz",
            root / TRUTH_DIR / f"{case_id}.label.nii.gz")


def _plain(obj):
    """JSON round trip, so tuples compare equal to the lists a stored file gives back."""
    return json.loads(json.dumps(obj))


def write_dataset(root: str | Path, params: PhantomParams, table: ClassTable = CARDIAC,
                  progress: bool = False) -> list[str]:
    """Write the phantom data set under ``root`` and return its case ids.

    Layout: ``images/<id>.img.nii.gz`` (int16 HU), ``segmentations/<id>.label.nii.gz`` (noisy),
    ``ground_truth/<id>.label.nii.gz`` (clean) and ``phantom.json`` (parameters, class table,
    each case's noise log). Resumable: a case whose three files exist and whose log is recorded
    is kept. When ``phantom.json`` records other parameters the folder is stale and every case
    is regenerated (old case files removed first). A folder holding labels but no
    ``phantom.json`` was not made here and is refused rather than overwritten.
    """
    check_table(table)
    root = Path(root)
    meta_path = root / META_NAME
    wanted = _plain({"params": asdict(params), "classes": table.to_records()})
    ids = [str(i + 1) for i in range(params.n_cases)]
    logs: dict[str, list[str]] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta, dict) and all(meta.get(k) == v for k, v in wanted.items()):
            logs = {k: v for k, v in (meta.get("cases") or {}).items() if k in ids}
        else:
            _remove_case_files(root)
    elif any(case_id_from_name(p.name) for p in (root / LABEL_DIR).glob("*")):
        raise FileExistsError(f"{root}: holds label files but no {META_NAME}; the phantom only "
                              "writes into folders it created")
    write_json(meta_path, {**wanted, "cases": logs})
    for index, cid in enumerate(tqdm(ids, desc="phantom", disable=not progress)):
        paths = case_paths(root, cid)
        if cid in logs and all(p.is_file() for p in paths):
            continue
        case = make_case(index, params, table)
        hu = np.clip(np.rint(case.image), -1024, 3071).astype(np.int16)
        write_nifti(paths[0], hu, case.affine, dtype=np.int16)
        write_nifti(paths[1], case.noisy, case.affine)
        write_nifti(paths[2], case.truth, case.affine)
        logs[cid] = case.noise_log
        write_json(meta_path, {**wanted, "cases": logs})
    return ids


_CASE_FILE = re.compile(r"^\d+\.(img|label)\.nii\.gz$")


def _remove_case_files(root: Path) -> None:
    """Delete the case files of a stale phantom folder (only names the phantom writes)."""
    for sub in (IMAGE_DIR, LABEL_DIR, TRUTH_DIR):
        folder = root / sub
        if folder.is_dir():
            for path in folder.iterdir():
                if _CASE_FILE.match(path.name) and path.is_file():
                    path.unlink()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m nearfix_lib.phantom OUT`` (or ``nearfix phantom OUT``): write a phantom data root to try nearfix on.

    The folder has the layout of a user's data root (``segmentations/``, ``images/``,
    ``ground_truth/``), so copies of its cases can be broken on purpose to see what the data
    contract does with them. Sizes not given keep the :class:`PhantomParams` defaults.
    """
    ap = argparse.ArgumentParser(prog=prog or "python -m nearfix_lib.phantom",
                                 description="Write a phantom data root (segmentations/, images/, ground_truth/).")
    ap.add_argument("out", help="folder to create (must not hold labels made elsewhere)")
    ap.add_argument("--cases", type=int, help=f"number of cases (default {PhantomParams.n_cases})")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("I", "J", "K"),
                    help=f"voxels per case (default {' '.join(map(str, PhantomParams.shape))})")
    ap.add_argument("--fov-mm", type=float, nargs=3, metavar=("X", "Y", "Z"),
                    help="field of view in mm; spacing = fov / shape "
                         f"(default {' '.join(map(str, PhantomParams.fov_mm))})")
    ap.add_argument("--seed", type=int, help=f"seed of the anatomy and noise (default {PhantomParams.seed})")
    args = ap.parse_args(argv)
    given = {"n_cases": args.cases, "shape": args.shape, "fov_mm": args.fov_mm, "seed": args.seed}
    params = PhantomParams(**{k: v for k, v in given.items() if v is not None})
    ids = write_dataset(args.out, params, progress=True)
    print(f"wrote {len(ids)} phantom cases to {args.out} (spacing {' x '.join(f'{s:.2f}' for s in params.spacing)} mm)")
    return 0
