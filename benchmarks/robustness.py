"""The robustness matrix (a benchmark, not a test): the repair on phantom families it was not tuned on.

    python -m benchmarks.robustness --out outputs/robustness                 # every family, held-out seeds
    python -m benchmarks.robustness --out DIR --split tuning --families thin_cor fine
    python -m benchmarks.robustness --out DIR --overrides '{stage1.classes: [LV, LAA, Cor, PV]}'

Why: every setting of nearfix was chosen on one phantom family (its anatomy, its 1.1 mm grid, its
noise model), and on an independent phantom the coronaries came out worse than their noisy input.
A user's data has no ground truth, so a repair that damages a class there looks like success.
The matrix is the check: families from our own generator that vary what that phantom held fixed
(voxel size and anisotropy, coronary radius and tree shape, LAA/PV shape, noise strength, errors
in millimetres of a segmenter's grid), listed with their seeds in ``params/robustness.yaml``. Each
family has a *tuning* seed set, on which settings may be chosen, and a *held-out* one, fixed before
any tuning, on which the verdict is read.

``--combine PAGE ...`` runs nothing: it joins the CSVs of earlier invocations' pages (each run on a
subset of the classes, since the whole matrix is hours of fits) into one held-out table, every
(family, class) pair once, the pairs no page has listed as not run.

``--roundtrip R1 R2 ...`` measures instead, without any fit, what the class ROI grid alone keeps of
each thin class: its mask resampled to R^3 (as ``prepare`` does) and back onto the original voxels,
against the mask itself (``roundtrip.csv``): a field fitted on that grid can do no better.

For each family the phantom is generated (``--cases`` per family), then prepare, stage 1, stage 2
and the report run on it with the judging configuration (``--params``, default
``params/phantom_1mm.yaml``; ``--overrides`` for shorter runs, stated on the page), each stage in
its own process (``benchmarks.scale``'s machinery: a failing family is a row, not the end). A
family whose report exists is kept and an interrupted one resumes, its fits from their checkpoints
(the matrix takes hours); ``--again`` runs it anew. It writes ``robustness.csv`` (family, split,
class, source: noisy, both baselines, stage 1, stage 2; Dice, HD95, components; mean over the
family's cases), ``verdicts.csv`` (the targets per family and class) and ``robustness.md``
rendered from them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from benchmarks.scale import PROJECT, run_stages, write_params

if TYPE_CHECKING:
    import pandas as pd

FAMILIES_FILE = PROJECT / "params" / "robustness.yaml"
STAGES = ("prepare", "stage1", "stage2", "report")
SOURCES = ("noisy", "closing", "gaussian", "stage1", "stage2")
REPAIRS = ("stage1", "stage2")
# assd and nsd (and their gains) came later: a page written before them joins with those cells empty
MATRIX_COLUMNS = ["family", "split", "class", "source", "n_cases", "dice", "hd95", "assd", "nsd", "n_comp",
                  "expected", "at_expected"]
VERDICT_COLUMNS = ["family", "split", "class", "source", "dice_gain", "hd95_gain", "assd_gain", "nsd_gain",
                   "dice_not_worse", "hd95_not_worse", "cor_gain_share", "ok"]
COR_GAIN = 0.03  # the coronaries: at least this Dice above the noisy input ...
COR_SHARE = 0.9  # ... at the expected component count, in this share of the cases


@dataclass(frozen=True)
class Family:
    """One phantom family: ``data.phantom`` overrides and a seed per split (``tuning``, ``heldout``)."""

    name: str
    about: str
    seeds: dict[str, int]
    phantom: dict


def load_families(path: Path = FAMILIES_FILE) -> tuple[int, list[Family]]:
    """The families file: (cases per family and split, the families in file order)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    families = [Family(name, str(spec.get("about", "")), {k: int(v) for k, v in spec["seeds"].items()},
                       dict(spec.get("phantom") or {}))
                for name, spec in (data.get("families") or {}).items()]
    if not families:
        raise ValueError(f"{path}: no families")
    return int(data.get("cases", 4)), families


