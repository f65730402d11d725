"""napari overlays: class colours in the labels colormap, and a real viewer on Xvfb with a screenshot."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROJECT, xvfb_run
from params_for_tests import load_test_params

from nearfix_lib.core.classes import CARDIAC

napari = pytest.importorskip("napari", reason="napari is not installed (pip install -e .[viewer])")


def test_labels_colormap_uses_the_class_table_colours():
    from nearfix_lib.viz.napari_viewer import napari_label_colormap

    cmap = napari_label_colormap(CARDIAC)
    mapped = cmap.map(np.array([0, CARDIAC["Cor"].index, CARDIAC["LV"].index]))
    assert mapped[0, 3] == 0.0  # background transparent
    assert np.allclose(mapped[1, :3], np.asarray(CARDIAC["Cor"].colour) / 255.0, atol=1e-3)
    assert np.allclose(mapped[2, :3], np.asarray(CARDIAC["LV"].colour) / 255.0, atol=1e-3)


@pytest.fixture
def tiny_run(tmp_path):
    """A run folder with the phantom, and case 1's 'stage 2' labels (the noisy ones, for the layers)."""
    from nearfix_lib.core.workspace import open_run
    from nearfix_lib.stages.runs import start_run

    # one case is all the viewer shows (and all the fixture checks open_run finds)
    params = load_test_params({"data.phantom.n_cases": 1}, run_dir=str(tmp_path / "run"))
    run = start_run(params, progress=False)
    (run.dir / "stage2" / "labels").mkdir(parents=True)
    shutil.copy(run.cases[0].label, run.dir / "stage2" / "labels" / "1.nii.gz")
    before = (run.dir / "params.yaml").stat().st_mtime_ns
    opened = open_run(run.dir)
    assert [c.case_id for c in opened.cases] == ["1"] and (run.dir / "params.yaml").stat().st_mtime_ns == before
    return run.dir


def test_viewer_screenshot_shows_the_class_colours_under_xvfb(tiny_run, tmp_path):
    if shutil.which("xvfb-run") is None:
        pytest.skip("no display server: xvfb-run is not installed (apt-get install xvfb)")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([*xvfb_run("1280x1024x24"), sys.executable, "-m",
                           "nearfix_lib.viz.view",
                           str(tiny_run), "1", "--screenshot", str(shot)], cwd=PROJECT, capture_output=True,
                          text=True, timeout=240)
    if proc.returncode != 0 and "cannot open display" in (proc.stderr + proc.stdout).lower():
        pytest.skip(f"Xvfb could not start: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import matplotlib.image as mpimg

    rgb = (mpimg.imread(shot)[..., :3] * 255).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    orange = (r - b > 100) & (r > g) & (g > b)  # Myo (230, 159, 0) over the CT
    light_blue = (b - r > 60) & (g - r > 40)  # RV (100, 200, 255)
    grey = (np.abs(r - g) < 8) & (np.abs(g - b) < 8) & (r > 40)  # CT
    assert orange.sum() > 200 and light_blue.sum() > 200 and grey.sum() > 200


def test_viewer_without_a_display_says_so_in_one_line(tiny_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = subprocess.run([sys.executable, "-m", "nearfix_lib.viz.view", str(tiny_run), "1", "--screenshot",
                           str(tmp_path / "shot.png")], cwd=PROJECT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no display") and "xvfb-run -a" in lines[0]
    assert not (tmp_path / "shot.png").exists()


def test_the_viewer_lists_the_classes_stage1_audit_flagged(tiny_run):
    """What the text overlay shows, read from stage 1's score rows (no display needed)."""
    import dataclasses

    import pandas as pd

    from nearfix_lib.core.workspace import open_run
    from nearfix_lib.viz.napari_viewer import audit_note

    run = open_run(tiny_run)
    assert audit_note(run, "1") == ""  # no stage 1 yet: nothing flagged
    rows = [{"case": case, "class": key, "source": "stage1", "reference": "noisy", "dice": 0.7, "audit_flagged": flag,
             "audit_kept_input": flag, "audit_reasons": "centre line kept 0.412 < 0.8" if flag else ""}
            for case, key, flag in (("1", "Cor", True), ("2", "Cor", False), ("1", "LV", False))]
    # the coronaries' boundary is placed by the CT where their input was not kept (stage1.ct_edge)
    rows[1].update(edge_decided=0.968, edge_contrast_noise=2.43)
    rows[1].update(path_joined=2, path_added=57, path_contrast_noise=3.1)  # pieces joined on the CT (ct_path)
    rows[1].update(path_dark_dropped=176)  # and a blob darker than the vessel's surroundings removed
    # and its trees parted (stage1.anatomy): between their origins, then for the count
    rows[1].update(anatomy_unattached_voxels=0, anatomy_origin_split_voxels=9, anatomy_split_voxels=3,
                   anatomy_enclosed_voxels=40)  # and a blob inside a chamber's labels removed
    for key in ("Cor", "LV"):
        folder = run.dir / "stage1" / key
        folder.mkdir(parents=True)
        pd.DataFrame([r for r in rows if r["class"] == key]).to_csv(folder / "scores.csv", index=False)
    # the coronaries' action is repair_input by default; clean_input says the input was only cleaned
    assert audit_note(run, "1") == ("Cor: repair flagged (centre line kept 0.412 < 0.8); "
                                    "M^ref is its input, repaired without the field")
    cleaning = load_test_params({"stage1.overrides.Cor.audit": {"action": "clean_input"}}, run_dir=str(run.dir))
    assert audit_note(dataclasses.replace(run, params=cleaning), "1").endswith("M^ref is its input, cleaned")
    assert audit_note(run, "2") == ("Cor: boundary on the CT's edge over 97% of its band (contrast / noise 2.4)\n"
                                    "Cor: 2 piece(s) joined along the CT's lumen (57 voxels)\n"
                                    "Cor: piece(s) darker than the vessel's surroundings on the CT removed "
                                    "(176 voxels)\n"
                                    "Cor: piece(s) enclosed by other classes' labels removed (40 voxels)\n"
                                    "Cor: pieces parted where the repair joined them over another class (12 voxels)")
    assert audit_note(run, "3") == ""
