"""The GPU benchmark's machinery on the CPU at a tiny size (its figures mean nothing here): the step
variants and the decodes in their own processes, the CSV's rows and the extrapolation from them."""

import pandas as pd
import pytest

from benchmarks.gpu import extrapolate, main
from nearfix_lib.core.config import load_params


def test_the_gpu_script_runs_its_steps_and_decodes_and_extrapolates(tmp_path):
    code = main(["--out", str(tmp_path), "--params", "params/test.yaml", "--step-params", "params/test.yaml",
                 "--device", "cpu", "--cases", "16", "--epochs", "2",
                 "--steps", "1", "--realsize-spacing", "1.5", "1.5", "2.0", "--budget-s", "100000",
                 "--skip-compile"])
    assert code == 0
    table = pd.read_csv(tmp_path / "gpu.csv")
    value = table.set_index(["what", "variant"])["value"]
    for stage, variant in (("stage1", "bf16"), ("stage3", "device_batches")):
        assert value[(f"{stage}_points_per_s", variant)] > 0
    decode_s = min(value[("decode_realsize", "dense")], value[("decode_realsize", "coarse_to_fine")])
    assert value[("extrapolated_hours", "decodes")] == pytest.approx(11 * 16 * decode_s / 3600)
    assert value[("extrapolated_hours", "total")] > 0
    assert "GPU benchmark" in (tmp_path / "gpu.md").read_text()


def test_extrapolation_counts_ten_class_fits_and_the_stage3_fit_at_the_fastest_step():
    params = load_params("params/phantom_1mm.yaml")
    value = {("stage1_ms_per_step", "bf16"): 10.0, ("stage1_ms_per_step", "bf16_compile"): 5.0,
             ("stage3_ms_per_step", "device_batches"): 20.0}
    rows = {r["variant"]: r["value"] for r in extrapolate(value, params, 1000, decode_s=2.0)}
    steps = 125  # 1,000 cases, 8 per step
    assert rows["stage1_fit"] == 10 * params.stage1.train.epochs * steps * 5.0 / 3.6e6
    assert rows["stage3_fit"] == params.stage3.train.epochs * steps * 20.0 / 3.6e6
    assert rows["decodes"] == 11 * 1000 * 2.0 / 3600
    assert rows["total"] == rows["stage1_fit"] + rows["stage3_fit"] + rows["decodes"]
