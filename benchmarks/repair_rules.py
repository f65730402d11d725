"""M^ref's rule, measured on fitted fields (a benchmark, not a test): the anchor's cuts and the field
alone, against the truth, without refitting anything.

    python -m benchmarks.repair_rules --runs DIR/runs/thin_cor_tuning DIR/runs/shapes_tuning --class Cor \
        --keep 0.05 0.2 --add 0.7 0.85 --join both --bridge 12 16 --volume-ratio 0 1.1 --out DIR/rules
    python -m benchmarks.repair_rules --runs DIR/runs/*_tuning --class LA LV RA RV Ao PA Myo \
        --keep 0.4 0.45 --add 0.55 0.6 --join off --out DIR/bands

Why: how a class's M^ref is made from its field (``stage1.anchor``: keep an input voxel unless
P < ``keep_above``, add one where P >= ``add_above``, with ``join`` the field's own connections
across the gaps; off: the field's P >= ``threshold``) is a choice made on the robustness matrix's
*tuning* seeds, and every candidate would otherwise need a run of its own. The field does not
change with the rule, so one dense decode of each case's class box serves every candidate. For
each run (a phantom run: the scores need its truth), each ``--class`` (several: one rule chosen for
them together; a run without a finished fit of a class is skipped, and said so) and each case of the
class's finished stage-1 fit, P is decoded at every voxel of the class box; each rule (the field alone, then every
``--keep`` x ``--add`` pair with ``--join`` off, on or both), with the clean-up's own bridge or each
``--bridge`` gap (``cleanup.bridge_gap_mm``: how far apart two pieces of a broken tree may lie and
still be joined), each anchor with the run's own cap on its volume or each ``--volume-ratio``
(``anchor.max_volume_ratio``: the anchored mask's voxels per input voxel, at most; 0: no cap),
goes through the run's own M^ref function (``stage1.mref_of``: clean-up, audit and its fallback
included) and is scored against the truth, next to the noisy input. With ``--without-field``, each
audit fallback (``audit.action`` ``clean_input``, ``repair_input``) is scored on every case too, as if
the audit had rejected its field: what a rejected case would get, measured where the field is known. Writes
``rules.csv`` (run, case, class, rule, keep_above, add_above, join, bridge_gap_mm, max_volume_ratio,
dice, hd95, n_comp, expected, kept_input, volume_ratio) and ``rules.md`` rendered from it: per run
(and class, where several) and rule the mean gain over the input (Dice, HD95), the share of cases 0.03 Dice
above their input at the expected component count (the robustness targets), and the cases at that
count. Use it on tuning seeds only: a rule chosen on held-out seeds has nothing left to confirm it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from benchmarks.robustness import COR_GAIN

if TYPE_CHECKING:
    import pandas as pd

    from nearfix_lib.core.workspace import Run

COLUMNS = ["run", "case", "class", "rule", "keep_above", "add_above", "join", "bridge_gap_mm", "max_volume_ratio",
           "add_over_foreign", "ct_edge", "anatomy", "dice", "hd95", "n_comp", "expected", "kept_input", "volume_ratio"]
SHARE_OF = f"cases +{COR_GAIN:g} at the expected count"  # benchmarks.robustness's coronary target


class Rule(NamedTuple):
    """One way of making M^ref from a field; NaN cuts: the field alone, NaN gap or ratio, None
    ``add_over_foreign``, ``ct_edge`` or ``anatomy`` (both of its rules): the run's own."""

    name: str
    keep_above: float
    add_above: float
    join: bool
    bridge_gap_mm: float
    max_volume_ratio: float = float("nan")
    add_over_foreign: bool | None = None
    ct_edge: bool | None = None
    anatomy: bool | None = None


NOISY = Rule("noisy", float("nan"), float("nan"), False, float("nan"))
# the audit's fallbacks (``audit.action``) on every case, as if the audit had rejected every field
FALLBACKS = ("clean_input", "repair_input")