def dotted(prefix: str, tree: dict) -> dict:
    """Nested overrides as dotted keys (``{noise: {a: 1}}`` -> ``{prefix.noise.a: 1}``)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted(f"{prefix}.{key}", value))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def family_overrides(family: Family, split: str, cases: int) -> dict:
    """The family's phantom, its ``split`` seed and ``cases`` cases, as dotted overrides of a params file."""
    if split not in family.seeds:
        raise ValueError(f"family {family.name} has no {split!r} seeds (it has {sorted(family.seeds)})")
    return {**dotted("data.phantom", family.phantom), "data.phantom.seed": family.seeds[split],
            "data.phantom.n_cases": cases}


def run_family(family: Family, split: str, cases: int, out: Path, params_file: str, overrides: dict,
               device: str, timeout_s: float, again: bool = False) -> list[dict]:
    """Generate the family's cases (kept when they exist), then every stage of ``STAGES`` in its own
    process, resuming what an interrupted run left; a family whose report exists is kept unless
    ``again`` (which starts it anew). Returns the stages' rows."""
    from nearfix_lib.phantom.dataset import write_dataset

    name = f"{family.name}_{split}"
    run_dir, data_root, params_path = out / "runs" / name, out / "data" / name, out / "params" / f"{name}.yaml"
    if (run_dir / "report" / "scores.csv").is_file() and not again:
        print(f"{name}: kept (its report exists; --again runs it anew)", flush=True)
        return []
    base = {**family_overrides(family, split, cases), "run.name": name, "run.run_dir": str(run_dir),
            "run.device": device, **overrides}
    phantom = write_params(params_path, params_file, base).data.phantom
    write_dataset(data_root, phantom, progress=True)
    write_params(params_path, params_file, {**base, "data.data_root": str(data_root)})
    if again:
        shutil.rmtree(run_dir, ignore_errors=True)
    # an interrupted family resumes (its fits from their checkpoints): the matrix takes hours
    return run_stages(run_dir, params_path, out / "logs", timeout_s, stages=STAGES, fresh=False)


def family_scores(out: Path, family: str, split: str) -> pd.DataFrame:
    """The family's report scores against the truth, for the matrix's sources and the classes its stage 1
    repaired (``stage1.classes``; the report scores an unrepaired class as empty), empty when it has none."""
    from nearfix_lib.core.scores import read_scores
    from nearfix_lib.core.workspace import open_run

    run_dir = out / "runs" / f"{family}_{split}"
    scores = read_scores(run_dir / "report")
    if scores.empty:
        return scores
    run = open_run(run_dir, discover=False)
    repaired = run.params.stage1.classes or list(run.table.keys)
    return scores[(scores["reference"] == "truth") & scores["source"].isin(SOURCES) & scores["class"].isin(repaired)]


def matrix_table(scores: pd.DataFrame, family: str, split: str) -> pd.DataFrame:
    """Mean over the family's cases per class and source (``MATRIX_COLUMNS``)."""
    import pandas as pd

    if scores.empty:
        return pd.DataFrame(columns=MATRIX_COLUMNS)
    grouped = scores.groupby(["class", "source"], sort=False)
    table = grouped[["dice", "hd95", "assd", "nsd", "n_comp", "expected", "at_expected"]].mean()
    table["n_cases"] = grouped["case"].nunique()
    table = table.reset_index().assign(family=family, split=split)
    return table[MATRIX_COLUMNS]


