"""Stage 3 on a run: distil L^ref (and the stage-1 fields) into the unified model, decode, score.

Inputs: ``stage2/labels/<case>.nii.gz`` (L^ref on the original grid, learnt inside the whole-heart
box; ``stage3.supervision: roi`` reads ``stage2/roi/<case>.npz`` instead), ``stage1/<key>/prob/<case>.npy``
(the stage-1 probabilities, the distillation teachers) and ``prepared/crops.json`` (geometry).
Outputs in ``<run>/stage3/``: ``cases/<case>/`` (the per-case store the fit reads, written once per
case, see :mod:`nearfix_lib.field.store`), ``ckpt/`` (the fit, resumable), ``unified.pt`` (the artifact),
``labels/<case>.nii.gz`` (decoded on the original grid, source affine and header) and
``scores.csv`` (decoded vs L^ref, and noisy / L^ref / decoded vs the truth when it exists).

Decoding and scoring is a per-case stage, ``decode`` (:data:`DECODE`, :mod:`stages.shards`): it
reads only ``unified.pt`` and the case's files, so it runs in ``workers`` processes or as SLURM
array tasks, each case's scores kept in ``stage3/parts/<case>.json`` until they are merged into
``scores.csv``; a refitted artifact makes every case stale.

Multi-GPU: ``torchrun --nproc_per_node=K -m nearfix_lib.stages.stage3 --params params/default.yaml``
runs :func:`fit_unified` under DistributedDataParallel, the same code path as the notebook, and
rank 0 writes ``unified.pt``; then ``nearfix run decode --params P --workers K [--shard i/n]``
(``jobs/slurm_array.sh decode ...``) decodes and scores every case.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.config import Params, Stage3Params, load_params
from nearfix_lib.core.geometry import resample, roi_box, roi_grid, voxel_spacing
from nearfix_lib.core.io import InputError, read_label, write_nifti, write_text
from nearfix_lib.core.metrics import Reference
from nearfix_lib.core.scores import pivot, score_labels, scores_frame, write_scores
from nearfix_lib.core.workspace import (
    Run,
    decode_dir,
    file_signature,
    kept_inputs,
    prepared_dir,
    stage1_probabilities,
    stage2_dir,
    stage3_cases_dir,
    stage3_dir,
    stage_labels,
)
from nearfix_lib.field.models import ImplicitField
from nearfix_lib.field.store import CaseStore, StoreSpec, is_complete, rank_rotation, write_case
from nearfix_lib.field.train import (
    FitResult,
    distributed_rank_world,
    fit,
    init_distributed_from_env,
    load_for_inference,
    validation_cases,
)
from nearfix_lib.field.unified import CaseGeometry, Teacher, UnifiedModel, UnifiedTask, fit_thresholds, teacher_affine
from nearfix_lib.phantom.dataset import make_case
from nearfix_lib.stages import shards
from nearfix_lib.stages.prepare import CaseCrops, load_crops_index, prepared_cases
from nearfix_lib.stages.runs import resolve_device, start_run


@dataclass
class Stage3Data:
    """The cases stage 3 fits: ids (latent order), geometry, and their store on disk (``stage3/cases/``):
    L^ref on the supervision grid (see :func:`supervision_labels`), sampling tables and teachers."""

    case_ids: list[str]
    geometry: dict[str, CaseGeometry]
    store: CaseStore


def geometry_of(crops: CaseCrops) -> CaseGeometry:
    return CaseGeometry(crops.shape, crops.affine, crops.heart_box, crops.heart_grid)


def teacher_paths(run: Run, crops: CaseCrops,
                  withheld: frozenset[str] = frozenset()) -> list[tuple[int, str, Path]]:
    """(head, class key, stage-1 probability file) of every class this case has a teacher for: classes without
    one are skipped, and so are the ``withheld`` ones (stage 1's audit kept the case's input there:
    :func:`~nearfix_lib.core.workspace.kept_inputs`), whose field the audit did not trust; their head
    learns that case from L^ref alone."""
    paths = ((k, cls.key, stage1_probabilities(run, cls.key, crops.case_id)) for k, cls in enumerate(run.table))
    return [(k, key, path) for k, key, path in paths if key not in withheld and path.is_file()]


def load_teachers(run: Run, crops: CaseCrops, withheld: frozenset[str] = frozenset()) -> list[Teacher]:
    """The teachers of :func:`teacher_paths`, memory-mapped from stage 1's files: a store records
    where they lie instead of copying them."""
    out = []
    for k, key, path in teacher_paths(run, crops, withheld):
        prob = np.load(path, mmap_mode="r", allow_pickle=False)
        grid = crops.class_grids[key]
        if prob.dtype != np.uint8 or prob.shape != tuple(grid.shape):
            raise InputError(path, f"{prob.dtype} {prob.shape}, not uint8 on the class ROI grid {tuple(grid.shape)}; "
                                   "rerun the repair (nearfix run repair)")
        out.append(Teacher(k, prob, teacher_affine(crops.heart_box, crops.class_boxes[key]), path))
    return out


def _supervision_path(run: Run, crops: CaseCrops) -> Path:
    if run.params.stage3.supervision == "roi":
        return stage2_dir(run) / "roi" / f"{crops.case_id}.npz"
    return stage_labels(run, "stage2", crops.case_id)


def supervision_labels(run: Run, crops: CaseCrops) -> np.ndarray:
    """A case's L^ref on the grid stage 3 learns it on (``stage3.supervision``).

    "original": the stage-2 map on the original voxels, cropped to the whole-heart box. The box
    is where the ROI-normalised coordinates run from -1 to 1 (voxel edges), so the crop's own
    normalised coordinates are the model's. "roi": the stage-2 map on the heart ROI grid.
    """
    path = _supervision_path(run, crops)
    if run.params.stage3.supervision == "roi":
        with np.load(path) as z:
            return z["labels"].astype(np.uint8)
    labels = read_label(path, run.table).array
    if labels.shape != tuple(crops.shape):
        raise InputError(path, f"shape {labels.shape} differs from the prepared case {tuple(crops.shape)}")
    return np.ascontiguousarray(labels[crops.heart_box.slices], dtype=np.uint8)


def store_spec(table: ClassTable, params: Stage3Params) -> StoreSpec:
    """What the store's arrays depend on besides the inputs (interface bits only when mining is on)."""
    return StoreSpec(tuple(table.indices), params.sampling.dilation_radius, interfaces=params.sampling.mined > 0)