def rules(keeps: list[float], adds: list[float], joins: list[bool], bridges: list[float] | None = None,
          ratios: list[float] | None = None, overs: list[bool] | None = None,
          edges: list[bool] | None = None, anatomies: list[bool] | None = None) -> list[Rule]:
    """Every rule measured: the field alone (NaN cuts), then each anchor with each ``join``; each with
    the run's own bridge gap (``bridges`` None) or with every gap of ``bridges``, each anchor with the
    run's own volume cap (``ratios`` None) or with every cap of ``ratios``, and the run's own
    ``add_over_foreign`` (``overs`` None) or each of ``overs``, and every rule with the run's own
    ``ct_edge.enabled`` (``edges`` None) or each of ``edges``, and its own ``anatomy`` (``anatomies``
    None) or each of ``anatomies`` (both of its rules on or off; named in the rule)."""
    nan = float("nan")
    cuts = [Rule("field", nan, nan, False, nan)]
    cuts += [Rule(f"anchor {k:g} / {a:g}" + (" + join" if j else ""), k, a, j, nan)
             for k in keeps for a in adds if k < a for j in joins]
    if ratios is not None:  # the field alone has no anchor to cap
        cuts = cuts[:1] + [r._replace(name=f"{r.name}, volume {v:g}", max_volume_ratio=v) for r in cuts[1:]
                           for v in ratios]
    if overs is not None:
        cuts = cuts[:1] + [r._replace(name=r.name + ("" if o else ", not over foreign"), add_over_foreign=o)
                           for r in cuts[1:] for o in overs]
    if edges is not None:
        cuts = [r._replace(name=r.name + (", CT edge" if e else ""), ct_edge=e) for r in cuts for e in edges]
    if anatomies is not None:
        cuts = [r._replace(name=r.name + (", anatomy" if a else ""), anatomy=a) for r in cuts for a in anatomies]
    if bridges is None:
        return cuts
    return [r._replace(name=f"{r.name}, bridge {g:g} mm", bridge_gap_mm=g) for r in cuts for g in bridges]


def rule_bits(p: np.ndarray, params) -> np.ndarray:
    """The bits ``stage1.repair_decision(params)`` gives a voxel, from dense probabilities ``p`` of any
    shape (what stage 1's decode gives where it evaluates every voxel)."""
    from nearfix_lib.stages.stage1 import repair_decision

    return repair_decision(params).labels(p.reshape(-1, 1)).reshape(p.shape)


def score_row(run_name: str, case_id: str, key: str, rule: Rule, mask: np.ndarray, truth: np.ndarray,
              spacing, expected: int, kept: bool) -> dict:
    """One row of ``rules.csv``: ``mask`` (made by ``rule``) against ``truth``."""
    from nearfix_lib.core.metrics import binary_scores, mask_components

    scores = binary_scores(mask, truth, spacing)
    return {"run": run_name, "case": case_id, "class": key, "rule": rule.name, "keep_above": rule.keep_above,
            "add_above": rule.add_above, "join": rule.join, "bridge_gap_mm": rule.bridge_gap_mm,
            "max_volume_ratio": rule.max_volume_ratio, "add_over_foreign": rule.add_over_foreign,
            "ct_edge": rule.ct_edge, "anatomy": rule.anatomy,
            "dice": scores["dice"], "hd95": scores["hd95"],
            "n_comp": mask_components(mask), "expected": expected, "kept_input": kept,
            "volume_ratio": float(mask.sum() / max(1, truth.sum()))}


def fallback_rule(action: str) -> Rule:
    """The row name of an audit fallback measured on every case (``--without-field``)."""
    return NOISY._replace(name=f"audit: {action}")


def fallback_mask(given: np.ndarray, expected: int, spacing, params, action: str, around, ct) -> np.ndarray:
    """M^ref where the audit replaced the field with ``action``: ``stage1.mref_of``'s own path, reached
    by an audit that rejects any repair leaving out input voxels and a field that holds none."""
    from nearfix_lib.core.config import AuditParams
    from nearfix_lib.stages.stage1 import mref_of

    rejecting = dataclasses.replace(params, audit=AuditParams(max_dropped=0.0, action=action))
    made = mref_of(given, np.zeros(given.shape, np.uint8), expected, spacing, rejecting, around, ct)
    if given.any() and not made.audit.kept_input:
        raise AssertionError("the audit did not reject an empty field")
    return made.mask


