import pytest
from conftest import PROJECT

from nearfix_lib.core.config import load_params, params_from_yaml_text, project_root, resolve_path


def test_demo_inherits_default_and_only_overrides_what_differs():
    demo = load_params(PROJECT / "params/demo.yaml")
    default = load_params(PROJECT / "params/default.yaml")
    assert demo.run.name == "demo" and default.run.name == "default"
    assert demo.prepare.class_resolution == 48 and default.prepare.class_resolution == 128
    assert default.prepare.heart_resolution == 256
    assert demo.prepare.heart_margin == default.prepare.heart_margin  # inherited
    assert demo.data.phantom.shape == (64, 60, 48)
    assert isinstance(demo.data.phantom.shape, tuple)
    assert demo.data.phantom.fov_mm == default.data.phantom.fov_mm


def test_overrides_and_notebook_parameters_win():
    p = load_params(PROJECT / "params/demo.yaml",
                    {"prepare.class_resolution": "48", "data.phantom": {"n_cases": 2}},
                    data_root="somewhere", run_dir="outputs/x", device="cpu")
    assert p.prepare.class_resolution == 48
    assert p.data.phantom.n_cases == 2 and p.data.phantom.shape == (64, 60, 48)
    assert (p.data.data_root, p.run.run_dir, p.run.device) == ("somewhere", "outputs/x", "cpu")
    # empty notebook parameters leave the file's values alone
    q = load_params(PROJECT / "params/demo.yaml", data_root="", run_dir="", device="")
    assert q.run.device == "cpu" and q.data.data_root == ""


def test_mistakes_fail_at_load_time_naming_the_key(tmp_path):
    (tmp_path / "base.yaml").write_text("prepare:\n  class_resolution: 16\n")
    (tmp_path / "typo.yaml").write_text("inherit: base.yaml\nprepare:\n  class_resolutoin: 64\n")
    with pytest.raises(ValueError, match="class_resolutoin"):
        load_params(tmp_path / "typo.yaml")
    (tmp_path / "type.yaml").write_text("prepare:\n  class_resolution: big\n")
    with pytest.raises(ValueError, match="prepare.class_resolution: expected an integer"):
        load_params(tmp_path / "type.yaml")
    (tmp_path / "unit.yaml").write_text("prepare:\n  margin_unit: inch\n")
    with pytest.raises(ValueError, match="margin_unit"):
        load_params(tmp_path / "unit.yaml")
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_params(tmp_path / "a.yaml")
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "shape.yaml").write_text("data:\n  phantom:\n    shape: [10, 20]\n")
    with pytest.raises(ValueError, match="expected 3 values"):
        load_params(tmp_path / "shape.yaml")


def test_resolved_params_round_trip_through_the_run_folder_yaml():
    p = load_params(PROJECT / "params/demo.yaml", {"run.seed": 7})
    q = params_from_yaml_text(p.to_yaml())
    assert q == p


def test_paths_resolve_from_notebooks_folder_too(monkeypatch):
    monkeypatch.chdir(PROJECT / "notebooks")
    assert project_root() == PROJECT
    assert resolve_path("params/demo.yaml") == PROJECT / "params/demo.yaml"
    assert load_params("params/demo.yaml").run.name == "demo"


def test_overrides_given_as_text_like_papermill_p_passes_them():
    as_json = load_params(PROJECT / "params/demo.yaml", '{"stage1.train.epochs": 20, "data.max_cases": 2}')
    as_yaml = load_params(PROJECT / "params/demo.yaml", "stage1.train: {epochs: 20}\ndata.max_cases: 2")
    assert as_json.stage1.train.epochs == as_yaml.stage1.train.epochs == 20
    assert as_json.data.max_cases == as_yaml.data.max_cases == 2
    assert load_params(PROJECT / "params/demo.yaml", "  ") == load_params(PROJECT / "params/demo.yaml", {})
    with pytest.raises(ValueError, match=r"^parameter overrides: expected a mapping"):
        load_params(PROJECT / "params/demo.yaml", "[1, 2]")
    with pytest.raises(ValueError, match=r"^parameter overrides: not valid YAML/JSON"):
        load_params(PROJECT / "params/demo.yaml", '{"stage1.train.epochs": [20')


def test_default_yaml_is_the_dataclass_defaults():
    """One source of defaults: params/default.yaml only restates (and comments) the dataclasses."""
    from nearfix_lib.core.config import Params

    assert load_params(PROJECT / "params/default.yaml").to_dict() == {**Params().to_dict(),
                                                                       "source": str(PROJECT / "params/default.yaml")}
    assert Params().stage1.for_class("Cor").cleanup.bridge_gap_mm == 16.0


def test_a_typo_in_a_class_override_fails_when_the_params_load():
    with pytest.raises(ValueError, match=r"stage1\.overrides\.LAA.*unknown key\(s\) \['threshhold'\]"):
        load_params(PROJECT / "params/demo.yaml", {"stage1.overrides.LAA": {"threshhold": 0.4}})
    with pytest.raises(ValueError, match=r"stage1\.overrides\.Cor\.cleanup.*unknown key\(s\) \['bridge_gap'\]"):
        load_params(PROJECT / "params/demo.yaml", {"stage1.overrides.Cor.cleanup.bridge_gap": 3.0})


def test_an_anchor_whose_thresholds_cross_fails_when_the_params_load():
    with pytest.raises(ValueError, match=r"stage1\.overrides\.Cor.*keep_above < add_above"):
        load_params(PROJECT / "params/demo.yaml",
                    {"stage1.overrides.Cor.anchor": {"keep_above": 0.8, "add_above": 0.5}})
    cor = load_params(PROJECT / "params/default.yaml").stage1.for_class("Cor").anchor
    assert cor.enabled and cor.keep_above < 0.3 < cor.add_above  # around the coronaries' threshold


def test_enclosed_by_shares_are_checked_and_the_coronaries_name_the_aorta():
    """``anatomy.enclosed_by``: a share outside (0, 1] is refused where the params are read; the coronaries'
    default names the aorta, the other classes none."""
    with pytest.raises(ValueError, match=r"anatomy.enclosed_by: Ao's share must lie in \(0, 1\], got 1.5"):
        load_params(PROJECT / "params/demo.yaml", {"stage1.overrides.Cor.anatomy.enclosed_by": {"Ao": 1.5}})
    stage1 = load_params(PROJECT / "params/default.yaml").stage1
    assert stage1.for_class("Cor").anatomy.enclosed_by == {"Ao": 0.8}
    assert stage1.for_class("LV").anatomy.enclosed_by == {}


def test_the_coronaries_replace_a_field_the_audit_rejects_by_their_input_repaired_without_it():
    """``audit.action``: the coronaries' default ``repair_input``; the other classes only flag; an
    unknown action is refused where the params are read."""
    stage1 = load_params(PROJECT / "params/default.yaml").stage1
    assert stage1.for_class("Cor").audit.action == "repair_input"
    assert stage1.for_class("LV").audit.action == "flag"
    with pytest.raises(ValueError, match="audit.action must be one of"):
        load_params(PROJECT / "params/demo.yaml", {"stage1.overrides.Cor.audit.action": "repair"})