def case_source(run: Run, crops: CaseCrops, with_teachers: bool = True,
                withheld: frozenset[str] = frozenset()) -> dict:
    """What identifies a case's stage-3 inputs without reading them: the L^ref file and every teacher
    file (:func:`file_signature`; a teacher withheld or restored changes it) and the heart box.
    Raises FileNotFoundError without L^ref."""
    teachers = teacher_paths(run, crops, withheld) if with_teachers else []
    return {"supervision": run.params.stage3.supervision, "shape": list(crops.shape),
            "heart_box": crops.heart_box.to_dict(), "labels": file_signature(run, _supervision_path(run, crops)),
            "teachers": [file_signature(run, p) for _, _, p in teachers]}


def load_stage3_data(run: Run, with_teachers: bool = True) -> Stage3Data:
    """Every case with a stage-2 L^ref, written to the store ``stage3/cases/<case>/`` once (a case whose
    store matches its inputs is not rewritten) and opened from there: nothing per case stays in memory
    but its geometry and the store's small metadata.

    Under torchrun every process runs this before the fit, each from its own offset
    (:func:`~nearfix_lib.field.store.rank_rotation`), so the K processes build the store in parallel.
    """
    index = load_crops_index(prepared_dir(run))
    spec = store_spec(run.table, run.params.stage3)
    root = stage3_cases_dir(run)
    items = list(index.items())
    kept = kept_inputs(run) if with_teachers else {}
    withheld = sum(len(kept.get(cid, ())) for cid in index)
    if withheld:
        print(f"stage3: {withheld} teacher(s) withheld, of (case, class) pairs whose input stage 1's audit "
              "kept (stage1/<class>/scores.csv, audit_kept_input); those heads learn them from L^ref alone")
    problems: dict[str, Exception] = {}
    for cid, crops in rank_rotation(items):
        try:
            withheld_here = kept.get(cid, frozenset())
            source = case_source(run, crops, with_teachers, withheld_here)
            if not is_complete(root / cid, spec, source):
                write_case(root / cid, supervision_labels(run, crops), spec,
                           load_teachers(run, crops, withheld_here) if with_teachers else [], source)
        except (FileNotFoundError, InputError) as err:
            problems[cid] = err
    ids, geometry = [], {}
    for cid, crops in items:  # in the index's order: latent i is the i-th usable case
        if cid in problems:
            run.skipped.add("stage3", cid, f"no usable stage-2 L^ref ({problems[cid]}); run 03_stage2 first")
            continue
        ids.append(cid)
        geometry[cid] = geometry_of(crops)
    run.write_skipped()
    if not ids:
        raise ValueError(f"stage3: no case has a stage-2 L^ref in {stage2_dir(run)}")
    return Stage3Data(ids, geometry, CaseStore(root, ids, spec))