def verdicts(scores: pd.DataFrame, family: str, split: str) -> pd.DataFrame:
    """The targets per class and repair, on the cases both the input and the repair have: mean Dice
    not below the noisy input's, mean HD95 not above it (over the cases where both maps hold the
    class; a repair that empties a class the input had misses the target); for the coronaries also
    the share of cases ``COR_GAIN`` Dice above their noisy input at the expected component count
    (target ``COR_SHARE``). ASSD and NSD gains are reported beside them, not judged: where a fixed
    far error stays (a boundary the input moved and the repair follows), a repair that removes near-surface
    noise elsewhere raises HD95's percentile while its mean distance and surface Dice improve, and the
    reader needs both to tell that from a repair that moved away from the truth."""
    import pandas as pd

    rows = []
    for cls in dict.fromkeys(scores["class"]):
        sub = scores[scores["class"] == cls].set_index(["case", "source"])
        present = set(sub.index.get_level_values("source"))
        if "noisy" not in present:
            continue
        noisy = sub.xs("noisy", level="source")
        for source in (s for s in REPAIRS if s in present):
            both = noisy.merge(sub.xs(source, level="source"), left_index=True, right_index=True,
                               suffixes=("_noisy", "_rep"))
            dice_gain = float((both["dice_rep"] - both["dice_noisy"]).mean())
            finite = both["hd95_noisy"].notna() & both["hd95_rep"].notna()
            emptied = int((both["hd95_noisy"].notna() & both["hd95_rep"].isna()).sum())
            hd95_gain = float((both["hd95_noisy"] - both["hd95_rep"])[finite].mean())
            assd_gain = float((both["assd_noisy"] - both["assd_rep"])[finite].mean())
            nsd_gain = float((both["nsd_rep"] - both["nsd_noisy"]).mean())
            row = {"family": family, "split": split, "class": cls, "source": source, "dice_gain": dice_gain,
                   "hd95_gain": hd95_gain, "assd_gain": assd_gain, "nsd_gain": nsd_gain,
                   "dice_not_worse": dice_gain >= 0.0,
                   "hd95_not_worse": bool(hd95_gain >= 0.0 and not emptied), "cor_gain_share": float("nan")}
            ok = row["dice_not_worse"] and row["hd95_not_worse"]
            if cls == "Cor":
                gained = (both["dice_rep"] >= both["dice_noisy"] + COR_GAIN) & (both["at_expected_rep"] == 1.0)
                row["cor_gain_share"] = float(gained.mean())
                ok = ok and row["cor_gain_share"] >= COR_SHARE
            rows.append({**row, "ok": bool(ok)})
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def _surface_gains(row: pd.Series) -> str:
    """ASSD and NSD against the input, where the page that holds the row measured them."""
    if row[["assd_gain", "nsd_gain"]].isna().any():
        return ""
    return f", ASSD {-row['assd_gain']:+.2f} mm, NSD {row['nsd_gain']:+.3f}"


def missed_targets(verdict: pd.DataFrame, with_family: bool = True) -> str:
    """The verdict rows that miss a target, each with its Dice and HD95 (and ASSD, NSD) against the input,
    or "none"."""
    missed = verdict[~verdict["ok"].astype(bool)]
    return ", ".join((f"{r['family']} " if with_family else "") + f"{r['class']} {r['source']} (Dice "
                     f"{r['dice_gain']:+.3f}, HD95 {-r['hd95_gain']:+.2f} mm{_surface_gains(r)} against the input"
                     + (f", {r['cor_gain_share']:.0%} of cases gain {COR_GAIN}" if r["class"] == "Cor" else "") + ")"
                     for _, r in missed.iterrows()) or "none"


def _family_section(family: Family, table: pd.DataFrame, verdict: pd.DataFrame) -> str:
    if table.empty:
        return f"## {family.name}\n\n{family.about}. No report (see the stage rows below).\n"
    parts = [f"## {family.name}\n\n{family.about}; {int(table['n_cases'].max())} cases."]
    metrics = (("dice", "Dice", ".3f"), ("hd95", "HD95 (mm)", ".2f"), ("assd", "ASSD (mm)", ".2f"),
               ("nsd", "NSD (surface Dice at 1 mm)", ".3f"),
               ("at_expected", "cases at the expected component count", ".3f"))
    for metric, label, fmt in metrics:
        wide = table.pivot(index="class", columns="source", values=metric)
        wide = wide.reindex(index=list(dict.fromkeys(table["class"])), columns=[s for s in SOURCES if s in wide])
        parts.append(f"**{label}**\n\n" + wide.to_markdown(floatfmt=fmt))
    parts.append(f"Targets missed: {missed_targets(verdict, with_family=False)}.")
    return "\n\n".join(parts) + "\n"