def run_rows(run: Run, key: str, candidates: list[Rule], without_field: bool = False) -> list[dict]:
    """Every case of the run's fit of ``key``: the noisy input's row, one per rule and, with
    ``without_field``, one per audit fallback (:data:`FALLBACKS`)."""
    from nearfix_lib.field.infer import field_on_grid, original_box_grid
    from nearfix_lib.stages.stage1 import box_anatomy, class_image, mref_of, repair_setup

    run_dir = run.dir
    state = repair_setup(run, [key])
    field, cls, base = state.fields[key], run.table[key], run.params.stage1.for_class(key)
    rows = []
    reads_ct = base.ct_path.enabled or any(base.ct_edge.enabled if r.ct_edge is None else r.ct_edge for r in candidates)
    reads_ct |= without_field and base.ct_edge.enabled
    for case_id, i in field.index_of.items():
        crops, case = state.index[case_id], run.load(case_id, with_image=reads_ct)
        if case.truth is None:
            raise ValueError(f"{run_dir}: case {case_id} has no truth; the rules are scored against it")
        box = crops.class_boxes[key]
        image = class_image(run, case_id, key, base.model, state.device) if base.model.appearance else None
        p = field_on_grid(field.model, i, original_box_grid(box), box, state.device, base.chunk_points,
                          image=image)[..., 0]
        given, truth = case.label.array[box.slices] == cls.index, case.truth.array[box.slices] == cls.index
        around = box_anatomy(case.label.array, box, key, run.table, crops.spacing, base.anatomy)
        ct = case.image.array[box.slices] if case.image is not None else None
        expected = cls.expected_components
        rows.append(score_row(run_dir.name, case_id, key, NOISY, given, truth, crops.spacing, expected, False))
        for rule in candidates:
            # the run's own anchor with the rule's cuts: its volume cap unless the rule names one
            ratio = base.anchor.max_volume_ratio if np.isnan(rule.max_volume_ratio) else rule.max_volume_ratio
            over = base.anchor.add_over_foreign if rule.add_over_foreign is None else rule.add_over_foreign
            anchor = (dataclasses.replace(base.anchor, enabled=False) if np.isnan(rule.keep_above)
                      else dataclasses.replace(base.anchor, enabled=True, keep_above=rule.keep_above,
                                               add_above=rule.add_above, join=rule.join, max_volume_ratio=ratio,
                                               add_over_foreign=over))
            cleanup = (base.cleanup if np.isnan(rule.bridge_gap_mm)
                       else dataclasses.replace(base.cleanup, bridge_gap_mm=rule.bridge_gap_mm))
            edge = dataclasses.replace(base.ct_edge, enabled=base.ct_edge.enabled if rule.ct_edge is None
                                       else rule.ct_edge)
            anatomy = (base.anatomy if rule.anatomy is None  # on: the run's own origins
                       else dataclasses.replace(base.anatomy, drop_unattached=rule.anatomy, split_joins=rule.anatomy,
                                                split_origins=base.anatomy.split_origins if rule.anatomy else []))
            params = dataclasses.replace(base, anchor=anchor, cleanup=cleanup, ct_edge=edge, anatomy=anatomy)
            made = mref_of(given, rule_bits(p, params), expected, crops.spacing, params, around, ct)
            rows.append(score_row(run_dir.name, case_id, key, rule, made.mask, truth, crops.spacing, expected,
                                  made.audit.kept_input))
        for action in FALLBACKS if without_field else ():
            mask = fallback_mask(given, expected, crops.spacing, base, action, around, ct)
            rows.append(score_row(run_dir.name, case_id, key, fallback_rule(action), mask, truth, crops.spacing,
                                  expected, True))
        print(f"{run_dir.name} {key} case {case_id}: {len(candidates)} rules", flush=True)
    return rows


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per run, class and rule: mean Dice and HD95 gain over the noisy input (HD95: input minus rule,
    positive better), the share of cases +0.03 at the expected count, cases worse than the input, volume."""
    noisy = table.loc[table["rule"] == "noisy", ["run", "class", "case", "dice", "hd95"]]
    repaired = table[table["rule"] != "noisy"].merge(noisy, on=["run", "class", "case"], suffixes=("", "_noisy"))
    repaired = repaired.assign(dice_gain=repaired["dice"] - repaired["dice_noisy"],
                               hd95_gain=repaired["hd95_noisy"] - repaired["hd95"])
    at_count = repaired["n_comp"] == repaired["expected"]
    repaired = repaired.assign(target=(repaired["dice_gain"] >= COR_GAIN) & at_count, at_count=at_count,
                               worse=repaired["dice_gain"] < 0)
    return repaired.groupby(["run", "class", "rule"], sort=False).agg(
        dice_gain=("dice_gain", "mean"), hd95_gain=("hd95_gain", "mean"), target=("target", "mean"),
        at_count=("at_count", "mean"),
        worse=("worse", "sum"), kept_input=("kept_input", "sum"), volume_ratio=("volume_ratio", "mean"),
        cases=("case", "count")).reset_index()


def page(table: pd.DataFrame, command: str, version: str) -> str:
    """The markdown page: per measure a rule x run table (run and class, where several) and the mean over them."""
    s = summary(table)
    several = s["class"].nunique() > 1
    s["run"] = s["class"] + " " + s["run"] if several else s["run"]
    lines = ["# M^ref's rule on fitted fields", "",
             f"`python -m benchmarks.repair_rules {command}` (code `{version}`). Each case's field decoded once "
             "at every voxel of its class box; every rule through `stage1.mref_of` (clean-up, audit and fallback "
             "included), scored against the truth. Gains are over the noisy input, mean over each run's cases "
             f"({int(s['cases'].max())} at most); `{SHARE_OF}` is the robustness matrix's coronary target; "
             "`worse`: cases below their input's Dice; `volume`: the mask's voxels over the truth's.", ""]
    for column, title, digits in (("dice_gain", "Dice gain", 3), ("hd95_gain", "HD95 gain (mm, input - rule)", 2),
                                  ("target", SHARE_OF, 2), ("at_count", "cases at the expected count", 2),
                                  ("worse", "worse", 0),
                                  ("volume_ratio", "volume", 2)):
        wide = s.pivot(index="rule", columns="run", values=column).reindex(s["rule"].unique())
        wide["mean" if column != "worse" else "sum"] = wide.mean(axis=1) if column != "worse" else wide.sum(axis=1)
        lines += [f"**{title}**", "", wide.round(digits).to_markdown(), ""]
    return "\n".join(lines)


def _fitted_keys(run: Run, keys: list[str]) -> list[str]:
    """Those of ``keys`` whose stage-1 fit in the run finished (the others said on stdout)."""
    from nearfix_lib.core.workspace import stage1_fitted

    done = [key for key in keys if stage1_fitted(run, key)]
    for key in sorted(set(keys) - set(done)):
        print(f"{run.dir.name}: no finished stage-1 fit of {key}, skipped", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from nearfix_lib.core.io import write_text
    from nearfix_lib.core.workspace import open_run
    from nearfix_lib.stages.runs import code_version

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="phantom runs with a finished stage-1 fit")
    ap.add_argument("--class", dest="keys", nargs="+", default=["Cor"],
                    help="the class(es) whose rule is measured (several: runs lacking a fit of one skip it)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.05, 0.2], help="keep_above values")
    ap.add_argument("--add", type=float, nargs="+", default=[0.5, 0.7, 0.85], help="add_above values")
    ap.add_argument("--join", choices=["off", "on", "both"], default="both", help="anchor.join of the rules")
    ap.add_argument("--bridge", type=float, nargs="+", help="cleanup.bridge_gap_mm values (default: the run's own)")
    ap.add_argument("--volume-ratio", type=float, nargs="+",
                    help="anchor.max_volume_ratio values, 0: no cap (default: the run's own)")
    ap.add_argument("--over-foreign", choices=["on", "off", "both"],
                    help="anchor.add_over_foreign of the rules (default: the run's own)")
    ap.add_argument("--ct-edge", choices=["on", "off", "both"],
                    help="ct_edge.enabled of the rules, the field alone's too (default: the run's own)")
    ap.add_argument("--anatomy", choices=["on", "off", "both"],
                    help="stage1.anatomy's rules of every rule, on (with the run's own split_origins) or off "
                         "(default: the run's own)")
    ap.add_argument("--without-field", action="store_true",
                    help="also the audit's fallbacks (clean_input, repair_input) on every case, as if the audit "
                         "had rejected every field")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/repair_rules"))
    args = ap.parse_args(argv)
    for run_dir in args.runs:
        if not (run_dir / "params.yaml").is_file():
            print(f"{run_dir}: no params.yaml, not a run folder", file=sys.stderr)
            return 2
    joins = {"off": [False], "on": [True], "both": [False, True]}[args.join]
    overs = None if args.over_foreign is None else {"on": [True], "off": [False],
                                                   "both": [True, False]}[args.over_foreign]
    edges = None if args.ct_edge is None else {"on": [True], "off": [False], "both": [False, True]}[args.ct_edge]
    anatomies = None if args.anatomy is None else {"on": [True], "off": [False], "both": [False, True]}[args.anatomy]
    candidates = rules(args.keep, args.add, joins, args.bridge, args.volume_ratio, overs, edges, anatomies)
    runs = [open_run(run_dir) for run_dir in args.runs]  # each opened once, for all its classes
    pairs = [(run, key) for run in runs  # one class: its missing fit is an error
             for key in (args.keys if len(args.keys) == 1 else _fitted_keys(run, args.keys))]
    if not pairs:
        print(f"none of the runs has a finished fit of {args.keys}", file=sys.stderr)
        return 2
    table = pd.DataFrame([r for run, key in pairs for r in run_rows(run, key, candidates, args.without_field)],
                         columns=COLUMNS)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "rules.csv", table.to_csv(index=False))
    write_text(args.out / "rules.md", page(table, " ".join(argv if argv is not None else sys.argv[1:]), code_version()))
    print(f"wrote {args.out / 'rules.csv'} and rules.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
