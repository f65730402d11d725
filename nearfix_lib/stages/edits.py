"""A person's edits of a run's cases: open a case for clicks (:mod:`nearfix_lib.field.refine`), save it.

The napari widget (:mod:`nearfix_lib.viz.edit_widget`), a notebook and the click benchmark use the
same two calls, :func:`open_edit` and :func:`save_edit`. What a case is edited with (``source``):

* ``stage3`` — the unified model F_Θ (``stage3/unified.pt``); the labels shown at the start are the
  case's decoded map (``stage3/labels/<case>.nii.gz``, or decoded now), or its saved edit;
* ``stage1:KEY`` — for a run without stage 3, class KEY's stage-1 model; the labels shown are the
  class's M^ref (``stage1/KEY/masks/<case>.nii.gz``) in the class's index.

A save writes ``<run>/edits/<case>.nii.gz`` (stage 1: ``<run>/edits/stage1_KEY/<case>.nii.gz``: the
whole box decoded with the edited latent, the case's affine and header), a ``.json`` beside it (the
clicks, the source, the latent's norm before and after, the voxels changed, the code version), and
the latent into the model's edits file (``stage3/unified.edits.pt``, which ``UnifiedModel.load``
reads; ``stage1/KEY/edits.pt``). The run's inputs, the artifact and every stage's results stay as
they were: an edit is a product beside them, never written into the data root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nearfix_lib.core.config import RefineParams
from nearfix_lib.core.io import read_label, write_json, write_nifti
from nearfix_lib.core.workspace import Run, open_run, prepared_dir, stage1_dir, stage1_fitted, stage_labels
from nearfix_lib.field.decide import threshold_decision
from nearfix_lib.field.refine import CaseField, EditSession, read_edited_latents, write_edited_latent
from nearfix_lib.field.unified import UnifiedModel, edits_path
from nearfix_lib.stages.prepare import load_crops_index
from nearfix_lib.stages.runs import code_version, resolve_device
from nearfix_lib.stages.stage1 import class_image, load_stage1_fields
from nearfix_lib.stages.stage3 import artifact_path


@dataclass
class CaseEdit:
    """An open case: the session, and where its edit is saved."""

    run: Run
    case_id: str
    source: str
    session: EditSession
    image: np.ndarray | None  # the CT, for the viewer
    affine: np.ndarray  # the case's (label image's) affine: world mm of every layer and click
    latents_file: Path  # the model's edits file

    @property
    def labels_path(self) -> Path:
        return edit_dir(self.run, self.source) / f"{self.case_id}.nii.gz"


def edit_dir(run: Run, source: str) -> Path:
    return run.path("edits") if source == "stage3" else run.path("edits", f"stage1_{source_class(source)}")


def source_class(source: str) -> str:
    """The class a ``stage1:KEY`` source edits."""
    if not source.startswith("stage1:") or not source[len("stage1:"):]:
        raise ValueError(f"source must be 'stage3' or 'stage1:KEY', got {source!r}")
    return source[len("stage1:"):]


def edit_sources(run: Run) -> list[str]:
    """What a case of this run can be edited with: ``stage3`` where the artifact exists, else (and
    also) ``stage1:KEY`` for every class whose stage-1 fit finished."""
    out = ["stage3"] if artifact_path(run).is_file() else []
    return out + [f"stage1:{k}" for k in run.table.keys if stage1_fitted(run, k)]


def open_edit(run_dir: str | Path | Run, case_id: str, source: str = "auto",
              params: RefineParams | None = None, with_image: bool = True) -> CaseEdit:
    """The case ready for clicks: from its saved edit where there is one, else as the model decodes it.
    ``source="auto"``: ``stage3`` where the run has it, else the first fitted stage-1 class."""
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    case_id = str(case_id)
    if source == "auto":
        sources = edit_sources(run)
        if not sources:
            raise ValueError(f"{run.dir}: nothing to edit with: no stage-3 artifact and no finished stage-1 fit")
        source = sources[0]
    params = params or run.params.refine
    case = run.load(case_id, with_image=with_image, with_truth=False)
    affine = np.asarray(case.label.affine, dtype=np.float64)
    field, latents_file, start = (_stage3_field(run, case_id) if source == "stage3"
                                  else _stage1_field(run, case_id, source_class(source)))
    saved = edit_dir(run, source) / f"{case_id}.nii.gz"
    edited = case_id in read_edited_latents(latents_file)
    if edited and saved.is_file():
        labels = read_label(saved, run.table, allow_empty=True).array
    elif start.is_file():
        labels = read_label(start, run.table, allow_empty=True).array  # a class repaired to nothing is shown too
        if source != "stage3":
            labels = np.where(labels > 0, run.table[source_class(source)].index, 0).astype(np.uint8)
    else:  # nothing decoded on disk: the model's own map of the box
        labels = np.zeros(field.shape, np.uint8)
        labels[field.box.slices] = field.decode(field.latent)
    if labels.shape != case.label.shape:
        raise ValueError(f"{saved if edited else start}: shape {labels.shape} differs from the case's "
                         f"{case.label.shape}")
    session = EditSession(field, labels, params, seed=run.params.run.seed)
    image = case.image.array if with_image and case.image is not None else None
    return CaseEdit(run, case_id, source, session, image, affine, latents_file)


def _stage3_field(run: Run, case_id: str) -> tuple[CaseField, Path, Path]:
    artifact = artifact_path(run)
    if not artifact.is_file():
        raise ValueError(f"{artifact}: no stage-3 artifact; fit stage 3 first, or edit with a stage-1 class")
    # decoding as the artifact says (not the run's params): the saved edit is what the artifact alone decodes
    unified = UnifiedModel.load(artifact, device=resolve_device(run.params.run.device))
    if case_id not in unified.geometry:
        raise ValueError(f"case {case_id!r} is not in {artifact}")
    return unified.case_field(case_id), edits_path(artifact), stage_labels(run, "stage3", case_id)


def _stage1_field(run: Run, case_id: str, key: str) -> tuple[CaseField, Path, Path]:
    device = resolve_device(run.params.run.device)
    fields = load_stage1_fields(run, device, [key])
    if key not in fields:
        raise ValueError(f"class {key}: no finished stage-1 fit in {stage1_dir(run, key)}")
    params = run.params.stage1.for_class(key)
    class_field = fields[key]
    if case_id not in class_field.index_of:
        raise ValueError(f"case {case_id!r} is not in class {key}'s stage-1 fit")
    crops = load_crops_index(prepared_dir(run))[case_id]
    latents_file = stage1_dir(run, key) / "edits.pt"
    edited = read_edited_latents(latents_file).get(case_id)
    table_latent = class_field.model.latents.embedding.weight[class_field.index_of[case_id]][None]
    latent = (edited["latent"] if edited else table_latent).detach().cpu().float().clone()
    field = CaseField(class_field.model, latent, crops.class_boxes[key], crops.affine, tuple(crops.shape),
                      threshold_decision(params.threshold, run.table[key].index), (run.table[key].index,),
                      params.decode, device, params.chunk_points,
                      class_image(run, case_id, key, params.model, device) if params.model.appearance else None)
    return field, latents_file, stage1_dir(run, key) / "masks" / f"{case_id}.nii.gz"


def save_edit(edit: CaseEdit) -> dict[str, Path]:
    """Write the edited case (labels, record, latent) and return where: the latent is fitted once more to
    the whole map shown (:meth:`EditSession.consolidate`) and the box decoded with it; the shown map
    becomes that decode (what the model alone decodes from now on)."""
    session = edit.session
    session.consolidate()
    decoded = session.decode_all()
    source = edit.run.load(edit.case_id, with_image=False, with_truth=False).label
    labels_path = write_nifti(edit.labels_path, decoded, source.affine, source.header)
    before, after = session.start_latent, session.latent
    changed = int(np.count_nonzero(decoded != session.start_labels))
    write_edited_latent(edit.latents_file, edit.case_id, after, start_norm=float(before.norm()),
                        norm=float(after.norm()))
    record = {"case": edit.case_id, "source": edit.source, "clicks": [c.to_dict() for c in session.clicks],
              "classes": sorted({int(c.label) for c in session.clicks}),
              "latent_norm_before": float(before.norm()), "latent_norm_after": float(after.norm()),
              "latent_change": float((after - before).norm()), "voxels_changed": changed,
              "labels": labels_path.name, "latents_file": str(edit.latents_file.relative_to(edit.run.dir)),
              "code_version": code_version()}
    json_path = write_json(labels_path.with_name(f"{edit.case_id}.json"), record)
    session.labels[...] = decoded
    return {"labels": labels_path, "record": json_path, "latents": edit.latents_file}