def page(families: list[Family], tables: dict, verdict_tables: dict, verdict: pd.DataFrame, split: str,
         conditions: str, stage_rows: pd.DataFrame) -> str:
    """``robustness.md``: the verdict summary, then each family's tables, all from the CSVs' rows."""
    summary = "no family has a report yet"
    if not verdict.empty:
        wide = verdict.pivot_table(index="family", columns=["source", "class"], values="dice_gain", sort=False)
        wide.columns = [f"{s} {c}" for s, c in wide.columns]
        missed = verdict[~verdict["ok"].astype(bool)]
        summary = (f"Mean Dice gain over the noisy input per family (repair - noisy; negative = worse than the "
                   f"input):\n\n{wide.to_markdown(floatfmt='+.3f')}\n\n"
                   f"{len(missed)} of {len(verdict)} (family, class, repair) pairs miss a target: mean Dice or HD95 "
                   f"worse than the noisy input, or, for the coronaries, fewer than {COR_SHARE:.0%} of the cases "
                   f"{COR_GAIN} Dice above their input at the expected component count.")
    sections = [_family_section(f, tables[f.name], verdict_tables[f.name]) for f in families]
    stages = "all kept from earlier runs" if stage_rows.empty else stage_rows.to_markdown(index=False, floatfmt=".1f")
    return (f"{conditions}\n\n## Verdicts ({split} seeds)\n\n{summary}\n\n" + "\n".join(sections)
            + f"\n## Stages run by this invocation\n\n{stages}\n")


def shown_path(path: Path) -> str:
    """A path as a page shows it: relative to the project when inside it (the families file, by default)."""
    path = path.resolve()
    return str(path.relative_to(PROJECT)) if path.is_relative_to(PROJECT) else str(path)


def conditions(params_file: str, overrides: dict, cases: int, split: str, families: list[Family], out: Path,
               families_file: Path = FAMILIES_FILE) -> str:
    what = ", ".join(f"`{k}: {v}`" for k, v in overrides.items()) or "none"
    versions = {f.name: out / "runs" / f"{f.name}_{split}" / "version.txt" for f in families}
    ran = ", ".join(f"{name} `{path.read_text().strip()}`" for name, path in versions.items() if path.is_file())
    return (f"Families of `{shown_path(families_file)}` ({', '.join(f.name for f in families)}), {cases} cases each, "
            f"**{split}** seeds. Each family: its phantom, then prepare, stage 1, stage 2 and the report on "
            f"`{params_file}`, overrides {what}. Scores against the phantom's truth, mean over the cases; "
            "`closing` and `gaussian` are the classical baselines of the report; verdicts.csv's `hd95_gain` and "
            "`assd_gain` are noisy minus repair, `dice_gain` and `nsd_gain` repair minus noisy (positive: better). "
            f"Code version of each family's run: {ran or 'none ran'}.")


