"""Agreement of coarse-to-fine with dense decoding on a fitted run (not a test): every case, every
stage-1 class field and every stage-3 head, as the run decodes them.

    python -m benchmarks.agreement RUN --out DIR [--params P] [--cases N] [--device auto]

For each case of the run folder and each field a label map is made of (each stage-1 class on its
class box, with that class's threshold and ``stage1.decode``; the unified model on the heart box,
with its thresholds and ``stage3.decode``), both decodes run on the same voxels: the share of voxels
identical, the 26-connected components per class of each, the share of voxels evaluated and the
seconds. Writes ``DIR/agreement.csv`` (``case,field,voxels,identical,evaluated,components_dense,
components_coarse_to_fine,components_equal,dense_s,coarse_to_fine_s``, and for stage 1
``mref_identical,mref_components_equal``: the same for M^ref, made as the repair makes it (clean-up, audit,
anchor); one row per case and
stage-1 class, one per case and stage-3 head) and ``DIR/agreement.md`` with the worst case per field and whether
the issue's bar holds: >= 99.99 % of voxels identical and the same component count everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

IDENTICAL_BAR = 0.9999


def _both(model, index, grid, box, decision, params, device, chunk, seed, image=None):
    """(dense labels, seconds), (coarse-to-fine labels, seconds, points evaluated); the coarse-to-fine
    decode seeded as the pipeline seeds it (``seed``: the boundaries of the labels the field was fitted to;
    ``image``: the appearance branch's input, for a field that reads the CT)."""
    from nearfix_lib.field.decide import decode_spent

    t0 = time.perf_counter()
    dense, _ = decode_spent(model, index, grid, box, decision, dataclasses.replace(params, mode="dense"), device,
                            chunk, image)
    t1 = time.perf_counter()
    fine, spent = decode_spent(model, index, grid, box, decision, dataclasses.replace(params, mode="coarse_to_fine"),
                               device, chunk, image, seed=seed)
    return (dense, t1 - t0), (fine, time.perf_counter() - t1, sum(spent.values()))


def _rows(case_id: str, prefix: str, dense, fine, classes, table) -> list[dict]:
    """One row per class of ``classes`` (a label map's values, for :func:`component_counts` of ``table``)."""
    from nearfix_lib.core.metrics import component_counts

    (d, d_s), (f, f_s, evaluated) = dense, fine
    comps = [component_counts(m, table) for m in (d, f)]
    return [{"case": case_id, "field": f"{prefix}:{cls.key}", "voxels": int(d.size),
             "identical": float(np.mean((d == cls.index) == (f == cls.index))), "evaluated": evaluated / d.size,
             "components_dense": comps[0][cls.key], "components_coarse_to_fine": comps[1][cls.key],
             "components_equal": comps[0][cls.key] == comps[1][cls.key], "dense_s": d_s, "coarse_to_fine_s": f_s}
            for cls in classes]


def _mref_agreement(given: np.ndarray, dense: np.ndarray, fine: np.ndarray, cls, spacing, params, table,
                    around, ct: np.ndarray | None) -> dict:
    """Stage 1's output from both decodes (:func:`~nearfix_lib.stages.stage1.repair_decision`'s cuts): each
    made into M^ref as the repair makes it (clean-up, audit, anchor, CT edge: ``stage1.mref_of``), then
    compared like the raw maps."""
    from nearfix_lib.core.metrics import component_counts
    from nearfix_lib.stages.stage1 import mref_of

    a, b = (mref_of(given, m, cls.expected_components, spacing, params, around, ct).mask for m in (dense, fine))
    comps = [component_counts(m.astype(np.uint8) * cls.index, table)[cls.key] for m in (a, b)]
    return {"mref_identical": float(np.mean(a == b)), "mref_components_equal": comps[0] == comps[1]}


def agreement_rows(run, device: str, cases: int = 0, decoding=None) -> list[dict]:
    """The rows of every case (the first ``cases``; 0: all) of a run with stage 1 and stage 3 fitted,
    decoded as ``decoding``'s ``stage1`` and ``stage3`` sections say (a :class:`Params`; the run's own
    when None)."""
    decoding = decoding or run.params
    from nearfix_lib.core.io import read_label
    from nearfix_lib.core.workspace import prepared_dir, stage_labels
    from nearfix_lib.field.infer import original_box_grid
    from nearfix_lib.field.sampling import interface_band
    from nearfix_lib.field.unified import UnifiedModel, priority_decision
    from nearfix_lib.stages.prepare import load_crops_index
    from nearfix_lib.stages.stage1 import box_anatomy, class_image, load_stage1_fields, repair_decision
    from nearfix_lib.stages.stage3 import artifact_path

    index = load_crops_index(prepared_dir(run))
    ids = list(index)[:cases] if cases else list(index)
    fields = load_stage1_fields(run, device)
    artifact = artifact_path(run)
    unified = UnifiedModel.load(artifact, device=device, edits=False) if artifact.is_file() else None
    reads_ct = any(decoding.stage1.for_class(key).mref_reads_ct for key in fields)  # M^ref's edge, paths
    rows = []
    for cid in ids:
        crops = index[cid]
        case = run.load(cid, with_image=reads_ct, with_truth=False) if fields else None
        given = case.label.array if case is not None else None
        for key, field in fields.items():
            if cid not in field.index_of or key not in crops.class_boxes:
                continue
            p = decoding.stage1.for_class(key)
            box = crops.class_boxes[key]
            cls = run.table[key]
            inside = given[box.slices] == cls.index
            image = class_image(run, cid, key, p.model, device) if p.model.appearance else None
            (dense, dense_s), (fine, fine_s, evaluated) = _both(
                field.model, field.index_of[cid], original_box_grid(box), box, repair_decision(p), p.decode, device,
                p.chunk_points, interface_band(inside, 1), image)
            own = [(bits & 1) * cls.index for bits in (dense, fine)]  # the field's own decision, P >= threshold
            rows += _rows(cid, "stage1", (own[0], dense_s), (own[1], fine_s, evaluated), [cls], run.table)
            rows[-1].update(_mref_agreement(inside, dense, fine, cls, crops.spacing, p, run.table,
                                            box_anatomy(given, box, key, run.table, crops.spacing, p.anatomy),
                                            case.image.array[box.slices] if p.mref_reads_ct else None))
            print(f"{cid} stage1:{key}: identical {rows[-1]['identical']:.6f}", flush=True)
        if unified is not None and cid in unified.case_ids:
            box = unified.geometry[cid].heart_box
            lref = read_label(stage_labels(run, "stage2", cid), run.table).array
            both = _both(unified.model, unified.case_ids.index(cid), original_box_grid(box), box,
                         priority_decision(unified.table, unified.thresholds), decoding.stage3.decode, device,
                         decoding.stage3.chunk_points, interface_band(lref[box.slices], 1))
            rows += _rows(cid, "stage3", *both, list(unified.table), unified.table)
            print(f"{cid} stage3: identical {min(r['identical'] for r in rows[-len(unified.table):]):.6f} (worst head)",
                  flush=True)
    return rows


def agreement_page(table, conditions: str) -> str:
    """Per field the worst case: the lowest share identical, component mismatches, and the bar."""
    worst = table.groupby("field", sort=False).agg(
        cases=("case", "count"), min_identical=("identical", "min"),
        component_mismatches=("components_equal", lambda s: int((~s.astype(bool)).sum())),
        mean_evaluated=("evaluated", "mean"), dense_s=("dense_s", "sum"), coarse_to_fine_s=("coarse_to_fine_s", "sum"))
    held = bool((table["identical"] >= IDENTICAL_BAR).all() and table["components_equal"].astype(bool).all())
    lines = ["# Agreement: coarse-to-fine against dense decoding", "", conditions, "",
             f"Every case and field >= {IDENTICAL_BAR:.2%} identical with equal component counts: "
             f"**{'yes' if held else 'no'}** ({len(table)} rows)."]
    columns = "| field | cases | min identical | component mismatches |"
    if "mref_identical" in table:  # stage 1's M^ref: both decodes cleaned as the repair cleans them
        mref = table.dropna(subset=["mref_identical"])
        kept = bool((mref["mref_identical"] >= IDENTICAL_BAR).all()
                    and mref["mref_components_equal"].astype(bool).all())
        lines.append(f"Stage 1's M^ref (both decodes cleaned as the repair cleans them), every case and class: "
                     f"**{'yes' if kept else 'no'}** ({len(mref)} rows).")
        worst = worst.join(mref.groupby("field").agg(
            mref_min_identical=("mref_identical", "min"),
            mref_mismatches=("mref_components_equal", lambda s: int((~s.astype(bool)).sum()))))
        columns += " M^ref min identical | M^ref component mismatches |"
    columns += " mean evaluated | dense s | coarse-to-fine s |"
    lines += ["", columns, "|---" * (columns.count("|") - 1) + "|"]
    with_mref = "mref_min_identical" in worst
    for r in worst.reset_index().itertuples():
        mref_cells = ""
        if with_mref:
            mref_cells = (" | |" if np.isnan(r.mref_min_identical)
                          else f" {r.mref_min_identical:.6f} | {int(r.mref_mismatches)} |")
        lines.append(f"| {r.field} | {r.cases} | {r.min_identical:.6f} | {r.component_mismatches} |{mref_cells} "
                     f"{r.mean_evaluated:.1%} | {r.dense_s:.1f} | {r.coarse_to_fine_s:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from nearfix_lib.core.config import load_params
    from nearfix_lib.core.io import write_text
    from nearfix_lib.core.workspace import open_run
    from nearfix_lib.stages.runs import code_version, resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder with stage 1 (and stage 3) fitted")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/agreement"))
    ap.add_argument("--cases", type=int, default=0, help="the first N cases (0: every case)")
    ap.add_argument("--params", type=Path, help="decode as this params file says (default: the run's params.yaml)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    run = open_run(args.run)
    decoding = load_params(args.params) if args.params else None
    rows = agreement_rows(run, resolve_device(args.device), args.cases, decoding)
    if not rows:
        print(f"{args.run}: no fitted stage-1 field or stage-3 model", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "agreement.csv", index=False)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    source = f"`{args.params.name}`" if args.params else "its `params.yaml`"
    conditions = (f"Run folder `{args.run.name}` ({table['case'].nunique()} cases); decoding as {source} "
                  f"says (`stage1.decode` per class, `stage3.decode`); code {code_version()}; "
                  f"`python -m benchmarks.agreement {command}`.")
    page = agreement_page(table, conditions)
    write_text(args.out / "agreement.md", page)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