def build_task(data: Stage3Data, table: ClassTable, params: Stage3Params, seed: int, device: str,
               distill: bool = True, mining_dir: Path | None = None) -> UnifiedTask:
    """The fit's task; ``mining_dir``: where its mining passes go (the fit's checkpoint folder's ``mined/``)."""
    loss = params.loss if distill else _no_distill(params).loss
    return UnifiedTask(data.store, table, params.sampling, loss, seed, device, chunk_points=params.chunk_points,
                       decoding=params.decode, mining_dir=mining_dir)


def _no_distill(params: Stage3Params) -> Stage3Params:
    import dataclasses

    return dataclasses.replace(params, loss=dataclasses.replace(params.loss, distill_weight=0.0))


def fit_unified(run: Run, data: Stage3Data, params: Stage3Params | None = None, name: str = "ckpt",
                distill: bool = True, progress: bool = True) -> tuple[ImplicitField, UnifiedTask, FitResult]:
    """Fit F_Θ on every case's L^ref into ``stage3/<name>/`` (resumes; under torchrun: DDP)."""
    params = params or run.params.stage3
    device = init_distributed_from_env(resolve_device(run.params.run.device))
    torch.manual_seed(run.params.run.seed)
    model = ImplicitField(len(data.case_ids), params.model, n_heads=len(run.table))
    task = build_task(data, run.table, params, run.params.run.seed, device, distill,
                      mining_dir=stage3_dir(run) / name / "mined")
    extra = {"case_ids": data.case_ids, "params": run.params.to_dict(), "distill": distill}
    result = fit(model, task, params.train, stage3_dir(run) / name, device=device, seed=run.params.run.seed,
                 progress=progress, extra=extra)
    load_for_inference(model, stage3_dir(run) / name, params.train.select, device)
    return model, task, result


def make_artifact(run: Run, model: ImplicitField, task: UnifiedTask, data: Stage3Data,
                  params: Stage3Params | None = None) -> UnifiedModel:
    """Fit the thresholds t_c on the training cases and assemble (and save) ``unified.pt``."""
    unified = assemble(run, model, task, data, params or run.params.stage3)
    unified.save(artifact_path(run))
    return unified


def threshold_case_indices(n_cases: int, params: Stage3Params, seed: int) -> list[int]:
    """The training cases the thresholds are fitted on: ``threshold_cases`` of them, drawn like the
    fit's validation cases (a fixed seeded subset; every case when there are not more)."""
    return validation_cases(n_cases, params.threshold_cases, seed)