def read_pages(pages: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The matrix and verdict rows of earlier invocations' pages (their ``robustness.csv`` and
    ``verdicts.csv``), concatenated (a page from before a column existed gets it empty); a (family, split,
    class, source) row in two pages is an error that names both, since the joint table must say which run
    each figure comes from."""
    import pandas as pd

    tables, verdict_tables, origin = [], [], {}
    for path in pages:
        for name in ("robustness.csv", "verdicts.csv"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: missing (a page of `python -m benchmarks.robustness`?)")
        verdict = pd.read_csv(path / "verdicts.csv")
        for key in verdict[["family", "split", "class", "source"]].itertuples(index=False):
            if tuple(key) in origin:
                raise ValueError(f"{path / 'verdicts.csv'}: {' '.join(map(str, key))} is also in "
                                 f"{origin[tuple(key)] / 'verdicts.csv'}; join pages of disjoint classes or families")
            origin[tuple(key)] = path
        tables.append(pd.read_csv(path / "robustness.csv"))
        verdict_tables.append(verdict)
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=MATRIX_COLUMNS)
    verdict = pd.concat(verdict_tables, ignore_index=True) if verdict_tables else pd.DataFrame(columns=VERDICT_COLUMNS)
    return table.reindex(columns=MATRIX_COLUMNS), verdict.reindex(columns=VERDICT_COLUMNS)


def combined_page(families: list[Family], classes: list[str], verdict: pd.DataFrame, pages: list[Path],
                  commands: list[str]) -> str:
    """The joint verdicts, family x class: stage 1 / stage 2 gains over the noisy input (Dice; HD95 in
    mm, positive = nearer the truth), each pair's verdict, the missed pairs and the pairs not run."""
    import pandas as pd

    names = [f.name for f in families if f.name in set(verdict["family"])]
    order = [c for c in classes if c in set(verdict["class"])]
    by_pair = verdict.set_index(["family", "class", "source"])
    pairs = [(f, c) for f in names for c in order]

    def cell(family: str, cls: str, column: str, fmt: str) -> str:
        if (family, cls, "stage1") not in by_pair.index:
            return "not run"
        rows = [by_pair.loc[(family, cls, s)] for s in REPAIRS if (family, cls, s) in by_pair.index]
        values = " / ".join("–" if pd.isna(r[column]) else format(r[column], fmt) for r in rows)
        return values + ("" if all(bool(r["ok"]) for r in rows) else " ✗")

    grids = {column: pd.DataFrame([[cell(f, c, column, fmt) for c in order] for f in names], index=names,
                                  columns=order).rename_axis("family")
             for column, fmt in (("dice_gain", "+.3f"), ("hd95_gain", "+.2f"), ("assd_gain", "+.2f"))}
    met = int(verdict["ok"].astype(bool).sum())
    absent = [f"{f} {c}" for f, c in pairs if (f, c, "stage1") not in by_pair.index]
    listed = "\n".join(f"* [{p}]({p}/robustness.md): `{cmd}`" for p, cmd in zip(pages, commands))
    return (f"Joined from the pages of earlier invocations (none rerun here; each page states its code "
            f"version, parameters and load):\n\n{listed}\n\n"
            f"## Verdicts ({', '.join(sorted(set(verdict['split'])))} seeds)\n\n"
            f"{met} of {len(verdict)} (family, class, repair) pairs meet every target "
            f"(mean Dice not below the noisy input's, mean HD95 not above it, and for the coronaries "
            f"{COR_SHARE:.0%} of the cases {COR_GAIN} Dice above the input at the expected component count); "
            f"{len(absent)} (family, class) pairs not run: {', '.join(absent) or 'none'}.\n\n"
            f"**Mean Dice gain over the noisy input, stage 1 / stage 2** (✗: a target missed)\n\n"
            f"{grids['dice_gain'].to_markdown()}\n\n"
            f"**Mean HD95 gain over the noisy input in mm, stage 1 / stage 2** (noisy - repair; positive: nearer "
            f"the truth)\n\n{grids['hd95_gain'].to_markdown()}\n\n"
            f"**Mean ASSD gain over the noisy input in mm, stage 1 / stage 2** (noisy - repair; reported, not judged; "
            f"–: a page from before ASSD was measured)\n\n{grids['assd_gain'].to_markdown()}\n\n"
            f"Targets missed: {missed_targets(verdict)}.\n")


ROUNDTRIP_CLASSES = ("Cor", "LAA", "PV")
ROUNDTRIP_COLUMNS = ["family", "split", "case", "class", "source", "resolution", "box_voxels", "dice",
                     "components", "components_before"]


