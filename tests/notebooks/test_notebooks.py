"""Every notebook runs headless through papermill with tiny parameters, in pipeline order."""

import json

import papermill as pm
import pytest
from conftest import PROJECT
from params_for_tests import TEST_PARAMS  # the tests' tiny run, shared with the whole suite

NOTEBOOKS = sorted((PROJECT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_parameters_cell(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code")
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    src = "".join(tagged[0]["source"])
    for name in ("params_file", "data_root", "run_dir", "device", "overrides"):
        assert f"{name} =" in src


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nbrun")


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, run_dir):
    out = run_dir / "notebooks" / path.name
    out.parent.mkdir(exist_ok=True)
    pm.execute_notebook(str(path), str(out), kernel_name="python3", cwd=str(PROJECT), progress_bar=False,
                        parameters={"params_file": TEST_PARAMS, "run_dir": str(run_dir)})
    assert (run_dir / "params.yaml").is_file()
    if path.stem.startswith("00"):
        assert (run_dir / "inspection" / "scores.csv").is_file()
        assert (run_dir / "inspection" / "components.png").stat().st_size > 1000
    if path.stem.startswith("01"):
        crops = json.loads((run_dir / "prepared" / "crops.json").read_text())
        assert sorted(crops["cases"]) == ["1", "2"]
        assert (run_dir / "prepared" / "1" / "class_Cor.npz").is_file()
    if path.stem.startswith("02"):  # default parameter cls = 9
        assert (run_dir / "stage1" / "Cor" / "masks" / "2.nii.gz").is_file()
        assert (run_dir / "stage1" / "Cor" / "curves.png").is_file()
    if path.stem.startswith("03"):  # only Cor was fitted above: the other classes are fused from the input
        import nibabel as nib
        import numpy as np

        fused = nib.load(str(run_dir / "stage2" / "labels" / "1.nii.gz"))
        source = nib.load(str(run_dir / "phantom" / "segmentations" / "1.label.nii.gz"))
        assert fused.shape == source.shape and np.allclose(fused.affine, source.affine)
        assert {0, 3, 9} <= set(np.unique(np.asarray(fused.dataobj)))  # LV from the input, Cor repaired
        assert not (run_dir / "stage2" / "roi").exists()  # stage 3 learns on the original grid here
        audit = (run_dir / "stage2" / "audit.csv").read_text()
        assert "bridge,Cor" in audit and "input,Myo" in audit and "input,Cor" not in audit
    if path.stem.startswith("04"):
        import nibabel as nib
        import numpy as np

        from nearfix_lib.field.unified import UnifiedModel

        source = nib.load(str(run_dir / "phantom" / "segmentations" / "2.label.nii.gz"))
        decoded = UnifiedModel.load(run_dir / "stage3" / "unified.pt").decode("2")
        assert decoded.shape == source.shape and decoded.dtype == np.uint8
        written = nib.load(str(run_dir / "stage3" / "labels" / "2.nii.gz"))
        assert np.allclose(written.affine, source.affine) and np.array_equal(np.asarray(written.dataobj), decoded)
        assert (run_dir / "stage3" / "distillation.csv").is_file()
        assert (run_dir / "stage3" / "new_cases" / "holdout" / "last.pt").is_file()
        import pandas as pd

        for folder, pairs in (("stage3", {("stage3", "lref"), ("stage3", "truth"), ("noisy", "truth"),
                                          ("stage2", "truth")}),
                              ("stage3/no_distill", {("no_distill", "lref"), ("no_distill", "truth")}),
                              ("stage3/new_cases/holdout", {("noisy", "truth"), ("stage3", "truth")})):
            scores = pd.read_csv(run_dir / folder / "scores.csv")
            assert set(zip(scores["source"], scores["reference"])) == pairs, folder
    if path.stem.startswith("05"):
        import pandas as pd

        scores = pd.read_csv(run_dir / "report" / "scores.csv")
        assert set(scores["source"]) == {"noisy", "gaussian", "closing", "stage1", "stage2", "stage3"}
        assert sorted(scores["case"].astype(str).unique()) == ["1", "2"] and scores["dice"].between(0, 1).all()
        summary = (run_dir / "report" / "summary.md").read_text()
        assert "## Dice against the truth" in summary and "bars.png" in summary
        for figure in ("bars.png", "contours_1_LAA.png", "surface_1_LAA.png"):
            assert (run_dir / "report" / figure).stat().st_size > 5000


@pytest.mark.notebook
def test_experiment_page_is_generated_from_the_runs_csvs(run_dir, tmp_path):
    """After the notebooks: `nearfix page` writes every stage's section, each number a mean of its CSV."""
    import pandas as pd

    from nearfix_lib.core.scores import pivot
    from nearfix_lib.stages.cli import main

    out = run_dir / "page.md"  # kept beside the run, to read when the test fails
    assert main(["page", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    for title in ("The noisy labels", "Stage 1", "Stage 2", "Stage 3: the unified model", "Stage 3: distillation",
                  "Stage 3: a case it never saw", "Every source against the truth", "Anatomical checks", "Timings"):
        assert f"## {title}" in page, title
    assert "| params file | `params/test.yaml`" in page and "| code version | `0." in page
    report = pivot(pd.read_csv(run_dir / "report" / "scores.csv"), "dice")
    section = page.split("## Every source against the truth")[1].split("## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| Cor "))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert [float(c) for c in cells] == [round(v, 3) for v in report.loc["Cor"]]
    # a run without the no-distillation comparison (the judging run's params) has no such section
    import shutil

    plain = tmp_path / run_dir.name
    shutil.copytree(run_dir, plain, ignore=shutil.ignore_patterns("no_distill"))
    assert main(["page", str(plain), "--out", str(out)]) == 0
    assert "## Stage 3: distillation" not in out.read_text() and "## Stage 3: the unified model" in out.read_text()


@pytest.mark.notebook
def test_many_cases_fits_each_size_on_its_first_cases_and_scores_the_same_unseen_case(run_dir, tmp_path):
    """After the notebooks: `benchmarks.many_cases` fits F_Θ on the run's first 1 and on both cases,
    each in its own folder beside the run's shared outputs, and the same held-out case in both."""
    import pandas as pd

    from benchmarks.many_cases import COLUMNS, main

    out = tmp_path / "many"
    assert main(["--run", str(run_dir), "--sizes", "1", "2", "--holdouts", "1", "--out", str(out)]) == 0
    table = pd.read_csv(out / "many_cases.csv", dtype={"case": str})
    assert list(table.columns) == COLUMNS and set(table["n_train"]) == {1, 2}
    assert set(table["source"]) == {"noisy", "stage3"} and set(table["case"]) == {"holdout0"}
    assert table["dice"].between(0, 1).all()
    noisy = table[table["source"] == "noisy"].pivot(index="class", columns="n_train", values="dice")
    assert noisy[1].equals(noisy[2])  # the same unseen case, whatever F_Θ learned from
    assert sorted(p.name for p in (out / "n1" / "stage2" / "labels").iterdir()) == ["1.nii.gz"]
    assert "no usable stage-2 L^ref" in (out / "n1" / "skipped.csv").read_text()
    assert trained_case_ids(out / "n1") == ["1"] and trained_case_ids(out / "n2") == ["1", "2"]
    assert (run_dir / "stage3" / "unified.pt").stat().st_mtime < (out / "n1" / "stage3" / "unified.pt").stat().st_mtime
    page = (out / "many_cases.md").read_text()
    assert "| Cor |" in page and "N = 2 Dice" in page


def trained_case_ids(run):
    from nearfix_lib.field.unified import UnifiedModel

    return list(UnifiedModel.load(run / "stage3" / "unified.pt").case_ids)