def _slab_pairs(model: ImplicitField, task: UnifiedTask, data: Stage3Data,
                cases: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(probabilities, L^ref) slab by slab of each case (its label crop mapped once): pooled counts add
    up, so neither a case's probability map nor its labels are held whole."""
    for i in cases:
        labels = data.store.labels(i)
        for slab, prob in task.probability_slabs(model, i):
            yield prob, labels[slab]
        del labels  # unmapped before the next case


def assemble(run: Run, model: ImplicitField, task: UnifiedTask, data: Stage3Data, params: Stage3Params) -> UnifiedModel:
    """F_Θ with thresholds fitted on :func:`threshold_case_indices`, decoded one case at a time
    (counts, not maps, are kept): a cost that does not grow with the number of cases."""
    chosen = threshold_case_indices(task.n_cases, params, run.params.run.seed)
    thresholds = fit_thresholds(_slab_pairs(model, task, data, chosen), run.table, params.threshold_candidates)
    return UnifiedModel(model, params.model, run.table, data.case_ids, thresholds, dict(data.geometry),
                        device=task.device, chunk_points=params.chunk_points, decoding=params.decode)


# -- decoding: a per-case stage ------------------------------------------------------------------

def stage_name(source: str) -> str:
    """The decoding stage of a model (in ``skipped.csv``, ``nearfix run``): ``decode`` for the
    deliverable, ``decode-<source>`` for a comparison fit (folders: :func:`workspace.decode_dir`)."""
    return "decode" if source == "stage3" else f"decode-{source}"


def artifact_path(run: Run, source: str = "stage3") -> Path:
    """The saved model a decoding reads: ``stage3/unified.pt``, ``stage3/<source>/unified.pt``."""
    return decode_dir(run, source) / "unified.pt"


def decode_setup(run: Run, source: str) -> UnifiedModel:
    """Once per process: the artifact, on the run's device, decoding as the run's ``stage3.decode`` says."""
    unified = UnifiedModel.load(artifact_path(run, source), device=resolve_device(run.params.run.device), edits=False)
    unified.decoding = run.params.stage3.decode
    return unified


def decode_case(run: Run, case_id: str, unified: UnifiedModel, source: str) -> shards.Rows:
    """One case: decoded on its original grid and scored against L^ref and (when it exists) the truth;
    the deliverable's decoding (source ``stage3``) also noisy and L^ref against the truth, and its
    map is written to ``stage3/labels/<case>.nii.gz`` (source affine and header: what the report and
    the viewers read). ``decode_s`` is the wall time of ``unified.decode``."""
    if case_id not in unified.case_ids:
        raise shards.CaseSkipped(f"not in {artifact_path(run, source)} (no usable stage-2 L^ref at its fit)")
    lref_path = stage_labels(run, "stage2", case_id)
    lref = read_label(lref_path, run.table).array  # read first: a missing or corrupt L^ref writes nothing
    case = run.load(case_id, with_image=False)
    if lref.shape != case.label.shape:
        raise InputError(lref_path, f"shape {lref.shape} differs from the case's {case.label.shape}")
    t0 = time.perf_counter()
    decoded = unified.decode(case_id, grid="original", seed_labels=lref)
    seconds = time.perf_counter() - t0
    if source == "stage3":
        write_nifti(stage_labels(run, "stage3", case_id), decoded, case.label.affine, case.label.header)
    spacing = case.label.spacing
    rows = score_labels(case_id, source, "lref", decoded, lref, spacing, run.table, decode_s=seconds)
    if case.truth is not None:
        truth = Reference(case.truth.array, spacing, run.table)  # scores up to three maps
        rows += score_labels(case_id, source, "truth", decoded, truth, spacing, run.table, decode_s=seconds)
        if source == "stage3":
            rows += score_labels(case_id, "noisy", "truth", case.label.array, truth, spacing, run.table)
            rows += score_labels(case_id, "stage2", "truth", lref, truth, spacing, run.table)
    return {"scores": rows}


def decode_stamp(run: Run, case_id: str, source: str) -> dict:
    """What a case's result depends on: the artifact (a refitted model makes every case stale) and its L^ref."""
    return {"artifact": shards.file_stamp(artifact_path(run, source)),
            "lref": shards.file_stamp(stage_labels(run, "stage2", case_id))}


def write_decoded(run: Run, rows: shards.Rows, source: str) -> pd.DataFrame:
    return write_scores(decode_dir(run, source), rows["scores"])


def decoding(source: str) -> shards.CaseStage:
    """The per-case stage that decodes and scores the model saved for ``source``: the same module-level
    functions, the source bound by ``functools.partial`` (picklable for worker processes)."""
    return shards.CaseStage(stage_name(source), ("scores",), partial(decode_case, source=source),
                            partial(write_decoded, source=source), setup=partial(decode_setup, source=source),
                            stamp=partial(decode_stamp, source=source), cases=prepared_cases)


# The deliverable's decoding (``nearfix run decode``). The comparison fit's without teachers is
# decoding("no_distill"), a stage of its own rather than a serial loop: one code path decodes, skips
# a bad case in one line and resumes, for both.
DECODE = decoding("stage3")


def decode_and_score(run: Run, progress: bool = True, *, workers: int = 1, shard: shards.Shard | str | None = None,
                     source: str = "stage3") -> pd.DataFrame:
    """Decode every case of the run (or a shard's share; ``workers`` processes) with the saved model
    of ``source`` (:func:`artifact_path`, written by :func:`make_artifact` or ``stage3.main``) and
    score it (:func:`decode_case`); returns ``scores.csv`` of :func:`workspace.decode_dir` once every
    case is done (else an empty table). A case whose part was written under the same artifact and
    L^ref is not decoded again."""
    path = artifact_path(run, source)
    if not path.is_file():
        raise ValueError(f"{stage_name(source)}: no model at {path}; fit stage 3 first (notebook 04_stage3, "
                         "or `nearfix stage3` / torchrun)")
    table = shards.run_stage(run, decoding(source), workers, shard, progress)
    return table if table is not None else scores_frame([])


def distillation_effect(run: Run, data: Stage3Data, with_distill: pd.DataFrame, progress: bool = True) -> pd.DataFrame:
    """Fit the same model without distillation (``stage3/no_distill``, its artifact saved there too)
    and compare per class: Dice against L^ref and against the truth, with (``stage3``) and without
    (``no_distill``) the stage-1 teachers; written to ``stage3/distillation.csv``."""
    params = _no_distill(run.params.stage3)
    model, task, _ = fit_unified(run, data, params, name="no_distill", distill=False, progress=progress)
    assemble(run, model, task, data, params).save(artifact_path(run, "no_distill"))
    without = decode_and_score(run, progress, source="no_distill")
    both = pd.concat([without, with_distill[with_distill["source"] == "stage3"]])
    both = both.sort_values("reference", kind="stable")  # columns grouped by reference
    out = pivot(both, "dice", ["reference", "source"])
    write_text(stage3_dir(run) / "distillation.csv", out.to_csv())
    return out


# -- new cases ------------------------------------------------------------------------------------

def heart_labels_of(labels: np.ndarray, affine: np.ndarray, params: Params) -> tuple[np.ndarray, CaseGeometry]:
    """A new case's labels on the supervision grid of its whole-heart box (as ``prepare`` would
    crop them, see :func:`supervision_labels`) and its geometry."""
    p = params.prepare
    box = roi_box(labels > 0, p.heart_margin, voxel_spacing(affine), p.margin_unit)
    if box is None:
        raise ValueError("new case: empty label map")
    grid = roi_grid(box, p.heart_resolution)
    geometry = CaseGeometry(tuple(labels.shape), np.asarray(affine), box, grid)
    if params.stage3.supervision == "roi":
        return resample(labels, grid, order=0).astype(np.uint8), geometry
    return np.ascontiguousarray(labels[box.slices], dtype=np.uint8), geometry


def fit_new_case(run: Run, unified: UnifiedModel, case_id: str, labels: np.ndarray, affine: np.ndarray,
                 progress: bool = False) -> np.ndarray:
    """Fit the latent of an unseen case's noisy labels (F_Θ frozen) and decode it on its original grid."""
    heart, geometry = heart_labels_of(labels, affine, run.params)
    p = run.params.stage3
    unified.fit_case(case_id, heart, geometry, p.sampling, p.loss, p.new_case_train,
                     stage3_dir(run) / "new_cases" / str(case_id), seed=run.params.run.seed, progress=progress)
    return unified.decode(case_id, grid="original", seed_labels=labels)


def phantom_holdout(run: Run):
    """A phantom case the unified model never saw (index ``n_cases`` of the run's phantom), or None
    when the run works on real data."""
    if run.params.data.data_root:
        return None
    return make_case(run.params.data.phantom.n_cases, run.params.data.phantom, run.table)


def new_case_scores(run: Run, case_id: str, holdout, decoded: np.ndarray) -> pd.DataFrame:
    """The hold-out's noisy labels and its decoded map against its truth (``stage3/new_cases/<case>/scores.csv``);
    returns mean Dice and HD95 per class."""
    spacing = voxel_spacing(holdout.affine)
    rows = (score_labels(case_id, "noisy", "truth", holdout.noisy, holdout.truth, spacing, run.table)
            + score_labels(case_id, "stage3", "truth", decoded, holdout.truth, spacing, run.table))
    return pivot(write_scores(stage3_dir(run) / "new_cases" / case_id, rows), ["dice", "hd95"])


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Command line for torchrun: fit (DDP when WORLD_SIZE > 1); rank 0 then writes the artifact."""
    ap = argparse.ArgumentParser(prog=prog, description="stage 3: fit the unified model (torchrun-ready)")
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--device", default="")
    args = ap.parse_args(argv)
    run = start_run(load_params(args.params, run_dir=args.run_dir, device=args.device), progress=False)
    data = load_stage3_data(run)
    model, task, _ = fit_unified(run, data)
    if distributed_rank_world()[0] == 0:
        unified = make_artifact(run, model, task, data)
        print(f"wrote {artifact_path(run)}; thresholds {dict(zip(run.table.keys, unified.thresholds))}; "
              f"decode and score: nearfix run decode --params {run.path('params.yaml')} --workers K")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