def roundtrip_rows(family: Family, split: str, cases: int, params_file: str, resolutions: list[int]) -> list[dict]:
    """Each case's thin classes (noisy and true masks) through the class ROI grid of each resolution
    and back: ``prepare``'s resampling (linear, >= 0.5) there, the same back onto the original voxels."""
    import cc3d
    import numpy as np

    from nearfix_lib.core.classes import CARDIAC
    from nearfix_lib.core.config import load_params
    from nearfix_lib.core.geometry import paste_back, resample_mask, roi_box, roi_grid
    from nearfix_lib.core.metrics import dice
    from nearfix_lib.phantom.dataset import make_case

    params = load_params(params_file, family_overrides(family, split, cases))
    phantom, margin = params.data.phantom, params.prepare.class_margin
    rows = []
    for index in range(cases):
        case = make_case(index, phantom)
        for key in ROUNDTRIP_CLASSES:
            for source in ("noisy", "truth"):
                mask = getattr(case, source) == CARDIAC[key].index  # the phantom's own table
                box = roi_box(mask, margin, phantom.spacing, params.prepare.margin_unit)
                if box is None:
                    continue
                before = cc3d.connected_components(mask, connectivity=26, return_N=True)[1]
                for r in resolutions:
                    grid = roi_grid(box, r)
                    roi = resample_mask(mask, grid).astype(np.float32)
                    back = paste_back(roi, grid, box, mask.shape, order=1) >= 0.5
                    rows.append({"family": family.name, "split": split, "case": case.case_id, "class": key,
                                 "source": source, "resolution": r, "box_voxels": max(box.shape),
                                 "dice": dice(back, mask),
                                 "components": cc3d.connected_components(back, connectivity=26, return_N=True)[1],
                                 "components_before": before})
        print(f"{family.name} {split}: case {case.case_id} through the ROI grids", flush=True)
    return rows


def roundtrip_page(table: pd.DataFrame, conditions: str) -> str:
    mean = table.groupby(["family", "class", "source", "resolution"], sort=False)[
        ["box_voxels", "dice", "components", "components_before"]].mean().reset_index()
    parts = [conditions]
    for key in dict.fromkeys(mean["class"]):
        wide = mean[mean["class"] == key].pivot_table(index=["family", "source"], columns="resolution",
                                                       values="dice", sort=False)
        wide.columns = [f"R = {c}" for c in wide.columns]
        boxes = mean[mean["class"] == key].groupby(["family", "source"], sort=False)["box_voxels"].first()
        wide.insert(0, "box (voxels)", boxes)
        parts.append(f"## {key}: Dice of the round trip against the mask\n\n" + wide.to_markdown(floatfmt=".3f"))
        comps = mean[mean["class"] == key].pivot_table(index=["family", "source"], columns="resolution",
                                                        values="components", sort=False)
        comps.columns = [f"R = {c}" for c in comps.columns]
        comps.insert(0, "before", mean[mean["class"] == key].groupby(["family", "source"], sort=False)[
            "components_before"].first())
        parts.append(f"**{key}: components after the round trip (mean over cases)**\n\n"
                     + comps.to_markdown(floatfmt=".2f"))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from benchmarks.bench import stamped_command, write_report
    from nearfix_lib.core.config import mapping_parameter
    from nearfix_lib.core.io import write_text

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/robustness")
    ap.add_argument("--families-file", default=str(FAMILIES_FILE))
    ap.add_argument("--families", nargs="+", default=[], help="a subset, by name (default: every family)")
    ap.add_argument("--split", choices=("heldout", "tuning"), default="heldout")
    ap.add_argument("--cases", type=int, default=0, help="cases per family (default: the families file's)")
    ap.add_argument("--params", default="params/phantom_1mm.yaml")
    ap.add_argument("--overrides", type=lambda v: mapping_parameter(v, "--overrides"), default={},
                    help="dotted keys as YAML/JSON, e.g. '{stage1.classes: [LV, LAA, Cor, PV]}'")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--again", action="store_true", help="run families whose report exists anew")
    ap.add_argument("--timeout-s", type=float, default=12 * 3600, help="per stage")
    ap.add_argument("--combine", nargs="+", default=[], metavar="PAGE",
                    help="no runs: join these earlier pages' CSVs (disjoint classes or families) into one table")
    ap.add_argument("--roundtrip", type=int, nargs="+", default=[],
                    help="no fits: the thin classes through class ROI grids of these resolutions and back")
    args = ap.parse_args(argv)

    file_cases, families = load_families(Path(args.families_file))
    unknown = set(args.families) - {f.name for f in families}
    if unknown:
        ap.error(f"unknown families {sorted(unknown)} (the file has {[f.name for f in families]})")
    families = [f for f in families if not args.families or f.name in args.families]
    cases, out = args.cases or file_cases, Path(args.out).resolve()
    if args.combine:
        from nearfix_lib.core.classes import CARDIAC

        pages = [Path(p) for p in args.combine]
        table, verdict = read_pages(pages)
        shown = [Path(os.path.relpath(p.resolve(), out)) for p in pages]  # links that work from the page
        commands = [stamped_command(p / "robustness.md") for p in pages]
        text = combined_page(families, CARDIAC.keys, verdict, shown, commands)
        write_text(out / "verdicts.csv", verdict.to_csv(index=False))
        write_report(out, "robustness", table, text, argv, module="benchmarks.robustness")
        return 0
    if args.roundtrip:
        rows = [r for f in families for r in roundtrip_rows(f, args.split, cases, args.params, args.roundtrip)]
        table = pd.DataFrame(rows, columns=ROUNDTRIP_COLUMNS)
        names = ", ".join(f.name for f in families)
        about = (f"Families of `{shown_path(Path(args.families_file))}` ({names}), {cases} cases "
                      f"each, **{args.split}** seeds; `{args.params}`'s class margin. No fit: each thin class's mask "
                      "(the noisy input and the truth) resampled onto its class ROI grid of R^3 voxels as `prepare` "
                      "does (linear, >= 0.5) and back onto the original voxels the same way, against itself. A "
                      "stage-1 field fitted on that grid can do no better than this.")
        write_report(out, "roundtrip", table, roundtrip_page(table, about), argv, module="benchmarks.robustness")
        return 0
    stage_rows, tables, verdict_tables = [], {}, {}
    for family in families:
        rows = run_family(family, args.split, cases, out, args.params, args.overrides, args.device, args.timeout_s,
                          args.again)
        stage_rows += [{"family": family.name, **row} for row in rows]
        scores = family_scores(out, family.name, args.split)
        tables[family.name] = matrix_table(scores, family.name, args.split)
        verdict_tables[family.name] = verdicts(scores, family.name, args.split)
    stages = pd.DataFrame(stage_rows)
    if not stages.empty:
        stages = stages[["family", "stage", "peak_rss_mb", "wall_s", "status"]]
    verdict = pd.concat([v for v in verdict_tables.values() if not v.empty] or [pd.DataFrame(columns=VERDICT_COLUMNS)])
    write_text(out / "verdicts.csv", verdict.reset_index(drop=True).to_csv(index=False))
    table = pd.concat([t for t in tables.values() if not t.empty] or [pd.DataFrame(columns=MATRIX_COLUMNS)])
    text = page(families, tables, verdict_tables, verdict, args.split,
                conditions(args.params, args.overrides, cases, args.split, families, out, Path(args.families_file)),
                stages)
    write_report(out, "robustness", table.reset_index(drop=True), text, argv, module="benchmarks.robustness")
    failed = not stages.empty and (stages["status"] != "ok").any()
    return 1 if failed or any(t.empty for t in tables.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
